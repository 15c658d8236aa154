//! The superapp server's contract as JSON: the paths the platform calls, their request bodies and
//! the `data` of their answers, all inside one envelope (`returnCode`, `returnMessage`, `data`,
//! `requestId`). The platform's client and the dev-host's server share these types, so the two
//! ends cannot drift apart; docs/superapp-server.md describes the same contract in prose.

use serde::{Deserialize, Serialize};

/// `/superapp/user/checkUser` `{"userId"}` → `data: bool`.
pub const CHECK_USER: &str = "/superapp/user/checkUser";
/// `/superapp/user/getUserInfoTemporaryCode` `{"userId", "type"}` → `data: {"code", "data"}`.
pub const TEMPORARY_CODE: &str = "/superapp/user/getUserInfoTemporaryCode";
/// `/superapp/user/getUserPhoneNumber` `{"userId", "temporaryCode"}` → `data: "<phone>"`.
pub const PHONE_NUMBER: &str = "/superapp/user/getUserPhoneNumber";
/// `/superapp/user/getUserEmail` `{"userId", "temporaryCode"}` → `data: "<e-mail>"`.
pub const EMAIL: &str = "/superapp/user/getUserEmail";
/// `/superapp/user/getUserAvatar` `{"userId"}` → `data: "<url>"`.
pub const AVATAR: &str = "/superapp/user/getUserAvatar";
/// `/superapp/user/getUserNick` `{"userId"}` → `data: "<nickname>"`.
pub const NICKNAME: &str = "/superapp/user/getUserNick";
/// `/superapp/access_token/b2b2c` `{"grantType": "AUTHORIZATION_CODE", "authCode"}` →
/// `data: {"accessToken", "userId", "authSuccessScopes"?}`.
pub const AUTH_CODE: &str = "/superapp/access_token/b2b2c";

/// Every path of the contract, in the order docs/superapp-server.md lists them.
pub const ALL_PATHS: [&str; 7] = [CHECK_USER, TEMPORARY_CODE, PHONE_NUMBER, EMAIL, AVATAR, NICKNAME, AUTH_CODE];

/// The `returnCode` of a success.
pub const OK: &str = "0";
/// `grantType` of the authCode redemption.
pub const AUTHORIZATION_CODE: &str = "AUTHORIZATION_CODE";

/// The envelope of every answer. `data` is absent (or null) on failures.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Envelope<T> {
    pub return_code: String,
    #[serde(default)]
    pub return_message: String,
    #[serde(default = "none")]
    pub data: Option<T>,
    #[serde(default)]
    pub request_id: String,
}

fn none<T>() -> Option<T> {
    None
}

/// A request naming only the user (checkUser, getUserAvatar, getUserNick).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UserRequest {
    pub user_id: String,
}

/// Which value a temporary code stands for (`type`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InfoType {
    Phone,
    Email,
}

impl InfoType {
    /// The path that redeems a temporary code of this type.
    pub const fn value_path(self) -> &'static str {
        match self {
            InfoType::Phone => PHONE_NUMBER,
            InfoType::Email => EMAIL,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            InfoType::Phone => "phone",
            InfoType::Email => "email",
        }
    }
}

/// getUserInfoTemporaryCode's request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TemporaryCodeRequest {
    pub user_id: String,
    #[serde(rename = "type")]
    pub kind: InfoType,
}

/// getUserInfoTemporaryCode's `data`: the temporary code and the masked value.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TemporaryCode {
    pub code: String,
    /// The value masked for display (`158****2850`).
    #[serde(default)]
    pub data: String,
}

/// getUserPhoneNumber's and getUserEmail's request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ValueRequest {
    pub user_id: String,
    pub temporary_code: String,
}

/// access_token/b2b2c's request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuthCodeRequest {
    pub grant_type: String,
    pub auth_code: String,
}

/// access_token/b2b2c's `data`: who the authCode's user is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuthCodeGrant {
    pub access_token: String,
    pub user_id: String,
    #[serde(default)]
    pub auth_success_scopes: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_names_are_the_contracts() {
        let request =
            serde_json::to_value(TemporaryCodeRequest { user_id: "u".into(), kind: InfoType::Phone }).unwrap();
        assert_eq!(request, serde_json::json!({"userId": "u", "type": "phone"}));
        let request = serde_json::to_value(ValueRequest { user_id: "u".into(), temporary_code: "t".into() }).unwrap();
        assert_eq!(request, serde_json::json!({"userId": "u", "temporaryCode": "t"}));
        let request =
            serde_json::to_value(AuthCodeRequest { grant_type: AUTHORIZATION_CODE.into(), auth_code: "a".into() })
                .unwrap();
        assert_eq!(request, serde_json::json!({"grantType": "AUTHORIZATION_CODE", "authCode": "a"}));
        let answer: Envelope<AuthCodeGrant> = serde_json::from_str(
            r#"{"returnCode":"0","returnMessage":"ok","data":{"accessToken":"t","userId":"u"},"requestId":"r"}"#,
        )
        .unwrap();
        assert_eq!(answer.data.unwrap().user_id, "u");
        let refused: Envelope<bool> = serde_json::from_str(r#"{"returnCode":"1001","data":null}"#).unwrap();
        assert_eq!((refused.return_code.as_str(), refused.data), ("1001", None));
    }
}
