//! The one table that turns service errors into gRPC statuses.
//!
//! Validation errors name the field and the rule (and carry google.rpc error details a
//! client library can read); internal errors are logged here with their context and answered
//! with a generic message.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::domain::Rejection;
use crate::service::ServiceError;
use crate::store::StoreError;

/// The `domain` of google.rpc.ErrorInfo details this service attaches.
pub const ERROR_DOMAIN: &str = "kpi.v1";

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Self {
        match error {
            ServiceError::Rejected(rejection) => rejection_status(&rejection),
            ServiceError::Contended => Status::aborted(error.to_string()),
            ServiceError::Store(error) => store_status(&error),
            ServiceError::TaskFailed(reason) => {
                tracing::error!(%reason, "a request's task failed");
                Status::internal("internal error; see the server log")
            }
        }
    }
}

/// The status of a request without credentials the server knows (`api::auth`).
pub fn unauthenticated(reason: String) -> Status {
    Status::unauthenticated(reason)
}

/// The status of a request whose principal lacks the method's role (`api::auth`).
pub fn permission_denied(reason: String) -> Status {
    Status::permission_denied(reason)
}

/// The status of a message that does not decode as the `message` type it should be.
pub fn undecodable_message(message: &str, reason: &str) -> Status {
    Status::invalid_argument(format!("the message is not a valid {message}: {reason}"))
}

/// The status of a refused command.
pub fn rejection_status(rejection: &Rejection) -> Status {
    let message = rejection.to_string();
    match rejection {
        Rejection::InvalidArgument { field, reason } => Status::with_error_details(
            Code::InvalidArgument,
            message,
            ErrorDetails::with_bad_request_violation(field, reason),
        ),
        Rejection::NotFound { field, what } => Status::with_error_details(
            Code::NotFound,
            message,
            ErrorDetails::with_bad_request_violation(field, format!("{what} not found")),
        ),
        Rejection::AlreadyExists { field, what } => Status::with_error_details(
            Code::AlreadyExists,
            message,
            ErrorDetails::with_bad_request_violation(field, format!("{what} already exists")),
        ),
        Rejection::FailedPrecondition { field, reason } => Status::with_error_details(
            Code::FailedPrecondition,
            message,
            ErrorDetails::with_precondition_failure_violation("STATE", field, reason),
        ),
        Rejection::OutOfRange { field, reason } => Status::with_error_details(
            Code::OutOfRange,
            message,
            ErrorDetails::with_bad_request_violation(field, reason),
        ),
        Rejection::Unavailable { field, reason } => Status::with_error_details(
            Code::Unavailable,
            message,
            ErrorDetails::with_precondition_failure_violation("STATE", field, reason),
        ),
        Rejection::ResourceExhausted { field, reason } => Status::with_error_details(
            Code::ResourceExhausted,
            message,
            ErrorDetails::with_quota_failure_violation(field, reason),
        ),
        Rejection::VersionMismatch {
            expected, current, ..
        } => Status::with_error_details(
            Code::Aborted,
            message,
            ErrorDetails::with_error_info(
                "VERSION_MISMATCH",
                ERROR_DOMAIN,
                HashMap::from([
                    ("expected_version".to_owned(), expected.to_string()),
                    ("current_version".to_owned(), current.to_string()),
                ]),
            ),
        ),
    }
}

/// The status of a failure of the log.
pub fn store_status(error: &StoreError) -> Status {
    match error {
        StoreError::Closed => Status::unavailable("the server is shutting down"),
        // Nothing of the request is stored; the same request succeeds once space returns.
        StoreError::DiskFull { .. } => Status::with_error_details(
            Code::ResourceExhausted,
            error.to_string(),
            ErrorDetails::with_quota_failure_violation("disk", error.to_string()),
        ),
        // The client asked for events the log can no longer read: DATA_LOSS, naming where.
        StoreError::Corrupt { .. } | StoreError::CorruptSegment { .. } => {
            tracing::error!(%error, "a read reached damaged data in the event log");
            Status::data_loss(format!("{error}; VerifyLog reports the damaged range"))
        }
        StoreError::WriterFailed | StoreError::WriterStopped => {
            tracing::error!(error = %error, "event log refuses writes");
            Status::unavailable(
                "the event log stopped accepting writes after a failure; the server needs a restart",
            )
        }
        other => {
            tracing::error!(error = %other, "event log failure");
            Status::internal("internal error in the event log; see the server log")
        }
    }
}

/// The status of a stored record that does not decode as an `EventRecord` (the log is
/// damaged there: VerifyLog names the range).
pub fn undecodable_record_status(seq: u64, error: &prost::DecodeError) -> Status {
    tracing::error!(seq, %error, "stored record does not decode");
    Status::internal("a stored record does not decode; run VerifyLog")
}

impl From<Rejection> for Status {
    fn from(rejection: Rejection) -> Self {
        rejection_status(&rejection)
    }
}
