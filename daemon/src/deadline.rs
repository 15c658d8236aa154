//! The deadline of the renderer call being served, for the outbound calls it makes on the way (the
//! remote platform's): a renderer that stops waiting after its `grpc-timeout` gets the daemon's own
//! answer first, not a cut-off call.

use std::future::Future;

use tokio::time::Instant;

tokio::task_local! {
    static CALL_DEADLINE: Instant;
}

/// Runs `f` with `deadline` as its calls' deadline (`None`: no deadline of the caller's own).
pub async fn with_deadline<F: Future>(deadline: Option<Instant>, f: F) -> F::Output {
    match deadline {
        Some(d) => CALL_DEADLINE.scope(d, f).await,
        None => f.await,
    }
}

/// The time left before the current call's deadline, if it has one.
pub fn remaining() -> Option<std::time::Duration> {
    CALL_DEADLINE.try_with(|d| d.saturating_duration_since(Instant::now())).ok()
}

/// `limit`, or less when the current call's deadline comes sooner.
pub fn within(limit: std::time::Duration) -> std::time::Duration {
    remaining().map_or(limit, |left| left.min(limit))
}
