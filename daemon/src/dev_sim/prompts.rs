//! The host's prompts, answered by a person clicking in the panel: v3 scopes, payments, the
//! settings page. [`PanelUser`] is the dev-host's [`HostUser`] for the simulator: each question
//! becomes a pending prompt the panel shows, and the delegate call waits for its answer (or for
//! the daemon to give up on the call, which drops the wait and so the prompt).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use futures::future::BoxFuture;
use miniapp_broker_client::{
    HostFailure,
    proto::v1::{AppInfo, GetAuthCodeRequest, OpenSettingRequest},
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::{changes::Changes, error::DevSimError};
use crate::dev_host::HostUser;

/// Prompts waiting at once; a question beyond that is answered at once as the user saying no
/// (scopes refused, payment cancelled, settings unchanged), so nothing waits unseen.
pub const MAX_PROMPTS: usize = 32;

/// What a person answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// The scopes allowed (the rest of those asked are refused).
    Scopes(BTreeSet<String>),
    Pay,
    Cancel,
    /// A host error, passed to the mini app unchanged.
    Fail {
        domain: String,
        code: i64,
        message: String,
    },
    /// The settings page's changes: scope -> granted.
    Settings(BTreeMap<String, bool>),
}

/// The kind of a prompt, which decides the answers it takes.
#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Scopes(BTreeSet<String>),
    Payment,
    Setting(BTreeSet<String>),
}

struct Pending {
    kind: Kind,
    view: Value,
    answer: oneshot::Sender<Answer>,
}

/// The pending prompts, by id.
pub struct Prompts {
    table: Mutex<BTreeMap<u64, Pending>>,
    next: AtomicU64,
    changes: Changes,
}

impl std::fmt::Debug for Prompts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prompts").finish_non_exhaustive()
    }
}

/// Removes its prompt when the wait ends, answered or abandoned (the daemon cancelled the call).
struct Waiting {
    prompts: Arc<Prompts>,
    id: u64,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let removed = self.prompts.lock().remove(&self.id).is_some();
        if removed {
            self.prompts.changes.bump();
        }
    }
}

/// An answer as the panel posts it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PostedAnswer {
    pub id: u64,
    /// scopes: the scopes allowed ([] refuses every one).
    #[serde(default)]
    pub granted: Option<Vec<String>>,
    /// payment: "pay", "cancel" or "fail".
    #[serde(default)]
    pub outcome: Option<String>,
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default)]
    pub code: Option<i64>,
    #[serde(default)]
    pub message: Option<String>,
    /// setting: scope -> granted.
    #[serde(default)]
    pub auth_setting: Option<BTreeMap<String, bool>>,
}

impl Prompts {
    pub fn new(changes: Changes) -> Arc<Prompts> {
        Arc::new(Prompts { table: Mutex::new(BTreeMap::new()), next: AtomicU64::new(1), changes })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Pending>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pending prompts, oldest first, as the panel shows them.
    pub fn views(&self) -> Vec<Value> {
        self.lock().iter().map(|(id, p)| with_id(*id, &p.view)).collect()
    }

    /// Shows a prompt and waits for its answer; `None` when the table is full.
    fn ask(self: &Arc<Self>, kind: Kind, view: Value) -> BoxFuture<'static, Option<Answer>> {
        let (tx, rx) = oneshot::channel();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        {
            let mut table = self.lock();
            if table.len() >= MAX_PROMPTS {
                tracing::warn!(max = MAX_PROMPTS, "dev-sim: too many prompts waiting; answering no");
                return Box::pin(async { None });
            }
            table.insert(id, Pending { kind, view, answer: tx });
        }
        self.changes.bump();
        let waiting = Waiting { prompts: self.clone(), id };
        Box::pin(async move {
            let answer = rx.await.ok();
            drop(waiting);
            answer
        })
    }

    /// Answers prompt `posted.id`; an answer that does not fit the prompt changes nothing.
    pub fn answer(&self, posted: PostedAnswer) -> Result<(), DevSimError> {
        let mut table = self.lock();
        let pending = table.get(&posted.id).ok_or_else(|| {
            DevSimError::BadRequest(format!("no prompt {} is waiting (answered, or the call ended)", posted.id))
        })?;
        let answer = match (&pending.kind, &posted) {
            (Kind::Scopes(asked), PostedAnswer { granted: Some(granted), outcome: None, auth_setting: None, .. }) => {
                let granted: BTreeSet<String> = granted.iter().cloned().collect();
                if let Some(odd) = granted.difference(asked).next() {
                    return Err(DevSimError::BadRequest(format!("{odd} was not asked")));
                }
                Answer::Scopes(granted)
            }
            (Kind::Payment, PostedAnswer { outcome: Some(outcome), granted: None, auth_setting: None, .. }) => {
                match outcome.as_str() {
                    "pay" => Answer::Pay,
                    "cancel" => Answer::Cancel,
                    "fail" => Answer::Fail {
                        domain: posted.domain.clone().unwrap_or_else(|| "DevSimPaymentDomain".into()),
                        code: posted.code.unwrap_or(-2),
                        message: posted.message.clone().unwrap_or_else(|| "payment failed in dev-sim".into()),
                    },
                    other => {
                        return Err(DevSimError::BadRequest(format!(
                            "outcome must be \"pay\", \"cancel\" or \"fail\", not {other:?}"
                        )));
                    }
                }
            }
            (Kind::Setting(known), PostedAnswer { auth_setting: Some(setting), granted: None, outcome: None, .. }) => {
                if let Some(odd) = setting.keys().find(|s| !known.contains(*s)) {
                    return Err(DevSimError::BadRequest(format!("{odd} is not a scope of this settings page")));
                }
                Answer::Settings(setting.clone())
            }
            _ => return Err(DevSimError::BadRequest("the answer does not fit the prompt's kind".into())),
        };
        let pending = table.remove(&posted.id).expect("looked up under the same lock");
        drop(table);
        // The waiter may have gone (the daemon cancelled the call) just now: nothing to tell then.
        let _ = pending.answer.send(answer);
        self.changes.bump();
        Ok(())
    }
}

fn with_id(id: u64, view: &Value) -> Value {
    let mut v = view.clone();
    if let Value::Object(map) = &mut v {
        map.insert("id".into(), json!(id));
    }
    v
}

fn app_view(app: &AppInfo) -> Value {
    json!({ "appId": app.app_id, "instanceId": app.instance_id, "apiVersion": app.api_version })
}

/// The dev-host's user-facing answers for the simulator: every question goes to the panel.
#[derive(Debug, Clone)]
pub struct PanelUser(pub Arc<Prompts>);

impl HostUser for PanelUser {
    fn scopes(&self, app: &AppInfo, req: &GetAuthCodeRequest) -> BoxFuture<'static, Vec<(String, bool)>> {
        let asked: BTreeSet<String> =
            req.scopes.iter().filter(|s| !req.previously_granted.contains(s)).cloned().collect();
        let all = req.scopes.clone();
        if asked.is_empty() {
            // Nothing new to ask: a real superapp does not prompt for what the user already gave.
            return Box::pin(async move { all.into_iter().map(|s| (s, true)).collect() });
        }
        let view = json!({
            "kind": "scopes", "api": req.api, "app": app_view(app),
            "scopes": asked, "previouslyGranted": req.previously_granted, "uid": req.uid,
        });
        let answer = self.0.ask(Kind::Scopes(asked.clone()), view);
        Box::pin(async move {
            let granted = match answer.await {
                Some(Answer::Scopes(granted)) => granted,
                _ => BTreeSet::new(),
            };
            all.into_iter().map(|s| (s.clone(), !asked.contains(&s) || granted.contains(&s))).collect()
        })
    }

    fn pay(&self, app: &AppInfo, api: &'static str) -> BoxFuture<'static, Result<(), HostFailure>> {
        let answer = self.0.ask(Kind::Payment, json!({ "kind": "payment", "api": api, "app": app_view(app) }));
        Box::pin(async move {
            match answer.await {
                Some(Answer::Pay) => Ok(()),
                Some(Answer::Fail { domain, code, message }) => Err(HostFailure::error(domain, code, message)),
                _ => Err(HostFailure::cancelled()),
            }
        })
    }

    fn settings(&self, app: &AppInfo, req: &OpenSettingRequest) -> BoxFuture<'static, BTreeMap<String, bool>> {
        let known: BTreeSet<String> = req.auth_setting.keys().cloned().collect();
        let view = json!({ "kind": "setting", "app": app_view(app), "authSetting": req.auth_setting, "uid": req.uid });
        let answer = self.0.ask(Kind::Setting(known), view);
        Box::pin(async move {
            match answer.await {
                Some(Answer::Settings(changes)) => changes,
                _ => BTreeMap::new(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> AppInfo {
        AppInfo { app_id: "wxa".into(), instance_id: "i1".into(), api_version: "v3".into() }
    }

    fn posted(id: u64) -> PostedAnswer {
        PostedAnswer { id, granted: None, outcome: None, domain: None, code: None, message: None, auth_setting: None }
    }

    #[tokio::test]
    async fn a_scope_prompt_waits_for_the_click_and_a_wrong_answer_changes_nothing() {
        let prompts = Prompts::new(Changes::new());
        let user = PanelUser(prompts.clone());
        let req = GetAuthCodeRequest {
            api: "getPhoneNumber".into(),
            scopes: vec!["SCOPE_PHONE_NUMBER".into(), "SCOPE_EMAIL".into()],
            previously_granted: vec!["SCOPE_EMAIL".into()],
            ..Default::default()
        };
        let decided = tokio::spawn(user.scopes(&app(), &req));
        let views = prompts.views();
        assert_eq!(views.len(), 1);
        assert_eq!(views[0]["scopes"], json!(["SCOPE_PHONE_NUMBER"]));
        let id = views[0]["id"].as_u64().unwrap();
        // A payment answer to a scope prompt, or a scope that was not asked: refused, still waiting.
        assert!(prompts.answer(PostedAnswer { outcome: Some("pay".into()), ..posted(id) }).is_err());
        assert!(prompts.answer(PostedAnswer { granted: Some(vec!["SCOPE_AVATAR".into()]), ..posted(id) }).is_err());
        assert_eq!(prompts.views().len(), 1);
        prompts.answer(PostedAnswer { granted: Some(vec![]), ..posted(id) }).unwrap();
        let mut decided = decided.await.unwrap();
        decided.sort();
        assert_eq!(decided, vec![("SCOPE_EMAIL".into(), true), ("SCOPE_PHONE_NUMBER".into(), false)]);
        assert!(prompts.views().is_empty());
        assert!(prompts.answer(PostedAnswer { granted: Some(vec![]), ..posted(id) }).is_err(), "answered once");
    }

    #[tokio::test]
    async fn an_abandoned_call_takes_its_prompt_away_and_a_full_table_says_no() {
        let prompts = Prompts::new(Changes::new());
        let user = PanelUser(prompts.clone());
        let waiting = user.pay(&app(), "requestPayment");
        assert_eq!(prompts.views().len(), 1);
        drop(waiting); // the daemon cancelled the delegate call
        assert!(prompts.views().is_empty());

        let held: Vec<_> = (0..MAX_PROMPTS).map(|_| user.pay(&app(), "requestPayment")).collect();
        assert_eq!(prompts.views().len(), MAX_PROMPTS);
        assert_eq!(user.pay(&app(), "requestPayment").await, Err(HostFailure::cancelled()));
        drop(held);
        assert!(prompts.views().is_empty());
    }

    #[tokio::test]
    async fn a_failed_payment_carries_the_host_error() {
        let prompts = Prompts::new(Changes::new());
        let paying = tokio::spawn(PanelUser(prompts.clone()).pay(&app(), "requestPayment"));
        let id = prompts.views()[0]["id"].as_u64().unwrap();
        let answer = PostedAnswer {
            outcome: Some("fail".into()),
            domain: Some("D".into()),
            code: Some(-9),
            message: Some("no funds".into()),
            ..posted(id)
        };
        prompts.answer(answer).unwrap();
        assert_eq!(paying.await.unwrap(), Err(HostFailure::error("D", -9, "no funds")));
    }
}
