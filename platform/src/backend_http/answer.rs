//! The answer shapes: always HTTP 200 with a JSON body, as both platforms answer.
//!
//! WeChat: the data fields on success (plus `errcode: 0, errmsg: "ok"` where WeChat sends them);
//! on error only `{"errcode": N, "errmsg": "..."}`. TCMPP's OpenServer: `errcode`, `errmsg` and a
//! `requestId` in every answer, and on error the data fields present as empty strings.

use axum::{
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Map, Value, json};

use crate::{ExchangeFailure, tokens::random_key};

/// Which platform's answer shape a path asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    WeChat,
    Tcmpp,
}

/// One endpoint's outcome: its data fields, or the failure. `empty` names the data fields TCMPP
/// still sends (as "") when the call failed.
pub(super) fn answer(
    flavor: Flavor,
    empty: &[(&str, Value)],
    outcome: Result<Map<String, Value>, ExchangeFailure>,
) -> Response {
    let body = match (flavor, outcome) {
        (Flavor::WeChat, Ok(fields)) => fields,
        (Flavor::WeChat, Err(e)) => error_fields(&e),
        (Flavor::Tcmpp, Ok(mut fields)) => {
            fields.entry("errcode").or_insert(json!(0));
            fields.entry("errmsg").or_insert(json!("ok"));
            fields.insert("requestId".into(), json!(request_id()));
            fields
        }
        (Flavor::Tcmpp, Err(e)) => {
            let mut fields = error_fields(&e);
            for (name, value) in empty {
                fields.insert((*name).into(), value.clone());
            }
            fields.insert("requestId".into(), json!(request_id()));
            fields
        }
    };
    json_response(StatusCode::OK, Value::Object(body))
}

fn error_fields(e: &ExchangeFailure) -> Map<String, Value> {
    let mut fields = Map::new();
    fields.insert("errcode".into(), json!(e.errcode()));
    fields.insert("errmsg".into(), json!(e.to_string()));
    fields
}

pub(super) fn json_response(status: StatusCode, body: Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json; charset=utf-8")], body.to_string()).into_response()
}

/// A request id as TCMPP's: 32 hex digits, random.
fn request_id() -> String {
    hex::encode(&random_key()[..16])
}
