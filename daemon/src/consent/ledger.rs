//! The disclosure ledger: one durable row each time a user's data leaves the daemon for an app
//! (what, to which app, for which user, through which surface, when; never the value), as the
//! privacy reports of mobile systems keep it. Codes are recorded by the platform when issued and
//! stamped when redeemed (one redeem path for every surface); what the daemon hands to a renderer
//! directly (avatar, nickname, the host's user info passed through) is recorded here.
//! A disclosure identical to a recent one (`privacy.ledger_coalesce_secs`) adds to that row's
//! count instead of adding a row, so what one app makes the ledger hold grows with the kinds of
//! data it asked for, not with how often it asked. Rows older than `privacy.ledger_days` are
//! deleted by the daemon's sweep, a bounded batch at a time (`crate::retention`).

use std::sync::Arc;

use miniapp_broker_proto::{Api, v1::Disclosure};

use crate::{
    clock::Clock,
    error::StoreError,
    page,
    platform::{Disclosed, Surface},
    store::{LedgerRow, NewLedgerRow, Store},
};

const DAY_MS: u64 = 24 * 3600 * 1000;
/// The most a page's `next_after_id` takes: a tag and a 64-bit varint.
const NEXT_ID_BYTES: usize = 11;

/// The ledger over the store. See the module docs.
pub struct Ledger {
    store: Arc<Store>,
    clock: Arc<dyn Clock>,
    retention_ms: u64,
}

impl Ledger {
    pub fn new(store: Arc<Store>, clock: Arc<dyn Clock>, days: u32) -> Ledger {
        Ledger { store, clock, retention_ms: u64::from(days) * DAY_MS }
    }

    /// Records that `what` of `uid` went to `app_id` as the answer to a renderer's `api` call.
    pub fn record(&self, app_id: &str, uid: &str, what: Disclosed, api: Api) -> Result<(), StoreError> {
        let now = self.clock.now_ms();
        self.store.ledger_add(&NewLedgerRow {
            app_id,
            uid,
            what: what.as_str(),
            surface: Surface::RendererApi.as_str(),
            api: api.name(),
            at_ms: now,
            via_code: false,
        })?;
        Ok(())
    }

    /// One page of the rows matching the filters (empty: any) with an id above `after_id`, oldest
    /// first, as many as fit in `max_bytes` once encoded (at least one), and the id to continue
    /// after (0: no more rows). A year of a busy daemon's rows never fits one gRPC message.
    pub fn page(
        &self,
        app_id: &str,
        uid: &str,
        since_ms: u64,
        after_id: u64,
        max_bytes: usize,
    ) -> Result<(Vec<Disclosure>, u64), StoreError> {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        let rows =
            self.store.ledger_page(some(app_id).as_deref(), some(uid).as_deref(), since_ms, after_id, page::ROWS)?;
        let more = rows.len() == page::ROWS as usize;
        let (rows, cut) = page::fit(rows.into_iter().map(disclosure), max_bytes, |_| NEXT_ID_BYTES);
        let next = if cut || more { after(&rows) } else { 0 };
        Ok((rows, next))
    }

    /// Deletes at most `limit` of the rows past the retention, oldest first; returns how many.
    pub fn prune(&self, limit: u32) -> Result<usize, StoreError> {
        self.store.ledger_prune(self.clock.now_ms().saturating_sub(self.retention_ms), limit)
    }
}

/// The id a page ends at, for the next page to start after.
fn after(page: &[Disclosure]) -> u64 {
    page.last().map_or(0, |d| d.id)
}

fn disclosure(r: LedgerRow) -> Disclosure {
    Disclosure {
        id: r.id,
        app_id: r.app_id,
        uid: r.uid,
        what: r.what,
        surface: r.surface,
        api: r.api,
        at_ms: r.at_ms,
        via_code: r.via_code,
        redeemed_at_ms: r.redeemed_at_ms.unwrap_or(0),
        redeemed_via: r.redeemed_via.unwrap_or_default(),
        count: r.count,
        last_at_ms: r.last_at_ms,
        redeemed_count: r.redeemed_count,
    }
}
