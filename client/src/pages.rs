//! Reading every page of an Admin listing. The daemon answers `ListSessions`, `ListGrants` and
//! `ListLedger` in pages that fit one message, each naming where the next one starts; the host
//! client and the CLI read them the same way, through [`read_all`].

use std::future::Future;

use miniapp_broker_proto::v1;

/// A listing request the daemon answers page by page.
pub trait Paged: Clone {
    /// One page of the answer.
    type Page;
    /// What the listing lists.
    type Row;
    /// Moves `page`'s rows into `rows` and points `self` at the next page; false after the last,
    /// or when the page names itself as the next (only a broken daemon would: reading on would
    /// never end).
    fn next_page(&mut self, page: Self::Page, rows: &mut Vec<Self::Row>) -> bool;
}

impl Paged for v1::ListSessionsRequest {
    type Page = v1::ListSessionsResponse;
    type Row = v1::SessionInfo;
    fn next_page(&mut self, page: Self::Page, rows: &mut Vec<Self::Row>) -> bool {
        rows.extend(page.sessions);
        let moved = page.next_after != self.after;
        self.after = page.next_after;
        moved && !self.after.is_empty()
    }
}

impl Paged for v1::ListGrantsRequest {
    type Page = v1::ListGrantsResponse;
    type Row = v1::Grant;
    fn next_page(&mut self, page: Self::Page, rows: &mut Vec<Self::Row>) -> bool {
        rows.extend(page.grants);
        let moved = page.next_after != self.after;
        self.after = page.next_after;
        moved && !self.after.is_empty()
    }
}

impl Paged for v1::ListLedgerRequest {
    type Page = v1::ListLedgerResponse;
    type Row = v1::Disclosure;
    fn next_page(&mut self, page: Self::Page, rows: &mut Vec<Self::Row>) -> bool {
        rows.extend(page.disclosures);
        let moved = page.next_after_id != self.after_id;
        self.after_id = page.next_after_id;
        moved && self.after_id != 0
    }
}

/// Every row of the listing `request` starts, fetching one page at a time with `fetch`.
pub async fn read_all<R, E, Fut>(mut request: R, mut fetch: impl FnMut(R) -> Fut) -> Result<Vec<R::Row>, E>
where
    R: Paged,
    Fut: Future<Output = Result<R::Page, E>>,
{
    let mut rows = Vec::new();
    while request.next_page(fetch(request.clone()).await?, &mut rows) {}
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_page_is_read_in_order_until_the_last() {
        // Three pages of ledger rows, chained by id.
        let ledger = read_all(v1::ListLedgerRequest::default(), |r: v1::ListLedgerRequest| async move {
            let row = |id| v1::Disclosure { id, ..Default::default() };
            Ok::<_, &str>(match r.after_id {
                0 => v1::ListLedgerResponse { disclosures: vec![row(1), row(2)], next_after_id: 2 },
                2 => v1::ListLedgerResponse { disclosures: vec![row(3)], next_after_id: 3 },
                3 => v1::ListLedgerResponse { disclosures: vec![row(4)], next_after_id: 0 },
                other => panic!("no page after {other}"),
            })
        })
        .await
        .unwrap();
        assert_eq!(ledger.iter().map(|d| d.id).collect::<Vec<_>>(), [1, 2, 3, 4]);
        // An error on a later page is the answer.
        let failed = read_all(v1::ListSessionsRequest::default(), |r: v1::ListSessionsRequest| async move {
            if r.after.is_empty() {
                Ok(v1::ListSessionsResponse { sessions: vec![Default::default()], next_after: "k".into() })
            } else {
                Err("page two failed")
            }
        })
        .await;
        assert_eq!(failed.unwrap_err(), "page two failed");
        // A page that names itself as the next ends the listing instead of looping.
        let stuck = read_all(v1::ListGrantsRequest::default(), |_| async {
            tokio::task::yield_now().await; // so that the timeout below can end a loop
            Ok::<_, &str>(v1::ListGrantsResponse { grants: vec![Default::default()], next_after: "same".into() })
        });
        let stuck = tokio::time::timeout(std::time::Duration::from_secs(1), stuck).await.expect("it ends").unwrap();
        assert_eq!(stuck.len(), 2, "the first page, and the one that repeated its cursor");
    }
}
