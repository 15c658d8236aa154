//! The credentials of a getUserInfo / getUserProfile answer, made the way WeChat makes them.
//!
//! The host answers `userInfo`; it cannot sign or encrypt it, since the session key is the
//! platform's. So in v2 and v3 the daemon fills `rawData`, `signature`, `encryptedData` and `iv`
//! (see [`crate::platform::user_data`]) with the current key of the app's session for the user
//! the call was made for, on the one path every delegated answer takes, and as WeChat does:
//! - `getUserProfile`: always, when the user has a live session;
//! - `getUserInfo`: only with `withCredentials: true` and a live session;
//! - otherwise (no session, `withCredentials` false, no `userInfo` in the answer) only `userInfo`:
//!   the four fields are empty, and the JSON bridge leaves them out.
//!
//! Whatever the host put in those four fields in v2/v3 is dropped (it cannot have the key). In v1
//! the host ran its own login, so its answer passes through untouched.

use miniapp_broker_proto::{
    Api,
    v1::{ApiRequest, ApiResponse, UserInfo, api_request::Api as Req, api_response::Api as Resp},
};
use serde::Serialize;
use tracing::debug;

use crate::{error::ApiError, platform::Platform, version::ApiVersion};

/// What a delegated answer's credentials are to be, decided from the call when it is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credentials {
    /// Not a profile API, or v1: the answer passes through as the host gave it.
    Untouched,
    /// v2/v3 getUserInfo without `withCredentials`: `userInfo` only.
    None,
    /// v2/v3 getUserProfile, or getUserInfo with `withCredentials`: made when there is a session.
    Made,
}

impl Credentials {
    /// The credentials a call of `api` in `version` with `request` gets.
    pub fn of_call(api: Api, version: ApiVersion, request: &ApiRequest) -> Credentials {
        match (version, api, request.api.as_ref()) {
            (ApiVersion::V1, _, _) => Credentials::Untouched,
            (_, Api::GetUserProfile, _) => Credentials::Made,
            (_, Api::GetUserInfo, Some(Req::GetUserInfo(r))) if r.with_credentials => Credentials::Made,
            (_, Api::GetUserInfo, _) => Credentials::None,
            _ => Credentials::Untouched,
        }
    }
}

/// `userInfo` as a JSON text in WeChat's field order (its `rawData`).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WeChatUserInfo<'a> {
    nick_name: &'a str,
    gender: u32,
    language: &'a str,
    city: &'a str,
    province: &'a str,
    country: &'a str,
    avatar_url: &'a str,
}

/// The `rawData` of a userInfo: its JSON text, fields in WeChat's order.
pub fn raw_data(info: &UserInfo) -> String {
    let wechat = WeChatUserInfo {
        nick_name: &info.nick_name,
        gender: info.gender,
        language: &info.language,
        city: &info.city,
        province: &info.province,
        country: &info.country,
        avatar_url: &info.avatar_url,
    };
    // Strings and a number: serializing cannot fail.
    serde_json::to_string(&wechat).unwrap_or_default()
}

/// Fills (or clears) `resp`'s credentials as `wanted` says, for `uid` of `app_id`.
pub async fn fill(
    platform: &dyn Platform,
    app_id: &str,
    uid: &str,
    wanted: Credentials,
    resp: &mut ApiResponse,
) -> Result<(), ApiError> {
    if wanted == Credentials::Untouched {
        return Ok(());
    }
    let (info, fields) = match resp.api.as_mut() {
        Some(Resp::GetUserInfo(r)) => {
            (r.user_info.as_ref(), [&mut r.raw_data, &mut r.signature, &mut r.encrypted_data, &mut r.iv])
        }
        Some(Resp::GetUserProfile(r)) => {
            (r.user_info.as_ref(), [&mut r.raw_data, &mut r.signature, &mut r.encrypted_data, &mut r.iv])
        }
        _ => return Ok(()),
    };
    let [raw, signature, encrypted, iv] = fields;
    for field in [&mut *raw, &mut *signature, &mut *encrypted, &mut *iv] {
        field.clear();
    }
    let (Credentials::Made, Some(info)) = (wanted, info) else { return Ok(()) };
    if uid.is_empty() {
        return Ok(());
    }
    match platform.user_credentials(app_id, uid, &raw_data(info)).await? {
        Some(made) => {
            *raw = made.raw_data;
            *signature = made.signature;
            *encrypted = made.encrypted_data;
            *iv = made.iv;
        }
        None => debug!(app_id, "no live session of the user: the profile answer carries userInfo only"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use miniapp_broker_proto::{api::ApiCall, v1};

    #[test]
    fn raw_data_is_the_user_info_in_wechats_order() {
        let info = UserInfo {
            nick_name: "Band \"B\"".into(),
            avatar_url: "http://a/0".into(),
            gender: 1,
            country: "CN".into(),
            province: "Guangdong".into(),
            city: "Guangzhou".into(),
            language: "zh_CN".into(),
        };
        assert_eq!(
            raw_data(&info),
            r#"{"nickName":"Band \"B\"","gender":1,"language":"zh_CN","city":"Guangzhou","province":"Guangdong","country":"CN","avatarUrl":"http://a/0"}"#
        );
    }

    #[test]
    fn wechats_rules_decide_which_calls_get_credentials() {
        let info = |with_credentials| v1::GetUserInfoRequest { with_credentials, lang: String::new() }.into_request();
        let profile = v1::GetUserProfileRequest { desc: "d".into(), lang: String::new() }.into_request();
        for v in [ApiVersion::V2, ApiVersion::V3] {
            assert_eq!(Credentials::of_call(Api::GetUserInfo, v, &info(true)), Credentials::Made);
            assert_eq!(Credentials::of_call(Api::GetUserInfo, v, &info(false)), Credentials::None);
            assert_eq!(Credentials::of_call(Api::GetUserProfile, v, &profile), Credentials::Made);
            let login = v1::LoginRequest::default().into_request();
            assert_eq!(Credentials::of_call(Api::Login, v, &login), Credentials::Untouched);
        }
        assert_eq!(Credentials::of_call(Api::GetUserInfo, ApiVersion::V1, &info(true)), Credentials::Untouched);
        assert_eq!(Credentials::of_call(Api::GetUserProfile, ApiVersion::V1, &profile), Credentials::Untouched);
    }
}
