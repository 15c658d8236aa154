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
    #[error("{0}")]
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
        Api::GetSetting => parse::<v1::GetSettingRequest>(params),
        Api::Authorize => parse::<v1::AuthorizeRequest>(params),
        // What the renderer may send is ignored: the daemon fills the request in for the host.
        Api::OpenSetting => {
            parse::<v1::OpenSettingRequest>(params).map(|_| ApiCall::into_request(v1::OpenSettingRequest::default()))
        }
    }
}

/// Refuses nesting beyond [`MAX_DEPTH`] in one pass, before serde sees the text (serde_json skips
/// unknown fields without a depth limit).
fn check_depth(text: &str) -> Result<(), JsonError> {
    // Nesting can never exceed the number of opening brackets (those inside strings counted
    // too). Counting them is one vectorised pass; only text with more than the bound of them
    // needs the walk that tells strings apart.
    let opening = text.bytes().filter(|&b| b == b'{' || b == b'[').count();
    if opening <= MAX_DEPTH {
        return Ok(());
    }
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
    serde_json::from_str::<T>(params).map(ApiCall::into_request).map_err(|e| JsonError::Invalid(e.to_string()))
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
        Some(R::GetSetting(r)) => serde_json::to_value(r),
        Some(R::Authorize(r)) => serde_json::to_value(r),
        Some(R::OpenSetting(r)) => serde_json::to_value(r),
        None => Ok(Value::Object(Map::new())),
    };
    // Serializing plain strings and numbers cannot fail.
    value.unwrap_or_else(|_| Value::Object(Map::new()))
}

/// [`response_to_json`] as text, written straight from the response (no [`Value`] in between)
/// except where a map's keys are sorted for a stable text (getSetting, openSetting).
pub fn response_to_json_text(resp: &v1::ApiResponse) -> String {
    let text = match resp.api.as_ref() {
        Some(R::Login(r)) => serde_json::to_string(r),
        Some(R::CheckSession(r)) => serde_json::to_string(r),
        Some(R::GetPhoneNumber(r)) => serde_json::to_string(r),
        Some(R::GetEmail(r)) => serde_json::to_string(r),
        Some(R::ChooseAvatar(r)) => serde_json::to_string(r),
        Some(R::GetNickName(r)) => serde_json::to_string(r),
        Some(R::GetUserInfo(r)) => serde_json::to_string(r),
        Some(R::GetUserProfile(r)) => serde_json::to_string(r),
        Some(R::RequestPayment(r)) => serde_json::to_string(r),
        Some(R::RequestMidasPaymentGameItem(r)) => serde_json::to_string(r),
        Some(R::Authorize(r)) => serde_json::to_string(r),
        Some(R::GetSetting(_) | R::OpenSetting(_)) | None => return response_to_json(resp).to_string(),
    };
    // Serializing plain strings and numbers cannot fail.
    text.unwrap_or_else(|_| "{}".to_owned())
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
    use crate::strategies::json_value;
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
        assert!(matches!(request_from_json(Api::RequestPayment, r#"{"timeStamp":12}"#), Err(JsonError::Invalid(_))));
        let deep = format!("{{\"x\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(request_from_json(Api::Login, &deep), Err(JsonError::TooDeep));
        let shallow = r#"{"x":[[["[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["]]]}"#;
        assert!(request_from_json(Api::Login, shallow).is_ok(), "brackets inside strings do not count");
        let wide =
            format!("{{{}\"z\":1}}", (0..MAX_DEPTH * 2).map(|i| format!("\"k{i}\":[{{}}],")).collect::<String>());
        assert!(request_from_json(Api::Login, &wide).is_ok(), "siblings are not nesting");
        assert!(request_from_json(Api::Login, "").is_ok());
    }

    #[test]
    fn settings_use_wechat_shapes() {
        let req = request_from_json(Api::Authorize, r#"{"scope":"scope.userInfo","success":"fn"}"#).unwrap();
        assert_eq!(v1::AuthorizeRequest::from_request(req).unwrap().scope, "scope.userInfo");
        let req = request_from_json(Api::OpenSetting, r#"{"uid":"someone-else","withSubscriptions":true}"#).unwrap();
        assert_eq!(v1::OpenSettingRequest::from_request(req), Some(v1::OpenSettingRequest::default()));
        let resp = v1::GetSettingResponse {
            err_msg: "getSetting:ok".into(),
            auth_setting: [("scope.userInfo".to_owned(), true), ("SCOPE_EMAIL".to_owned(), false)].into(),
        };
        assert_eq!(
            response_to_json(&v1::GetSettingRequest::wrap_response(resp)),
            json!({"errMsg": "getSetting:ok", "authSetting": {"SCOPE_EMAIL": false, "scope.userInfo": true}})
        );
    }

    #[test]
    fn a_response_as_text_is_the_same_object() {
        let responses = [
            v1::LoginRequest::wrap_response(v1::LoginResponse { err_msg: "login:ok".into(), code: "c\"x".into() }),
            v1::RequestPaymentRequest::wrap_response(v1::RequestPaymentResponse {
                err_msg: "requestPayment:ok".into(),
            }),
            v1::GetSettingRequest::wrap_response(v1::GetSettingResponse {
                err_msg: "getSetting:ok".into(),
                auth_setting: [("b".to_owned(), true), ("a".to_owned(), false)].into(),
            }),
            v1::ApiResponse { api: None },
        ];
        for resp in responses {
            let text = response_to_json_text(&resp);
            assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), response_to_json(&resp), "{text}");
        }
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

    // Every API's params: a typed request written as the params object a mini program passes
    // (plus keys the bridge must ignore) parses back to the same request.

    fn text() -> impl Strategy<Value = String> {
        ".{0,24}"
    }

    /// Any typed request of any API, every field arbitrary.
    fn any_request() -> impl Strategy<Value = v1::ApiRequest> {
        prop_oneof![
            any::<u32>().prop_map(|timeout| v1::LoginRequest { timeout }.into_request()),
            Just(v1::CheckSessionRequest {}.into_request()),
            Just(v1::GetPhoneNumberRequest {}.into_request()),
            Just(v1::GetEmailRequest {}.into_request()),
            Just(v1::ChooseAvatarRequest {}.into_request()),
            Just(v1::GetNickNameRequest {}.into_request()),
            (any::<bool>(), text()).prop_map(|(with_credentials, lang)| v1::GetUserInfoRequest {
                with_credentials,
                lang
            }
            .into_request()),
            (text(), text()).prop_map(|(desc, lang)| v1::GetUserProfileRequest { desc, lang }.into_request()),
            (text(), text(), text(), text(), text(), text()).prop_map(
                |(time_stamp, nonce_str, package, sign_type, pay_sign, idempotency_key)| {
                    v1::RequestPaymentRequest { time_stamp, nonce_str, package, sign_type, pay_sign, idempotency_key }
                        .into_request()
                }
            ),
            (text(), text(), text(), text()).prop_map(|(sign_data, pay_sig, signature, idempotency_key)| {
                v1::RequestMidasPaymentGameItemRequest { sign_data, pay_sig, signature, idempotency_key }.into_request()
            }),
            Just(v1::GetSettingRequest {}.into_request()),
            text().prop_map(|scope| v1::AuthorizeRequest { scope }.into_request()),
            Just(v1::OpenSettingRequest::default().into_request()),
        ]
    }

    /// The params object a mini program would pass for `req`.
    fn params_of(req: &v1::ApiRequest) -> Value {
        use v1::api_request::Api as A;
        match req.api.as_ref().expect("a request") {
            A::Login(r) => serde_json::to_value(r),
            A::CheckSession(r) => serde_json::to_value(r),
            A::GetPhoneNumber(r) => serde_json::to_value(r),
            A::GetEmail(r) => serde_json::to_value(r),
            A::ChooseAvatar(r) => serde_json::to_value(r),
            A::GetNickName(r) => serde_json::to_value(r),
            A::GetUserInfo(r) => serde_json::to_value(r),
            A::GetUserProfile(r) => serde_json::to_value(r),
            A::RequestPayment(r) => serde_json::to_value(r),
            A::RequestMidasPaymentGameItem(r) => serde_json::to_value(r),
            A::GetSetting(r) => serde_json::to_value(r),
            A::Authorize(r) => serde_json::to_value(r),
            A::OpenSetting(r) => serde_json::to_value(r),
        }
        .expect("requests serialize")
    }

    fn user_info() -> impl Strategy<Value = Option<v1::UserInfo>> {
        proptest::option::of((text(), text(), 0u32..3, text()).prop_map(|(nick_name, avatar_url, gender, city)| {
            v1::UserInfo { nick_name, avatar_url, gender, city, ..Default::default() }
        }))
    }

    /// Any successful answer of any API.
    fn any_response() -> impl Strategy<Value = v1::ApiResponse> {
        prop_oneof![
            (text(), text())
                .prop_map(|(err_msg, code)| v1::LoginRequest::wrap_response(v1::LoginResponse { err_msg, code })),
            text().prop_map(|err_msg| v1::CheckSessionRequest::wrap_response(v1::CheckSessionResponse { err_msg })),
            (text(), text()).prop_map(|(err_msg, code)| v1::GetPhoneNumberRequest::wrap_response(
                v1::GetPhoneNumberResponse { err_msg, code }
            )),
            (text(), text())
                .prop_map(|(err_msg, code)| v1::GetEmailRequest::wrap_response(v1::GetEmailResponse { err_msg, code })),
            (text(), text()).prop_map(|(err_msg, avatar_url)| v1::ChooseAvatarRequest::wrap_response(
                v1::ChooseAvatarResponse { err_msg, avatar_url }
            )),
            (text(), text()).prop_map(|(err_msg, nick_name)| v1::GetNickNameRequest::wrap_response(
                v1::GetNickNameResponse { err_msg, nick_name }
            )),
            (text(), user_info(), text(), text()).prop_map(|(err_msg, user_info, raw_data, signature)| {
                v1::GetUserInfoRequest::wrap_response(v1::GetUserInfoResponse {
                    err_msg,
                    user_info,
                    raw_data,
                    signature,
                    ..Default::default()
                })
            }),
            (text(), user_info(), text(), text()).prop_map(|(err_msg, user_info, encrypted_data, iv)| {
                v1::GetUserProfileRequest::wrap_response(v1::GetUserProfileResponse {
                    err_msg,
                    user_info,
                    encrypted_data,
                    iv,
                    ..Default::default()
                })
            }),
            text().prop_map(|err_msg| v1::RequestPaymentRequest::wrap_response(v1::RequestPaymentResponse { err_msg })),
            text().prop_map(|err_msg| {
                v1::RequestMidasPaymentGameItemRequest::wrap_response(v1::RequestMidasPaymentGameItemResponse {
                    err_msg,
                })
            }),
            (text(), prop::collection::btree_map(text(), any::<bool>(), 0..5)).prop_map(|(err_msg, auth_setting)| {
                v1::GetSettingRequest::wrap_response(v1::GetSettingResponse { err_msg, auth_setting })
            }),
            text().prop_map(|err_msg| v1::AuthorizeRequest::wrap_response(v1::AuthorizeResponse { err_msg })),
            (text(), prop::collection::btree_map(text(), any::<bool>(), 0..5)).prop_map(|(err_msg, auth_setting)| {
                v1::OpenSettingRequest::wrap_response(v1::OpenSettingResponse { err_msg, auth_setting })
            }),
        ]
    }

    /// Reads a success object back into the typed answer of `api`.
    fn response_from_json(api: Api, value: Value) -> v1::ApiResponse {
        fn read<T: ApiCall>(value: Value) -> v1::ApiResponse
        where
            T::Response: DeserializeOwned,
        {
            T::wrap_response(serde_json::from_value(value).expect("a success object reads back"))
        }
        match api {
            Api::Login => read::<v1::LoginRequest>(value),
            Api::CheckSession => read::<v1::CheckSessionRequest>(value),
            Api::GetPhoneNumber => read::<v1::GetPhoneNumberRequest>(value),
            Api::GetEmail => read::<v1::GetEmailRequest>(value),
            Api::ChooseAvatar => read::<v1::ChooseAvatarRequest>(value),
            Api::GetNickName => read::<v1::GetNickNameRequest>(value),
            Api::GetUserInfo => read::<v1::GetUserInfoRequest>(value),
            Api::GetUserProfile => read::<v1::GetUserProfileRequest>(value),
            Api::RequestPayment => read::<v1::RequestPaymentRequest>(value),
            Api::RequestMidasPaymentGameItem => read::<v1::RequestMidasPaymentGameItemRequest>(value),
            Api::GetSetting => read::<v1::GetSettingRequest>(value),
            Api::Authorize => read::<v1::AuthorizeRequest>(value),
            Api::OpenSetting => read::<v1::OpenSettingRequest>(value),
        }
    }

    proptest! {
        #[test]
        fn every_api_round_trips_through_its_params(
            req in any_request(),
            ignored in prop::collection::btree_map("zz[a-z]{0,6}|success|fail|complete", json_value(), 0..4),
        ) {
            let api = req.api().unwrap();
            let mut params = params_of(&req);
            for (key, value) in ignored {
                params[key.as_str()] = value;
            }
            prop_assert_eq!(request_from_json(api, &params.to_string()), Ok(req));
        }

        #[test]
        fn any_json_value_parses_or_is_refused_cleanly(api in 0usize..10, value in json_value()) {
            let api = Api::ALL[api];
            match request_from_json(api, &value.to_string()) {
                Ok(req) => prop_assert_eq!(req.api(), Some(api)),
                Err(JsonError::NotAnObject) => prop_assert!(!value.is_object()),
                Err(JsonError::Invalid(_)) => prop_assert!(value.is_object()),
                Err(JsonError::TooDeep) => prop_assert!(false, "nested at most 5 deep"),
            }
        }

        #[test]
        fn nesting_is_refused_exactly_beyond_max_depth(api in 0usize..10, n in 0usize..80, arrays in any::<bool>()) {
            let (open, close) = if arrays { ("[", "]") } else { ("{\"k\":", "}") };
            let params = format!("{{\"zz\":{}1{}}}", open.repeat(n), close.repeat(n));
            let result = request_from_json(Api::ALL[api], &params);
            if n + 1 > MAX_DEPTH {
                prop_assert_eq!(result, Err(JsonError::TooDeep));
            } else {
                prop_assert!(result.is_ok(), "{} deep: {:?}", n + 1, result);
            }
        }

        #[test]
        fn answers_round_trip_through_the_success_object(resp in any_response()) {
            let value = response_to_json(&resp);
            prop_assert_eq!(value["errMsg"].as_str(), Some(resp.err_msg()));
            prop_assert_eq!(response_from_json(resp.api().unwrap(), value), resp);
        }

        #[test]
        fn failures_keep_err_msg_errno_and_the_host_error(err_msg in text(), errno in any::<i64>(), host in proptest::option::of((text(), any::<i64>(), text()))) {
            let failure = v1::ApiFailure {
                err_msg: err_msg.clone(),
                errno,
                host_error: host.map(|(domain, code, message)| v1::HostError { domain, code, message }),
                ..Default::default()
            };
            let value = failure_to_json(&failure);
            prop_assert_eq!(value["errMsg"].as_str(), Some(err_msg.as_str()));
            prop_assert_eq!(value["errno"].as_i64(), Some(errno));
            prop_assert_eq!(value.get("hostError").is_some(), failure.host_error.is_some());
        }
    }
}
