//! Retention: the sweep deletes ledger rows past `privacy.ledger_days` and payment records past
//! `payments.retention_days`, a bounded batch at a time.
//!
//! Each batch is one short `DELETE` of at most [`BATCH`] rows, oldest first, and the sweep yields
//! between batches and stops after [`BATCHES_PER_TICK`] of them: however large a backlog (a store
//! from a daemon that never pruned, a clock that jumped), no tick holds the store, or the worker
//! it runs on, for longer than a few milliseconds at a time. A backlog larger than one tick's
//! share is worked off over the next ticks.

use tracing::{info, warn};

use crate::broker::Broker;

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

/// One tick's share of the pruning: up to [`BATCHES_PER_TICK`] batches of each table, yielding
/// between them.
pub async fn prune(broker: &Broker) -> Pruned {
    let ledger = batches("ledger rows past privacy.ledger_days", || broker.consent.ledger.prune(BATCH)).await;
    let retention_ms = u64::from(broker.config.payments.retention_days) * DAY_MS;
    let payments = batches("payment records past payments.retention_days", || {
        broker.store.payments_prune(broker.clock.now_ms().saturating_sub(retention_ms), BATCH)
    })
    .await;
    Pruned { ledger, payments }
}

async fn batches(what: &'static str, mut batch: impl FnMut() -> Result<usize, crate::error::StoreError>) -> usize {
    let mut total = 0;
    for _ in 0..BATCHES_PER_TICK {
        match batch() {
            Ok(n) => {
                total += n;
                if n < BATCH as usize {
                    break;
                }
            }
            Err(e) => {
                warn!(error = %e, what, "could not prune");
                break;
            }
        }
        tokio::task::yield_now().await;
    }
    if total > 0 {
        info!(deleted = total, what, "pruned");
    }
    total
}
