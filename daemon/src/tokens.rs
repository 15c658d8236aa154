//! Secrets that decide who may do what: the host token, launch tokens, one-time codes, app secrets.
//! All are random (from the OS-seeded CSPRNG), compared in constant time, and never logged.

use std::{
    fs,
    io::{self, Write},
    path::Path,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// `bytes` random bytes as URL-safe base64 (no padding).
pub fn random_token(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    URL_SAFE_NO_PAD.encode(buf)
}

/// 32 random bytes.
pub fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    key
}

/// Constant-time equality of two secrets (lengths are not secret).
pub fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// SHA-256 of a secret, for storing app secrets without keeping them readable.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The token that gates `Host` and `Admin`: whoever can read the token file is the host.
#[derive(Clone)]
pub struct HostToken(String);

impl std::fmt::Debug for HostToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostToken(..)")
    }
}

impl HostToken {
    /// Reads the token file, or creates it (mode 0600, 256 random bits) if it does not exist.
    pub fn load_or_create(path: &Path) -> io::Result<HostToken> {
        match fs::read_to_string(path) {
            Ok(text) if !text.trim().is_empty() => return Ok(HostToken(text.trim().to_owned())),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if let Some(parent) = path.parent() {
            crate::transport::create_private_dir(parent)?;
        }
        let token = random_token(32);
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path)?;
        // The mode above applies only to a file this call creates; an empty file already there
        // keeps its own, so make it private before the secret goes in.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(fs::Permissions::from_mode(0o600))?;
        }
        file.write_all(token.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()?;
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
