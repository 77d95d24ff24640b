//! Downloads of stored blobs with `ETag` (= sha256), `If-None-Match` and single `Range`
//! requests (RFC 9110 §14). Multi-range requests are answered with the whole content (allowed).

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, ApiResult};
use crate::codes::Code;
use crate::store::BlobStore;

/// Serve blob `sha256` of `size` bytes as `content_type`, offering `filename` for saving.
pub async fn serve_blob(
    store: &dyn BlobStore,
    sha256: &str,
    size: u64,
    content_type: &'static str,
    filename: &str,
    headers: &HeaderMap,
) -> ApiResult<Response> {
    let etag = format!("\"{sha256}\"");
    if let Some(inm) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        if inm
            .split(',')
            .any(|t| t.trim() == etag || t.trim() == "*" || t.trim() == format!("W/{etag}"))
        {
            return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
        }
    }
    // A Range applies only if If-Range (when present) still names this content.
    let if_range_ok = headers
        .get(header::IF_RANGE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.trim() == etag);
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(r) if if_range_ok => parse_range(r, size),
        _ => RangeRequest::Full,
    };
    let mut builder = Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::ETAG, &etag)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(
            header::CONTENT_DISPOSITION,
            HeaderValue::from_str(&format!("attachment; filename=\"{}\"", sanitize(filename)))
                .unwrap_or(HeaderValue::from_static("attachment")),
        );
    let response = match range {
        RangeRequest::Full => builder
            .header(header::CONTENT_LENGTH, size)
            .body(Body::from_stream(store.read_range(sha256, 0..size).await?)),
        RangeRequest::Partial(start, end) => {
            let len = end - start + 1;
            builder = builder
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}"))
                .header(header::CONTENT_LENGTH, len);
            builder.body(Body::from_stream(
                store.read_range(sha256, start..end + 1).await?,
            ))
        }
        RangeRequest::Unsatisfiable => {
            let mut err = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                Code::RangeNotSatisfiable,
                format!("the content is {size} bytes long"),
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                err.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(err);
        }
    };
    response.map_err(ApiError::internal)
}

#[derive(Debug, PartialEq, Eq)]
enum RangeRequest {
    Full,
    Partial(u64, u64),
    Unsatisfiable,
}

/// Parse one `bytes=` range against `size`; anything we do not serve as a single range
/// (syntax we do not understand, several ranges) falls back to the full content.
fn parse_range(value: &str, size: u64) -> RangeRequest {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeRequest::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let parsed = match (a.is_empty(), b.is_empty()) {
        (true, false) => match b.parse::<u64>() {
            Ok(0) => return RangeRequest::Unsatisfiable,
            Ok(n) => (size.saturating_sub(n), size.saturating_sub(1)),
            Err(_) => return RangeRequest::Full,
        },
        (false, _) => match (
            a.parse::<u64>(),
            if b.is_empty() {
                Ok(u64::MAX)
            } else {
                b.parse::<u64>()
            },
        ) {
            (Ok(s), Ok(e)) if s <= e => (s, e.min(size.saturating_sub(1))),
            _ => return RangeRequest::Full,
        },
        _ => return RangeRequest::Full,
    };
    if size == 0 || parsed.0 >= size {
        RangeRequest::Unsatisfiable
    } else {
        RangeRequest::Partial(parsed.0, parsed.1)
    }
}

pub(crate) fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), RangeRequest::Partial(0, 9));
        assert_eq!(parse_range("bytes=90-", 100), RangeRequest::Partial(90, 99));
        assert_eq!(parse_range("bytes=-10", 100), RangeRequest::Partial(90, 99));
        assert_eq!(
            parse_range("bytes=95-200", 100),
            RangeRequest::Partial(95, 99)
        );
        assert_eq!(parse_range("bytes=100-", 100), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), RangeRequest::Full);
        assert_eq!(parse_range("items=0-1", 100), RangeRequest::Full);
        assert_eq!(parse_range("bytes=5-1", 100), RangeRequest::Full);
    }
}
