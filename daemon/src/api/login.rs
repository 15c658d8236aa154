//! wx.login. v1: delegated. v2: a one-time code for (app, signed-in uid), starting a fresh session.
//! v3: getAuthCode first; a `code` it returns is passed through as the login code, an `authCode`
//! is bound into the code the daemon issues (Code2Session returns it to the app's backend). The
//! code is issued, and the session started, only for the user still signed in (`user.rs`).

use miniapp_broker_proto::{Api, v1::LoginResponse};

use super::auth_code;
use crate::{broker::Broker, error::ApiError, registry::AppInstance, version::ApiVersion};

pub async fn default(b: &Broker, inst: &AppInstance, version: ApiVersion) -> Result<LoginResponse, ApiError> {
    let (ticket, _) = b.user.ticket()?;
    let (auth_code, hold) = if version == ApiVersion::V3 {
        let (authorized, hold) = auth_code::authorize(b, inst, Api::Login, &ticket).await?;
        if let Some(code) = authorized.code {
            b.platform.start_session(&inst.app_id, &hold.uid).await?;
            return Ok(LoginResponse { err_msg: Api::Login.ok_msg(), code });
        }
        (authorized.auth_code, hold)
    } else {
        (None, b.user.hold(&ticket).await?)
    };
    let code = b.platform.login_code(&inst.app_id, &hold.uid, auth_code).await?;
    Ok(LoginResponse { err_msg: Api::Login.ok_msg(), code })
}
