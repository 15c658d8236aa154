//! wx.checkSession. v1: delegated. v2/v3: ok while the (app, signed-in uid) session exists and has
//! not expired; signing out or switching users ends it. No getAuthCode step (it reveals nothing).

use miniapp_broker_proto::{Api, v1::CheckSessionResponse};

use crate::{broker::Broker, error::ApiError, registry::AppInstance};

pub async fn default(b: &Broker, inst: &AppInstance) -> Result<CheckSessionResponse, ApiError> {
    let uid = b.user.get().ok_or(ApiError::NotLoggedIn)?.uid.clone();
    b.platform.check_session(&inst.app_id, &uid).await?;
    Ok(CheckSessionResponse { err_msg: Api::CheckSession.ok_msg() })
}
