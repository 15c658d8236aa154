//! miniapp-platformd: the platform as a network service. Many instances share one database;
//! daemons reach it over gRPC (`miniapp.platform.v1`), app backends over the backend HTTP API.

pub mod cli;
pub mod postgres;
pub mod tenants;
