//! What can go wrong in the simulator, typed inside and mapped once to an HTTP answer at the edge
//! (`{"error": "..."}` with a status) or to the CLI's message.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
};

/// An error of the simulator's server or of its setup.
#[derive(Debug, thiserror::Error)]
pub enum DevSimError {
    /// Starting up: a bad flag, app dir or profile, a daemon that cannot be reached.
    #[error("{0}")]
    Setup(String),
    /// The request came from somewhere other than the simulator's own page.
    #[error("refused: {0}")]
    Forbidden(String),
    /// A malformed or inconsistent request body; nothing changed.
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("not found")]
    NotFound,
    #[error("too large: {0}")]
    TooLarge(String),
    /// Too many requests at once.
    #[error("busy: at most {0} requests at once")]
    Busy(usize),
    /// The daemon refused or failed what the panel asked (launch, switch user).
    #[error("the daemon answered: {0}")]
    Daemon(String),
}

impl DevSimError {
    fn status(&self) -> StatusCode {
        match self {
            DevSimError::Setup(_) | DevSimError::Daemon(_) => StatusCode::BAD_GATEWAY,
            DevSimError::Forbidden(_) => StatusCode::FORBIDDEN,
            DevSimError::BadRequest(_) => StatusCode::BAD_REQUEST,
            DevSimError::NotFound => StatusCode::NOT_FOUND,
            DevSimError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            DevSimError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for DevSimError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.to_string() }).to_string();
        (self.status(), [(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response()
    }
}
