//! Unix specifics: the socket path, its private directory, stale sockets, systemd's sockets.

use std::{
    fs, io,
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt},
    },
    path::{Path, PathBuf},
};

use interprocess::local_socket::{
    GenericFilePath, ListenerOptions, ToFsName, tokio::Listener as LocalListener, traits::tokio::Listener as _,
};
use interprocess::os::unix::local_socket::ListenerOptionsExt;

use super::Listener;
use crate::error::StartError;

/// `$XDG_RUNTIME_DIR/miniapp-broker/brokerd.sock`, or a per-user directory under the temp dir
/// when there is no runtime dir.
pub fn default_address() -> PathBuf {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| std::env::temp_dir().join(format!("miniapp-broker-{}", unsafe { libc::geteuid() })));
    base.join("miniapp-broker").join("brokerd.sock")
}

/// Creates `dir` (and parents) with the leaf private to the user (0700).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    Ok(())
}

/// Creates `dir` private to the daemon's user (as [`create_private_dir`]), after making sure no
/// other user controls it: every existing directory on the way must be owned by the daemon's uid
/// or root and writable by nobody else (a sticky directory such as `/tmp` is fine), and `dir`
/// itself must be the daemon's own and writable by nobody else. A directory someone else made
/// first (a squatter of `/tmp/miniapp-broker-<uid>`) or that others can write is refused, never
/// used: whoever controls it could swap the socket or read what the daemon writes there.
pub fn create_owned_dir(dir: &Path, what: &'static str) -> Result<(), StartError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let own = unsafe { libc::geteuid() };
    let unsafe_dir = |path: &Path, why: String| StartError::UnsafeDir { what, path: path.display().to_string(), why };
    let io_err = |path: &Path, e: io::Error| unsafe_dir(path, e.to_string());
    let absolute = std::path::absolute(dir).map_err(|e| io_err(dir, e))?;
    for ancestor in absolute.ancestors().skip(1) {
        let meta = match fs::metadata(ancestor) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(ancestor, e)),
        };
        if meta.uid() != own && meta.uid() != 0 {
            return Err(unsafe_dir(ancestor, format!("is owned by uid {}, not by this user (uid {own})", meta.uid())));
        }
        let mode = meta.permissions().mode();
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Err(unsafe_dir(ancestor, format!("is writable by group or others (mode {:o})", mode & 0o7777)));
        }
    }
    create_private_dir(&absolute).map_err(|e| io_err(&absolute, e))?;
    let meta = fs::metadata(&absolute).map_err(|e| io_err(&absolute, e))?;
    if meta.uid() != own {
        return Err(unsafe_dir(&absolute, format!("is owned by uid {}, not by this user (uid {own})", meta.uid())));
    }
    let mode = meta.permissions().mode();
    if mode & 0o022 != 0 {
        return Err(unsafe_dir(&absolute, format!("is writable by group or others (mode {:o})", mode & 0o7777)));
    }
    Ok(())
}

/// Binds the socket at `path`: the directory is created private, a stale socket (nobody
/// answers) is replaced, a live one means another daemon runs there.
pub async fn bind(path: &Path) -> Result<Listener, StartError> {
    let display = path.display().to_string();
    let listen_err = |source: io::Error| StartError::Listen { path: display.clone(), source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_owned_dir(dir, "socket directory")?;
    }
    if path.exists() {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(StartError::AlreadyRunning(display)),
            // Only a socket is replaced: a mistyped --socket must not delete someone's file.
            Err(_) if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) => {
                fs::remove_file(path).map_err(listen_err)?
            }
            Err(_) => {
                return Err(listen_err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "the path exists and is not a socket",
                )));
            }
        }
    }
    let name = path.to_fs_name::<GenericFilePath>().map_err(listen_err)?;
    let inner = ListenerOptions::new().name(name).mode(0o600).reclaim_name(true).create_tokio().map_err(listen_err)?;
    // Belt and braces: some platforms ignore the mode at bind time.
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(listen_err)?;
    Ok(Listener { inner, address: display })
}

/// The listening socket systemd passed (socket activation: `LISTEN_PID` names this process and
/// `LISTEN_FDS` is at least 1), if any. The variables are cleared so children do not inherit them.
pub fn systemd_listener() -> Result<Option<Listener>, StartError> {
    let pid_matches = std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let fds = std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse::<i32>().ok()).unwrap_or(0);
    if !pid_matches || fds < 1 {
        return Ok(None);
    }
    // SAFETY: systemd passes listening sockets starting at fd 3 (SD_LISTEN_FDS_START); this
    // process owns them from here on, and the variables are removed so nothing else claims them.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    let fd = unsafe { OwnedFd::from_raw_fd(3) };
    let address = socket_path_of(&fd).unwrap_or_else(|| "systemd socket".to_owned());
    let listen_err = |source: io::Error| StartError::Listen { path: address.clone(), source };
    // tokio wants non-blocking sockets; systemd hands them over blocking.
    let std_listener = std::os::unix::net::UnixListener::from(fd);
    std_listener.set_nonblocking(true).map_err(listen_err)?;
    let uds = interprocess::os::unix::uds_local_socket::tokio::Listener::try_from(OwnedFd::from(std_listener))
        .map_err(listen_err)?;
    let mut inner = LocalListener::from(uds);
    // systemd owns the socket file: never unlink it.
    inner.do_not_reclaim_name_on_drop();
    Ok(Some(Listener { inner, address }))
}

fn socket_path_of(fd: &OwnedFd) -> Option<String> {
    use std::os::fd::AsRawFd;
    let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd.as_raw_fd()) };
    let path = listener.local_addr().ok().and_then(|a| a.as_pathname().map(|p| p.display().to_string()));
    // Borrowed, not owned: do not close it.
    std::mem::forget(listener);
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_path_that_is_not_a_socket_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.txt");
        fs::write(&path, "keep me").unwrap();
        assert!(matches!(bind(&path).await, Err(StartError::Listen { .. })));
        assert_eq!(fs::read_to_string(&path).unwrap(), "keep me");
    }
}
