//! The endpoints: parse the query or JSON body, call the platform, shape the answer. No decisions
//! live here; the platform authenticates, rate-limits and redeems for both backend surfaces.

use axum::{
    body::Bytes,
    extract::{
        Query, State,
        rejection::{BytesRejection, QueryRejection},
    },
    http::StatusCode,
    response::Response,
};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{
    Shared,
    answer::{answer, json_response},
};
use crate::{AuthorizedApp, Credential, ExchangeFailure, Surface, TokenRequest, ValueKind};

/// An endpoint's data fields, or the failure [`answer`] shapes for the path's platform.
type Outcome = Result<Map<String, Value>, ExchangeFailure>;

/// `GET /sns/jscode2session?appid=&secret=&js_code=&grant_type=authorization_code`
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct SessionQuery {
    appid: String,
    secret: String,
    js_code: String,
    grant_type: String,
}

/// `GET /cgi-bin/token?grant_type=client_credential&appid=&secret=`
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct TokenParams {
    grant_type: String,
    appid: String,
    secret: String,
}

/// The body of `POST /cgi-bin/stable_token`: the same, and `force_refresh`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StableTokenBody {
    grant_type: String,
    appid: String,
    secret: String,
    force_refresh: bool,
}

/// `GET /wxa/checksession?access_token=&openid=&signature=&sig_method=hmac_sha256`
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct CheckSessionQuery {
    access_token: String,
    openid: String,
    signature: String,
    sig_method: String,
}

/// The `access_token` query parameter of the POST endpoints.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct TokenQuery {
    access_token: String,
}

/// The body of `getuserphonenumber` / `getuseremail`: the code, and optionally whose it must be.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct CodeBody {
    code: String,
    openid: Option<String>,
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ExchangeFailure> {
    q.map(|Query(q)| q).map_err(|_| ExchangeFailure::DataFormat)
}

/// A JSON object body (bounded by the router's body limit), or 47001.
fn body<T: serde::de::DeserializeOwned>(b: Result<Bytes, BytesRejection>) -> Result<T, ExchangeFailure> {
    let bytes = b.map_err(|_| ExchangeFailure::DataFormat)?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(v @ Value::Object(_)) => serde_json::from_value(v).map_err(|_| ExchangeFailure::DataFormat),
        _ => Err(ExchangeFailure::DataFormat),
    }
}

/// `ok`, or a malformed request with WeChat's `errcode` for it.
fn require(ok: bool, errcode: i32, why: &'static str) -> Result<(), ExchangeFailure> {
    if ok { Ok(()) } else { Err(ExchangeFailure::Malformed(errcode, why)) }
}

async fn by_secret(s: &Shared, app_id: &str, secret: &str) -> Result<AuthorizedApp, ExchangeFailure> {
    s.platform.authenticate(Surface::BackendHttp, Credential::Secret { app_id, secret }).await
}

async fn by_token(s: &Shared, token: &str) -> Result<AuthorizedApp, ExchangeFailure> {
    s.platform.authenticate(Surface::BackendHttp, Credential::AccessToken(token)).await
}

fn fields(pairs: impl IntoIterator<Item = (&'static str, Value)>) -> Map<String, Value> {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

pub(super) async fn jscode2session(
    State(s): State<Shared>,
    q: Result<Query<SessionQuery>, QueryRejection>,
) -> Response {
    let outcome: Outcome = async {
        let q = query(q)?;
        require(q.grant_type == "authorization_code", 40002, "grant_type must be authorization_code")?;
        let app = by_secret(&s, &q.appid, &q.secret).await?;
        let session = s.platform.code2session(Surface::BackendHttp, &app, &q.js_code).await?;
        let mut out = fields([("openid", json!(session.openid)), ("session_key", json!(session.session_key))]);
        // WeChat sends unionid only where there is one; TCMPP always has the field.
        if !session.unionid.is_empty() || s.flavor == super::Flavor::Tcmpp {
            out.insert("unionid".into(), json!(session.unionid));
        }
        Ok(out)
    }
    .await;
    answer(s.flavor, &[("openid", json!("")), ("session_key", json!("")), ("unionid", json!(""))], outcome)
}

async fn issue_token(s: &Shared, p: TokenParams, request: TokenRequest) -> Outcome {
    require(p.grant_type == "client_credential", 40002, "grant_type must be client_credential")?;
    let app = by_secret(s, &p.appid, &p.secret).await?;
    let token = s.platform.access_token(&app, request).await?;
    Ok(fields([("access_token", json!(token.token)), ("expires_in", json!(token.expires_in_secs))]))
}

fn token_empty() -> [(&'static str, Value); 2] {
    [("access_token", json!("")), ("expires_in", json!(0))]
}

pub(super) async fn token(State(s): State<Shared>, q: Result<Query<TokenParams>, QueryRejection>) -> Response {
    let outcome = match query(q) {
        Ok(p) => issue_token(&s, p, TokenRequest::Fresh).await,
        Err(e) => Err(e),
    };
    answer(s.flavor, &token_empty(), outcome)
}

pub(super) async fn stable_token(State(s): State<Shared>, b: Result<Bytes, BytesRejection>) -> Response {
    let outcome = match body::<StableTokenBody>(b) {
        Ok(b) => {
            let params = TokenParams { grant_type: b.grant_type, appid: b.appid, secret: b.secret };
            issue_token(&s, params, TokenRequest::Stable { force_refresh: b.force_refresh }).await
        }
        Err(e) => Err(e),
    };
    answer(s.flavor, &token_empty(), outcome)
}

/// The checksession query (checksession and resetusersessionkey take the same one): its app, by
/// the access token, and the query, once its signature method is checked.
async fn signed_session_query(
    s: &Shared,
    q: Result<Query<CheckSessionQuery>, QueryRejection>,
) -> Result<(AuthorizedApp, CheckSessionQuery), ExchangeFailure> {
    let q = query(q)?;
    let app = by_token(s, &q.access_token).await?;
    require(q.sig_method == "hmac_sha256", 87009, "sig_method must be hmac_sha256")?;
    Ok((app, q))
}

pub(super) async fn checksession(
    State(s): State<Shared>,
    q: Result<Query<CheckSessionQuery>, QueryRejection>,
) -> Response {
    let outcome: Outcome = async {
        let (app, q) = signed_session_query(&s, q).await?;
        s.platform.check_session_signature(&app, &q.openid, &q.signature).await?;
        Ok(fields([("errcode", json!(0)), ("errmsg", json!("ok"))]))
    }
    .await;
    answer(s.flavor, &[], outcome)
}

/// `GET /wxa/resetusersessionkey?access_token=&openid=&signature=&sig_method=hmac_sha256` (the
/// checksession query): the session of `openid` gets a new key, answered with the openid.
pub(super) async fn resetusersessionkey(
    State(s): State<Shared>,
    q: Result<Query<CheckSessionQuery>, QueryRejection>,
) -> Response {
    let outcome: Outcome = async {
        let (app, q) = signed_session_query(&s, q).await?;
        let session_key = s.platform.reset_session_key(&app, &q.openid, &q.signature).await?;
        Ok(fields([
            ("errcode", json!(0)),
            ("errmsg", json!("ok")),
            ("openid", json!(q.openid)),
            ("session_key", json!(session_key)),
        ]))
    }
    .await;
    answer(s.flavor, &[], outcome)
}

/// Redeems a phone or e-mail code with an access token: the app it is for, and the value.
async fn redeem(
    s: &Shared,
    q: Result<Query<TokenQuery>, QueryRejection>,
    b: Result<Bytes, BytesRejection>,
    kind: ValueKind,
) -> Result<(AuthorizedApp, String), ExchangeFailure> {
    let q = query(q)?;
    let app = by_token(s, &q.access_token).await?;
    let b: CodeBody = body(b)?;
    let value = s.platform.redeem_value(Surface::BackendHttp, &app, &b.code, kind, b.openid.as_deref()).await?;
    Ok((app, value))
}

fn watermark(s: &Shared, app: &AuthorizedApp) -> Value {
    json!({ "timestamp": s.clock.now_ms() / 1000, "appid": app.app_id() })
}

pub(super) async fn getuserphonenumber(
    State(s): State<Shared>,
    q: Result<Query<TokenQuery>, QueryRejection>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let outcome = redeem(&s, q, b, ValueKind::PhoneNumber).await.map(|(app, value)| {
        let phone = PhoneInfo::parse(&value);
        let info = json!({
            "phoneNumber": phone.phone_number,
            "purePhoneNumber": phone.pure,
            "countryCode": phone.country_code,
            "watermark": watermark(&s, &app),
        });
        fields([("errcode", json!(0)), ("errmsg", json!("ok")), ("phone_info", info)])
    });
    answer(s.flavor, &[], outcome)
}

/// Ours: WeChat has no e-mail endpoint. The same style as getuserphonenumber (docs/decisions.md).
pub(super) async fn getuseremail(
    State(s): State<Shared>,
    q: Result<Query<TokenQuery>, QueryRejection>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let outcome = redeem(&s, q, b, ValueKind::Email).await.map(|(app, email)| {
        let info = json!({ "email": email, "watermark": watermark(&s, &app) });
        fields([("errcode", json!(0)), ("errmsg", json!("ok")), ("email_info", info)])
    });
    answer(s.flavor, &[], outcome)
}

pub(super) async fn not_found() -> Response {
    json_response(StatusCode::NOT_FOUND, json!({ "errcode": 40066, "errmsg": "invalid url: no such endpoint" }))
}

pub(super) async fn method_not_allowed() -> Response {
    json_response(
        StatusCode::METHOD_NOT_ALLOWED,
        json!({ "errcode": 40066, "errmsg": "invalid url: this endpoint takes another HTTP method" }),
    )
}

/// A profile's phone number in WeChat's three forms. `+CC NUMBER` (a separator after the country
/// code) gives the country code; a number without `+` is taken as a mainland number (86).
#[derive(Debug, PartialEq, Eq)]
struct PhoneInfo {
    phone_number: String,
    pure: String,
    country_code: String,
}

impl PhoneInfo {
    fn parse(value: &str) -> PhoneInfo {
        let digits = |s: &str| s.chars().filter(char::is_ascii_digit).collect::<String>();
        let value = value.trim();
        let (country_code, pure) = match value.strip_prefix('+') {
            Some(rest) => match rest.split_once([' ', '-']) {
                Some((cc, number)) => (digits(cc), digits(number)),
                None => (String::new(), digits(rest)),
            },
            None => ("86".to_owned(), digits(value)),
        };
        let phone_number = match country_code.as_str() {
            "86" => pure.clone(),
            "" => format!("+{pure}"),
            cc => format!("+{cc}{pure}"),
        };
        PhoneInfo { phone_number, pure, country_code }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phone_numbers_split_into_wechat_forms() {
        let p = PhoneInfo::parse("+86 138 0013 8000");
        assert_eq!(
            (p.phone_number.as_str(), p.pure.as_str(), p.country_code.as_str()),
            ("13800138000", "13800138000", "86")
        );
        let p = PhoneInfo::parse("+1-415-555-0100");
        assert_eq!(
            (p.phone_number.as_str(), p.pure.as_str(), p.country_code.as_str()),
            ("+14155550100", "4155550100", "1")
        );
        let p = PhoneInfo::parse("13800138000");
        assert_eq!(p.country_code, "86");
        assert_eq!(p.pure, "13800138000");
    }
}
