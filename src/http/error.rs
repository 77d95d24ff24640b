//! The API's error type and its RFC 9457 `application/problem+json` rendering.
//!
//! Every failure a client can see goes through [`ApiError`]: a status, a stable snake_case
//! `code`, a human `detail` and, for request bodies, JSON pointers to each problem.
//! 5xx bodies never carry internals; the cause is logged instead.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::codes::Code;
use crate::spec::FieldError;

/// An error answered to the client.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: Code,
    /// What happened and what to do about it.
    pub detail: String,
    /// Per-field problems (validation).
    pub errors: Vec<FieldError>,
    /// Extra response headers (`WWW-Authenticate`, `Retry-After`).
    pub headers: Vec<(header::HeaderName, &'static str)>,
}

/// Result alias for handlers.
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    /// An error with no field list.
    pub fn new(status: StatusCode, code: Code, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            errors: Vec::new(),
            headers: Vec::new(),
        }
    }

    /// This error with one more response header.
    pub fn with_header(mut self, name: header::HeaderName, value: &'static str) -> Self {
        self.headers.push((name, value));
        self
    }

    /// 503 while the database cannot be reached: retry after a few seconds.
    pub fn database_unavailable(cause: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %cause, "database unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::DatabaseUnavailable,
            "the database cannot be reached right now; retry shortly",
        )
        .with_header(header::RETRY_AFTER, "5")
    }

    /// 404 for a resource id that does not exist.
    pub fn not_found(code: Code, what: &str, id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            code,
            format!("no {what} with id `{id}`"),
        )
    }

    /// 400 for a request that is malformed (syntax, parameters).
    pub fn bad_request(code: Code, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }

    /// 422 for well-formed input that cannot be accepted.
    pub fn unprocessable(code: Code, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail)
    }

    /// 409 for a request that conflicts with the resource's state.
    pub fn conflict(code: Code, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, detail)
    }

    /// 422 listing field problems; the code is that of the first problem.
    pub fn validation(errors: Vec<FieldError>) -> Self {
        let code = errors.first().map_or(Code::ValidationFailed, |e| e.code);
        let detail = match errors.len() {
            1 => format!(
                "{}: {}",
                display_pointer(&errors[0].pointer),
                errors[0].detail
            ),
            n => format!("{n} problems in the request body; see `errors`"),
        };
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code,
            detail,
            errors,
            headers: Vec::new(),
        }
    }

    /// 500 with the cause logged, not shown.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            Code::InternalError,
            "the server failed to handle the request; it has been logged",
        )
    }
}

fn display_pointer(p: &str) -> &str {
    if p.is_empty() {
        "body"
    } else {
        p
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "type": format!("urn:whittle:problem:{}", self.code),
            "title": self.status.canonical_reason().unwrap_or("Error"),
            "status": self.status.as_u16(),
            "detail": self.detail,
            "code": self.code,
            "errors": self.errors,
        });
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body.to_string(),
        )
            .into_response();
        for (name, value) in self.headers {
            response
                .headers_mut()
                .insert(name, header::HeaderValue::from_static(value));
        }
        response
    }
}

impl From<crate::db::Error> for ApiError {
    fn from(e: crate::db::Error) -> Self {
        if e.is_unavailable() {
            ApiError::database_unavailable(e)
        } else {
            ApiError::internal(e)
        }
    }
}

impl From<crate::queue::Error> for ApiError {
    fn from(e: crate::queue::Error) -> Self {
        match e {
            crate::queue::Error::Db(e) => e.into(),
            e => ApiError::internal(e),
        }
    }
}

impl From<crate::store::Error> for ApiError {
    fn from(e: crate::store::Error) -> Self {
        match e {
            crate::store::Error::TooLarge { limit } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                Code::PayloadTooLarge,
                format!("the upload exceeds the limit of {limit} bytes (WHITTLE_MAX_UPLOAD_BYTES)"),
            ),
            crate::store::Error::Body(msg) => ApiError::bad_request(Code::UploadInterrupted, msg),
            crate::store::Error::Io(io) => ApiError::internal(io),
            e @ crate::store::Error::NotFound(_) => ApiError::internal(e),
        }
    }
}

impl From<crate::compress::Error> for ApiError {
    fn from(e: crate::compress::Error) -> Self {
        use crate::compress::Error as E;
        match &e {
            E::Io(io) => ApiError::internal(io),
            E::Cancelled => ApiError::internal("operation cancelled"),
            _ => {
                let mut err = ApiError::unprocessable(e.code(), e.to_string());
                if let Some(pointer) = e.pointer() {
                    err.errors.push(FieldError::new(pointer, e.to_string()));
                    err.errors[0].code = e.code();
                }
                err
            }
        }
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        ApiError::internal(e)
    }
}
