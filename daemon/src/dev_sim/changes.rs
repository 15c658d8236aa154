//! A change counter the panel waits on: every change to what it shows (a prompt, a call, a user
//! switch, a relaunch, consent or ledger rows) bumps it, and the panel's long poll returns when
//! the counter passes the value it last saw.

use std::time::Duration;

use tokio::sync::watch;

/// The shared counter; cloning shares it.
#[derive(Debug, Clone)]
pub struct Changes(watch::Sender<u64>);

impl Default for Changes {
    fn default() -> Self {
        Changes::new()
    }
}

impl Changes {
    pub fn new() -> Changes {
        Changes(watch::Sender::new(0))
    }

    /// Something the panel shows changed.
    pub fn bump(&self) {
        self.0.send_modify(|v| *v += 1);
    }

    /// The counter now.
    pub fn now(&self) -> u64 {
        *self.0.borrow()
    }

    /// Waits until the counter passes `after`, at most `wait`; the counter then.
    pub async fn after(&self, after: u64, wait: Duration) -> u64 {
        let mut rx = self.0.subscribe();
        let _ = tokio::time::timeout(wait, rx.wait_for(|v| *v > after)).await;
        self.now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wait_returns_on_the_next_change_or_at_its_deadline() {
        let changes = Changes::new();
        assert_eq!(changes.after(0, Duration::from_millis(20)).await, 0, "nothing changed: the deadline");
        let waiter = tokio::spawn({
            let changes = changes.clone();
            async move { changes.after(0, Duration::from_secs(30)).await }
        });
        changes.bump();
        assert_eq!(waiter.await.unwrap(), 1);
        assert_eq!(changes.after(0, Duration::from_secs(30)).await, 1, "already past: at once");
    }
}
