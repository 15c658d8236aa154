//! Client library for miniapp-broker.
//!
//! - [`RendererClient`]: what a mini app renderer process uses to call the open APIs. It talks to
//!   the daemon over one multiplexed stream by default (cheaper per call than unary RPCs, and the
//!   daemon learns at once when the renderer goes away), offers the plain unary RPCs and the JSON
//!   bridge too, and reconnects with backoff when the daemon restarts.
//! - [`HostClient`]: what the superapp shell uses: it registers a handler per delegate method,
//!   pushes the signed-in user, and launches and closes app instances.
//!
//! Both connect to the daemon's local socket (a Unix domain socket, or a named pipe on Windows)
//! through [`connect::channel`].

pub mod connect;
pub mod host;
pub mod pages;
pub mod renderer;

pub use host::{HostBuilder, HostClient, HostClientError, HostFailure};
pub use miniapp_broker_proto as proto;
pub use miniapp_broker_proto::v1::ApiFailure;
pub use renderer::RendererClient;
