//! The open APIs of the seed, as one table: name, delegate method, v3 scope, whether the daemon has
//! a default implementation, and the request/response arms that belong to each.

use crate::v1::{self, DelegateMethod, api_request, api_response};

/// One open API of the mini program SDK (the `wx.` method a mini program calls).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Api {
    Login,
    CheckSession,
    GetPhoneNumber,
    GetEmail,
    ChooseAvatar,
    GetNickName,
    GetUserInfo,
    GetUserProfile,
    RequestPayment,
    RequestMidasPaymentGameItem,
    /// wx.getSetting: the user's decisions for this app (answered by the daemon).
    GetSetting,
    /// wx.authorize: ask for a scope ahead of use (through getAuthCode).
    Authorize,
    /// wx.openSetting: the host's settings page for this app.
    OpenSetting,
}

/// The v3 scopes of the seed (SCOPE_PHONE_NUMBER, ...).
pub mod scope {
    pub const PHONE_NUMBER: &str = "SCOPE_PHONE_NUMBER";
    pub const EMAIL: &str = "SCOPE_EMAIL";
    pub const AVATAR: &str = "SCOPE_AVATAR";
    pub const NICKNAME: &str = "SCOPE_NICKNAME";
    /// Every scope the daemon knows, for validating what a host or an operator names.
    pub const ALL: [&str; 4] = [PHONE_NUMBER, EMAIL, AVATAR, NICKNAME];
    /// WeChat's `scope.userInfo`: avatar and nickname together (getSetting, authorize).
    pub const USER_INFO: &str = "scope.userInfo";

    /// The v3 scopes a scope name stands for: itself, or avatar and nickname for
    /// `scope.userInfo`; `None` for a name the daemon does not know.
    pub fn expand(name: &str) -> Option<&'static [&'static str]> {
        const USER_INFO_SCOPES: [&str; 2] = [AVATAR, NICKNAME];
        match name {
            USER_INFO => Some(&USER_INFO_SCOPES),
            _ => ALL.iter().position(|s| *s == name).map(|i| std::slice::from_ref(&ALL[i])),
        }
    }
}

impl Api {
    /// The settings APIs (getSetting, authorize, openSetting): answered by the daemon's consent
    /// store in every version, never forwarded as themselves except openSetting's page.
    pub const CONSENT: [Api; 3] = [Api::GetSetting, Api::Authorize, Api::OpenSetting];

    /// Every open API of the seed, in its order (each has a delegate method of its own; the
    /// settings APIs are in [`Api::CONSENT`]).
    pub const ALL: [Api; 10] = [
        Api::Login,
        Api::CheckSession,
        Api::GetPhoneNumber,
        Api::GetEmail,
        Api::ChooseAvatar,
        Api::GetNickName,
        Api::GetUserInfo,
        Api::GetUserProfile,
        Api::RequestPayment,
        Api::RequestMidasPaymentGameItem,
    ];

    /// The mini program name without `wx.`, as it appears in `errMsg` ("login").
    pub const fn name(self) -> &'static str {
        match self {
            Api::Login => "login",
            Api::CheckSession => "checkSession",
            Api::GetPhoneNumber => "getPhoneNumber",
            Api::GetEmail => "getEmail",
            Api::ChooseAvatar => "chooseAvatar",
            Api::GetNickName => "getNickName",
            Api::GetUserInfo => "getUserInfo",
            Api::GetUserProfile => "getUserProfile",
            Api::RequestPayment => "requestPayment",
            Api::RequestMidasPaymentGameItem => "requestMidasPaymentGameItem",
            Api::GetSetting => "getSetting",
            Api::Authorize => "authorize",
            Api::OpenSetting => "openSetting",
        }
    }

    /// Looks an API up by its mini program name, with or without the `wx.` prefix.
    pub fn from_name(name: &str) -> Option<Api> {
        let name = name.strip_prefix("wx.").unwrap_or(name);
        Api::ALL.into_iter().chain(Api::CONSENT).find(|api| api.name() == name)
    }

    /// The TMFMiniAppSDKDelegate method the host implements for this API.
    pub const fn method(self) -> DelegateMethod {
        match self {
            Api::Login => DelegateMethod::Login,
            Api::CheckSession => DelegateMethod::CheckSession,
            Api::GetPhoneNumber => DelegateMethod::GetPhoneNumber,
            Api::GetEmail => DelegateMethod::GetEmail,
            Api::ChooseAvatar => DelegateMethod::ChooseAvatar,
            Api::GetNickName => DelegateMethod::GetNickName,
            Api::GetUserInfo => DelegateMethod::GetUserInfo,
            Api::GetUserProfile => DelegateMethod::GetUserProfile,
            Api::RequestPayment => DelegateMethod::RequestPayment,
            Api::RequestMidasPaymentGameItem => DelegateMethod::RequestMidasPaymentGameItem,
            // Never reaches the host.
            Api::GetSetting => DelegateMethod::Unspecified,
            Api::Authorize => DelegateMethod::GetAuthCode,
            Api::OpenSetting => DelegateMethod::OpenSetting,
        }
    }

    /// The scope getAuthCode must grant before the v3 default runs; `None` for login and
    /// checkSession (login asks getAuthCode with no scope) and for APIs without a default.
    pub const fn scope(self) -> Option<&'static str> {
        match self {
            Api::GetPhoneNumber => Some(scope::PHONE_NUMBER),
            Api::GetEmail => Some(scope::EMAIL),
            Api::ChooseAvatar => Some(scope::AVATAR),
            Api::GetNickName => Some(scope::NICKNAME),
            _ => None,
        }
    }

    /// Whether the daemon implements this API itself in v2 and v3 (the seed's "default
    /// implementation"). The others are delegated to the host in every version.
    pub const fn has_default(self) -> bool {
        matches!(
            self,
            Api::Login | Api::CheckSession | Api::GetPhoneNumber | Api::GetEmail | Api::ChooseAvatar | Api::GetNickName
        )
    }

    /// Whether the API is one of the settings APIs ([`Api::CONSENT`]).
    pub const fn is_consent(self) -> bool {
        matches!(self, Api::GetSetting | Api::Authorize | Api::OpenSetting)
    }

    /// Whether the API moves money, so it carries an idempotency key.
    pub const fn is_payment(self) -> bool {
        matches!(self, Api::RequestPayment | Api::RequestMidasPaymentGameItem)
    }

    /// `"<api>:ok"`.
    pub fn ok_msg(self) -> String {
        format!("{}:ok", self.name())
    }

    /// `"<api>:fail <reason>"`.
    pub fn fail_msg(self, reason: &str) -> String {
        format!("{}:fail {reason}", self.name())
    }
}

impl std::fmt::Display for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl v1::ApiRequest {
    /// Which API this request calls; `None` when the oneof is unset.
    pub fn api(&self) -> Option<Api> {
        use api_request::Api as R;
        Some(match self.api.as_ref()? {
            R::Login(_) => Api::Login,
            R::CheckSession(_) => Api::CheckSession,
            R::GetPhoneNumber(_) => Api::GetPhoneNumber,
            R::GetEmail(_) => Api::GetEmail,
            R::ChooseAvatar(_) => Api::ChooseAvatar,
            R::GetNickName(_) => Api::GetNickName,
            R::GetUserInfo(_) => Api::GetUserInfo,
            R::GetUserProfile(_) => Api::GetUserProfile,
            R::RequestPayment(_) => Api::RequestPayment,
            R::RequestMidasPaymentGameItem(_) => Api::RequestMidasPaymentGameItem,
            R::GetSetting(_) => Api::GetSetting,
            R::Authorize(_) => Api::Authorize,
            R::OpenSetting(_) => Api::OpenSetting,
        })
    }
}

impl v1::ApiResponse {
    /// Which API this response answers; `None` when the oneof is unset.
    pub fn api(&self) -> Option<Api> {
        use api_response::Api as R;
        Some(match self.api.as_ref()? {
            R::Login(_) => Api::Login,
            R::CheckSession(_) => Api::CheckSession,
            R::GetPhoneNumber(_) => Api::GetPhoneNumber,
            R::GetEmail(_) => Api::GetEmail,
            R::ChooseAvatar(_) => Api::ChooseAvatar,
            R::GetNickName(_) => Api::GetNickName,
            R::GetUserInfo(_) => Api::GetUserInfo,
            R::GetUserProfile(_) => Api::GetUserProfile,
            R::RequestPayment(_) => Api::RequestPayment,
            R::RequestMidasPaymentGameItem(_) => Api::RequestMidasPaymentGameItem,
            R::GetSetting(_) => Api::GetSetting,
            R::Authorize(_) => Api::Authorize,
            R::OpenSetting(_) => Api::OpenSetting,
        })
    }

    /// The `err_msg` of whichever arm is set ("" when none is).
    pub fn err_msg(&self) -> &str {
        use api_response::Api as R;
        match self.api.as_ref() {
            Some(R::Login(r)) => &r.err_msg,
            Some(R::CheckSession(r)) => &r.err_msg,
            Some(R::GetPhoneNumber(r)) => &r.err_msg,
            Some(R::GetEmail(r)) => &r.err_msg,
            Some(R::ChooseAvatar(r)) => &r.err_msg,
            Some(R::GetNickName(r)) => &r.err_msg,
            Some(R::GetUserInfo(r)) => &r.err_msg,
            Some(R::GetUserProfile(r)) => &r.err_msg,
            Some(R::RequestPayment(r)) => &r.err_msg,
            Some(R::RequestMidasPaymentGameItem(r)) => &r.err_msg,
            Some(R::GetSetting(r)) => &r.err_msg,
            Some(R::Authorize(r)) => &r.err_msg,
            Some(R::OpenSetting(r)) => &r.err_msg,
            None => "",
        }
    }

    /// Sets the `err_msg` of whichever arm is set to `"<api>:ok"`, so a host need not.
    pub fn stamp_ok(&mut self) {
        use api_response::Api as R;
        let Some(api) = self.api() else { return };
        let msg = api.ok_msg();
        match self.api.as_mut() {
            Some(R::Login(r)) => r.err_msg = msg,
            Some(R::CheckSession(r)) => r.err_msg = msg,
            Some(R::GetPhoneNumber(r)) => r.err_msg = msg,
            Some(R::GetEmail(r)) => r.err_msg = msg,
            Some(R::ChooseAvatar(r)) => r.err_msg = msg,
            Some(R::GetNickName(r)) => r.err_msg = msg,
            Some(R::GetUserInfo(r)) => r.err_msg = msg,
            Some(R::GetUserProfile(r)) => r.err_msg = msg,
            Some(R::RequestPayment(r)) => r.err_msg = msg,
            Some(R::RequestMidasPaymentGameItem(r)) => r.err_msg = msg,
            Some(R::GetSetting(r)) => r.err_msg = msg,
            Some(R::Authorize(r)) => r.err_msg = msg,
            Some(R::OpenSetting(r)) => r.err_msg = msg,
            None => {}
        }
    }
}

/// Ties a typed request message to its API and its response type, so typed client calls and
/// handlers need no per-API code of their own.
pub trait ApiCall: Sized + Send + 'static {
    /// The API this request calls.
    const API: Api;
    /// The typed answer.
    type Response: Send + 'static;
    /// Wraps the typed request into the `ApiRequest` oneof.
    fn into_request(self) -> v1::ApiRequest;
    /// Takes the typed request out of the oneof, if it is this API's arm.
    fn from_request(req: v1::ApiRequest) -> Option<Self>;
    /// Wraps a typed answer into the `ApiResponse` oneof.
    fn wrap_response(resp: Self::Response) -> v1::ApiResponse;
    /// Takes the typed answer out of the oneof, if it is this API's arm.
    fn unwrap_response(resp: v1::ApiResponse) -> Option<Self::Response>;
}

macro_rules! api_calls {
    ($($api:ident, $req:ident, $resp:ident;)*) => {$(
        impl ApiCall for v1::$req {
            const API: Api = Api::$api;
            type Response = v1::$resp;
            fn into_request(self) -> v1::ApiRequest {
                v1::ApiRequest { api: Some(api_request::Api::$api(self)) }
            }
            fn from_request(req: v1::ApiRequest) -> Option<Self> {
                match req.api {
                    Some(api_request::Api::$api(r)) => Some(r),
                    _ => None,
                }
            }
            fn wrap_response(resp: v1::$resp) -> v1::ApiResponse {
                v1::ApiResponse { api: Some(api_response::Api::$api(resp)) }
            }
            fn unwrap_response(resp: v1::ApiResponse) -> Option<v1::$resp> {
                match resp.api {
                    Some(api_response::Api::$api(r)) => Some(r),
                    _ => None,
                }
            }
        }
    )*};
}

api_calls! {
    Login, LoginRequest, LoginResponse;
    CheckSession, CheckSessionRequest, CheckSessionResponse;
    GetPhoneNumber, GetPhoneNumberRequest, GetPhoneNumberResponse;
    GetEmail, GetEmailRequest, GetEmailResponse;
    ChooseAvatar, ChooseAvatarRequest, ChooseAvatarResponse;
    GetNickName, GetNickNameRequest, GetNickNameResponse;
    GetUserInfo, GetUserInfoRequest, GetUserInfoResponse;
    GetUserProfile, GetUserProfileRequest, GetUserProfileResponse;
    RequestPayment, RequestPaymentRequest, RequestPaymentResponse;
    RequestMidasPaymentGameItem, RequestMidasPaymentGameItemRequest, RequestMidasPaymentGameItemResponse;
    GetSetting, GetSettingRequest, GetSettingResponse;
    Authorize, AuthorizeRequest, AuthorizeResponse;
    OpenSetting, OpenSettingRequest, OpenSettingResponse;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_accept_the_wx_prefix() {
        for api in Api::ALL {
            assert_eq!(Api::from_name(api.name()), Some(api));
            assert_eq!(Api::from_name(&format!("wx.{}", api.name())), Some(api));
        }
        for api in Api::CONSENT {
            assert_eq!(Api::from_name(api.name()), Some(api));
            assert!(api.is_consent() && !api.has_default() && !Api::ALL.contains(&api));
        }
        assert_eq!(Api::from_name("getLocation"), None);
    }

    #[test]
    fn only_the_seed_defaults_have_defaults() {
        let defaults: Vec<_> = Api::ALL.into_iter().filter(|a| a.has_default()).collect();
        assert_eq!(defaults.len(), 6);
        assert!(!Api::RequestPayment.has_default());
        assert_eq!(Api::GetEmail.scope(), Some(scope::EMAIL));
        assert_eq!(Api::Login.scope(), None);
        assert_eq!(scope::expand(scope::USER_INFO), Some(&[scope::AVATAR, scope::NICKNAME][..]));
        assert_eq!(scope::expand(scope::EMAIL), Some(&[scope::EMAIL][..]));
        assert_eq!(scope::expand("scope.userLocation"), None);
    }
}
