//! miniapp-platformd: the platform as a network service (docs/platform.md). Many instances share
//! one database; daemons reach it over gRPC (`miniapp.platform.v1`, [`daemon_api`]), app backends
//! over the platform crate's backend HTTP API. The platform's logic is the crate's, over the
//! PostgreSQL engine ([`engine`]) or the crate's SQLite one.

pub mod cli;
pub mod daemon_api;
pub mod daemon_listener;
pub mod engine;
pub mod local_redemptions;
pub mod postgres;
pub mod serve;
pub mod tenants;
pub mod tls;
pub mod vouching;

use sha2::{Digest, Sha256};

/// The id by which a daemon asks about a code it issued: the code's SHA-256, hex (the platform
/// stores codes by that hash; it does not let anyone redeem the code).
pub fn code_id(code: &str) -> String {
    Sha256::digest(code.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The hash a [`code_id`] spells, if it is one.
pub fn code_hash_of_id(id: &str) -> Option<Vec<u8>> {
    if id.len() != 64 {
        return None;
    }
    (0..32).map(|i| u8::from_str_radix(id.get(2 * i..2 * i + 2)?, 16).ok()).collect()
}
