//! The platform's signature on every request to a superapp server, so the server knows the request
//! comes from the platform: `X-SIGNATURE` = base64 of SHA256withRSA (PKCS#1 v1.5) by the
//! platform's private key over `POST:<path>:<lowercase hex sha256 of the body>:<X-TIMESTAMP>`.
//!
//! The key pair is made at first start and kept as PKCS#8 PEM in the data dir (0600, written to a
//! private temporary file and renamed into place, never replaced once there: the superapp server
//! has its public half installed). The public half is printed as SPKI PEM for the superapp team.
//! [`PlatformPublicKey`] is the verifying side, as a superapp server (the dev-host's) runs it.

use std::{
    fs,
    io::{self, Write},
    path::Path,
    sync::LazyLock,
};

use base64::{Engine, engine::general_purpose::STANDARD};
use rsa::{
    RsaPrivateKey, RsaPublicKey,
    pkcs1v15::{Signature, SigningKey, VerifyingKey},
    pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding},
    rand_core::OsRng,
    signature::{RandomizedSigner, SignatureEncoding, Verifier},
};
use sha2::{Digest, Sha256};
use time::{OffsetDateTime, format_description::BorrowedFormatItem, format_description::well_known::Rfc3339};

/// The request headers the contract names.
pub const HEADER_TIMESTAMP: &str = "x-timestamp";
pub const HEADER_CLIENT_KEY: &str = "x-client-key";
pub const HEADER_SIGNATURE: &str = "x-signature";

/// The key size made at first start.
pub const KEY_BITS: usize = 2048;

/// Why a key could not be made, read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{path}: not an RSA private key in PKCS#8 PEM ({reason}); move it away to make a new key pair")]
    BadPrivateKey { path: String, reason: String },
    #[error("not an RSA public key in PEM (\"BEGIN PUBLIC KEY\"): {0}")]
    BadPublicKey(String),
    #[error("could not make an RSA key pair: {0}")]
    Generate(String),
}

/// Why a signature was not accepted (the verifying side's answer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("X-SIGNATURE is not base64 of an RSA signature")]
    Malformed,
    #[error("X-SIGNATURE does not verify with the platform's public key")]
    Mismatch,
}

/// The message the signature covers.
pub fn string_to_sign(path: &str, body: &[u8], timestamp: &str) -> String {
    let digest = Sha256::digest(body);
    let mut hex = String::with_capacity(64);
    for b in digest {
        hex.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
        hex.push(char::from_digit(u32::from(b & 0xf), 16).unwrap_or('0'));
    }
    format!("POST:{path}:{hex}:{timestamp}")
}

/// `X-TIMESTAMP`'s form: RFC 3339 to the second with a numeric offset (`2026-01-02T03:04:05+00:00`).
static TIMESTAMP: LazyLock<Vec<BorrowedFormatItem<'static>>> = LazyLock::new(|| {
    time::format_description::parse_borrowed::<1>(
        "[year]-[month]-[day]T[hour]:[minute]:[second][offset_hour sign:mandatory]:[offset_minute]",
    )
    .expect("the timestamp format is valid")
});

/// `now` as `X-TIMESTAMP`.
pub fn timestamp(now: OffsetDateTime) -> String {
    now.format(&*TIMESTAMP).expect("every date the clock gives formats")
}

/// An `X-TIMESTAMP` as a time (any RFC 3339 form: `Z` or an offset, fractions of a second).
pub fn parse_timestamp(text: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(text, &Rfc3339).ok()
}

/// The platform's key pair. See the module docs.
pub struct PlatformKey {
    signing: SigningKey<Sha256>,
    public: RsaPublicKey,
}

impl std::fmt::Debug for PlatformKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PlatformKey(..)")
    }
}

impl PlatformKey {
    /// A fresh key pair of [`KEY_BITS`].
    pub fn generate() -> Result<PlatformKey, KeyError> {
        let private = RsaPrivateKey::new(&mut OsRng, KEY_BITS).map_err(|e| KeyError::Generate(e.to_string()))?;
        Ok(PlatformKey::from_private(private))
    }

    /// The private key as PKCS#8 PEM, for an embedder that keeps it elsewhere than a file (the
    /// platform service: in its database, shared by its instances).
    pub fn private_key_pem(&self) -> Result<String, KeyError> {
        Ok(self
            .signing
            .as_ref()
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| KeyError::Generate(e.to_string()))?
            .to_string())
    }

    /// A key pair from [`PlatformKey::private_key_pem`]'s text; `what` names where it was kept.
    pub fn from_private_key_pem(what: &str, pem: &str) -> Result<PlatformKey, KeyError> {
        let private = RsaPrivateKey::from_pkcs8_pem(pem)
            .map_err(|e| KeyError::BadPrivateKey { path: what.to_owned(), reason: e.to_string() })?;
        Ok(PlatformKey::from_private(private))
    }

    fn from_private(private: RsaPrivateKey) -> PlatformKey {
        let public = private.to_public_key();
        PlatformKey { signing: SigningKey::new(private), public }
    }

    /// Reads the key pair at `path`, or makes one there if there is none. Two processes making one
    /// at once end up with the same key (the first rename wins; the other reads it). A file that
    /// is not a key is an error, never replaced.
    pub fn load_or_create(path: &Path) -> Result<PlatformKey, KeyError> {
        let io_err = |source| KeyError::Io { path: path.display().to_string(), source };
        if let Some(key) = Self::read(path)? {
            return Ok(key);
        }
        let key = Self::generate()?;
        let pem = key.signing.as_ref().to_pkcs8_pem(LineEnding::LF).map_err(|e| KeyError::Generate(e.to_string()))?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        // tempfile creates the file 0600 on Unix, before anything is written to it.
        let mut file = tempfile::Builder::new().prefix(".platform.key.").tempfile_in(dir).map_err(io_err)?;
        file.write_all(pem.as_bytes()).map_err(io_err)?;
        file.as_file().sync_all().map_err(io_err)?;
        match file.persist_noclobber(path) {
            Ok(_) => {}
            Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => {
                return Self::read(path)?.ok_or_else(|| io_err(io::Error::other("the key file vanished")));
            }
            Err(e) => return Err(io_err(e.error)),
        }
        #[cfg(unix)]
        fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)?;
        Ok(key)
    }

    /// Reads the key pair at `path` if there is one; never makes one.
    pub fn read(path: &Path) -> Result<Option<PlatformKey>, KeyError> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(KeyError::Io { path: path.display().to_string(), source }),
        };
        let private = RsaPrivateKey::from_pkcs8_pem(&text)
            .map_err(|e| KeyError::BadPrivateKey { path: path.display().to_string(), reason: e.to_string() })?;
        Ok(Some(PlatformKey::from_private(private)))
    }

    /// The public half as PEM (`-----BEGIN PUBLIC KEY-----`, SPKI), for the superapp to install.
    pub fn public_key_pem(&self) -> String {
        self.public.to_public_key_pem(LineEnding::LF).expect("an RSA public key encodes")
    }

    /// The public half, as a verifier holds it.
    pub fn public_key(&self) -> PlatformPublicKey {
        PlatformPublicKey(VerifyingKey::new(self.public.clone()))
    }

    /// `X-SIGNATURE` for `message` (see [`string_to_sign`]). Blinded: a signature's timing does
    /// not depend on the private key.
    pub fn sign(&self, message: &str) -> String {
        let signature: Signature = self.signing.sign_with_rng(&mut OsRng, message.as_bytes());
        STANDARD.encode(signature.to_bytes())
    }
}

/// The platform's public key as a superapp server holds it, to check `X-SIGNATURE`.
#[derive(Debug, Clone)]
pub struct PlatformPublicKey(VerifyingKey<Sha256>);

impl PlatformPublicKey {
    /// From PEM (`-----BEGIN PUBLIC KEY-----`, as `platform-public-key` prints it).
    pub fn from_pem(text: &str) -> Result<PlatformPublicKey, KeyError> {
        let public =
            RsaPublicKey::from_public_key_pem(text.trim()).map_err(|e| KeyError::BadPublicKey(e.to_string()))?;
        Ok(PlatformPublicKey(VerifyingKey::new(public)))
    }

    /// Whether `signature` (base64) is the platform's over `message`.
    pub fn verify(&self, message: &str, signature: &str) -> Result<(), SignatureError> {
        let bytes = STANDARD.decode(signature.trim()).map_err(|_| SignatureError::Malformed)?;
        let signature = Signature::try_from(bytes.as_slice()).map_err(|_| SignatureError::Malformed)?;
        self.0.verify(message.as_bytes(), &signature).map_err(|_| SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_string_to_sign_hashes_the_body_in_lowercase_hex() {
        // sha256("") and sha256("abc"), published test values.
        assert_eq!(
            string_to_sign("/p", b"", "T"),
            "POST:/p:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855:T"
        );
        assert_eq!(
            string_to_sign("/superapp/user/checkUser", b"abc", "2026-01-02T03:04:05+00:00"),
            "POST:/superapp/user/checkUser:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad:2026-01-02T03:04:05+00:00"
        );
    }

    #[test]
    fn timestamps_carry_a_numeric_offset_and_parse_back() {
        let t = OffsetDateTime::from_unix_timestamp(1_767_323_045).unwrap();
        assert_eq!(timestamp(t), "2026-01-02T03:04:05+00:00");
        assert_eq!(parse_timestamp("2026-01-02T03:04:05+00:00"), Some(t));
        assert_eq!(parse_timestamp("2026-01-02T11:04:05+08:00"), Some(t));
        assert_eq!(parse_timestamp("2026-01-02T03:04:05Z"), Some(t));
        assert_eq!(parse_timestamp("yesterday"), None);
    }

    #[test]
    fn a_key_is_made_once_kept_private_and_signs_what_its_public_half_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("platform.key");
        let key = PlatformKey::load_or_create(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let again = PlatformKey::load_or_create(&path).unwrap();
        assert_eq!(again.public_key_pem(), key.public_key_pem(), "the key is read back, not replaced");
        assert!(key.public_key_pem().starts_with("-----BEGIN PUBLIC KEY-----\n"));

        let public = PlatformPublicKey::from_pem(&again.public_key_pem()).unwrap();
        let message = string_to_sign("/superapp/user/checkUser", br#"{"userId":"u"}"#, "2026-01-02T03:04:05+00:00");
        let signature = key.sign(&message);
        assert_eq!(public.verify(&message, &signature), Ok(()));
        assert_eq!(
            public.verify(&message.replace("checkUser", "getUserNick"), &signature),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(public.verify(&message, "not base64!"), Err(SignatureError::Malformed));
        let other = PlatformKey::generate().unwrap();
        assert_eq!(other.public_key().verify(&message, &signature), Err(SignatureError::Mismatch));
    }

    #[test]
    fn a_file_that_is_not_a_key_is_an_error_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("platform.key");
        fs::write(&path, "not a key").unwrap();
        assert!(matches!(PlatformKey::load_or_create(&path), Err(KeyError::BadPrivateKey { .. })));
        assert_eq!(fs::read_to_string(&path).unwrap(), "not a key");
        assert!(PlatformPublicKey::from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----").is_err());
    }
}
