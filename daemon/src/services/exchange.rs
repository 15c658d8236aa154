//! `Exchange`: the mini app backend's surface, authenticated by the app's secret. Failures carry
//! WeChat's errcode/errmsg in the status details and message.

use std::sync::Arc;

use miniapp_broker_proto::v1::{self, exchange_server::Exchange};
use prost::Message;
use tonic::{Code, Request, Response, Status};
use tracing::info;

use crate::{
    broker::Broker,
    platform::Surface,
    platform::{ExchangeFailure, ValueKind},
};

/// The `Exchange` service.
#[derive(Debug, Clone)]
pub struct ExchangeService {
    broker: Arc<Broker>,
}

impl ExchangeService {
    pub fn new(broker: Arc<Broker>) -> Self {
        ExchangeService { broker }
    }

    async fn redeem(&self, r: v1::RedeemCodeRequest, kind: ValueKind) -> Result<String, Status> {
        let outcome = self.broker.platform.redeem_value(&r.app_id, &r.secret, &r.code, kind, Surface::Exchange).await;
        log_outcome(&r.app_id, if kind == ValueKind::PhoneNumber { "getPhoneNumber" } else { "getEmail" }, &outcome);
        outcome.map_err(to_status)
    }
}

fn log_outcome<T>(app_id: &str, exchange: &'static str, outcome: &Result<T, ExchangeFailure>) {
    match outcome {
        Ok(_) => info!(app_id, exchange, "code exchanged"),
        Err(e) => info!(app_id, exchange, errcode = e.errcode(), "code exchange refused"),
    }
}

/// The status of an exchange failure: its gRPC code, `errcode N: errmsg`, and the details.
pub fn to_status(e: ExchangeFailure) -> Status {
    let code = match e {
        ExchangeFailure::InvalidAppId | ExchangeFailure::InvalidSecret => Code::Unauthenticated,
        ExchangeFailure::InvalidCode | ExchangeFailure::CodeExpired | ExchangeFailure::Malformed(_) => {
            Code::InvalidArgument
        }
        ExchangeFailure::CodeUsed => Code::FailedPrecondition,
        ExchangeFailure::System(_) => Code::Internal,
    };
    let error = e.to_error();
    Status::with_details(code, format!("errcode {}: {}", error.errcode, error.errmsg), error.encode_to_vec().into())
}

#[tonic::async_trait]
impl Exchange for ExchangeService {
    async fn code2_session(
        &self,
        r: Request<v1::Code2SessionRequest>,
    ) -> Result<Response<v1::Code2SessionResponse>, Status> {
        let r = r.into_inner();
        let outcome = self.broker.platform.code2session(&r.app_id, &r.secret, &r.code, Surface::Exchange).await;
        log_outcome(&r.app_id, "code2Session", &outcome);
        outcome.map(Response::new).map_err(to_status)
    }

    async fn get_phone_number(
        &self,
        r: Request<v1::RedeemCodeRequest>,
    ) -> Result<Response<v1::PhoneNumberResponse>, Status> {
        let phone_number = self.redeem(r.into_inner(), ValueKind::PhoneNumber).await?;
        Ok(Response::new(v1::PhoneNumberResponse { phone_number }))
    }

    async fn get_email(&self, r: Request<v1::RedeemCodeRequest>) -> Result<Response<v1::EmailResponse>, Status> {
        let email = self.redeem(r.into_inner(), ValueKind::Email).await?;
        Ok(Response::new(v1::EmailResponse { email }))
    }
}
