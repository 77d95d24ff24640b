//! What every upload handler shares: the announced-size check, multipart reading, small text
//! parts and display names.

use axum::extract::{Multipart, Request};
use axum::http::{header, HeaderMap, StatusCode};

use super::error::{ApiError, ApiResult};
use crate::codes::Code;

/// Refuse early when the client announces a body over the limit.
pub(crate) fn check_content_length(headers: &HeaderMap, limit: u64) -> ApiResult<()> {
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match announced {
        Some(n) if n > limit => Err(crate::store::Error::TooLarge { limit }.into()),
        _ => Ok(()),
    }
}

/// Build a `Multipart` reader from the whole request.
pub(crate) async fn multipart(req: Request) -> ApiResult<Multipart> {
    use axum::extract::FromRequest;
    Multipart::from_request(req, &())
        .await
        .map_err(|e| ApiError::bad_request(Code::MalformedMultipart, e.body_text()))
}

/// Read a small text part (at most 4 MiB).
pub(crate) async fn field_text(
    mut field: axum::extract::multipart::Field<'_>,
) -> ApiResult<String> {
    let mut buf = Vec::new();
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| ApiError::bad_request(Code::MalformedMultipart, e.body_text()))?
    {
        buf.extend_from_slice(&chunk);
        if buf.len() > 4 << 20 {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                Code::PayloadTooLarge,
                "text parts are limited to 4 MiB",
            ));
        }
    }
    String::from_utf8(buf)
        .map_err(|_| ApiError::bad_request(Code::MalformedMultipart, "text parts must be UTF-8"))
}

/// Trim and check a display name.
pub(crate) fn clean_name(name: String) -> ApiResult<String> {
    let name = name.trim().to_string();
    if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err(ApiError::unprocessable(
            Code::InvalidName,
            "a name is 1–200 printable characters",
        ));
    }
    Ok(name)
}
