//! wx.login. v1: delegated. v2: a one-time code for (app, signed-in uid), starting a fresh session.
//! v3: getAuthCode first; a `code` it returns is passed through as the login code, an `authCode`
//! is bound into the code the daemon issues (Code2Session returns it to the app's backend).

use miniapp_broker_proto::{Api, v1::LoginResponse};

use super::auth_code;
use crate::{broker::Broker, error::ApiError, registry::AppInstance, version::ApiVersion};

pub async fn default(b: &Broker, inst: &AppInstance, version: ApiVersion) -> Result<LoginResponse, ApiError> {
    let uid = b.user.get().ok_or(ApiError::NotLoggedIn)?.uid.clone();
    let auth_code = if version == ApiVersion::V3 {
        let authorized = auth_code::authorize(b, inst, Api::Login, &uid).await?;
        if let Some(code) = authorized.code {
            b.platform.start_session(&inst.app_id, &uid).await?;
            return Ok(LoginResponse { err_msg: Api::Login.ok_msg(), code });
        }
        authorized.auth_code
    } else {
        None
    };
    let code = b.platform.login_code(&inst.app_id, &uid, auth_code).await?;
    Ok(LoginResponse { err_msg: Api::Login.ok_msg(), code })
}
