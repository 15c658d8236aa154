//! The dev-host's superapp server (`dev-host --superapp-listen ADDR`): the superapp's backend as
//! docs/superapp-server.md describes it, served from the dev-host's profile, so a developer runs
//! the whole chain (host, daemon with its platform, superapp server) on one machine.
//!
//! It checks every request as a real superapp server must: the client key, a timestamp within
//! five minutes, and the platform's signature by the public key the platform printed. It issues the
//! authCodes its own host's getAuthCode returns, and answers each once; temporary codes for phone
//! and e-mail are single use too. Every answer is HTTP 200 with the contract's envelope; a refusal
//! is a `returnCode` other than "0" (the codes are this server's own, listed in [`Refusal`]).

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::DefaultBodyLimit,
    http::{HeaderMap, header::CONTENT_TYPE},
    routing,
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    dev_host::DevUser,
    superapp::{
        PlatformPublicKey,
        contract::{
            self, AuthCodeGrant, AuthCodeRequest, InfoType, TemporaryCode, TemporaryCodeRequest, UserRequest,
            ValueRequest,
        },
        signing::{HEADER_CLIENT_KEY, HEADER_SIGNATURE, HEADER_TIMESTAMP, parse_timestamp, string_to_sign},
    },
};

/// How far `X-TIMESTAMP` may be from this server's clock.
pub const TIMESTAMP_WINDOW: Duration = Duration::from_secs(300);
/// How long an authCode or a temporary code stays redeemable.
pub const CODE_TTL: Duration = Duration::from_secs(300);
/// Outstanding authCodes and temporary codes, each; one more is refused until some expire.
pub const MAX_CODES: usize = 4096;
/// The largest request body taken (the contract's bodies are a few dozen bytes).
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// Why this server refused a request: its `returnCode` and `returnMessage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("unknown X-CLIENT-KEY")]
    ClientKey,
    #[error("X-TIMESTAMP missing, not RFC 3339, or more than five minutes off")]
    Timestamp,
    #[error("X-SIGNATURE missing or not the platform's")]
    Signature,
    #[error("request body is not the contract's JSON")]
    BadRequest,
    #[error("user not found")]
    UnknownUser,
    #[error("user has no such value")]
    NoValue,
    #[error("invalid temporaryCode")]
    TemporaryCode,
    #[error("invalid authCode")]
    AuthCode,
    #[error("authCode already used")]
    AuthCodeUsed,
    #[error("too many outstanding codes")]
    Busy,
}

impl Refusal {
    pub const fn return_code(self) -> &'static str {
        match self {
            Refusal::ClientKey => "1001",
            Refusal::Timestamp => "1002",
            Refusal::Signature => "1003",
            Refusal::BadRequest => "1004",
            Refusal::UnknownUser => "2001",
            Refusal::NoValue => "2002",
            Refusal::TemporaryCode => "2003",
            Refusal::AuthCode => "2004",
            Refusal::AuthCodeUsed => "2005",
            Refusal::Busy => "5001",
        }
    }
}

/// An authCode this server issued.
#[derive(Debug)]
struct AuthEntry {
    uid: String,
    scopes: Vec<String>,
    expires: Instant,
    /// Redeemed: kept until it expires so a replay is told so.
    used: bool,
}

/// A temporary code for a phone number or an e-mail.
#[derive(Debug)]
struct TemporaryEntry {
    uid: String,
    kind: InfoType,
    expires: Instant,
}

#[derive(Debug, Default)]
struct Codes {
    auth: HashMap<String, AuthEntry>,
    temporary: HashMap<String, TemporaryEntry>,
}

/// The dev-host's superapp server. See the module docs.
#[derive(Debug)]
pub struct DevSuperapp {
    users: BTreeMap<String, DevUser>,
    client_key: String,
    platform_key: PlatformPublicKey,
    codes: Mutex<Codes>,
}

fn random_hex(prefix: &str) -> String {
    let bytes: [u8; 16] = rand::random();
    format!("{prefix}{}", hex::encode(bytes))
}

/// `158****2850`, `de****ev@example.invalid`: enough for the user to recognise, no more.
pub fn masked(kind: InfoType, value: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    let keep = |s: &[char], head: usize, tail: usize| {
        if s.len() <= head + tail {
            "****".to_owned()
        } else {
            format!("{}****{}", s[..head].iter().collect::<String>(), s[s.len() - tail..].iter().collect::<String>())
        }
    };
    match kind {
        InfoType::Phone => keep(&chars, 3, 4),
        InfoType::Email => match value.split_once('@') {
            Some((local, domain)) => format!("{}@{domain}", keep(&local.chars().collect::<Vec<_>>(), 2, 2)),
            None => keep(&chars, 2, 2),
        },
    }
}

impl DevSuperapp {
    /// A server that knows `users` (by uid), takes `client_key` and checks signatures with
    /// `platform_key`.
    pub fn new(
        users: impl IntoIterator<Item = DevUser>,
        client_key: &str,
        platform_key: PlatformPublicKey,
    ) -> DevSuperapp {
        DevSuperapp {
            users: users.into_iter().filter(|u| !u.uid.is_empty()).map(|u| (u.uid.clone(), u)).collect(),
            client_key: client_key.to_owned(),
            platform_key,
            codes: Mutex::new(Codes::default()),
        }
    }

    fn codes(&self) -> std::sync::MutexGuard<'_, Codes> {
        self.codes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An authCode for `uid` with the scopes the user granted, as the host's getAuthCode returns
    /// it; `None` when too many are outstanding.
    pub fn issue_auth_code(&self, uid: &str, scopes: &[String]) -> Option<String> {
        let now = Instant::now();
        let mut codes = self.codes();
        codes.auth.retain(|_, e| e.expires > now);
        if codes.auth.len() >= MAX_CODES {
            return None;
        }
        let code = random_hex("devsuperapp-auth-");
        codes.auth.insert(
            code.clone(),
            AuthEntry { uid: uid.to_owned(), scopes: scopes.to_vec(), expires: now + CODE_TTL, used: false },
        );
        Some(code)
    }

    /// The contract's routes over this server.
    pub fn router(self: Arc<Self>) -> Router {
        let mut router = Router::new();
        for path in contract::ALL_PATHS {
            let server = self.clone();
            router =
                router.route(
                    path,
                    routing::post(move |headers: HeaderMap, body: Bytes| {
                        let server = server.clone();
                        async move {
                            ([(CONTENT_TYPE, "application/json")], server.answer(path, &headers, &body).to_string())
                        }
                    }),
                );
        }
        router.layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
    }

    /// Serves on `listener` until `shutdown`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) -> std::io::Result<()> {
        axum::serve(listener, self.router()).with_graceful_shutdown(shutdown.cancelled_owned()).await
    }

    /// Binds `address` and serves in a task until `shutdown`; returns the bound address.
    pub async fn spawn(
        self: Arc<Self>,
        address: SocketAddr,
        shutdown: CancellationToken,
    ) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(address).await?;
        let bound = listener.local_addr()?;
        tokio::spawn(self.serve(listener, shutdown));
        Ok(bound)
    }

    /// The envelope for one request to `path`.
    pub fn answer(&self, path: &str, headers: &HeaderMap, body: &[u8]) -> Value {
        let request_id = random_hex("");
        match self.check(path, headers, body).and_then(|()| self.data(path, body)) {
            Ok(data) => {
                json!({"returnCode": contract::OK, "returnMessage": "ok", "data": data, "requestId": request_id})
            }
            Err(refusal) => json!({
                "returnCode": refusal.return_code(),
                "returnMessage": refusal.to_string(),
                "data": null,
                "requestId": request_id,
            }),
        }
    }

    /// The client key, the timestamp's freshness and the platform's signature.
    fn check(&self, path: &str, headers: &HeaderMap, body: &[u8]) -> Result<(), Refusal> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        if header(HEADER_CLIENT_KEY) != Some(self.client_key.as_str()) {
            return Err(Refusal::ClientKey);
        }
        let stamp = header(HEADER_TIMESTAMP).ok_or(Refusal::Timestamp)?;
        let at = parse_timestamp(stamp).ok_or(Refusal::Timestamp)?;
        if (OffsetDateTime::now_utc() - at).unsigned_abs() > TIMESTAMP_WINDOW {
            return Err(Refusal::Timestamp);
        }
        let signature = header(HEADER_SIGNATURE).ok_or(Refusal::Signature)?;
        self.platform_key.verify(&string_to_sign(path, body, stamp), signature).map_err(|_| Refusal::Signature)
    }

    fn user(&self, uid: &str) -> Result<&DevUser, Refusal> {
        self.users.get(uid).ok_or(Refusal::UnknownUser)
    }

    /// The `data` of a success.
    fn data(&self, path: &str, body: &[u8]) -> Result<Value, Refusal> {
        fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Refusal> {
            serde_json::from_slice(body).map_err(|_| Refusal::BadRequest)
        }
        fn present(value: &str) -> Result<Value, Refusal> {
            if value.is_empty() { Err(Refusal::NoValue) } else { Ok(Value::from(value)) }
        }
        let now = Instant::now();
        match path {
            contract::CHECK_USER => Ok(Value::Bool(self.users.contains_key(&parse::<UserRequest>(body)?.user_id))),
            contract::AVATAR => present(&self.user(&parse::<UserRequest>(body)?.user_id)?.avatar_url),
            contract::NICKNAME => present(&self.user(&parse::<UserRequest>(body)?.user_id)?.nick_name),
            contract::TEMPORARY_CODE => {
                let request: TemporaryCodeRequest = parse(body)?;
                let user = self.user(&request.user_id)?;
                let value = match request.kind {
                    InfoType::Phone => &user.phone_number,
                    InfoType::Email => &user.email,
                };
                if value.is_empty() {
                    return Err(Refusal::NoValue);
                }
                let mut codes = self.codes();
                codes.temporary.retain(|_, e| e.expires > now);
                if codes.temporary.len() >= MAX_CODES {
                    return Err(Refusal::Busy);
                }
                let code = random_hex("devsuperapp-tmp-");
                let entry = TemporaryEntry { uid: request.user_id, kind: request.kind, expires: now + CODE_TTL };
                codes.temporary.insert(code.clone(), entry);
                Ok(serde_json::to_value(TemporaryCode { code, data: masked(request.kind, value) }).expect("serializes"))
            }
            contract::PHONE_NUMBER | contract::EMAIL => {
                let kind = if path == contract::PHONE_NUMBER { InfoType::Phone } else { InfoType::Email };
                let request: ValueRequest = parse(body)?;
                let mut codes = self.codes();
                let valid = codes
                    .temporary
                    .get(&request.temporary_code)
                    .is_some_and(|e| e.uid == request.user_id && e.kind == kind && e.expires > now);
                if !valid {
                    return Err(Refusal::TemporaryCode);
                }
                codes.temporary.remove(&request.temporary_code);
                drop(codes);
                let user = self.user(&request.user_id)?;
                present(if kind == InfoType::Phone { &user.phone_number } else { &user.email })
            }
            contract::AUTH_CODE => {
                let request: AuthCodeRequest = parse(body)?;
                if request.grant_type != contract::AUTHORIZATION_CODE {
                    return Err(Refusal::BadRequest);
                }
                let mut codes = self.codes();
                let entry =
                    codes.auth.get_mut(&request.auth_code).filter(|e| e.expires > now).ok_or(Refusal::AuthCode)?;
                if entry.used {
                    return Err(Refusal::AuthCodeUsed);
                }
                entry.used = true;
                let grant = AuthCodeGrant {
                    access_token: random_hex("devsuperapp-token-"),
                    user_id: entry.uid.clone(),
                    auth_success_scopes: entry.scopes.clone(),
                };
                Ok(serde_json::to_value(grant).expect("serializes"))
            }
            _ => Err(Refusal::BadRequest),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_masked_as_the_contracts_examples() {
        assert_eq!(masked(InfoType::Phone, "15800002850"), "158****2850");
        assert_eq!(masked(InfoType::Email, "muzhang@tencent.com"), "mu****ng@tencent.com");
        assert_eq!(masked(InfoType::Phone, "123"), "****");
        assert_eq!(masked(InfoType::Email, "ab@x"), "****@x");
    }
}
