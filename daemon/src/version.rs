//! Open-API versions (v1, v2, v3) and how an app instance gets one.
//!
//! Resolution, once per instance: `apiVersion` in app.json wins; else the host's `openApiVersion`
//! answer for the instance (one question shared by every call that waits for it, see
//! [`Question`]); else the daemon's configured default. An instance answers every API
//! with the one version it resolved (no mixing); a version that came from a host is re-asked when a
//! new host connects.

use std::{fmt, str::FromStr, sync::Arc};

use futures::future::{FutureExt, Shared, WeakShared};
use serde::{Deserialize, Serialize};

use crate::{error::ApiError, host_link::HostLink, registry::AppInstance};

/// The seed's three implementation solutions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ApiVersion {
    /// Every API is implemented by the host.
    V1,
    /// The daemon answers login, checkSession and the user-information APIs itself from the
    /// signed-in user the host pushed.
    V2,
    /// As v2, but each default first asks the host's getAuthCode ("mutual trust").
    V3,
}

impl ApiVersion {
    pub const fn as_str(self) -> &'static str {
        match self {
            ApiVersion::V1 => "v1",
            ApiVersion::V2 => "v2",
            ApiVersion::V3 => "v3",
        }
    }

    pub(crate) const fn to_u8(self) -> u8 {
        match self {
            ApiVersion::V1 => 1,
            ApiVersion::V2 => 2,
            ApiVersion::V3 => 3,
        }
    }

    pub(crate) const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(ApiVersion::V1),
            2 => Some(ApiVersion::V2),
            3 => Some(ApiVersion::V3),
            _ => None,
        }
    }
}

/// An `apiVersion` that is not "v1", "v2" or "v3".
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("invalid apiVersion {0:?}: expected \"v1\", \"v2\" or \"v3\"")]
pub struct InvalidVersion(pub String);

impl FromStr for ApiVersion {
    type Err = InvalidVersion;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "v1" => Ok(ApiVersion::V1),
            "v2" => Ok(ApiVersion::V2),
            "v3" => Ok(ApiVersion::V3),
            other => Err(InvalidVersion(other.chars().take(32).collect())),
        }
    }
}

impl TryFrom<String> for ApiVersion {
    type Error = InvalidVersion;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ApiVersion> for String {
    fn from(v: ApiVersion) -> String {
        v.as_str().to_owned()
    }
}

impl fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an instance's version came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VersionSource {
    AppJson,
    Host,
    Default,
}

impl VersionSource {
    pub const fn as_str(self) -> &'static str {
        match self {
            VersionSource::AppJson => "app.json",
            VersionSource::Host => "host",
            VersionSource::Default => "default",
        }
    }
}

/// The parts of app.json the daemon reads. Everything else in it is the mini app's business.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppJson {
    pub api_version: Option<ApiVersion>,
}

/// Why an app.json was refused at launch.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AppJsonError {
    #[error("app.json is not a JSON object")]
    NotAnObject,
    #[error("app.json: {0}")]
    Syntax(String),
    #[error("app.json: apiVersion must be a string")]
    VersionType,
    #[error("app.json: {0}")]
    Version(#[from] InvalidVersion),
}

impl AppJson {
    /// Reads app.json text; empty text is an app.json with no settings.
    pub fn parse(text: &str) -> Result<AppJson, AppJsonError> {
        if text.trim().is_empty() {
            return Ok(AppJson::default());
        }
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| AppJsonError::Syntax(e.to_string()))?;
        let obj = value.as_object().ok_or(AppJsonError::NotAnObject)?;
        let api_version = match obj.get("apiVersion") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.parse()?),
            Some(_) => return Err(AppJsonError::VersionType),
        };
        Ok(AppJson { api_version })
    }
}

/// An instance's version question to its host, shared by every call that waits for the answer.
///
/// The first call of a fresh instance asks the host's `openApiVersion`; calls that arrive while the
/// question is open join it instead of asking again, and its outcome, a version or the failure
/// (deadline, host gone), is every waiter's. Each waiter waits only until its own deadline. The
/// instance keeps only a weak handle: when every waiter has gone the question is dropped, which
/// cancels it on the host, and a question that ended is never joined (the next call asks afresh).
#[derive(Default)]
pub struct Question(std::sync::Mutex<Option<WeakShared<Asking>>>);

/// The open question itself: resolves to the version, or to why the host gave none.
type Asking = futures::future::BoxFuture<'static, Result<ApiVersion, ApiError>>;

impl std::fmt::Debug for Question {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Question")
    }
}

impl Question {
    /// The open question, or a new one made by `ask` when none is open.
    fn join(&self, ask: impl FnOnce() -> Asking) -> Shared<Asking> {
        let mut open = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(question) = open.as_ref().and_then(WeakShared::upgrade)
            && question.peek().is_none()
        {
            return question;
        }
        let question = ask().shared();
        *open = question.downgrade();
        question
    }
}

/// The version of `inst`, resolving it on first use: from app.json, else by the instance's one
/// shared [`Question`] to the host (or the default). The caller waits until `deadline` at most.
/// A version learned from a host that has since been replaced is asked again.
pub async fn resolve(
    host: &Arc<HostLink>,
    default: ApiVersion,
    inst: &Arc<AppInstance>,
    deadline: tokio::time::Instant,
) -> Result<ApiVersion, ApiError> {
    if let Some((v, _)) = inst.resolved(host.current_id()) {
        return Ok(v);
    }
    if let Some(v) = inst.app_json.api_version {
        inst.set_version(v, VersionSource::AppJson, 0);
        return Ok(v);
    }
    let question = inst.question.join(|| Box::pin(ask(host.clone(), default, inst.clone())));
    tokio::time::timeout_at(deadline, question).await.unwrap_or(Err(ApiError::Timeout))
}

/// One question to the host: waits (up to the grace period) for a host while none is connected,
/// asks its `openApiVersion` once, and records the version it chose (or the default).
async fn ask(host: Arc<HostLink>, default: ApiVersion, inst: Arc<AppInstance>) -> Result<ApiVersion, ApiError> {
    use miniapp_broker_proto::v1::{DelegateMethod, OpenApiVersionRequest, delegate_call};

    use crate::host_link::{Expect, HostAnswer};

    // While a host restarts, wait (up to the grace period) for the next one: its answer, not the
    // default, is what the instance should run with.
    let session = host.wait_current().await.ok();
    let host_id = session.as_ref().map_or(0, |h| h.id);
    if let Some((v, _)) = inst.resolved(host_id) {
        return Ok(v);
    }
    // A version an earlier host chose is never swapped for the default because no host could be
    // asked again: the call fails, and the next one asks.
    let chosen_by_a_host = inst.version_label().1 == VersionSource::Host.as_str();
    if session.is_none() && chosen_by_a_host {
        return Err(ApiError::NoHost);
    }
    let asked = match session {
        Some(h) if h.implements(DelegateMethod::OpenApiVersion) => {
            let app = crate::broker::Broker::app_info(&inst, None);
            let request = delegate_call::Request::OpenApiVersion(OpenApiVersionRequest {});
            match HostLink::call_on(&h, app, request, Expect::Version).await {
                Ok(HostAnswer::Version(answer)) => match answer.version.parse::<ApiVersion>() {
                    Ok(v) => Some((v, h.id)),
                    Err(e) => {
                        tracing::warn!(app_id = %inst.app_id, error = %e, "host's openApiVersion answer is invalid; using the default");
                        None
                    }
                },
                Ok(_) => None,
                // The host went away (or never answered, or could not take the question) before it
                // chose: not a choice of the default. Nothing is cached; the next call asks again.
                Err(e @ (ApiError::HostGone | ApiError::Timeout | ApiError::Exhausted(_) | ApiError::Cancelled(_))) => {
                    tracing::warn!(app_id = %inst.app_id, reason = e.reason(), "openApiVersion got no answer; the version stays unresolved");
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(app_id = %inst.app_id, reason = e.reason(), "openApiVersion failed; using the default");
                    None
                }
            }
        }
        _ => None,
    };
    let (version, source, from_host) = match asked {
        Some((v, host_id)) => (v, VersionSource::Host, host_id),
        None => (default, VersionSource::Default, 0),
    };
    inst.set_version(version, source, from_host);
    tracing::info!(app_id = %inst.app_id, instance = %inst.instance_id, version = version.as_str(), source = source.as_str(), "api version resolved");
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;
    use miniapp_broker_proto::strategies::json_value;
    use proptest::prelude::*;

    #[test]
    fn app_json_version_is_read_and_checked() {
        assert_eq!(AppJson::parse(r#"{"apiVersion":"v3","pages":[]}"#).unwrap().api_version, Some(ApiVersion::V3));
        assert_eq!(AppJson::parse("").unwrap().api_version, None);
        assert_eq!(AppJson::parse("{}").unwrap().api_version, None);
        assert!(matches!(AppJson::parse(r#"{"apiVersion":"v4"}"#), Err(AppJsonError::Version(_))));
        assert_eq!(AppJson::parse(r#"{"apiVersion":2}"#), Err(AppJsonError::VersionType));
        assert_eq!(AppJson::parse("[]"), Err(AppJsonError::NotAnObject));
    }

    proptest! {
        #[test]
        fn app_json_never_panics(text in ".{0,200}") {
            let _ = AppJson::parse(&text);
        }

        #[test]
        fn only_three_versions_parse(s in "[a-zA-Z0-9]{0,4}") {
            let ok = s.parse::<ApiVersion>().is_ok();
            prop_assert_eq!(ok, matches!(s.as_str(), "v1" | "v2" | "v3"));
        }

        #[test]
        fn app_json_reads_the_version_among_any_other_keys(
            v in 0usize..3,
            others in prop::collection::btree_map("[a-zA-Z]{1,10}", json_value(), 0..6),
        ) {
            let version = [ApiVersion::V1, ApiVersion::V2, ApiVersion::V3][v];
            let mut obj: serde_json::Map<String, serde_json::Value> = others.into_iter().collect();
            obj.insert("apiVersion".into(), version.as_str().into());
            let text = serde_json::Value::Object(obj).to_string();
            prop_assert_eq!(AppJson::parse(&text), Ok(AppJson { api_version: Some(version) }));
        }

        #[test]
        fn app_json_of_any_json_is_accepted_exactly_when_valid(
            mut value in json_value(),
            version in proptest::option::of(prop_oneof![json_value(), "v[0-9]".prop_map(serde_json::Value::from)]),
        ) {
            if let (serde_json::Value::Object(obj), Some(v)) = (&mut value, version) {
                obj.insert("apiVersion".into(), v);
            }
            let valid = match &value {
                serde_json::Value::Object(obj) => match obj.get("apiVersion") {
                    None | Some(serde_json::Value::Null) => true,
                    Some(serde_json::Value::String(s)) => s.parse::<ApiVersion>().is_ok(),
                    Some(_) => false,
                },
                _ => false,
            };
            prop_assert_eq!(AppJson::parse(&value.to_string()).is_ok(), valid);
        }
    }
}
