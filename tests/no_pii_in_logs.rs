//! No personal data in logs, proven (issue 11): the whole demo flow (every API in v1, v2 and v3,
//! the settings APIs, the backend's exchanges, the ledger) runs with every log at TRACE, from the
//! daemon and from every library under it, captured; no line may hold a phone number, an e-mail
//! address, a token, a code, a secret, a session key, a profile's encrypted data or the profile
//! values it carries (nickname, avatar). The forbidden values are the ones the flow
//! actually handed out, as the demo reports them. Its own test binary: it owns the global
//! subscriber.

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use tracing_subscriber::fmt::MakeWriter;

/// Every log line, in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_flow_logs_no_personal_data_at_trace() {
    let captured = Captured::default();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(captured.clone())
        .init();

    let report = miniapp_brokerd::demo::run_reporting().await.expect("the demo runs");
    assert!(report.passed, "the demo flow had unexpected failures");

    let logs = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    // The capture works and saw the flow: the daemon's per-call lines and a library's traces.
    for expected in ["call answered", "consent changed", "miniapp-brokerd listening", "TRACE"] {
        assert!(logs.contains(expected), "the logs lack {expected:?}: is the capture working?");
    }
    let kinds: std::collections::BTreeSet<_> = report.handed_out.iter().map(|(what, _)| *what).collect();
    for kind in [
        "host token",
        "launch token",
        "app secret",
        "code",
        "session key",
        "authCode",
        "phone number",
        "e-mail",
        "encryptedData",
        "nickname",
        "avatar",
    ] {
        assert!(kinds.contains(kind), "the demo handed out no {kind}: the check would prove nothing");
    }
    let mut leaks = Vec::new();
    for (what, value) in &report.handed_out {
        assert!(value.len() >= 8, "{what} is too short to search for");
        if let Some(line) = logs.lines().find(|l| l.contains(value.as_str())) {
            leaks.push(format!("{what} in: {line}"));
        }
    }
    assert!(leaks.is_empty(), "{} log line(s) hold personal data or secrets:\n{}", leaks.len(), leaks.join("\n"));
}
