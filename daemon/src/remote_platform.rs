//! The remote platform: the daemon's v2/v3 defaults go to a `miniapp-platformd` over gRPC
//! (`miniapp.platform.v1`) instead of the embedded platform (`[platform] url`, `--platform-url`).
//!
//! Every call carries a deadline: the renderer call's own ([`crate::deadline`]) when it is
//! shorter than `[platform] timeout_ms`. A platform that is down, slow or refusing ends the call by
//! then with `PlatformError::Unavailable` (`ApiError::PlatformUnavailable`), "`<api>:fail
//! platform unavailable`"; the channel reconnects by itself, so the daemon recovers when the
//! platform is back.
//!
//! The user's disclosure ledger stays the daemon's: a code's rows are written here while the
//! platform is asked for it (taken back if no code comes), and stamped when the platform reports
//! it redeemed ([`RemotePlatform::sync_redemptions`], run with the periodic sweep and before the
//! ledger is listed).

use std::{sync::Arc, time::Duration};

use dashmap::DashMap;
use miniapp_broker_proto::platform::v1::{self as pv1, platform_client::PlatformClient};
use tonic::{
    Code, Request, Status,
    metadata::{AsciiMetadataValue, MetadataValue},
    transport::{Channel, ClientTlsConfig, Endpoint},
};
use tracing::{info, warn};

use miniapp_broker_proto::v1::Code2SessionResponse;
use miniapp_platform::{
    AccessToken, AuthorizedApp, Credential, Disclosed, ExchangeFailure, Platform, PlatformError, SessionInfo, Surface,
    TokenRequest, ValueKind, superapp::vouch::ProfileField, tokens::code_id, user_data::UserCredentials,
};

use crate::{
    clock::Clock,
    store::{NewLedgerRow, Store},
};

/// The trailer in which the platform names a vouching step's failure (the proto's contract).
const FAILURE_TRAILER: &str = "platform-failure";
/// Most apps whose vouching answer is remembered (the map starts over past it).
const MAX_VOUCHING_KEPT: usize = 10_000;

/// Most code hashes asked about in one `Redemptions` call.
const REDEMPTIONS_PER_CALL: usize = 1000;

/// How to reach the platform (`[platform]`).
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    pub url: String,
    pub client_key: String,
    pub client_secret: String,
    /// PEM of the CA that signed the platform's certificate (else the system's roots).
    pub ca_pem: Option<Vec<u8>>,
    /// The longest a platform call may take when the caller has no shorter deadline.
    pub timeout: Duration,
}

/// A code the daemon issued through the platform and has not yet seen redeemed: its ledger rows.
#[derive(Debug, Clone)]
struct Outstanding {
    ledger: Vec<u64>,
    expires_at_ms: u64,
}

/// Ledger rows written for a code not yet issued: taken back when dropped, unless
/// [`LedgerClaim::keep`] says the code was issued.
struct LedgerClaim<'a> {
    store: &'a Store,
    ids: Vec<u64>,
}

impl LedgerClaim<'_> {
    fn keep(mut self) -> Vec<u64> {
        std::mem::take(&mut self.ids)
    }
}

impl Drop for LedgerClaim<'_> {
    fn drop(&mut self) {
        if !self.ids.is_empty()
            && let Err(e) = self.store.ledger_remove(&self.ids)
        {
            warn!(error = %e, "could not take back the ledger rows of a code that was not issued");
        }
    }
}

/// The remote platform. See the module docs.
pub struct RemotePlatform {
    client: PlatformClient<Channel>,
    key: AsciiMetadataValue,
    secret: AsciiMetadataValue,
    timeout: Duration,
    store: Arc<Store>,
    clock: Arc<dyn Clock>,
    /// Codes issued and not yet seen redeemed, by the hex SHA-256 of the code.
    outstanding: DashMap<String, Outstanding>,
    /// Whether the superapp's server vouches for each app's users, as the platform answered (a
    /// tenant's server never changes once it is stored, so the answer is kept).
    vouching: DashMap<String, bool>,
}

impl std::fmt::Debug for RemotePlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemotePlatform").field("outstanding", &self.outstanding.len()).finish_non_exhaustive()
    }
}

impl RemotePlatform {
    /// A platform client; connects lazily (a platform down at start is retried on each call).
    pub fn new(config: RemoteConfig, store: Arc<Store>, clock: Arc<dyn Clock>) -> Result<RemotePlatform, String> {
        let mut endpoint = Endpoint::from_shared(config.url.clone())
            .map_err(|e| format!("platform.url {}: {e}", config.url))?
            .connect_timeout(config.timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10));
        if config.url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_native_roots();
            if let Some(pem) = &config.ca_pem {
                tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| format!("platform TLS: {e}"))?;
        } else if !config.url.starts_with("http://") {
            return Err(format!("platform.url must be http(s)://HOST:PORT, not {}", config.url));
        }
        let key = MetadataValue::try_from(config.client_key.as_str()).map_err(|_| "platform.client_key: not ASCII")?;
        let secret =
            MetadataValue::try_from(config.client_secret.as_str()).map_err(|_| "platform client secret: not ASCII")?;
        Ok(RemotePlatform {
            client: PlatformClient::new(endpoint.connect_lazy()),
            key,
            secret,
            timeout: config.timeout,
            store,
            clock,
            outstanding: DashMap::new(),
            vouching: DashMap::new(),
        })
    }

    /// A request with the credentials and the call's deadline.
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(crate::deadline::within(self.timeout));
        request.metadata_mut().insert("client-key", self.key.clone());
        request.metadata_mut().insert("client-secret", self.secret.clone());
        request
    }

    /// Runs one call within its deadline (the transport's own timeout covers the connect, this
    /// one the whole call).
    async fn call<T, F>(&self, what: &'static str, f: F) -> Result<T, PlatformError>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        match tokio::time::timeout(crate::deadline::within(self.timeout), f).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(self.failed(what, &status)),
            Err(_) => {
                warn!(call = what, "platform did not answer within the deadline");
                Err(PlatformError::Unavailable("no answer within the deadline".into()))
            }
        }
    }

    fn failed(&self, what: &'static str, status: &Status) -> PlatformError {
        let reason = status.metadata().get(FAILURE_TRAILER).and_then(|v| v.to_str().ok()).unwrap_or("");
        match (status.code(), reason) {
            (Code::FailedPrecondition, "session_expired") => PlatformError::SessionExpired,
            (Code::FailedPrecondition, _) if status.message() == "session expired" => PlatformError::SessionExpired,
            // The superapp's server, which the platform asked: the same errors as the embedded
            // platform's (docs/errors.md 1019-1021).
            (_, "superapp_unavailable") => PlatformError::Superapp("the platform could not reach it".into()),
            (_, "unknown_user") => PlatformError::UnknownUser,
            (_, "auth_code_refused") => {
                PlatformError::AuthCodeRefused(status.message().trim_start_matches("authCode refused: ").to_owned())
            }
            (code, _) => {
                // The platform's message says nothing personal (it never echoes values).
                warn!(call = what, code = ?code, message = status.message(), "platform refused or failed");
                PlatformError::Unavailable(format!("{code:?}"))
            }
        }
    }

    /// Asks the platform for a code (`call`, an `Issue*Code` RPC) while its ledger rows are
    /// written: a code of `api` discloses `discloses` (what the platform answers for such a
    /// code), so the rows go in while the request is in flight instead of after the answer. They
    /// are taken back when no code comes, or when the call is dropped before it ends; rows of what
    /// the platform says the code discloses, if that is something else, replace them.
    async fn issue_code<F>(
        &self,
        what: &'static str,
        app_id: &str,
        uid: &str,
        api: &str,
        discloses: &str,
        call: F,
    ) -> Result<String, PlatformError>
    where
        F: std::future::Future<Output = Result<tonic::Response<pv1::IssuedCode>, Status>>,
    {
        let rows = async {
            // The request goes out first (the channel's tasks run before this one resumes).
            tokio::task::yield_now().await;
            self.write_rows(app_id, uid, api, &[discloses])
        };
        let (issued, claim) = tokio::join!(self.call(what, call), rows);
        let mut claim = claim?;
        let issued = issued?;
        if issued.discloses.len() != 1 || issued.discloses[0] != discloses {
            let answered: Vec<&str> = issued.discloses.iter().map(String::as_str).collect();
            claim = self.write_rows(app_id, uid, api, &answered)?;
        }
        self.outstanding
            .insert(code_id(&issued.code), Outstanding { ledger: claim.keep(), expires_at_ms: issued.expires_at_ms });
        Ok(issued.code)
    }

    /// Writes the ledger rows of a code of `api` disclosing `what`, held by a [`LedgerClaim`].
    fn write_rows(&self, app_id: &str, uid: &str, api: &str, what: &[&str]) -> Result<LedgerClaim<'_>, PlatformError> {
        let now = self.clock.now_ms();
        let rows: Vec<NewLedgerRow<'_>> = what
            .iter()
            .map(|what| NewLedgerRow {
                app_id,
                uid,
                what,
                surface: Surface::RendererApi.as_str(),
                api,
                at_ms: now,
                via_code: true,
            })
            .collect();
        let ids =
            self.store.ledger_add_all(&rows).map_err(|e| PlatformError::Ledger(crate::platform::ledger_error(e)))?;
        Ok(LedgerClaim { store: &self.store, ids })
    }

    /// Asks the platform which outstanding codes were redeemed and stamps their ledger rows;
    /// forgets codes past their expiry. Errors are logged: the next sweep asks again.
    pub async fn sync_redemptions(&self) {
        let now = self.clock.now_ms();
        let ids: Vec<String> = self.outstanding.iter().map(|e| e.key().clone()).collect();
        for chunk in ids.chunks(REDEMPTIONS_PER_CALL) {
            let request = self.request(pv1::RedemptionsRequest { code_ids: chunk.to_vec() });
            let mut client = self.client.clone();
            match self.call("Redemptions", client.redemptions(request)).await {
                Ok(answer) => {
                    for r in answer.redeemed {
                        if let Some((_, code)) = self.outstanding.remove(&r.code_id)
                            && let Err(e) = self.store.ledger_redeemed(&code.ledger, &r.surface, r.redeemed_at_ms)
                        {
                            warn!(error = %e, "could not stamp a redeemed code's ledger rows");
                        }
                    }
                }
                Err(_) => return,
            }
        }
        // A code past its expiry (with a minute's slack for clocks) can no longer be redeemed.
        self.outstanding.retain(|_, c| c.expires_at_ms + 60_000 > now);
    }

    /// Codes issued and not yet seen redeemed (status, tests).
    pub fn outstanding_codes(&self) -> usize {
        self.outstanding.len()
    }
}

#[tonic::async_trait]
impl Platform for RemotePlatform {
    async fn login_code(&self, app_id: &str, uid: &str, auth_code: Option<String>) -> Result<String, PlatformError> {
        let request = self.request(pv1::IssueLoginCodeRequest {
            app_id: app_id.to_owned(),
            uid: uid.to_owned(),
            auth_code: auth_code.unwrap_or_default(),
        });
        let mut client = self.client.clone();
        let issuing = client.issue_login_code(request);
        self.issue_code("IssueLoginCode", app_id, uid, "login", Disclosed::Openid.as_str(), issuing).await
    }

    async fn start_session(&self, app_id: &str, uid: &str) -> Result<String, PlatformError> {
        let request = self.request(pv1::StartSessionRequest { app_id: app_id.to_owned(), uid: uid.to_owned() });
        let mut client = self.client.clone();
        Ok(self.call("StartSession", client.start_session(request)).await?.session_key)
    }

    async fn check_session(&self, app_id: &str, uid: &str) -> Result<(), PlatformError> {
        let request = self.request(pv1::CheckSessionRequest { app_id: app_id.to_owned(), uid: uid.to_owned() });
        let mut client = self.client.clone();
        self.call("CheckSession", client.check_session(request)).await.map(drop)
    }

    async fn value_code(
        &self,
        app_id: &str,
        uid: &str,
        kind: ValueKind,
        value: String,
    ) -> Result<String, PlatformError> {
        let (wire, api) = wire_kind(kind);
        let request = self.request(pv1::IssueValueCodeRequest {
            app_id: app_id.to_owned(),
            uid: uid.to_owned(),
            kind: wire as i32,
            value,
        });
        let mut client = self.client.clone();
        self.issue_code("IssueValueCode", app_id, uid, api, kind.disclosed().as_str(), client.issue_value_code(request))
            .await
    }

    async fn vouches(&self, app_id: &str) -> Result<bool, PlatformError> {
        if let Some(known) = self.vouching.get(app_id) {
            return Ok(*known);
        }
        let request = self.request(pv1::VouchingRequest { app_id: app_id.to_owned() });
        let mut client = self.client.clone();
        let vouched = self.call("Vouching", client.vouching(request)).await?.vouched;
        if self.vouching.len() >= MAX_VOUCHING_KEPT {
            self.vouching.clear();
        }
        self.vouching.insert(app_id.to_owned(), vouched);
        Ok(vouched)
    }

    async fn vouched_value_code(&self, app_id: &str, uid: &str, kind: ValueKind) -> Result<String, PlatformError> {
        let (wire, api) = wire_kind(kind);
        let request = self.request(pv1::IssueVouchedValueCodeRequest {
            app_id: app_id.to_owned(),
            uid: uid.to_owned(),
            kind: wire as i32,
        });
        let mut client = self.client.clone();
        let issuing = client.issue_vouched_value_code(request);
        self.issue_code("IssueVouchedValueCode", app_id, uid, api, kind.disclosed().as_str(), issuing).await
    }

    async fn vouched_profile(&self, app_id: &str, uid: &str, field: ProfileField) -> Result<String, PlatformError> {
        let field = match field {
            ProfileField::Avatar => pv1::ProfileField::Avatar,
            ProfileField::Nickname => pv1::ProfileField::Nickname,
        };
        let request = self.request(pv1::VouchedProfileRequest {
            app_id: app_id.to_owned(),
            uid: uid.to_owned(),
            field: field as i32,
        });
        let mut client = self.client.clone();
        Ok(self.call("VouchedProfile", client.vouched_profile(request)).await?.value)
    }

    async fn user_changed(&self, old_uid: &str) -> Result<(), PlatformError> {
        let request = self.request(pv1::UserChangedRequest { old_uid: old_uid.to_owned() });
        let mut client = self.client.clone();
        self.call("UserChanged", client.user_changed(request)).await.map(drop)
    }

    async fn invalidate_codes(&self, app_id: &str, uid: &str, kind: Option<ValueKind>) -> usize {
        let kind = match kind {
            None => pv1::ValueKind::Unspecified,
            Some(ValueKind::PhoneNumber) => pv1::ValueKind::PhoneNumber,
            Some(ValueKind::Email) => pv1::ValueKind::Email,
        };
        let request = self.request(pv1::InvalidateCodesRequest {
            app_id: app_id.to_owned(),
            uid: uid.to_owned(),
            kind: kind as i32,
        });
        let mut client = self.client.clone();
        match self.call("InvalidateCodes", client.invalidate_codes(request)).await {
            Ok(answer) => answer.invalidated as usize,
            Err(_) => {
                // The revocation itself stands in the daemon; the codes expire by their TTL.
                info!(app_id, "the platform could not be told to invalidate codes");
                0
            }
        }
    }

    // The backend side is the platform service's: with a remote platform the daemon's own
    // backend HTTP API and Exchange are off, so these are never reached; should one be, the
    // backend is told where to go.
    async fn authenticate(&self, _: Surface, _: Credential<'_>) -> Result<AuthorizedApp, ExchangeFailure> {
        Err(use_the_platform())
    }

    async fn code2session(
        &self,
        _: Surface,
        _: &AuthorizedApp,
        _: &str,
    ) -> Result<Code2SessionResponse, ExchangeFailure> {
        Err(use_the_platform())
    }

    async fn redeem_value(
        &self,
        _: Surface,
        _: &AuthorizedApp,
        _: &str,
        _: ValueKind,
        _: Option<&str>,
    ) -> Result<String, ExchangeFailure> {
        Err(use_the_platform())
    }

    async fn access_token(&self, _: &AuthorizedApp, _: TokenRequest) -> Result<AccessToken, ExchangeFailure> {
        Err(use_the_platform())
    }

    async fn check_session_signature(&self, _: &AuthorizedApp, _: &str, _: &str) -> Result<(), ExchangeFailure> {
        Err(use_the_platform())
    }

    async fn reset_session_key(&self, _: &AuthorizedApp, _: &str, _: &str) -> Result<String, ExchangeFailure> {
        Err(use_the_platform())
    }

    async fn user_credentials(
        &self,
        app_id: &str,
        uid: &str,
        user_info_json: &str,
    ) -> Result<Option<UserCredentials>, PlatformError> {
        let request = self.request(pv1::UserCredentialsRequest {
            app_id: app_id.to_owned(),
            uid: uid.to_owned(),
            user_info_json: user_info_json.to_owned(),
        });
        let mut client = self.client.clone();
        match self.call("UserCredentials", client.user_credentials(request)).await {
            Ok(c) => Ok(Some(UserCredentials {
                raw_data: c.raw_data,
                signature: c.signature,
                encrypted_data: c.encrypted_data,
                iv: c.iv,
            })),
            Err(PlatformError::SessionExpired) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Openids are the platform service's; the daemon never computes one in remote mode.
    fn openid(&self, _: &str, _: &str) -> String {
        String::new()
    }

    async fn register_app(&self, _: &str, _: bool) -> Result<Option<String>, PlatformError> {
        Err(PlatformError::Unavailable("apps are registered at the platform: miniapp-platformd register-app".into()))
    }

    /// Sessions live at the platform service; the daemon lists none.
    async fn list_sessions(
        &self,
        _: Option<&str>,
        _: Option<(&str, &str)>,
        _: u32,
    ) -> Result<Vec<SessionInfo>, PlatformError> {
        Ok(Vec::new())
    }

    async fn sweep(&self) {
        self.sync_redemptions().await;
    }
}

/// A value kind on the wire, and the API that issues its codes (the ledger's `api`).
fn wire_kind(kind: ValueKind) -> (pv1::ValueKind, &'static str) {
    match kind {
        ValueKind::PhoneNumber => (pv1::ValueKind::PhoneNumber, "getPhoneNumber"),
        ValueKind::Email => (pv1::ValueKind::Email, "getEmail"),
    }
}

fn use_the_platform() -> ExchangeFailure {
    ExchangeFailure::System("this daemon uses a remote platform: redeem at the platform service".into())
}
