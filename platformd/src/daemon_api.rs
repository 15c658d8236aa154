//! The gRPC API daemons use (`--daemon-listen`, `miniapp.platform.v1.Platform`): a thin surface
//! over the platform crate's [`Platform`], as the daemon's own API layer is over the embedded one.
//!
//! Every call first proves its superapp (the `client-key` and `client-secret` metadata,
//! [`Tenants::verify`]) and, for an app, that the app is that superapp's ([`Tenants::owns`]). A uid
//! is the superapp's own: the platform sees it as `<superapp>/<uid>`, so two superapps' users of
//! the same uid are different users (their openids differ, and one's sign-out ends only its own
//! sessions).

use std::sync::Arc;

use miniapp_broker_proto::platform::v1::{self as pv1, platform_server};
use miniapp_platform::{Disclosed, Platform, PlatformError, StoreError, ValueKind, superapp::vouch::ProfileField};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::{
    local_redemptions::RecordingStore,
    postgres::PgStore,
    tenants::{TenantError, Tenants},
};

/// Longest app id, uid, auth code or value taken.
const MAX_FIELD_BYTES: usize = 1024;
/// Longest user info JSON taken (a profile of a nickname, an avatar URL and a few fields).
const MAX_USER_INFO_BYTES: usize = 16 * 1024;
/// Most code ids one Redemptions call may ask about.
const MAX_REDEMPTIONS: usize = 1000;

/// Where `Redemptions` finds which codes were redeemed: the codes' rows of the shared engine, or
/// what a single SQLite instance remembered.
#[derive(Clone)]
pub enum RedemptionSource {
    Pg(PgStore),
    Local(Arc<RecordingStore>),
}

/// The service. See the module docs.
pub struct DaemonApi {
    platform: Arc<dyn Platform>,
    tenants: Arc<Tenants>,
    redemptions: RedemptionSource,
    code_ttl_ms: u64,
}

impl DaemonApi {
    pub fn new(
        platform: Arc<dyn Platform>,
        tenants: Arc<Tenants>,
        redemptions: RedemptionSource,
        code_ttl_secs: u64,
    ) -> DaemonApi {
        DaemonApi { platform, tenants, redemptions, code_ttl_ms: code_ttl_secs * 1000 }
    }

    pub fn into_server(self) -> platform_server::PlatformServer<DaemonApi> {
        platform_server::PlatformServer::new(self)
    }

    /// The superapp the request's credentials prove.
    async fn superapp<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let meta = request.metadata();
        let read = |key: &str| meta.get(key).and_then(|v| v.to_str().ok()).unwrap_or("");
        match self.tenants.verify(read("client-key"), read("client-secret")).await {
            Ok(Some(name)) => Ok(name),
            Ok(None) => {
                info!("daemon call refused: unknown client key or wrong secret");
                Err(Status::unauthenticated("unknown client key or wrong client secret"))
            }
            Err(e) => Err(tenant_failure(&e)),
        }
    }

    /// The superapp, once it is shown to own `app_id`; the uid as the platform knows it.
    async fn for_app<T>(&self, request: &Request<T>, app_id: &str, uid: &str) -> Result<String, Status> {
        // Both fields are checked before the credentials are.
        check_field("app_id", app_id)?;
        check_field("uid", uid)?;
        let superapp = self.owning(request, app_id).await?;
        Ok(platform_uid(&superapp, uid))
    }

    /// The superapp, once it is shown to own `app_id`.
    async fn owning<T>(&self, request: &Request<T>, app_id: &str) -> Result<String, Status> {
        check_field("app_id", app_id)?;
        let superapp = self.superapp(request).await?;
        match self.tenants.owns(&superapp, app_id).await {
            Ok(true) => Ok(superapp),
            Ok(false) => {
                info!(superapp, "daemon call refused: the app is not this superapp's");
                Err(Status::permission_denied("the app is not registered to this superapp"))
            }
            Err(e) => Err(tenant_failure(&e)),
        }
    }

    fn issued(&self, code: String, discloses: &[&str]) -> pv1::IssuedCode {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
        pv1::IssuedCode {
            code_id: crate::code_id(&code),
            code,
            discloses: discloses.iter().map(|s| (*s).to_owned()).collect(),
            expires_at_ms: now as u64 + self.code_ttl_ms,
        }
    }
}

/// The uid as the platform sees it: the superapp's user `uid`.
pub fn platform_uid(superapp: &str, uid: &str) -> String {
    format!("{superapp}/{uid}")
}

fn check_field(name: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{name} is required")));
    }
    if value.len() > MAX_FIELD_BYTES {
        return Err(Status::invalid_argument(format!("{name} is longer than {MAX_FIELD_BYTES} bytes")));
    }
    Ok(())
}

fn tenant_failure(e: &TenantError) -> Status {
    warn!(error = %e, "tenant lookup failed");
    Status::unavailable("platform database unavailable")
}

/// The trailer that names a vouching step's failure (and an ended session), as the proto says.
pub const FAILURE_TRAILER: &str = "platform-failure";

/// A status carrying `reason` in [`FAILURE_TRAILER`].
fn with_reason(code: tonic::Code, message: String, reason: &'static str) -> Status {
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert(FAILURE_TRAILER, tonic::metadata::MetadataValue::from_static(reason));
    Status::with_metadata(code, message, metadata)
}

/// A platform failure as the daemon hears it.
fn platform_failure(e: PlatformError) -> Status {
    use tonic::Code;
    match e {
        PlatformError::SessionExpired => {
            with_reason(Code::FailedPrecondition, "session expired".into(), "session_expired")
        }
        // The superapp server's own words are kept out of the message: a server's text is not the
        // platform's to pass on (the platform logged it).
        PlatformError::Superapp(_) => {
            with_reason(Code::Unavailable, "superapp server unavailable".into(), "superapp_unavailable")
        }
        PlatformError::UnknownUser => {
            with_reason(Code::FailedPrecondition, "user unknown to the superapp server".into(), "unknown_user")
        }
        PlatformError::AuthCodeRefused(reason) => {
            with_reason(Code::FailedPrecondition, format!("authCode refused: {reason}"), "auth_code_refused")
        }
        PlatformError::UserData(_) => Status::invalid_argument("user_info_json is not a JSON object"),
        PlatformError::Store(StoreError::Unavailable(_)) => {
            warn!(error = %e, "platform database unavailable");
            Status::unavailable("platform database unavailable")
        }
        other => {
            warn!(error = %other, "platform call failed");
            Status::unavailable("platform failed")
        }
    }
}

fn profile_field_of(field: i32) -> Result<ProfileField, Status> {
    match pv1::ProfileField::try_from(field) {
        Ok(pv1::ProfileField::Avatar) => Ok(ProfileField::Avatar),
        Ok(pv1::ProfileField::Nickname) => Ok(ProfileField::Nickname),
        Ok(pv1::ProfileField::Unspecified) => Err(Status::invalid_argument("field is required")),
        Err(_) => Err(Status::invalid_argument("unknown field")),
    }
}

fn kind_of(kind: i32) -> Result<Option<ValueKind>, Status> {
    match pv1::ValueKind::try_from(kind) {
        Ok(pv1::ValueKind::Unspecified) => Ok(None),
        Ok(pv1::ValueKind::PhoneNumber) => Ok(Some(ValueKind::PhoneNumber)),
        Ok(pv1::ValueKind::Email) => Ok(Some(ValueKind::Email)),
        Err(_) => Err(Status::invalid_argument("unknown kind")),
    }
}

#[tonic::async_trait]
impl platform_server::Platform for DaemonApi {
    async fn issue_login_code(
        &self,
        request: Request<pv1::IssueLoginCodeRequest>,
    ) -> Result<Response<pv1::IssuedCode>, Status> {
        let uid = self.for_app(&request, &request.get_ref().app_id, &request.get_ref().uid).await?;
        let r = request.into_inner();
        if r.auth_code.len() > MAX_FIELD_BYTES {
            return Err(Status::invalid_argument("auth_code is too long"));
        }
        let auth_code = (!r.auth_code.is_empty()).then_some(r.auth_code);
        let code = self.platform.login_code(&r.app_id, &uid, auth_code).await.map_err(platform_failure)?;
        Ok(Response::new(self.issued(code, &[Disclosed::Openid.as_str()])))
    }

    async fn start_session(
        &self,
        request: Request<pv1::StartSessionRequest>,
    ) -> Result<Response<pv1::StartSessionResponse>, Status> {
        let uid = self.for_app(&request, &request.get_ref().app_id, &request.get_ref().uid).await?;
        let session_key =
            self.platform.start_session(&request.get_ref().app_id, &uid).await.map_err(platform_failure)?;
        Ok(Response::new(pv1::StartSessionResponse { session_key }))
    }

    async fn check_session(
        &self,
        request: Request<pv1::CheckSessionRequest>,
    ) -> Result<Response<pv1::CheckSessionResponse>, Status> {
        let uid = self.for_app(&request, &request.get_ref().app_id, &request.get_ref().uid).await?;
        self.platform.check_session(&request.get_ref().app_id, &uid).await.map_err(platform_failure)?;
        Ok(Response::new(pv1::CheckSessionResponse {}))
    }

    async fn issue_value_code(
        &self,
        request: Request<pv1::IssueValueCodeRequest>,
    ) -> Result<Response<pv1::IssuedCode>, Status> {
        let uid = self.for_app(&request, &request.get_ref().app_id, &request.get_ref().uid).await?;
        let r = request.into_inner();
        let Some(kind) = kind_of(r.kind)? else {
            return Err(Status::invalid_argument("kind is required"));
        };
        check_field("value", &r.value)?;
        // A superapp whose server vouches has its users' data there, never from a desktop.
        if self.platform.vouches(&r.app_id).await.map_err(platform_failure)? {
            info!(app_id = %r.app_id, "a value from the daemon refused: the superapp's server vouches");
            return Err(Status::failed_precondition(
                "this superapp's server holds its users' data: use IssueVouchedValueCode",
            ));
        }
        let code = self.platform.value_code(&r.app_id, &uid, kind, r.value).await.map_err(platform_failure)?;
        Ok(Response::new(self.issued(code, &[kind.disclosed().as_str()])))
    }

    async fn vouching(
        &self,
        request: Request<pv1::VouchingRequest>,
    ) -> Result<Response<pv1::VouchingResponse>, Status> {
        let app_id = &request.get_ref().app_id;
        self.owning(&request, app_id).await?;
        let vouched = self.platform.vouches(app_id).await.map_err(platform_failure)?;
        Ok(Response::new(pv1::VouchingResponse { vouched }))
    }

    async fn issue_vouched_value_code(
        &self,
        request: Request<pv1::IssueVouchedValueCodeRequest>,
    ) -> Result<Response<pv1::IssuedCode>, Status> {
        let uid = self.for_app(&request, &request.get_ref().app_id, &request.get_ref().uid).await?;
        let Some(kind) = kind_of(request.get_ref().kind)? else {
            return Err(Status::invalid_argument("kind is required"));
        };
        let code =
            self.platform.vouched_value_code(&request.get_ref().app_id, &uid, kind).await.map_err(platform_failure)?;
        Ok(Response::new(self.issued(code, &[kind.disclosed().as_str()])))
    }

    async fn vouched_profile(
        &self,
        request: Request<pv1::VouchedProfileRequest>,
    ) -> Result<Response<pv1::VouchedProfileResponse>, Status> {
        let uid = self.for_app(&request, &request.get_ref().app_id, &request.get_ref().uid).await?;
        let field = profile_field_of(request.get_ref().field)?;
        let value =
            self.platform.vouched_profile(&request.get_ref().app_id, &uid, field).await.map_err(platform_failure)?;
        Ok(Response::new(pv1::VouchedProfileResponse { value }))
    }

    async fn invalidate_codes(
        &self,
        request: Request<pv1::InvalidateCodesRequest>,
    ) -> Result<Response<pv1::InvalidateCodesResponse>, Status> {
        let uid = self.for_app(&request, &request.get_ref().app_id, &request.get_ref().uid).await?;
        let kind = kind_of(request.get_ref().kind)?;
        let invalidated = self.platform.invalidate_codes(&request.get_ref().app_id, &uid, kind).await;
        Ok(Response::new(pv1::InvalidateCodesResponse { invalidated: invalidated as u32 }))
    }

    async fn user_changed(
        &self,
        request: Request<pv1::UserChangedRequest>,
    ) -> Result<Response<pv1::UserChangedResponse>, Status> {
        check_field("old_uid", &request.get_ref().old_uid)?;
        let superapp = self.superapp(&request).await?;
        let uid = platform_uid(&superapp, &request.get_ref().old_uid);
        self.platform.user_changed(&uid).await.map_err(platform_failure)?;
        Ok(Response::new(pv1::UserChangedResponse {}))
    }

    async fn redemptions(
        &self,
        request: Request<pv1::RedemptionsRequest>,
    ) -> Result<Response<pv1::RedemptionsResponse>, Status> {
        let superapp = self.superapp(&request).await?;
        let ids = &request.get_ref().code_ids;
        if ids.len() > MAX_REDEMPTIONS {
            return Err(Status::invalid_argument(format!("at most {MAX_REDEMPTIONS} code ids")));
        }
        let hashes: Vec<Vec<u8>> = ids.iter().filter_map(|id| crate::code_hash_of_id(id).map(|h| h.to_vec())).collect();
        let found = match &self.redemptions {
            RedemptionSource::Pg(pg) => pg.redemptions(&superapp, &hashes).await.map_err(|e| {
                warn!(error = %e, "redemptions lookup failed");
                Status::unavailable("platform database unavailable")
            })?,
            RedemptionSource::Local(store) => store.redemptions(&superapp, &hashes),
        };
        let redeemed = found
            .into_iter()
            .map(|(hash, at, via)| pv1::Redemption { code_id: hex::encode(hash), redeemed_at_ms: at, surface: via })
            .collect();
        Ok(Response::new(pv1::RedemptionsResponse { redeemed }))
    }

    async fn user_credentials(
        &self,
        request: Request<pv1::UserCredentialsRequest>,
    ) -> Result<Response<pv1::UserCredentialsResponse>, Status> {
        let uid = self.for_app(&request, &request.get_ref().app_id, &request.get_ref().uid).await?;
        let r = request.into_inner();
        if r.user_info_json.len() > MAX_USER_INFO_BYTES {
            return Err(Status::invalid_argument(format!("user_info_json is longer than {MAX_USER_INFO_BYTES} bytes")));
        }
        match self.platform.user_credentials(&r.app_id, &uid, &r.user_info_json).await.map_err(platform_failure)? {
            Some(c) => Ok(Response::new(pv1::UserCredentialsResponse {
                raw_data: c.raw_data,
                signature: c.signature,
                encrypted_data: c.encrypted_data,
                iv: c.iv,
            })),
            None => Err(Status::failed_precondition("session expired")),
        }
    }
}
