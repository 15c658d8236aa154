//! The open APIs: for each, the decision "default or delegate", its parameters, and the default
//! implementation where the daemon has one. One file per API; `auth_code` is the getAuthCode step
//! (v3's defaults and wx.authorize), `profile` the signed-in user's data, `payments` the
//! idempotency shared by both payments; `get_setting`, `authorize` and `open_setting` are the
//! settings APIs over the consent store.

mod auth_code;
mod authorize;
mod check_session;
mod choose_avatar;
pub mod credentials;
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
    api::{ApiCall, scope},
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

/// The last check before a call's route does anything, the same on every surface and on both the
/// fast and the waiting path: a remembered refusal of a scope the API discloses denies it
/// (`auth deny`) before the host or a default sees it; a call that may add to the store
/// ([`adds_to_store`]) takes one from its user's bucket for the API in the app
/// (`limits.calls_per_second_per_user`). Returns the call's route.
pub fn gate(b: &Broker, inst: &AppInstance, api: Api, version: ApiVersion) -> Result<Route, ApiError> {
    let route = route(api, version);
    let scopes = facts(api).refused_by;
    let adds = adds_to_store(api, route);
    if scopes.is_empty() && !adds {
        return Ok(route);
    }
    let user = b.user.get();
    if !scopes.is_empty()
        && let Some(user) = &user
        && b.consent.refuses_any(&inst.app_id, &user.uid, scopes)?
    {
        return Err(ApiError::AuthDeny);
    }
    // Signed out, nothing but a payment writes (the defaults fail "app not login").
    match &user {
        Some(user) if adds => b.user_rates.check(&inst.app_id, &user.uid, api)?,
        None if route == Route::Payment => b.user_rates.check(&inst.app_id, "", api)?,
        _ => {}
    }
    Ok(route)
}

/// Whether a call of `api` on `route` may add to the store: every default (a session, a code's
/// ledger rows, a disclosure), a payment (its record), and a delegated answer the ledger records.
/// The settings APIs only replace one decision per scope, and other delegated calls store nothing.
pub fn adds_to_store(api: Api, route: Route) -> bool {
    match route {
        Route::Default | Route::Payment => true,
        Route::Delegate => facts(api).disclosed.is_some(),
        Route::Consent => false,
    }
}

/// Answers one validated call of `api` in an instance running `version`, past its [`gate`] (which
/// gave `route`), with the instance's in-flight `slot` for it: held until the answer, or by the
/// payment's own task until the host answers it (payments are answered once per key, see
/// [`payments`]).
pub async fn handle(
    b: &Arc<Broker>,
    inst: &Arc<AppInstance>,
    version: ApiVersion,
    api: Api,
    route: Route,
    request: ApiRequest,
    slot: CallSlot,
) -> Result<ApiResponse, ApiError> {
    let outcome = match route {
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

/// The per-API facts the daemon acts on beyond the route (which follows from the contract's own
/// table in `miniapp_broker_proto::api`): what a delegated answer discloses, and which scopes'
/// remembered refusal denies the API. One row per API; docs/decisions.md has the same table.
#[derive(Debug, Clone, Copy)]
pub struct Facts {
    /// What of the user a delegated answer carries, recorded in the ledger when it passes through
    /// (`None`: nothing the daemon can name). Such an answer is post-processed on every surface
    /// (see [`finish_delegated`]).
    pub disclosed: Option<Disclosed>,
    /// The scopes whose remembered refusal (any one of them) makes the API fail `auth deny`
    /// without reaching the host or a default, on every route and surface.
    pub refused_by: &'static [&'static str],
}

/// The [`Facts`] row of `api`.
pub const fn facts(api: Api) -> Facts {
    use scope::{AVATAR, EMAIL, NICKNAME, PHONE_NUMBER};
    const USER_INFO: &[&str] = &[AVATAR, NICKNAME];
    let (disclosed, refused_by): (_, &'static [&'static str]) = match api {
        Api::GetPhoneNumber => (None, &[PHONE_NUMBER]),
        Api::GetEmail => (None, &[EMAIL]),
        Api::ChooseAvatar => (Some(Disclosed::Avatar), &[AVATAR]),
        Api::GetNickName => (Some(Disclosed::Nickname), &[NICKNAME]),
        Api::GetUserInfo => (Some(Disclosed::UserInfo), USER_INFO),
        Api::GetUserProfile => (Some(Disclosed::UserProfile), USER_INFO),
        Api::Login
        | Api::CheckSession
        | Api::RequestPayment
        | Api::RequestMidasPaymentGameItem
        | Api::GetSetting
        | Api::Authorize
        | Api::OpenSetting => (None, &[]),
    };
    Facts { disclosed, refused_by }
}

/// A delegated open-API call as its answer's post-processing needs it, taken when the call is
/// handed to the host: the API, the app, the user the answer is about (the one signed in when the
/// call was made; empty, and nothing copied, for an API whose answer carries no user data), and
/// the signed and encrypted user data the answer is to get ([`credentials`]).
#[derive(Debug)]
pub struct Delegated {
    api: Api,
    app_id: Arc<str>,
    uid: String,
    credentials: credentials::Credentials,
}

impl Delegated {
    pub fn new(b: &Broker, inst: &AppInstance, api: Api, version: ApiVersion, request: &ApiRequest) -> Delegated {
        let uid = if facts(api).disclosed.is_some() {
            b.user.get().map(|u| u.uid.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        let credentials = credentials::Credentials::of_call(api, version, request);
        Delegated { api, app_id: inst.app_id.clone(), uid, credentials }
    }

    /// Whether the answer's post-processing waits on the platform (it makes the answer's signed
    /// and encrypted user data): such a call is finished by [`finish_delegated`] on a task, never
    /// by the stream's synchronous hook.
    pub fn makes_credentials(&self) -> bool {
        self.credentials != credentials::Credentials::Untouched
    }

    /// Whether [`finish_delegated`] does more than take the answer and stamp it. The stream's
    /// forward carries the hook only for such calls (it costs an allocation per call); unary,
    /// `Invoke` and payments always call it. An API whose answer needs post-processing says so in
    /// its [`facts`] row.
    pub fn post_processed(&self) -> bool {
        facts(self.api).disclosed.is_some()
    }
}

/// The one place a host's answer to a delegated open-API call becomes the renderer's answer, on
/// every surface (unary, `Invoke`, the stream's forward, the waiting path, payments): the answer
/// is checked to be the API's, gets its signed and encrypted user data in v2/v3
/// ([`credentials::fill`]), is recorded in the disclosure ledger when it carries user data (an
/// answer whose row cannot be written is not passed on), and stamped `"<api>:ok"`. Whatever else
/// a delegated answer must go through before it leaves the daemon belongs here.
pub async fn finish_delegated(
    b: &Broker,
    call: &Delegated,
    answer: Result<HostAnswer, ApiError>,
) -> Result<ApiResponse, ApiError> {
    let mut resp = answer?.into_api_response()?;
    credentials::fill(b.platform.as_ref(), &call.app_id, &call.uid, call.credentials, &mut resp).await?;
    record_delegated(b, call, resp)
}

/// [`finish_delegated`] for a call that makes no credentials
/// ([`Delegated::makes_credentials`] is false), where nothing waits: the stream's forward calls it
/// as the host's answer arrives.
pub fn finish_delegated_now(
    b: &Broker,
    call: &Delegated,
    answer: Result<HostAnswer, ApiError>,
) -> Result<ApiResponse, ApiError> {
    debug_assert!(!call.makes_credentials(), "a call that makes credentials is finished on a task");
    record_delegated(b, call, answer?.into_api_response()?)
}

/// The ledger row of a delegated answer that carries user data.
fn record_delegated(b: &Broker, call: &Delegated, resp: ApiResponse) -> Result<ApiResponse, ApiError> {
    if let Some(what) = facts(call.api).disclosed {
        b.consent.ledger.record(&call.app_id, &call.uid, what, call.api)?;
    }
    Ok(resp)
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

/// Forwards a call to the host, waiting for one within the grace period, and waits for its answer.
pub async fn delegate(
    b: &Broker,
    inst: &AppInstance,
    version: ApiVersion,
    api: Api,
    request: ApiRequest,
) -> Result<ApiResponse, ApiError> {
    let app = Broker::app_info(inst, Some(version));
    let call = Delegated::new(b, inst, api, version, &request);
    finish_delegated(b, &call, b.host.call(app, delegate_call::Request::Api(request), Expect::Api(api)).await).await
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
