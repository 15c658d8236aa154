//! The WeChat JSON mapping behind `OpenApi.Invoke`: a mini program's params object in, the object
//! its `success`/`fail` callback receives out. Field names are the WeChat camelCase ones
//! (`timeStamp`, `nonceStr`, `errMsg`, ...); unknown fields (callbacks a bridge forgot to strip,
//! `complete`, ...) are ignored, wrong types are refused.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use crate::{
    api::{Api, ApiCall},
    v1::{self, api_response::Api as R},
};

/// Why a params object was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JsonError {
    /// The params are not a JSON object (an array, a string, garbage).
    #[error("params must be a JSON object")]
    NotAnObject,
    /// The object does not fit the API (a wrong type, bad syntax).
    #[error("invalid params: {0}")]
    Invalid(String),
    /// Arrays and objects nested deeper than [`MAX_DEPTH`].
    #[error("params nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

/// How deeply params may nest. WeChat params are flat; a bound keeps hostile input cheap to refuse.
pub const MAX_DEPTH: usize = 32;

/// Parses the params object of `api` into a typed request. Empty text means `{}`.
pub fn request_from_json(api: Api, params: &str) -> Result<v1::ApiRequest, JsonError> {
    let params = params.trim();
    let params = if params.is_empty() { "{}" } else { params };
    if !params.starts_with('{') {
        return Err(JsonError::NotAnObject);
    }
    check_depth(params)?;
    match api {
        Api::Login => parse::<v1::LoginRequest>(params),
        Api::CheckSession => parse::<v1::CheckSessionRequest>(params),
        Api::GetPhoneNumber => parse::<v1::GetPhoneNumberRequest>(params),
        Api::GetEmail => parse::<v1::GetEmailRequest>(params),
        Api::ChooseAvatar => parse::<v1::ChooseAvatarRequest>(params),
        Api::GetNickName => parse::<v1::GetNickNameRequest>(params),
        Api::GetUserInfo => parse::<v1::GetUserInfoRequest>(params),
        Api::GetUserProfile => parse::<v1::GetUserProfileRequest>(params),
        Api::RequestPayment => parse::<v1::RequestPaymentRequest>(params),
        Api::RequestMidasPaymentGameItem => parse::<v1::RequestMidasPaymentGameItemRequest>(params),
    }
}

/// Refuses nesting beyond [`MAX_DEPTH`] in one pass, before serde sees the text (serde_json skips
/// unknown fields without a depth limit).
fn check_depth(text: &str) -> Result<(), JsonError> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for b in text.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(JsonError::TooDeep);
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

fn parse<T: ApiCall + DeserializeOwned>(params: &str) -> Result<v1::ApiRequest, JsonError> {
    serde_json::from_str::<T>(params)
        .map(ApiCall::into_request)
        .map_err(|e| JsonError::Invalid(e.to_string()))
}

/// The object a mini program's `success` callback receives, e.g. `{"errMsg":"login:ok","code":"…"}`.
pub fn response_to_json(resp: &v1::ApiResponse) -> Value {
    let value = match resp.api.as_ref() {
        Some(R::Login(r)) => serde_json::to_value(r),
        Some(R::CheckSession(r)) => serde_json::to_value(r),
        Some(R::GetPhoneNumber(r)) => serde_json::to_value(r),
        Some(R::GetEmail(r)) => serde_json::to_value(r),
        Some(R::ChooseAvatar(r)) => serde_json::to_value(r),
        Some(R::GetNickName(r)) => serde_json::to_value(r),
        Some(R::GetUserInfo(r)) => serde_json::to_value(r),
        Some(R::GetUserProfile(r)) => serde_json::to_value(r),
        Some(R::RequestPayment(r)) => serde_json::to_value(r),
        Some(R::RequestMidasPaymentGameItem(r)) => serde_json::to_value(r),
        None => Ok(Value::Object(Map::new())),
    };
    // Serializing plain strings and numbers cannot fail.
    value.unwrap_or_else(|_| Value::Object(Map::new()))
}

/// The object a mini program's `fail` callback receives:
/// `{"errMsg":"requestPayment:fail cancel","errno":…}`, plus `hostError` when the host raised it.
pub fn failure_to_json(f: &v1::ApiFailure) -> Value {
    let mut obj = json!({ "errMsg": f.err_msg, "errno": f.errno });
    if let Some(h) = &f.host_error {
        obj["hostError"] = json!({ "domain": h.domain, "code": h.code, "message": h.message });
    }
    obj
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn payment_params_use_wechat_names() {
        let req = request_from_json(
            Api::RequestPayment,
            r#"{"timeStamp":"1","nonceStr":"n","package":"prepay_id=1","signType":"RSA","paySign":"s","success":"fn"}"#,
        )
        .unwrap();
        let Some(v1::api_request::Api::RequestPayment(p)) = req.api else { panic!("wrong arm") };
        assert_eq!((p.time_stamp.as_str(), p.package.as_str(), p.pay_sign.as_str()), ("1", "prepay_id=1", "s"));
    }

    #[test]
    fn garbage_is_refused_clearly() {
        assert_eq!(request_from_json(Api::Login, "[1]"), Err(JsonError::NotAnObject));
        assert!(matches!(request_from_json(Api::Login, "{"), Err(JsonError::Invalid(_))));
        assert!(matches!(
            request_from_json(Api::RequestPayment, r#"{"timeStamp":12}"#),
            Err(JsonError::Invalid(_))
        ));
        let deep = format!("{{\"x\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(request_from_json(Api::Login, &deep), Err(JsonError::TooDeep));
        let shallow = r#"{"x":[[["[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["]]]}"#;
        assert!(request_from_json(Api::Login, shallow).is_ok(), "brackets inside strings do not count");
        assert!(request_from_json(Api::Login, "").is_ok());
    }

    #[test]
    fn responses_serialize_with_err_msg() {
        let resp = v1::LoginResponse { err_msg: "login:ok".into(), code: "c".into() };
        let json = response_to_json(&v1::LoginRequest::wrap_response(resp));
        assert_eq!(json, json!({"errMsg": "login:ok", "code": "c"}));
    }

    proptest! {
        #[test]
        fn any_text_parses_or_is_refused_without_panicking(api in 0usize..10, text in ".{0,256}") {
            let _ = request_from_json(Api::ALL[api], &text);
        }

        #[test]
        fn payment_fields_survive_a_round_trip(ts in "[0-9]{1,12}", nonce in "[A-Za-z0-9]{1,32}", sign in ".{0,64}") {
            let params = json!({"timeStamp": ts, "nonceStr": nonce, "package": "p", "signType": "RSA", "paySign": sign});
            let req = request_from_json(Api::RequestPayment, &params.to_string()).unwrap();
            let p = v1::RequestPaymentRequest::from_request(req).unwrap();
            prop_assert_eq!(p.time_stamp, ts);
            prop_assert_eq!(p.nonce_str, nonce);
            prop_assert_eq!(p.pay_sign, sign);
        }
    }
}
