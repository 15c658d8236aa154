//! The platform's client of a superapp server: each call of the contract ([`super::contract`]) as
//! one signed JSON POST ([`super::signing`]) with a deadline, a bounded answer and a bounded number
//! of calls in flight, and every way it can go wrong as one [`SuperappError`].
//!
//! hyper-util's client (already under tonic and axum), over `http://` (the superapp's own network,
//! or one machine) or `https://` (hyper-rustls with the system's roots; `SSL_CERT_FILE` names
//! another bundle). A URL of another scheme is refused when the client is made, not at the first
//! call.
//!
//! A client may speak for users of one namespace ([`SuperappClient::for_namespace`]): the platform
//! service knows a superapp's user `alice` as `acme/alice`, while the superapp's server knows her as
//! `alice`; the client strips the namespace from every uid it sends, and a userId the server
//! answers is the platform's uid only with it.

use std::{sync::Arc, time::Duration};

use axum::{
    body::Bytes,
    http::{Request, Uri, header::CONTENT_TYPE},
};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde::{Serialize, de::DeserializeOwned};
use time::OffsetDateTime;
use tokio::sync::Semaphore;

use super::{
    contract::{
        self, AuthCodeGrant, AuthCodeRequest, Envelope, InfoType, TemporaryCode, TemporaryCodeRequest, UserRequest,
        ValueRequest,
    },
    signing::{HEADER_CLIENT_KEY, HEADER_SIGNATURE, HEADER_TIMESTAMP, PlatformKey, string_to_sign, timestamp},
};

/// The longest user id, code or value taken from an answer; anything longer is garbage.
pub const MAX_FIELD_CHARS: usize = 2048;

/// How the platform reaches one superapp's server.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientSettings {
    /// `http://host:port` (a path prefix is kept: the contract's paths are appended to it).
    pub server_url: String,
    /// `X-CLIENT-KEY`: the superapp's client key.
    pub client_key: String,
    /// The deadline of one call, from sending to the last byte of the answer.
    pub timeout: Duration,
    /// The largest answer body read.
    pub max_answer_bytes: usize,
    /// Calls in flight at once; one more fails at once with [`SuperappError::Busy`].
    pub max_in_flight: usize,
}

/// Why a call to the superapp server gave no answer the platform can use. The message names the
/// failure, never a user's data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SuperappError {
    #[error("superapp server_url {0:?} is not an http:// or https:// URL")]
    BadUrl(String),
    #[error("superapp server did not answer within {0} ms")]
    Timeout(u64),
    #[error("superapp server unreachable: {0}")]
    Unreachable(String),
    #[error("superapp server answered HTTP {0}")]
    Status(u16),
    #[error("superapp server's answer is larger than {0} bytes")]
    TooLarge(usize),
    #[error("superapp server's answer is not the contract's JSON: {0}")]
    Garbage(String),
    /// A well-formed answer with a returnCode other than "0".
    #[error("superapp server refused: returnCode {code:?}: {message}")]
    Refused { code: String, message: String },
    /// Too many calls to the superapp server in flight.
    #[error("too many calls to the superapp server in flight")]
    Busy,
}

/// One superapp server. See the module docs.
pub struct SuperappClient {
    base: String,
    client_key: String,
    key: Arc<PlatformKey>,
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// `"<namespace>/"` when the platform's uids carry the superapp's name, else empty.
    namespace: String,
    timeout: Duration,
    max_answer_bytes: usize,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
}

impl std::fmt::Debug for SuperappClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SuperappClient").field("base", &self.base).finish_non_exhaustive()
    }
}

/// At most this many characters of a server's own text are kept in an error.
const MAX_MESSAGE_CHARS: usize = 120;

fn shortened(text: &str) -> String {
    text.chars().take(MAX_MESSAGE_CHARS).filter(|c| !c.is_control()).collect()
}

/// `text` if it is a usable field of an answer: non-empty and at most [`MAX_FIELD_CHARS`].
fn field(what: &str, text: String) -> Result<String, SuperappError> {
    if text.is_empty() || text.chars().count() > MAX_FIELD_CHARS {
        return Err(SuperappError::Garbage(format!("{what} is empty or longer than {MAX_FIELD_CHARS} characters")));
    }
    Ok(text)
}

impl SuperappClient {
    pub fn new(settings: &ClientSettings, key: Arc<PlatformKey>) -> Result<SuperappClient, SuperappError> {
        let base = settings.server_url.trim_end_matches('/').to_owned();
        let uri: Uri = base.parse().map_err(|_| SuperappError::BadUrl(settings.server_url.clone()))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(SuperappError::BadUrl(settings.server_url.clone())),
        };
        if uri.host().is_none() || uri.query().is_some() {
            return Err(SuperappError::BadUrl(settings.server_url.clone()));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(settings.timeout));
        connector.enforce_http(false);
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = if https {
            builder.with_native_roots().map_err(|e| SuperappError::Unreachable(format!("no TLS roots: {e}")))?
        } else {
            // An http:// server is never reached over TLS, and the roots are not read for it.
            builder.with_tls_config(
                rustls_config_without_roots().map_err(|e| SuperappError::Unreachable(format!("TLS: {e}")))?,
            )
        };
        let connector =
            if https { builder.https_only() } else { builder.https_or_http() }.enable_http1().wrap_connector(connector);
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(settings.max_in_flight.min(16))
            .build(connector);
        Ok(SuperappClient {
            base,
            client_key: settings.client_key.clone(),
            key,
            http,
            timeout: settings.timeout,
            max_answer_bytes: settings.max_answer_bytes,
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight.max(1))),
            max_in_flight: settings.max_in_flight.max(1),
            namespace: String::new(),
        })
    }

    /// This client for the platform's uids of `namespace` (`<namespace>/<uid>`), see the module
    /// docs.
    pub fn for_namespace(mut self, namespace: &str) -> SuperappClient {
        self.namespace = format!("{namespace}/");
        self
    }

    /// The superapp's own user id of the platform's `uid`.
    pub fn user_id<'a>(&self, uid: &'a str) -> &'a str {
        uid.strip_prefix(self.namespace.as_str()).unwrap_or(uid)
    }

    /// Whether the server's `user_id` is the platform's `uid`.
    pub fn is_user(&self, uid: &str, user_id: &str) -> bool {
        uid.strip_prefix(self.namespace.as_str()) == Some(user_id)
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.max_in_flight - self.in_flight.available_permits()
    }

    /// checkUser: whether the superapp knows the user.
    pub async fn check_user(&self, user_id: &str) -> Result<bool, SuperappError> {
        self.call(contract::CHECK_USER, &UserRequest { user_id: self.user_id(user_id).to_owned() }).await
    }

    /// getUserInfoTemporaryCode: a temporary code standing for the user's phone or e-mail.
    pub async fn temporary_code(&self, user_id: &str, kind: InfoType) -> Result<TemporaryCode, SuperappError> {
        let answer: TemporaryCode = self
            .call(contract::TEMPORARY_CODE, &TemporaryCodeRequest { user_id: self.user_id(user_id).to_owned(), kind })
            .await?;
        Ok(TemporaryCode { code: field("data.code", answer.code)?, data: answer.data })
    }

    /// getUserPhoneNumber / getUserEmail: the value a temporary code stands for.
    pub async fn value(&self, user_id: &str, kind: InfoType, temporary_code: &str) -> Result<String, SuperappError> {
        let request =
            ValueRequest { user_id: self.user_id(user_id).to_owned(), temporary_code: temporary_code.to_owned() };
        field("data", self.call(kind.value_path(), &request).await?)
    }

    /// getUserAvatar: the user's avatar URL.
    pub async fn avatar(&self, user_id: &str) -> Result<String, SuperappError> {
        field("data", self.call(contract::AVATAR, &UserRequest { user_id: self.user_id(user_id).to_owned() }).await?)
    }

    /// getUserNick: the user's nickname.
    pub async fn nickname(&self, user_id: &str) -> Result<String, SuperappError> {
        field("data", self.call(contract::NICKNAME, &UserRequest { user_id: self.user_id(user_id).to_owned() }).await?)
    }

    /// access_token/b2b2c: who the host's authCode stands for.
    pub async fn redeem_auth_code(&self, auth_code: &str) -> Result<AuthCodeGrant, SuperappError> {
        let request =
            AuthCodeRequest { grant_type: contract::AUTHORIZATION_CODE.to_owned(), auth_code: auth_code.to_owned() };
        let grant: AuthCodeGrant = self.call(contract::AUTH_CODE, &request).await?;
        if grant.auth_success_scopes.len() > 64 {
            return Err(SuperappError::Garbage("more than 64 authSuccessScopes".into()));
        }
        Ok(AuthCodeGrant { user_id: field("data.userId", grant.user_id)?, ..grant })
    }

    /// One signed POST of `request` to `path`, its answer's `data` once `returnCode` is "0".
    async fn call<Req: Serialize, T: DeserializeOwned>(
        &self,
        path: &'static str,
        request: &Req,
    ) -> Result<T, SuperappError> {
        let _permit = self.in_flight.clone().try_acquire_owned().map_err(|_| SuperappError::Busy)?;
        let body = serde_json::to_vec(request).expect("the contract's requests serialize");
        let stamp = timestamp(OffsetDateTime::now_utc());
        let signature = self.key.sign(&string_to_sign(path, &body, &stamp));
        let request = Request::post(format!("{}{path}", self.base))
            .header(CONTENT_TYPE, "application/json")
            .header(HEADER_TIMESTAMP, stamp)
            .header(HEADER_CLIENT_KEY, &self.client_key)
            .header(HEADER_SIGNATURE, signature)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| SuperappError::BadUrl(e.to_string()))?;
        let limit = self.max_answer_bytes;
        let exchange = async {
            let response = self.http.request(request).await.map_err(|e| SuperappError::Unreachable(chain(&e)))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), limit).collect().await.map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    SuperappError::TooLarge(limit)
                } else {
                    SuperappError::Unreachable(shortened(&e.to_string()))
                }
            })?;
            Ok::<_, SuperappError>((status, body.to_bytes()))
        };
        let (status, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| SuperappError::Timeout(self.timeout.as_millis() as u64))??;
        if !status.is_success() {
            return Err(SuperappError::Status(status.as_u16()));
        }
        let envelope: Envelope<T> =
            serde_json::from_slice(&body).map_err(|e| SuperappError::Garbage(json_error(&e)))?;
        if envelope.return_code != contract::OK {
            return Err(SuperappError::Refused {
                code: shortened(&envelope.return_code),
                message: shortened(&envelope.return_message),
            });
        }
        envelope.data.ok_or_else(|| SuperappError::Garbage("returnCode \"0\" without data".into()))
    }
}

/// rustls with no roots, for a client that only ever speaks plain HTTP.
fn rustls_config_without_roots() -> Result<rustls::ClientConfig, rustls::Error> {
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth())
}

/// Where and how an answer is not the contract's JSON, without serde's quote of the offending
/// value (which may be a user's phone number or e-mail address).
fn json_error(e: &serde_json::Error) -> String {
    let kind = match e.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "not JSON",
        serde_json::error::Category::Data => "not the call's shape",
        serde_json::error::Category::Eof => "cut short",
    };
    format!("{kind} at line {} column {}", e.line(), e.column())
}

/// An error and its sources in one line (hyper's "client error (Connect)" says little alone).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    shortened(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> ClientSettings {
        ClientSettings {
            server_url: url.into(),
            client_key: "k".into(),
            timeout: Duration::from_millis(500),
            max_answer_bytes: 1024,
            max_in_flight: 2,
        }
    }

    #[tokio::test]
    async fn only_http_and_https_urls_are_taken() {
        let key = Arc::new(PlatformKey::generate().unwrap());
        for bad in ["ftp://x", "not a url", "http://x/?q=1", "/relative"] {
            assert!(matches!(SuperappClient::new(&settings(bad), key.clone()), Err(SuperappError::BadUrl(_))), "{bad}");
        }
        assert!(SuperappClient::new(&settings("http://127.0.0.1:1/prefix/"), key.clone()).is_ok());
        assert!(SuperappClient::new(&settings("https://superapp.example.invalid"), key).is_ok());
    }

    #[tokio::test]
    async fn a_namespaced_client_speaks_of_the_superapps_own_users() {
        let key = Arc::new(PlatformKey::generate().unwrap());
        let plain = SuperappClient::new(&settings("http://127.0.0.1:1"), key.clone()).unwrap();
        assert_eq!(plain.user_id("alice"), "alice");
        assert!(plain.is_user("alice", "alice"));
        let acme = SuperappClient::new(&settings("http://127.0.0.1:1"), key).unwrap().for_namespace("acme");
        assert_eq!(acme.user_id("acme/alice"), "alice");
        assert!(acme.is_user("acme/alice", "alice"));
        assert!(!acme.is_user("acme/alice", "acme/alice"), "the server's id is never namespaced");
        assert!(!acme.is_user("other/alice", "alice"), "another tenant's user is not this server's");
        assert!(!acme.is_user("alice", "alice"));
    }
}
