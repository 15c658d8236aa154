//! How an [`ApiFailure`](crate::v1::ApiFailure) travels in a gRPC status: the status message is the
//! WeChat errMsg, the details are the encoded failure, and the `x-errno` trailer carries the errno
//! for clients that do not decode details.

use prost::Message;
use tonic::{Code, Status, metadata::MetadataValue};

use crate::{metadata, v1::ApiFailure};

impl ApiFailure {
    /// The gRPC status of a failed typed unary call.
    pub fn into_status(self) -> Status {
        let code = Code::from_i32(self.grpc_code);
        let message = self.err_msg.clone();
        let errno = self.errno;
        let mut status = Status::with_details(code, message, self.encode_to_vec().into());
        if let Ok(value) = MetadataValue::try_from(errno.to_string()) {
            status.metadata_mut().insert(metadata::ERRNO, value);
        }
        status
    }

    /// Reads the failure back out of a status; a status that carries none (a transport error, an
    /// authentication refusal) becomes a failure with the status's own code and message.
    pub fn from_status(status: &Status) -> ApiFailure {
        if let Ok(failure) = ApiFailure::decode(status.details())
            && !failure.err_msg.is_empty()
        {
            return failure;
        }
        ApiFailure {
            err_msg: status.message().to_owned(),
            errno: 0,
            grpc_code: status.code() as i32,
            reason: format!("{:?}", status.code()),
            host_error: None,
        }
    }
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (errno {})", self.err_msg, self.errno)
    }
}

impl std::error::Error for ApiFailure {}

impl ApiFailure {
    /// Whether the user cancelled on the host (`"<api>:fail cancel"`).
    pub fn is_cancel(&self) -> bool {
        self.err_msg.ends_with(":fail cancel")
    }

    /// The gRPC status code of the failure.
    pub fn code(&self) -> Code {
        Code::from_i32(self.grpc_code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::HostError;

    #[test]
    fn a_failure_survives_the_status() {
        let failure = ApiFailure {
            err_msg: "login:fail app not login".into(),
            errno: -1001,
            grpc_code: Code::FailedPrecondition as i32,
            reason: "host_error".into(),
            host_error: Some(HostError {
                domain: "TCMPPLoginErrorDomain".into(),
                code: -1001,
                message: "app not login".into(),
            }),
        };
        let status = failure.clone().into_status();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(status.message(), "login:fail app not login");
        assert_eq!(status.metadata().get(metadata::ERRNO).unwrap(), "-1001");
        assert_eq!(ApiFailure::from_status(&status), failure);
    }
}
