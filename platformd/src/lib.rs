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

pub use miniapp_platform::tokens::{code_hash_of_id, code_id};
