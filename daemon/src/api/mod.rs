//! The open APIs: for each, the decision "default or delegate", its parameters, and the default
//! implementation where the daemon has one. One file per API; `auth_code` is the getAuthCode step
//! (v3's defaults and wx.authorize), `profile` the signed-in user's data, `payments` the
//! idempotency shared by both payments; `get_setting`, `authorize` and `open_setting` are the
//! settings APIs over the consent store.

mod auth_code;
mod authorize;
mod check_session;
mod choose_avatar;
mod get_email;
mod get_nick_name;
mod get_phone_number;
mod get_setting;
mod get_user_info;
mod get_user_profile;
mod login;
mod open_setting;
pub mod payments;
mod profile;
mod request_midas_payment_game_item;
mod request_payment;

use std::sync::Arc;

use miniapp_broker_proto::{
    Api,
    api::ApiCall,
    v1::{self, ApiRequest, ApiResponse, api_request::Api as Req, delegate_call},
};

use crate::{
    broker::Broker,
    error::ApiError,
    host_link::{Expect, HostAnswer},
    platform::Disclosed,
    registry::{AppInstance, CallSlot},
    version::ApiVersion,
};

/// How a call is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The host answers (v1, or an API without a default).
    Delegate,
    /// The daemon answers (v2/v3 defaults).
    Default,
    /// The host answers, once per idempotency key.
    Payment,
    /// The consent store answers, asking the host where the API does (every version).
    Consent,
}

/// The route of `api` in an instance running `version`.
pub fn route(api: Api, version: ApiVersion) -> Route {
    if api.is_consent() {
        Route::Consent
    } else if api.is_payment() {
        Route::Payment
    } else if version == ApiVersion::V1 || !api.has_default() {
        Route::Delegate
    } else {
        Route::Default
    }
}

/// Checks a request's parameters before anything else happens; returns its API.
pub fn validate(request: &ApiRequest) -> Result<Api, ApiError> {
    match request.api.as_ref() {
        None => return Err(ApiError::InvalidParams("the request names no API".into())),
        Some(Req::GetUserProfile(r)) => get_user_profile::validate(r)?,
        Some(Req::RequestPayment(r)) => request_payment::validate(r)?,
        Some(Req::RequestMidasPaymentGameItem(r)) => request_midas_payment_game_item::validate(r)?,
        Some(Req::Authorize(r)) => authorize::validate(r)?,
        Some(_) => {}
    }
    request.api().ok_or_else(|| ApiError::InvalidParams("the request names no API".into()))
}

/// Answers one validated call of `api` in an instance running `version`, with the instance's
/// in-flight `slot` for it: held until the answer, or by the payment's own task until the host
/// answers it (payments are answered once per key, see [`payments`]). Every API but the settings
/// APIs first takes one from the signed-in user's bucket in the app (`limits.calls_per_second_per_user`):
/// each may write to the store.
pub async fn handle(
    b: &Arc<Broker>,
    inst: &Arc<AppInstance>,
    version: ApiVersion,
    api: Api,
    request: ApiRequest,
    slot: CallSlot,
) -> Result<ApiResponse, ApiError> {
    if !api.is_consent() {
        let uid = b.user.get().map(|u| u.uid.clone()).unwrap_or_default();
        b.user_rates.check(&inst.app_id, &uid)?;
    }
    let outcome = match route(api, version) {
        Route::Delegate => delegate(b, inst, version, api, request).await,
        Route::Default => run_default(b, inst, version, request).await,
        Route::Payment => return payments::run(b, inst, version, api, request, slot).await,
        Route::Consent => run_consent(b, inst, version, request).await,
    };
    drop(slot);
    outcome
}

/// Answers a settings API (getSetting, authorize, openSetting).
async fn run_consent(
    b: &Broker,
    inst: &AppInstance,
    version: ApiVersion,
    request: ApiRequest,
) -> Result<ApiResponse, ApiError> {
    Ok(match request.api {
        Some(Req::GetSetting(_)) => v1::GetSettingRequest::wrap_response(get_setting::run(b, inst)?),
        Some(Req::Authorize(r)) => v1::AuthorizeRequest::wrap_response(authorize::run(b, inst, version, r).await?),
        Some(Req::OpenSetting(_)) => v1::OpenSettingRequest::wrap_response(open_setting::run(b, inst, version).await?),
        _ => return Err(ApiError::Internal("not a settings API".into())),
    })
}

/// What of the user a delegated API's answer carries, for the ledger (the host's data passed
/// through to a renderer); `None` for APIs whose answer discloses nothing the daemon can name.
fn disclosed_by(api: Api) -> Option<Disclosed> {
    match api {
        Api::ChooseAvatar => Some(Disclosed::Avatar),
        Api::GetNickName => Some(Disclosed::Nickname),
        Api::GetUserInfo => Some(Disclosed::UserInfo),
        Api::GetUserProfile => Some(Disclosed::UserProfile),
        _ => None,
    }
}

/// Whether a delegated answer of `api` is recorded in the ledger.
pub fn discloses(api: Api) -> bool {
    disclosed_by(api).is_some()
}

/// Records in the ledger that the host's answer to a delegated `api` call, about `uid` (signed
/// in when the call was made), went to `app_id`'s renderer. Every delegate path calls it before
/// the answer leaves.
pub fn record_passed_through(b: &Broker, app_id: &str, uid: &str, api: Api) -> Result<(), ApiError> {
    match disclosed_by(api) {
        Some(what) => Ok(b.consent.ledger.record(app_id, uid, what, api)?),
        None => Ok(()),
    }
}

/// Runs the daemon's default implementation of a validated request.
pub async fn run_default(
    b: &Broker,
    inst: &AppInstance,
    version: ApiVersion,
    request: ApiRequest,
) -> Result<ApiResponse, ApiError> {
    let req = request.api.ok_or_else(|| ApiError::InvalidParams("the request names no API".into()))?;
    Ok(match req {
        Req::Login(_) => v1::LoginRequest::wrap_response(login::default(b, inst, version).await?),
        Req::CheckSession(_) => v1::CheckSessionRequest::wrap_response(check_session::default(b, inst).await?),
        Req::GetPhoneNumber(_) => {
            v1::GetPhoneNumberRequest::wrap_response(get_phone_number::default(b, inst, version).await?)
        }
        Req::GetEmail(_) => v1::GetEmailRequest::wrap_response(get_email::default(b, inst, version).await?),
        Req::ChooseAvatar(_) => v1::ChooseAvatarRequest::wrap_response(choose_avatar::default(b, inst, version).await?),
        Req::GetNickName(_) => v1::GetNickNameRequest::wrap_response(get_nick_name::default(b, inst, version).await?),
        other => {
            return Err(ApiError::Internal(format!(
                "{} has no default implementation",
                ApiRequest { api: Some(other) }.api().map(Api::name).unwrap_or("?")
            )));
        }
    })
}

/// Forwards a call to the host and waits for its answer.
pub async fn delegate(
    b: &Broker,
    inst: &AppInstance,
    version: ApiVersion,
    api: Api,
    request: ApiRequest,
) -> Result<ApiResponse, ApiError> {
    let app = Broker::app_info(inst, Some(version));
    let uid = passed_through_to(b, api);
    delegated(
        b,
        &inst.app_id,
        &uid,
        api,
        b.host.call(app, delegate_call::Request::Api(request), Expect::Api(api)).await,
    )
}

/// The user a delegated `api` call's answer is about: the one signed in when the call was made
/// (empty, and nothing copied, for an API whose answer carries no user data).
pub fn passed_through_to(b: &Broker, api: Api) -> String {
    if discloses(api) { b.user.get().map(|u| u.uid.clone()).unwrap_or_default() } else { String::new() }
}

/// The renderer's answer from the host's answer to a delegated open-API call about `uid`, recorded
/// in the ledger first when it carries user data.
pub fn delegated(
    b: &Broker,
    app_id: &str,
    uid: &str,
    api: Api,
    answer: Result<HostAnswer, ApiError>,
) -> Result<ApiResponse, ApiError> {
    match answer? {
        HostAnswer::Api(mut resp) => {
            record_passed_through(b, app_id, uid, api)?;
            resp.stamp_ok();
            Ok(resp)
        }
        _ => Err(ApiError::HostProtocol("unexpected answer type".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_follow_the_seed_table() {
        for api in Api::ALL {
            assert_ne!(route(api, ApiVersion::V1), Route::Default, "{api} in v1");
            let expected = if api.is_payment() {
                Route::Payment
            } else if api.has_default() {
                Route::Default
            } else {
                Route::Delegate
            };
            assert_eq!(route(api, ApiVersion::V2), expected, "{api} in v2");
            assert_eq!(route(api, ApiVersion::V3), expected, "{api} in v3");
        }
    }

    use proptest::prelude::*;
    use serde_json::{Value, json};

    /// signData as a hostile bridge may send it: text, or an object whose required keys hold
    /// anything.
    fn sign_data() -> impl Strategy<Value = String> {
        let field = prop_oneof![
            Just(Value::Null),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            ".{0,8}".prop_map(Value::from),
            Just(json!([1])),
        ];
        prop_oneof![
            ".{0,40}",
            prop::collection::btree_map(
                prop_oneof![
                    Just("mode"),
                    Just("currencyType"),
                    Just("productId"),
                    Just("outTradeNo"),
                    Just("buyQuantity"),
                    Just("goodsPrice"),
                    Just("env")
                ],
                field,
                0..7,
            )
            .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()).to_string()),
        ]
    }

    fn any_request() -> impl Strategy<Value = ApiRequest> {
        let s = || ".{0,12}";
        prop_oneof![
            Just(ApiRequest { api: None }),
            Just(v1::LoginRequest { timeout: 0 }.into_request()),
            (s(), s()).prop_map(|(desc, lang)| v1::GetUserProfileRequest { desc, lang }.into_request()),
            (
                "[0-9a-z ]{0,12}",
                s(),
                s(),
                prop_oneof![Just("MD5".to_owned()), Just("RSA".to_owned()), s().boxed()],
                s(),
                s()
            )
                .prop_map(|(time_stamp, nonce_str, package, sign_type, pay_sign, idempotency_key)| {
                    v1::RequestPaymentRequest { time_stamp, nonce_str, package, sign_type, pay_sign, idempotency_key }
                        .into_request()
                }),
            (sign_data(), s(), s(), s()).prop_map(|(sign_data, pay_sig, signature, idempotency_key)| {
                v1::RequestMidasPaymentGameItemRequest { sign_data, pay_sig, signature, idempotency_key }.into_request()
            }),
        ]
    }

    proptest! {
        /// The daemon's own checks (payment fields, signData, desc) never panic, accept only what
        /// names an API, and refuse only as invalid parameters.
        #[test]
        fn validation_is_total(request in any_request()) {
            match validate(&request) {
                Ok(api) => prop_assert_eq!(Some(api), request.api()),
                Err(e) => prop_assert!(matches!(e, ApiError::InvalidParams(_)), "{e:?}"),
            }
        }

        #[test]
        fn well_formed_payments_pass(
            ts in "[0-9]{1,12}",
            nonce in "[A-Za-z0-9]{1,32}",
            sign_type in prop_oneof![Just("MD5"), Just("HMAC-SHA256"), Just("RSA")],
            quantity in 1u64..1000,
            price in 1u64..1_000_000,
        ) {
            let payment = v1::RequestPaymentRequest {
                time_stamp: ts,
                nonce_str: nonce.clone(),
                package: format!("prepay_id={nonce}"),
                sign_type: sign_type.into(),
                pay_sign: "sig".into(),
                idempotency_key: String::new(),
            };
            prop_assert_eq!(validate(&payment.into_request()), Ok(Api::RequestPayment));
            let data = json!({
                "mode": "short_series_goods", "currencyType": "CNY", "productId": "p", "outTradeNo": nonce,
                "buyQuantity": quantity, "goodsPrice": price,
            });
            let midas = v1::RequestMidasPaymentGameItemRequest {
                sign_data: data.to_string(),
                pay_sig: "ps".into(),
                signature: "s".into(),
                idempotency_key: String::new(),
            };
            prop_assert_eq!(validate(&midas.into_request()), Ok(Api::RequestMidasPaymentGameItem));
        }
    }
}
