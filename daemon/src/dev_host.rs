//! A host simulator: answers every delegate method from a profile in a TOML file, the way the
//! WeChat devtools simulator stands in for the real app. The demo runs it with a built-in profile;
//! `miniapp-brokerd dev-host` runs it for a mini app developer who has no superapp at hand, and
//! `miniapp-brokerd dev-sim` runs it with a person answering in a browser panel ([`HostUser`]).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwap;
use futures::future::BoxFuture;

use miniapp_broker_client::{
    HostBuilder, HostFailure,
    proto::{
        api::scope,
        v1::{
            AppInfo, CheckSessionRequest, CheckSessionResponse, ChooseAvatarRequest, ChooseAvatarResponse,
            GetAuthCodeRequest, GetAuthCodeResponse, GetEmailRequest, GetEmailResponse, GetNickNameRequest,
            GetNickNameResponse, GetPhoneNumberRequest, GetPhoneNumberResponse, GetUserInfoRequest,
            GetUserInfoResponse, GetUserProfileRequest, GetUserProfileResponse, LoginRequest, LoginResponse,
            OpenSettingRequest, OpenSettingResponse, RequestMidasPaymentGameItemRequest,
            RequestMidasPaymentGameItemResponse, RequestPaymentRequest, RequestPaymentResponse, SignedInUser, UserInfo,
            UserProfile,
        },
    },
};
use serde::{Deserialize, Serialize};

use crate::dev_superapp::DevSuperapp;

/// The dev-host's settings (`dev-host --profile FILE`). Every key is optional.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DevHostConfig {
    /// The name the host gives the daemon.
    pub name: String,
    /// The signed-in user; an empty uid means signed out.
    pub user: DevUser,
    /// What requestPayment and requestMidasPaymentGameItem answer: "ok", "fail" or "cancel".
    pub payments: String,
    /// v3 scopes: "auto" grants every scope not in `refuse`; "ask" asks on the terminal.
    pub scopes: String,
    /// Scopes always refused (with the reason "user refused").
    pub refuse: Vec<String>,
    /// The openApiVersion answer for apps whose app.json sets none; empty: not implemented.
    pub open_api_version: String,
    /// More users a person can switch to (`dev-sim`'s panel); `user` is signed in at the start.
    pub users: Vec<DevUser>,
    /// The superapp's server, as `dev-host --superapp-listen ADDR` plays it.
    pub superapp: DevSuperappConfig,
}

/// The superapp server the dev-host plays (`--superapp-listen`): who it knows and whom it trusts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DevSuperappConfig {
    /// The `X-CLIENT-KEY` the platform must send (the daemon's `[superapp] client_key`).
    pub client_key: String,
    /// The platform's public key, a PEM file as `miniapp-brokerd platform-public-key` prints it
    /// (`--platform-public-key` overrides). Empty: the key of the daemon the dev-host serves, read
    /// from its data dir.
    pub platform_public_key: String,
    /// Users the superapp knows besides the signed-in `[user]` (checkUser, their profiles).
    pub users: Vec<DevUser>,
}

impl Default for DevSuperappConfig {
    fn default() -> Self {
        DevSuperappConfig { client_key: "dev-client-key".into(), platform_public_key: String::new(), users: Vec::new() }
    }
}

/// The user the dev-host signs in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DevUser {
    pub uid: String,
    pub nick_name: String,
    pub avatar_url: String,
    pub phone_number: String,
    pub email: String,
}

impl Default for DevHostConfig {
    fn default() -> Self {
        DevHostConfig {
            name: "dev-host".into(),
            user: DevUser::default(),
            payments: "ok".into(),
            scopes: "auto".into(),
            refuse: Vec::new(),
            open_api_version: String::new(),
            users: Vec::new(),
            superapp: DevSuperappConfig::default(),
        }
    }
}

impl Default for DevUser {
    fn default() -> Self {
        DevUser {
            uid: "dev-user-1".into(),
            nick_name: "Dev User".into(),
            avatar_url: "https://example.invalid/avatar/dev-user-1.png".into(),
            phone_number: "+86 138 0000 0000".into(),
            email: "dev-user-1@example.invalid".into(),
        }
    }
}

impl DevHostConfig {
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let config: DevHostConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        if !matches!(config.payments.as_str(), "ok" | "fail" | "cancel") {
            return Err(format!("payments must be \"ok\", \"fail\" or \"cancel\", not {:?}", config.payments));
        }
        if !matches!(config.scopes.as_str(), "auto" | "ask") {
            return Err(format!("scopes must be \"auto\" or \"ask\", not {:?}", config.scopes));
        }
        if let Some(bad) = config.refuse.iter().find(|s| !scope::ALL.contains(&s.as_str())) {
            return Err(format!("unknown scope {bad:?} in refuse; expected one of {}", scope::ALL.join(", ")));
        }
        if !matches!(config.open_api_version.as_str(), "" | "v1" | "v2" | "v3") {
            return Err(format!(
                "open_api_version must be \"v1\", \"v2\", \"v3\" or empty, not {:?}",
                config.open_api_version
            ));
        }
        if let Some(u) = config.users.iter().find(|u| u.uid.is_empty()) {
            return Err(format!("every entry of users needs a uid (nick_name {:?} has none)", u.nick_name));
        }
        if config.superapp.client_key.is_empty() {
            return Err("superapp.client_key must not be empty".into());
        }
        Ok(config)
    }

    /// Every user the superapp server knows: the signed-in one and `superapp.users`.
    pub fn superapp_users(&self) -> Vec<DevUser> {
        std::iter::once(self.user.clone())
            .chain(self.users.iter().cloned())
            .chain(self.superapp.users.iter().cloned())
            .collect()
    }

    /// The user as the host pushes it.
    pub fn signed_in_user(&self) -> SignedInUser {
        self.user.signed_in()
    }

    /// Every user of the profile a person can switch to: `user` first, then `users`, each uid once.
    pub fn all_users(&self) -> Vec<DevUser> {
        let mut all: Vec<DevUser> = Vec::new();
        for u in std::iter::once(&self.user).chain(&self.users) {
            if !u.uid.is_empty() && !all.iter().any(|seen| seen.uid == u.uid) {
                all.push(u.clone());
            }
        }
        all
    }
}

impl DevUser {
    /// This user as the host pushes it (an empty uid signs out).
    pub fn signed_in(&self) -> SignedInUser {
        SignedInUser {
            uid: self.uid.clone(),
            profile: Some(UserProfile {
                nick_name: self.nick_name.clone(),
                avatar_url: self.avatar_url.clone(),
                phone_number: self.phone_number.clone(),
                email: self.email.clone(),
            }),
        }
    }

    /// Nobody signed in.
    pub fn signed_out() -> DevUser {
        DevUser {
            uid: String::new(),
            nick_name: String::new(),
            avatar_url: String::new(),
            phone_number: String::new(),
            email: String::new(),
        }
    }
}

/// What the person playing the superapp's user answers: which v3 scopes they grant, whether they
/// pay, what they change on the settings page. The terminal dev-host answers from the profile
/// ([`ProfileAnswers`]); `dev-sim` asks in its browser panel. Either way the rest of the host (the
/// delegate methods, the profile data) is this module's.
pub trait HostUser: Send + Sync + 'static {
    /// A decision (granted or not) for each scope of `req.scopes`, in any order.
    fn scopes(&self, app: &AppInfo, req: &GetAuthCodeRequest) -> BoxFuture<'static, Vec<(String, bool)>>;
    /// Whether the payment of `api` ("requestPayment", "requestMidasPaymentGameItem") goes through.
    fn pay(&self, app: &AppInfo, api: &'static str) -> BoxFuture<'static, Result<(), HostFailure>>;
    /// The changes the user made on the settings page (scope -> granted), given the current ones.
    fn settings(&self, app: &AppInfo, req: &OpenSettingRequest) -> BoxFuture<'static, BTreeMap<String, bool>>;
}

/// The profile's own answers: `payments`, `scopes` ("auto", or "ask" on the terminal), `refuse`.
#[derive(Debug, Clone)]
pub struct ProfileAnswers(Arc<DevHostConfig>);

impl ProfileAnswers {
    pub fn new(config: &DevHostConfig) -> Self {
        ProfileAnswers(Arc::new(config.clone()))
    }
}

impl HostUser for ProfileAnswers {
    fn scopes(&self, app: &AppInfo, req: &GetAuthCodeRequest) -> BoxFuture<'static, Vec<(String, bool)>> {
        let (cfg, app_id, req) = (self.0.clone(), app.app_id.clone(), req.clone());
        Box::pin(async move {
            let mut decided = Vec::with_capacity(req.scopes.len());
            for s in &req.scopes {
                let granted = if cfg.refuse.contains(s) {
                    false
                } else if cfg.scopes == "ask" && !req.previously_granted.contains(s) {
                    let (app_id, s2) = (app_id.clone(), s.clone());
                    tokio::task::spawn_blocking(move || ask_terminal(&app_id, &s2)).await.unwrap_or(false)
                } else {
                    true
                };
                decided.push((s.clone(), granted));
            }
            decided
        })
    }

    fn pay(&self, _app: &AppInfo, _api: &'static str) -> BoxFuture<'static, Result<(), HostFailure>> {
        let outcome = payment_outcome(&self.0.payments);
        Box::pin(async move { outcome })
    }

    /// The user turns every scope in `refuse` off and leaves the rest.
    fn settings(&self, _app: &AppInfo, _req: &OpenSettingRequest) -> BoxFuture<'static, BTreeMap<String, bool>> {
        let changes = self.0.refuse.iter().map(|s| (s.clone(), false)).collect();
        Box::pin(async move { changes })
    }
}

/// The signed-in user the host's handlers answer from (chooseAvatar, getUserInfo, ...); a person
/// switching users in `dev-sim` swaps it and pushes the new one to the daemon.
pub type CurrentDevUser = Arc<ArcSwap<DevUser>>;

/// Where the host reports each delegate call: the app it is for and the method (`"login"`,
/// `"getAuthCode(getPhoneNumber)"`, ...).
pub type Observer = Arc<dyn Fn(&AppInfo, &str) + Send + Sync>;

/// An observer that prints one line per delegate call.
pub fn printing(print: Printer) -> Observer {
    Arc::new(move |app: &AppInfo, what: &str| {
        print(format!(
            "delegate {what:<28} app={} instance={} version={}",
            app.app_id, app.instance_id, app.api_version
        ))
    })
}

/// Where the dev-host reports each delegate call (the terminal for `dev-host`, nothing for the demo).
pub type Printer = Arc<dyn Fn(String) + Send + Sync>;

/// Asks the terminal whether to grant a scope (`scopes = "ask"`); one question at a time.
static ASK: Mutex<()> = Mutex::new(());

fn ask_terminal(app_id: &str, scope: &str) -> bool {
    use std::io::{BufRead, Write};
    let _one_at_a_time = ASK.lock().unwrap_or_else(|e| e.into_inner());
    eprint!("dev-host: grant {scope} to {app_id}? [y/N] ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line).is_err() {
        return false;
    }
    matches!(line.trim(), "y" | "Y" | "yes")
}

fn hex_code(prefix: &str) -> String {
    let bytes: [u8; 16] = rand::random();
    format!("{prefix}{}", hex::encode(bytes))
}

fn user_info(u: &DevUser) -> UserInfo {
    UserInfo {
        nick_name: u.nick_name.clone(),
        avatar_url: u.avatar_url.clone(),
        gender: 0,
        country: String::new(),
        province: String::new(),
        city: String::new(),
        language: "en".into(),
    }
}

fn raw_data(info: &UserInfo) -> String {
    serde_json::json!({ "nickName": info.nick_name, "avatarUrl": info.avatar_url, "gender": info.gender, "language": info.language })
        .to_string()
}

fn payment_outcome(policy: &str) -> Result<(), HostFailure> {
    match policy {
        "ok" => Ok(()),
        "cancel" => Err(HostFailure::cancelled()),
        _ => Err(HostFailure::error("DevHostPaymentDomain", -2, "payment declined by dev-host")),
    }
}

/// One line for a consent event, as the dev-host prints it.
pub fn describe_consent(e: &miniapp_broker_client::proto::v1::ConsentChanged) -> String {
    format!(
        "consent  {:<22} {:<18} app={} uid={} (from {})",
        e.scope,
        e.decision().as_str_name(),
        e.app_id,
        e.uid,
        e.source().as_str_name()
    )
}

/// A host builder that answers every delegate method from `config`, reporting each call to `print`.
/// With `superapp`, getAuthCode's authCodes are that server's, for the signed-in user and the
/// scopes granted; without, they are random strings no one can redeem.
pub fn builder(
    address: &str,
    token: &str,
    config: &DevHostConfig,
    print: Printer,
    superapp: Option<Arc<DevSuperapp>>,
) -> HostBuilder {
    let user: CurrentDevUser = Arc::new(ArcSwap::from_pointee(config.user.clone()));
    builder_with(address, token, config, user, Arc::new(ProfileAnswers::new(config)), printing(print), superapp)
}

/// A host builder whose user-facing answers come from `answers` and whose profile data comes from
/// the current `user`, reporting each delegate call to `observe`; authCodes as in [`builder`].
pub fn builder_with(
    address: &str,
    token: &str,
    config: &DevHostConfig,
    user: CurrentDevUser,
    answers: Arc<dyn HostUser>,
    observe: Observer,
    superapp: Option<Arc<DevSuperapp>>,
) -> HostBuilder {
    let mut b = HostBuilder::new(address, token).name(&config.name).user(user.load().signed_in());

    macro_rules! on {
        ($req:ty, $name:literal, |$u:ident| $body:expr) => {{
            let (user, observe) = (user.clone(), observe.clone());
            b = b.handle(move |app, _req: $req| {
                observe(&app, $name);
                let $u = user.load_full();
                async move {
                    let _ = &$u;
                    $body
                }
            });
        }};
    }
    on!(LoginRequest, "login", |u| Ok(LoginResponse { code: hex_code("devhost-"), ..Default::default() }));
    on!(CheckSessionRequest, "checkSession", |u| Ok(CheckSessionResponse::default()));
    on!(GetPhoneNumberRequest, "getPhoneNumber", |u| Ok(GetPhoneNumberResponse {
        code: hex_code("devhost-phone-"),
        ..Default::default()
    }));
    on!(GetEmailRequest, "getEmail", |u| Ok(GetEmailResponse {
        code: hex_code("devhost-email-"),
        ..Default::default()
    }));
    on!(ChooseAvatarRequest, "chooseAvatar", |u| Ok(ChooseAvatarResponse {
        avatar_url: u.avatar_url.clone(),
        ..Default::default()
    }));
    on!(GetNickNameRequest, "getNickName", |u| Ok(GetNickNameResponse {
        nick_name: u.nick_name.clone(),
        ..Default::default()
    }));
    on!(GetUserInfoRequest, "getUserInfo", |u| {
        let info = user_info(&u);
        Ok(GetUserInfoResponse { raw_data: raw_data(&info), user_info: Some(info), ..Default::default() })
    });
    on!(GetUserProfileRequest, "getUserProfile", |u| {
        let info = user_info(&u);
        Ok(GetUserProfileResponse { raw_data: raw_data(&info), user_info: Some(info), ..Default::default() })
    });

    macro_rules! payment {
        ($req:ty, $resp:ty, $name:literal) => {{
            let (answers, observe) = (answers.clone(), observe.clone());
            b = b.handle(move |app, _req: $req| {
                observe(&app, $name);
                let paid = answers.pay(&app, $name);
                async move { paid.await.map(|()| <$resp>::default()) }
            });
        }};
    }
    payment!(RequestPaymentRequest, RequestPaymentResponse, "requestPayment");
    payment!(RequestMidasPaymentGameItemRequest, RequestMidasPaymentGameItemResponse, "requestMidasPaymentGameItem");

    {
        let (answers, observe, user, superapp) = (answers.clone(), observe.clone(), user.clone(), superapp.clone());
        b = b.get_auth_code(move |app, req: GetAuthCodeRequest| {
            observe(&app, &format!("getAuthCode({})", req.api));
            let decided = answers.scopes(&app, &req);
            let (uid, superapp) = (user.load().uid.clone(), superapp.clone());
            async move {
                let decided: HashMap<String, bool> = decided.await.into_iter().collect();
                let mut answer = GetAuthCodeResponse::default();
                let mut refused = BTreeMap::new();
                for s in &req.scopes {
                    if decided.get(s).copied().unwrap_or(false) {
                        answer.auth_success_scopes.push(s.clone());
                    } else {
                        refused.insert(s.clone(), "user refused".to_owned());
                    }
                }
                answer.auth_error_scopes = refused.into_iter().collect();
                answer.auth_code = match &superapp {
                    Some(server) => server.issue_auth_code(&uid, &answer.auth_success_scopes).ok_or_else(|| {
                        HostFailure::error("DevHostSuperappDomain", -3, "too many outstanding authCodes")
                    })?,
                    None => hex_code("devhost-auth-"),
                };
                Ok(answer)
            }
        });
    }
    {
        let (answers, observe) = (answers.clone(), observe.clone());
        b = b.handle(move |app, req: OpenSettingRequest| {
            observe(&app, "openSetting");
            let changed = answers.settings(&app, &req);
            async move { Ok(OpenSettingResponse { auth_setting: changed.await, ..Default::default() }) }
        });
    }
    if !config.open_api_version.is_empty() {
        let (version, observe) = (config.open_api_version.clone(), observe.clone());
        b = b.open_api_version(move |app| {
            observe(&app, "openApiVersion");
            let version = version.clone();
            async move { Ok(version) }
        });
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_profile_parses_and_bad_values_are_refused() {
        let example = include_str!("../../dev-host.example.toml");
        let parsed = DevHostConfig::from_toml(example).unwrap();
        assert_eq!(parsed.refuse, vec![scope::NICKNAME.to_owned()]);
        assert!(DevHostConfig::from_toml("payments = \"maybe\"").is_err());
        assert!(DevHostConfig::from_toml("refuse = [\"SCOPE_X\"]").is_err());
        assert!(DevHostConfig::from_toml("open_api_version = \"v9\"").is_err());
        assert_eq!(DevHostConfig::from_toml("").unwrap(), DevHostConfig::default());
    }

    use proptest::prelude::*;

    /// Any profile `from_toml` accepts.
    fn any_valid_profile() -> impl Strategy<Value = DevHostConfig> {
        let user = (".{0,12}", ".{0,12}", ".{0,12}", ".{0,12}", ".{0,12}").prop_map(
            |(uid, nick_name, avatar_url, phone_number, email)| DevUser {
                uid,
                nick_name,
                avatar_url,
                phone_number,
                email,
            },
        );
        (
            ".{0,16}",
            user,
            prop_oneof![Just("ok"), Just("fail"), Just("cancel")],
            prop_oneof![Just("auto"), Just("ask")],
            proptest::sample::subsequence(scope::ALL.to_vec(), 0..=scope::ALL.len()),
            prop_oneof![Just(""), Just("v1"), Just("v2"), Just("v3")],
        )
            .prop_map(|(name, user, payments, scopes, refuse, open_api_version)| DevHostConfig {
                name,
                user,
                payments: payments.into(),
                scopes: scopes.into(),
                refuse: refuse.into_iter().map(str::to_owned).collect(),
                open_api_version: open_api_version.into(),
                users: Vec::new(),
                superapp: DevSuperappConfig::default(),
            })
    }

    proptest! {
        #[test]
        fn any_text_is_a_profile_or_an_error(text in ".{0,200}") {
            let _ = DevHostConfig::from_toml(&text);
        }

        #[test]
        fn valid_profiles_round_trip_through_toml(profile in any_valid_profile()) {
            let text = toml::to_string(&profile).expect("a profile serializes");
            prop_assert_eq!(DevHostConfig::from_toml(&text), Ok(profile));
        }

        #[test]
        fn only_the_documented_values_are_accepted(
            payments in "ok|fail|cancel|[a-z]{0,6}",
            scopes in "auto|ask|[a-z]{0,4}",
            refuse in "SCOPE_(EMAIL|AVATAR|NICKNAME|PHONE_NUMBER|[A-Z]{0,5})",
            version in "v?[0-9]?",
        ) {
            let text = format!("payments = {payments:?}\nscopes = {scopes:?}\nrefuse = [{refuse:?}]\nopen_api_version = {version:?}\n");
            let valid = matches!(payments.as_str(), "ok" | "fail" | "cancel")
                && matches!(scopes.as_str(), "auto" | "ask")
                && scope::ALL.contains(&refuse.as_str())
                && matches!(version.as_str(), "" | "v1" | "v2" | "v3");
            prop_assert_eq!(DevHostConfig::from_toml(&text).is_ok(), valid);
        }
    }
}
