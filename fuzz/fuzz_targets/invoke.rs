//! `OpenApi.Invoke` as a renderer reaches it: an arbitrary API name and params text (the first
//! byte says how long the name is), through the daemon's own `parse_invoke` and the daemon's
//! parameter checks, to the `InvokeResponse` it would answer. Whatever the input: no panic; a
//! refusal is an `InvokeResponse` whose `result_json` is a JSON object with `errMsg`
//! "<name>:fail ..." and the failure's errno, whose name is printable and at most 64 characters
//! (an unknown name never echoes control characters or markup). (`json_params` checks that what
//! parses reads back unchanged.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use miniapp_broker_proto::{Api, json::request_from_json};
use miniapp_brokerd::services::open_api::{invoke_response, parse_invoke};

fuzz_target!(|data: &[u8]| {
    let Some((&name_len, rest)) = data.split_first() else { return };
    let (name, params) = rest.split_at((name_len as usize).min(rest.len()));
    let (Ok(name), Ok(params)) = (std::str::from_utf8(name), std::str::from_utf8(params)) else { return };
    let refused = match parse_invoke(name, params) {
        Ok((api, request)) => {
            assert_eq!(Some(api), Api::from_name(name));
            assert_eq!(request.api(), Some(api));
            assert_eq!(request_from_json(api, params).as_ref(), Ok(&request), "the same text parses the same");
            match miniapp_brokerd::api::validate(&request) {
                Ok(checked) => {
                    assert_eq!(checked, api);
                    return;
                }
                Err(e) => (api.name().to_owned(), e),
            }
        }
        Err(refused) => refused,
    };
    let (label, error) = refused.clone();
    assert!(
        label.len() <= 64 && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_'),
        "the errMsg names {label:?}"
    );
    let response = invoke_response(Err(refused));
    assert!(!response.ok);
    let json: serde_json::Value = serde_json::from_str(&response.result_json).expect("result_json is JSON");
    let err_msg = json["errMsg"].as_str().expect("errMsg");
    assert!(err_msg.starts_with(&format!("{label}:fail ")), "{err_msg:?}");
    assert_eq!(json["errno"].as_i64(), Some(error.errno()));
    assert_eq!(response.failure.map(|f| f.errno), Some(error.errno()));
});
