//! Metadata keys that renderers, hosts and the daemon agree on.

/// Carries a renderer's launch token on every `OpenApi` call.
pub const LAUNCH_TOKEN: &str = "x-launch-token";

/// Carries the host token on `Host` and `Admin` calls, as `Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";

/// Trailer with the WeChat errno of a failed unary open-API call, for clients that do not decode
/// status details.
pub const ERRNO: &str = "x-errno";

/// The `authorization` value for a host token.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}
