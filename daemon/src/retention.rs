//! Retention: the sweep deletes ledger rows past `privacy.ledger_days` and payment records past
//! `payments.retention_days`, a bounded batch at a time.
//!
//! Each batch is one short `DELETE` of at most [`BATCH`] rows, oldest first, run on a blocking
//! thread (never on an async worker), and holds the store only for that one statement: calls that
//! write wait for at most one batch. A tick runs at most [`BATCHES_PER_TICK`] batches per table,
//! so however large a backlog (a store from a daemon that never pruned, a clock that jumped), it
//! is worked off over the next ticks instead of in one long delete.

use std::sync::Arc;

use tracing::{info, warn};

use crate::{broker::Broker, error::StoreError};

/// Rows one `DELETE` takes at most.
pub const BATCH: u32 = 500;
/// Batches one sweep tick runs at most, per table.
pub const BATCHES_PER_TICK: usize = 20;

const DAY_MS: u64 = 24 * 3600 * 1000;

/// What one tick deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub ledger: usize,
    pub payments: usize,
}

/// One tick's share of the pruning: up to [`BATCHES_PER_TICK`] batches of each table.
pub async fn prune(broker: &Arc<Broker>) -> Pruned {
    let b = broker.clone();
    let ledger = batches("ledger rows past privacy.ledger_days", move || b.consent.ledger.prune(BATCH)).await;
    let b = broker.clone();
    let retention_ms = u64::from(broker.config.payments.retention_days) * DAY_MS;
    let payments = batches("payment records past payments.retention_days", move || {
        b.store.payments_prune(b.clock.now_ms().saturating_sub(retention_ms), BATCH)
    })
    .await;
    Pruned { ledger, payments }
}

/// Runs `batch` on a blocking thread until it deletes less than a full batch, fails, or
/// [`BATCHES_PER_TICK`] ran; returns how many rows went.
async fn batches(
    what: &'static str,
    batch: impl Fn() -> Result<usize, StoreError> + Send + Sync + Clone + 'static,
) -> usize {
    let mut total = 0;
    for _ in 0..BATCHES_PER_TICK {
        let one = batch.clone();
        match tokio::task::spawn_blocking(one).await {
            Ok(Ok(n)) => {
                total += n;
                if n < BATCH as usize {
                    break;
                }
            }
            Ok(Err(e)) => {
                warn!(error = %e, what, "could not prune");
                break;
            }
            Err(e) => {
                warn!(error = %e, what, "the pruning task failed");
                break;
            }
        }
    }
    if total > 0 {
        info!(deleted = total, what, "pruned");
    }
    total
}
