//! The tonic services: thin layers that decode a request, identify the caller, call into the
//! broker, and map the answer (or a typed error) to the wire. No decisions live here.

pub mod admin;
pub mod exchange;
pub mod gate;
pub mod host;
pub mod open_api;
pub mod stream_budget;

use miniapp_broker_proto::metadata;
use tonic::{Status, metadata::MetadataMap};

use crate::broker::Broker;

/// Refuses a caller without the host token (Host and Admin).
pub(crate) fn require_host_token(broker: &Broker, md: &MetadataMap) -> Result<(), Status> {
    let presented = md
        .get(metadata::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Status::unauthenticated("missing host token (authorization: Bearer <token>)"))?;
    if broker.host_token.verify(presented) { Ok(()) } else { Err(Status::unauthenticated("invalid host token")) }
}

/// App ids are short printable identifiers (`wx` + 16 hex digits in WeChat; any [A-Za-z0-9_.-]).
pub(crate) fn check_app_id(app_id: &str) -> Result<(), Status> {
    let valid = !app_id.is_empty()
        && app_id.len() <= 64
        && app_id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if valid { Ok(()) } else { Err(Status::invalid_argument("app_id must be 1-64 characters of [A-Za-z0-9_.-]")) }
}
