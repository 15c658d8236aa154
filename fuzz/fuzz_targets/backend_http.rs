//! The backend HTTP API's query strings and bodies: the first two bytes pick the method, a
//! browser header and the path; the rest, split at the first NUL, is the query and the body. Every
//! answer must hold the properties of `miniapp_platform::backend_http::probe` (JSON, the statuses
//! promised, success only with the app's secret).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use miniapp_platform::backend_http::probe::Probe;

fuzz_target!(|data: &[u8]| {
    static PROBE: OnceLock<Probe> = OnceLock::new();
    let probe = PROBE.get_or_init(Probe::new);
    let Some((selector, rest)) = data.split_first_chunk::<2>() else { return };
    let (query, body) = match rest.iter().position(|&b| b == 0) {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (rest, &[][..]),
    };
    probe.check(u16::from_le_bytes(*selector), &String::from_utf8_lossy(query), body);
});
