//! wx.requestPayment: no default; always delegated, once per idempotency key (see `payments`).
//! The five WeChat fields are required and checked before anything reaches the host.

use miniapp_broker_proto::v1::RequestPaymentRequest;

use crate::error::ApiError;

/// The sign types WeChat Pay accepts.
const SIGN_TYPES: [&str; 3] = ["MD5", "HMAC-SHA256", "RSA"];

pub fn validate(r: &RequestPaymentRequest) -> Result<(), ApiError> {
    for (name, value) in [
        ("timeStamp", &r.time_stamp),
        ("nonceStr", &r.nonce_str),
        ("package", &r.package),
        ("signType", &r.sign_type),
        ("paySign", &r.pay_sign),
    ] {
        if value.trim().is_empty() {
            return Err(ApiError::InvalidParams(format!("{name} is required")));
        }
    }
    if !r.time_stamp.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::InvalidParams("timeStamp must be a decimal number of seconds".into()));
    }
    if !SIGN_TYPES.contains(&r.sign_type.as_str()) {
        return Err(ApiError::InvalidParams("signType must be MD5, HMAC-SHA256 or RSA".into()));
    }
    Ok(())
}

/// The idempotency key when the caller gave none: nonceStr and paySign are unique per order.
pub fn derived_key(r: &RequestPaymentRequest) -> String {
    super::payments::digest_key(&["requestPayment", &r.package, &r.nonce_str, &r.pay_sign])
}
