//! Extractors whose rejections are problem+json, plus small request helpers shared by the
//! resource routers (ids in paths, pagination).

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::error::ApiError;
use crate::codes::Code;

/// `Json<T>` whose rejections become `malformed_json` / `unsupported_media_type` problems.
#[derive(Debug)]
pub struct AppJson<T>(pub T);

impl<S, T> FromRequest<S> for AppJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                Code::UnsupportedMediaType,
                "send the body as application/json",
            )),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                Code::PayloadTooLarge,
                "JSON bodies are limited to 2 MiB",
            )),
            Err(e) => Err(ApiError::bad_request(Code::MalformedJson, e.body_text())),
        }
    }
}

/// `Query<T>` whose rejections become `invalid_parameter` problems.
#[derive(Debug)]
pub struct AppQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for AppQuery<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Self(v)),
            Err(e) => Err(ApiError::bad_request(Code::InvalidParameter, e.body_text())),
        }
    }
}

/// Parse an id from a path segment; an unparsable id cannot exist, so it is a 404.
pub fn parse_id<T: std::str::FromStr>(raw: &str, code: Code, what: &str) -> Result<T, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::not_found(code, what, raw))
}

/// `?limit=&cursor=` of every list.
#[derive(Debug, Deserialize)]
pub struct Page {
    /// Page size (default 50, clamped to 1..=500).
    pub limit: Option<i64>,
    /// Opaque cursor from the previous page's `next_cursor`.
    pub cursor: Option<String>,
}

impl Page {
    /// The clamped page size.
    pub fn limit(&self) -> i64 {
        crate::db::page_limit(self.limit)
    }

    /// The decoded cursor (the last id of the previous page).
    pub fn after<T: std::str::FromStr>(&self) -> Result<Option<T>, ApiError> {
        match self.cursor.as_deref() {
            None | Some("") => Ok(None),
            Some(c) => c.parse().map(Some).map_err(|_| {
                ApiError::bad_request(
                    Code::InvalidCursor,
                    "`cursor` must be a `next_cursor` value from a previous page",
                )
            }),
        }
    }
}

/// `{"items": [...], "next_cursor": …}`: the cursor is the last id when the page is full.
pub fn page_body<B: serde::Serialize, T: std::fmt::Display>(
    items: Vec<B>,
    last: Option<T>,
    limit: i64,
) -> PageBody<B> {
    let next_cursor = if items.len() as i64 == limit {
        last.map(|l| l.to_string())
    } else {
        None
    };
    PageBody { items, next_cursor }
}

/// One page of a list: `{"items", "next_cursor"}`.
#[derive(Debug, serde::Serialize)]
pub struct PageBody<B> {
    /// The page.
    pub items: Vec<B>,
    /// The cursor of the next page; `null` on the last.
    pub next_cursor: Option<String>,
}
