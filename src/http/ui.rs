//! The dashboard (`GET /`): static files embedded in the binary (no build step, no CDN).
//! It is a client of the public API like any other; see `ui/app.js`.

use axum::extract::Path;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::AppState;

/// The embedded files: path under `/ui/`, content type, bytes.
const FILES: &[(&str, &str, &str)] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../ui/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("../../ui/app.css"),
    ),
    (
        "vendor/uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_str!("../../ui/vendor/uPlot.iife.min.js"),
    ),
    (
        "vendor/uPlot.min.css",
        "text/css; charset=utf-8",
        include_str!("../../ui/vendor/uPlot.min.css"),
    ),
];

const INDEX: &str = include_str!("../../ui/index.html");

/// Routes of the dashboard.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/ui/{*path}", get(asset))
}

/// Security headers of every dashboard response: no framing, no other origins' scripts.
fn headers(content_type: &'static str) -> [(header::HeaderName, &'static str); 4] {
    [
        (header::CONTENT_TYPE, content_type),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::CACHE_CONTROL, "no-cache"),
    ]
}

async fn index() -> Response {
    (headers("text/html; charset=utf-8"), INDEX).into_response()
}

async fn asset(Path(path): Path<String>, req: HeaderMap) -> Response {
    let Some((_, ty, body)) = FILES.iter().find(|(p, _, _)| *p == path) else {
        return super::error::ApiError::new(
            StatusCode::NOT_FOUND,
            crate::codes::Code::RouteNotFound,
            "no such dashboard file",
        )
        .into_response();
    };
    // The content is fixed for a build: its length and version make a good validator.
    let etag = format!("\"{}-{}\"", env!("CARGO_PKG_VERSION"), body.len());
    if req
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == etag)
    {
        return StatusCode::NOT_MODIFIED.into_response();
    }
    let mut res = (headers(ty), *body).into_response();
    if let Ok(v) = etag.parse() {
        res.headers_mut().insert(header::ETAG, v);
    }
    res
}
