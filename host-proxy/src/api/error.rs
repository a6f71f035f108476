//! [`ApiError`]: every failure as one HTTP answer, a status and a stable machine code
//! (docs/http-api.md, the status table), and the conversions from the enclave client's, the
//! store's and axum's errors. The one place that maps an outcome to a status.

use attestplane_proto::{ErrorCode, Response};
use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response as HttpResponse};

use super::body::{ErrorBody, ErrorDetail};

use crate::enclave_client::ClientError;
use crate::store::StoreError;

/// An error answer: status, stable code, message, and the log entry that recorded it if any.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    seq: Option<u64>,
    retry_after: Option<u64>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            seq: None,
            retry_after: None,
        }
    }

    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub(super) fn overloaded(message: &str) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message);
        e.retry_after = Some(1);
        e
    }

    pub(super) fn logged(mut self, seq: u64) -> Self {
        self.seq = Some(seq);
        self
    }

    /// An enclave error code as HTTP.
    pub(super) fn from_code(code: ErrorCode, message: &str) -> Self {
        let (status, name) = match code {
            ErrorCode::BadRequest => (StatusCode::BAD_REQUEST, "bad_request"),
            ErrorCode::Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            ErrorCode::Denied => (StatusCode::FORBIDDEN, "denied"),
            ErrorCode::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ErrorCode::Conflict => (StatusCode::CONFLICT, "conflict"),
            ErrorCode::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ErrorCode::NotReady => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
            ErrorCode::BrokenLog => (StatusCode::SERVICE_UNAVAILABLE, "broken_log"),
            ErrorCode::Overloaded => return Self::overloaded(message),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        Self::new(status, name, message)
    }

    pub(super) fn unexpected(got: &Response) -> Self {
        match got {
            Response::Error { code, message } => Self::from_code(*code, message),
            _ => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "unexpected reply from the enclave",
            ),
        }
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        let message = e.to_string();
        match e {
            ClientError::Unavailable(_) => {
                let mut e = Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "enclave_unavailable",
                    message,
                );
                e.retry_after = Some(1);
                e
            }
            ClientError::NotReady => {
                let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", message);
                e.retry_after = Some(1);
                e
            }
            ClientError::Failed(_) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "not_serving", message)
            }
            ClientError::Timeout => Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout", message),
            ClientError::Protocol(_) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::OutOfRange { .. } => Self::bad_request(e.to_string()),
            _ => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("log store: {e}"),
            ),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let (code, status) = match r.status() {
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                ("unsupported_media_type", StatusCode::UNSUPPORTED_MEDIA_TYPE)
            }
            StatusCode::PAYLOAD_TOO_LARGE => ("too_large", StatusCode::PAYLOAD_TOO_LARGE),
            _ => ("bad_request", StatusCode::BAD_REQUEST),
        };
        Self::new(status, code, r.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> HttpResponse {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
                seq: self.seq,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

pub(super) type ApiResult<T> = Result<T, ApiError>;

/// Runs blocking store work off the async workers.
pub(super) async fn blocking<T, E>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> ApiResult<T>
where
    T: Send + 'static,
    E: Into<ApiError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(Into::into),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("a store task failed: {e}"),
        )),
    }
}
