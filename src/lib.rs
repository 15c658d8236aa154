//! The wire contract of miniapp-broker.
//!
//! `proto/` is the single source of truth; this crate is its Rust face: the generated messages and
//! tonic services ([`v1`], with the [`codec`] they use), the table of open APIs ([`api::Api`]), the WeChat JSON mapping used by
//! `OpenApi.Invoke` ([`json`]), how a failure travels in a gRPC status ([`failure`]) and the
//! metadata keys both sides agree on ([`metadata`]).

pub mod api;
pub mod codec;
pub mod failure;
pub mod json;
pub mod metadata;
#[cfg(any(test, feature = "proptest"))]
pub mod strategies;

/// Generated from `proto/miniapp/broker/v1/*.proto`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("miniapp.broker.v1");
}

/// Generated from `proto/miniapp/platform/v1/platform.proto`: the API daemons use to reach the
/// platform service (`miniapp-platformd serve --daemon-listen`).
pub mod platform {
    #[allow(clippy::all, missing_docs)]
    pub mod v1 {
        tonic::include_proto!("miniapp.platform.v1");
    }
}

/// The encoded `FileDescriptorSet` of `proto/`, served by gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/miniapp_broker_v1_descriptor.bin"));

pub use api::Api;
