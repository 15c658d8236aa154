//! `OpenApi.Invoke`'s params: the first byte picks the API, the rest is the params text. Whatever
//! parses must pass the daemon's own checks without panicking and read back unchanged after being
//! written out again as WeChat-style JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use miniapp_broker_proto::{
    Api,
    json::request_from_json,
    v1::{ApiRequest, api_request::Api as A},
};

fn params_of(req: &ApiRequest) -> String {
    match req.api.as_ref().expect("a parsed request names its API") {
        A::Login(r) => serde_json::to_string(r),
        A::CheckSession(r) => serde_json::to_string(r),
        A::GetPhoneNumber(r) => serde_json::to_string(r),
        A::GetEmail(r) => serde_json::to_string(r),
        A::ChooseAvatar(r) => serde_json::to_string(r),
        A::GetNickName(r) => serde_json::to_string(r),
        A::GetUserInfo(r) => serde_json::to_string(r),
        A::GetUserProfile(r) => serde_json::to_string(r),
        A::RequestPayment(r) => serde_json::to_string(r),
        A::RequestMidasPaymentGameItem(r) => serde_json::to_string(r),
        A::GetSetting(r) => serde_json::to_string(r),
        A::Authorize(r) => serde_json::to_string(r),
        A::OpenSetting(r) => serde_json::to_string(r),
    }
    .expect("requests serialize")
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let api = Api::ALL[selector as usize % Api::ALL.len()];
    if let Ok(req) = request_from_json(api, text) {
        assert_eq!(req.api(), Some(api));
        let _ = miniapp_brokerd::api::validate(&req);
        assert_eq!(request_from_json(api, &params_of(&req)).as_ref(), Ok(&req), "round trip of {text:?}");
    }
});
