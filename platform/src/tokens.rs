//! Random secrets and their comparison: codes, session keys, access tokens, app secrets. All are
//! random (from the OS-seeded CSPRNG), compared in constant time, and never logged. The daemon uses
//! the same functions for its own tokens.

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

/// The id by which a daemon and the platform service speak of a code without holding it: the
/// code's SHA-256 ([`hash_secret`], what the platform stores codes by), in hex. It does not let
/// anyone redeem the code.
pub fn code_id(code: &str) -> String {
    hex::encode(hash_secret(code))
}

/// The hash a [`code_id`] spells, if it is one.
pub fn code_hash_of_id(id: &str) -> Option<[u8; 32]> {
    let mut hash = [0u8; 32];
    hex::decode_to_slice(id, &mut hash).ok().map(|()| hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_id_is_the_hex_of_the_code_hash_and_reads_back() {
        let id = code_id("abc");
        // SHA-256("abc"), the standard's test vector.
        assert_eq!(id, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(code_hash_of_id(&id), Some(hash_secret("abc")));
        for not_an_id in ["", &id[..62], &format!("{id}00"), &id.replace('b', "g"), "+a".repeat(32).as_str()] {
            assert_eq!(code_hash_of_id(not_an_id), None, "{not_an_id}");
        }
    }
}
