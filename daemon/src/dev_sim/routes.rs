//! The simulator's HTTP surface: the panel and its scripts, the mini app's files under `/app/`,
//! and the panel's API under `/api/` (JSON POSTs, behind [`super::guard`]).

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, State},
    http::header,
    middleware,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Value, json};

use super::{
    app::AppFiles,
    assets::{self, Asset},
    error::DevSimError,
    guard::{self, Guard},
    prompts::PostedAnswer,
    sim::Sim,
};

/// Largest API request body (a wx call's params).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// How long the panel's long poll waits for a change.
pub const POLL_WAIT: Duration = Duration::from_secs(20);

#[derive(Clone)]
struct Shared {
    sim: Arc<Sim>,
    files: Arc<AppFiles>,
}

/// The routes, guarded.
pub fn router(sim: Arc<Sim>, files: AppFiles, guard: Guard) -> Router {
    Router::new()
        .route("/", get(|| async { asset(assets::PANEL_HTML) }))
        .route("/sim/panel.js", get(|| async { asset(assets::PANEL_JS) }))
        .route("/sim/panel.css", get(|| async { asset(assets::PANEL_CSS) }))
        .route("/sim/bridge.js", get(|| async { asset(assets::BRIDGE_JS) }))
        .route("/app/", get(app_index))
        .route("/app/{*path}", get(app_file))
        .route("/api/state", post(state))
        .route("/api/invoke", post(invoke))
        .route("/api/prompt", post(prompt))
        .route("/api/user", post(user))
        .route("/api/launch", post(relaunch))
        .fallback(|| async { DevSimError::NotFound })
        .with_state(Shared { sim, files: Arc::new(files) })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(guard, guard::guard))
}

fn asset(a: Asset) -> Response {
    ([(header::CONTENT_TYPE, a.content_type)], a.body).into_response()
}

async fn app_index(State(s): State<Shared>) -> Result<Response, DevSimError> {
    app_file(State(s), Path(String::new())).await
}

async fn app_file(State(s): State<Shared>, Path(path): Path<String>) -> Result<Response, DevSimError> {
    let files = s.files.clone();
    let (body, content_type) =
        tokio::task::spawn_blocking(move || files.read(&path)).await.map_err(|_| DevSimError::NotFound)??;
    Ok(([(header::CONTENT_TYPE, content_type)], body.into_owned()).into_response())
}

fn json_response(value: Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], value.to_string()).into_response()
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, DevSimError> {
    serde_json::from_slice(body).map_err(|e| DevSimError::BadRequest(e.to_string()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateRequest {
    /// The change counter the panel last saw; the answer waits for a newer one (none: at once).
    #[serde(default)]
    after: Option<u64>,
}

async fn state(State(s): State<Shared>, body: Bytes) -> Result<Response, DevSimError> {
    let r: StateRequest = if body.is_empty() { StateRequest { after: None } } else { parse(&body)? };
    let version = match r.after {
        None => s.sim.changes.now(),
        Some(after) => s.sim.changes.after(after, POLL_WAIT).await,
    };
    Ok(json_response(s.sim.snapshot(version).await))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InvokeRequest {
    token: String,
    api: String,
    #[serde(default)]
    params: Option<Value>,
}

async fn invoke(State(s): State<Shared>, body: Bytes) -> Result<Response, DevSimError> {
    let r: InvokeRequest = parse(&body)?;
    let params = r.params.unwrap_or_else(|| json!({}));
    if !params.is_object() {
        return Err(DevSimError::BadRequest("params must be an object".into()));
    }
    let (instance, version) = s.sim.instance_of(&r.token).await;
    let (ok, result, id) = s.sim.calls.invoke(&r.token, &instance, &version, &r.api, params).await;
    if version.is_empty() && !instance.is_empty() {
        let learned = s.sim.learn_version().await;
        s.sim.calls.learned_version(id, &learned);
    }
    s.sim.refresh_privacy();
    Ok(json_response(json!({ "ok": ok, "result": result })))
}

async fn prompt(State(s): State<Shared>, body: Bytes) -> Result<Response, DevSimError> {
    let answer: PostedAnswer = parse(&body)?;
    s.sim.prompts.answer(answer)?;
    Ok(json_response(json!({ "ok": true })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserRequest {
    /// A uid of the profile; empty signs out.
    uid: String,
}

async fn user(State(s): State<Shared>, body: Bytes) -> Result<Response, DevSimError> {
    let r: UserRequest = parse(&body)?;
    s.sim.switch_user(&r.uid).await?;
    Ok(json_response(json!({ "ok": true })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LaunchRequest {
    /// "v1", "v2", "v3", or empty for app.json's own.
    #[serde(default)]
    api_version: String,
}

async fn relaunch(State(s): State<Shared>, body: Bytes) -> Result<Response, DevSimError> {
    let r: LaunchRequest = parse(&body)?;
    let launch = s.sim.relaunch(&r.api_version).await?;
    Ok(json_response(json!({ "ok": true, "generation": launch.generation })))
}
