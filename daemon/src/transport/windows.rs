//! Windows specifics: a named pipe whose security descriptor admits only the daemon's own user
//! (and SYSTEM), so "same user" holds on Windows as the uid check makes it hold on Unix.

use std::{io, path::Path};

use interprocess::{
    local_socket::{GenericNamespaced, ListenerOptions, ToNsName},
    os::windows::{local_socket::ListenerOptionsExt, security_descriptor::SecurityDescriptor},
};
use widestring::U16CString;

use super::Listener;
use crate::error::StartError;

/// SDDL: protected DACL, full access for the owner (the daemon's user) and LocalSystem only.
const PIPE_SDDL: &str = "D:P(A;;GA;;;OW)(A;;GA;;;SY)";

/// The pipe name `\\.\pipe\miniapp-brokerd`.
pub fn default_address() -> std::path::PathBuf {
    std::path::PathBuf::from("miniapp-brokerd")
}

/// Named pipes need no directory; the data dir still does.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)
}

/// The data dir under `%LOCALAPPDATA%` inherits that profile directory's ACL (the user, SYSTEM and
/// Administrators); no ownership check is made on Windows (see docs/windows.md).
pub fn create_owned_dir(dir: &Path, what: &'static str) -> Result<(), StartError> {
    create_private_dir(dir).map_err(|e| StartError::UnsafeDir {
        what,
        path: dir.display().to_string(),
        why: e.to_string(),
    })
}

/// Creates the named pipe listener.
pub async fn bind(name: &Path) -> Result<Listener, StartError> {
    let display = name.display().to_string();
    let listen_err = |source: io::Error| StartError::Listen { path: display.clone(), source };
    let pipe = display.clone();
    let ns_name = pipe.as_str().to_ns_name::<GenericNamespaced>().map_err(listen_err)?;
    let sddl = U16CString::from_str(PIPE_SDDL).map_err(|e| listen_err(io::Error::other(e.to_string())))?;
    let sd = SecurityDescriptor::deserialize(&sddl).map_err(listen_err)?;
    let inner =
        ListenerOptions::new().name(ns_name).security_descriptor(sd).create_tokio().map_err(|e| match e.kind() {
            io::ErrorKind::AddrInUse | io::ErrorKind::PermissionDenied => StartError::AlreadyRunning(display.clone()),
            _ => listen_err(e),
        })?;
    Ok(Listener { inner, address: display })
}

/// Socket activation is a systemd feature; Windows services get no inherited listener.
pub fn systemd_listener() -> Result<Option<Listener>, StartError> {
    Ok(None)
}
