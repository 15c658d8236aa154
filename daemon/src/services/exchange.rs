//! `Exchange`: the mini app backend's surface, authenticated by the app's secret. Failures carry
//! WeChat's errcode/errmsg in the status details and message. The platform authenticates, rate
//! limits, redeems and logs; this service only maps to and from the wire.

use std::sync::Arc;

use miniapp_broker_proto::v1::{self, exchange_server::Exchange};
use prost::Message;
use tonic::{Code, Request, Response, Status};

use super::gate::prove_backend;
use crate::{
    platform::{Credential, ExchangeFailure, Platform, Surface, ValueKind},
    transport::ConnInfo,
};

/// The `Exchange` service.
#[derive(Clone)]
pub struct ExchangeService {
    platform: Arc<dyn Platform>,
}

impl std::fmt::Debug for ExchangeService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExchangeService").finish_non_exhaustive()
    }
}

impl ExchangeService {
    pub fn new(platform: Arc<dyn Platform>) -> Self {
        ExchangeService { platform }
    }

    async fn redeem(&self, r: Request<v1::RedeemCodeRequest>, kind: ValueKind) -> Result<String, Status> {
        let (connection, r) = (r.extensions().get::<ConnInfo>().cloned(), r.into_inner());
        let credential = Credential::Secret { app_id: &r.app_id, secret: &r.secret };
        let app = self.platform.authenticate(Surface::Exchange, credential).await.map_err(to_status)?;
        prove_backend(connection);
        self.platform.redeem_value(Surface::Exchange, &app, &r.code, kind, None).await.map_err(to_status)
    }
}

/// The status of an exchange failure: its gRPC code, `errcode N: errmsg`, and the details.
pub fn to_status(e: ExchangeFailure) -> Status {
    let code = match e {
        ExchangeFailure::InvalidSecret
        | ExchangeFailure::InvalidCredential
        | ExchangeFailure::TokenExpired
        | ExchangeFailure::InvalidSignature => Code::Unauthenticated,
        ExchangeFailure::InvalidCode
        | ExchangeFailure::CodeExpired
        | ExchangeFailure::Malformed(..)
        | ExchangeFailure::DataFormat => Code::InvalidArgument,
        ExchangeFailure::CodeUsed => Code::FailedPrecondition,
        ExchangeFailure::RateLimited => Code::ResourceExhausted,
        ExchangeFailure::System(_) => Code::Internal,
        ExchangeFailure::Busy => Code::Unavailable,
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
        let (connection, r) = (r.extensions().get::<ConnInfo>().cloned(), r.into_inner());
        let credential = Credential::Secret { app_id: &r.app_id, secret: &r.secret };
        let app = self.platform.authenticate(Surface::Exchange, credential).await.map_err(to_status)?;
        prove_backend(connection);
        let session = self.platform.code2session(Surface::Exchange, &app, &r.code).await.map_err(to_status)?;
        Ok(Response::new(session))
    }

    async fn get_phone_number(
        &self,
        r: Request<v1::RedeemCodeRequest>,
    ) -> Result<Response<v1::PhoneNumberResponse>, Status> {
        let phone_number = self.redeem(r, ValueKind::PhoneNumber).await?;
        Ok(Response::new(v1::PhoneNumberResponse { phone_number }))
    }

    async fn get_email(&self, r: Request<v1::RedeemCodeRequest>) -> Result<Response<v1::EmailResponse>, Status> {
        let email = self.redeem(r, ValueKind::Email).await?;
        Ok(Response::new(v1::EmailResponse { email }))
    }
}
