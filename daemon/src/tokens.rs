//! Secrets that decide who may do what: the host token, launch tokens, one-time codes, app secrets.
//! All are random (from the OS-seeded CSPRNG), compared in constant time, and never logged.

use std::{
    fs,
    io::{self, Write},
    path::Path,
};

pub use miniapp_platform::tokens::{hash_secret, random_key, random_token, secrets_equal};

/// The token that gates `Host` and `Admin`: whoever can read the token file is the host.
#[derive(Clone)]
pub struct HostToken(String);

impl std::fmt::Debug for HostToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostToken(..)")
    }
}

impl HostToken {
    /// Reads the token file, or creates it (mode 0600, 256 random bits) if it does not exist or is
    /// empty. The token is written to a private temporary file in the same directory and renamed
    /// into place, so the file is never seen empty or half written, whoever reads it when, and a
    /// daemon that dies while writing leaves no token file at all.
    pub fn load_or_create(path: &Path) -> io::Result<HostToken> {
        let existing = |path: &Path| match fs::read_to_string(path) {
            Ok(text) if !text.trim().is_empty() => Ok(Some(HostToken(text.trim().to_owned()))),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        };
        if let Some(token) = existing(path)? {
            return Ok(token);
        }
        let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(parent) => {
                crate::transport::create_private_dir(parent)?;
                parent
            }
            None => Path::new("."),
        };
        let token = random_token(32);
        // tempfile creates the file 0600 on Unix, before anything is written to it.
        let mut file = tempfile::Builder::new().prefix(".host.token.").tempfile_in(dir)?;
        file.write_all(token.as_bytes())?;
        file.write_all(b"\n")?;
        file.as_file().sync_all()?;
        match file.persist_noclobber(path) {
            Ok(_) => {}
            Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => match existing(path)? {
                // Another process made one meanwhile: that one is the token.
                Some(theirs) => return Ok(theirs),
                // An empty file (an older daemon's leftover): replace it.
                None => {
                    e.file.persist(path).map_err(|e| e.error)?;
                }
            },
            Err(e) => return Err(e.error),
        }
        // The rename itself survives a crash once the directory is synced.
        #[cfg(unix)]
        fs::File::open(dir)?.sync_all()?;
        Ok(HostToken(token))
    }

    /// Whether an `authorization` value (`Bearer <token>`, or the bare token) carries this token.
    pub fn verify(&self, presented: &str) -> bool {
        let presented = presented.strip_prefix("Bearer ").unwrap_or(presented).trim();
        secrets_equal(presented.as_bytes(), self.0.as_bytes())
    }

    /// The token itself, for the in-process demo and tests that act as the host.
    pub fn reveal(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_token_is_created_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/host.token");
        let token = HostToken::load_or_create(&path).unwrap();
        assert_eq!(token.reveal().len(), 43);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let again = HostToken::load_or_create(&path).unwrap();
        assert!(again.verify(&format!("Bearer {}", token.reveal())));
        assert!(!again.verify("Bearer nope"));
        assert!(!again.verify(""));
    }

    #[cfg(unix)]
    #[test]
    fn an_empty_token_file_already_there_is_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.token");
        fs::write(&path, "").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        HostToken::load_or_create(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
