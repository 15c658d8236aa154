//! `Host.LaunchApp`'s app.json: never panics; an accepted version reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use miniapp_brokerd::version::AppJson;

fuzz_target!(|text: &str| {
    if let Ok(app_json) = AppJson::parse(text) {
        let again = match app_json.api_version {
            Some(v) => format!("{{\"apiVersion\":\"{v}\"}}"),
            None => "{}".to_owned(),
        };
        assert_eq!(AppJson::parse(&again), Ok(app_json));
    }
});
