//! wx.requestMidasPaymentGameItem: no default; always delegated, once per idempotency key.
//! `signData` must be a JSON object with the fields WeChat requires; `paySig` and `signature` are
//! required.

use miniapp_broker_proto::v1::RequestMidasPaymentGameItemRequest;
use serde_json::Value;

use crate::error::ApiError;

const REQUIRED_STRINGS: [&str; 4] = ["mode", "currencyType", "productId", "outTradeNo"];
const REQUIRED_NUMBERS: [&str; 2] = ["buyQuantity", "goodsPrice"];

pub fn validate(r: &RequestMidasPaymentGameItemRequest) -> Result<(), ApiError> {
    for (name, value) in [("signData", &r.sign_data), ("paySig", &r.pay_sig), ("signature", &r.signature)] {
        if value.trim().is_empty() {
            return Err(ApiError::InvalidParams(format!("{name} is required")));
        }
    }
    let sign_data = sign_data(r)?;
    for key in REQUIRED_STRINGS {
        match sign_data.get(key) {
            Some(Value::String(s)) if !s.is_empty() => {}
            _ => return Err(ApiError::InvalidParams(format!("signData.{key} is required (a string)"))),
        }
    }
    for key in REQUIRED_NUMBERS {
        match sign_data.get(key).and_then(Value::as_u64) {
            Some(n) if n > 0 => {}
            _ => return Err(ApiError::InvalidParams(format!("signData.{key} is required (a positive integer)"))),
        }
    }
    Ok(())
}

fn sign_data(r: &RequestMidasPaymentGameItemRequest) -> Result<serde_json::Map<String, Value>, ApiError> {
    match serde_json::from_str::<Value>(&r.sign_data) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(ApiError::InvalidParams("signData must be a JSON object".into())),
    }
}

/// The idempotency key when the caller gave none: outTradeNo is unique per order.
pub fn derived_key(r: &RequestMidasPaymentGameItemRequest) -> String {
    let out_trade_no = sign_data(r)
        .ok()
        .and_then(|m| m.get("outTradeNo").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_default();
    super::payments::digest_key(&["requestMidasPaymentGameItem", &out_trade_no, &r.signature])
}
