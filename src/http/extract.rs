//! Extractors whose rejections are problem+json, plus small request helpers shared by the
//! resource routers (ids in paths, pagination).

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
        let json_type = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|m| {
                let m = m.trim().to_ascii_lowercase();
                m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
            });
        if !json_type {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                Code::UnsupportedMediaType,
                "send the body as application/json",
            ));
        }
        let bytes = match axum::body::Bytes::from_request(req, state).await {
            Ok(b) => b,
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    Code::PayloadTooLarge,
                    "JSON bodies are limited to 2 MiB",
                ))
            }
            Err(e) => {
                return Err(ApiError::bad_request(
                    Code::UploadInterrupted,
                    e.body_text(),
                ))
            }
        };
        Ok(Self(parse_json(&bytes)?))
    }
}

/// Parses a JSON request body strictly: duplicate keys in an object (which JSON parsers
/// resolve differently) are 400 `malformed_json`, and strings holding U+0000 (which one
/// database stores and the other refuses) are 422 `validation_failed` at their pointer.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::bad_request(
            Code::MalformedJson,
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    let mut de = serde_json::Deserializer::from_slice(bytes);
    if let Err(e) = serde::de::DeserializeSeed::deserialize(strict::Strict(String::new()), &mut de)
    {
        let msg = e.to_string();
        return Err(match msg.strip_prefix("NUL at ") {
            Some(rest) => {
                let pointer = rest.split('\u{1}').next().unwrap_or(rest).to_string();
                ApiError::validation(vec![crate::spec::FieldError::new(
                    pointer,
                    "strings may not contain the NUL character (U+0000)",
                )])
            }
            None => ApiError::bad_request(Code::MalformedJson, msg),
        });
    }
    serde_json::from_value(value).map_err(|e| {
        ApiError::bad_request(Code::MalformedJson, format!("the body does not fit: {e}"))
    })
}

/// A pass over a JSON document that refuses duplicate keys and NUL characters, tracking the
/// JSON pointer for the message.
mod strict {
    use std::collections::HashSet;
    use std::fmt;

    use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

    pub struct Strict(pub String);

    impl<'de> DeserializeSeed<'de> for Strict {
        type Value = ();
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    fn escape(key: &str) -> String {
        key.replace('~', "~0").replace('/', "~1")
    }

    impl<'de> Visitor<'de> for Strict {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("JSON")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
            if v.contains('\0') {
                return Err(E::custom(format!("NUL at {}\u{1}", self.0)));
            }
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let mut i = 0usize;
            while seq
                .next_element_seed(Strict(format!("{}/{i}", self.0)))?
                .is_some()
            {
                i += 1;
            }
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen = HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                let pointer = format!("{}/{}", self.0, escape(&key));
                if key.contains('\0') {
                    return Err(de::Error::custom(format!("NUL at {pointer}\u{1}")));
                }
                if !seen.insert(key.clone()) {
                    return Err(de::Error::custom(format!(
                        "duplicate key `{key}` at {}",
                        if self.0.is_empty() { "/" } else { &self.0 }
                    )));
                }
                map.next_value_seed(Strict(pointer))?;
            }
            Ok(())
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

/// Whether `s` is a UUID written as `8-4-4-4-12` hex digits (the only form the API writes).
pub fn is_hyphenated_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
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
            // Cursors are ids in their hyphenated form (what `next_cursor` holds).
            Some(c) if !is_hyphenated_uuid(c) => Err(ApiError::bad_request(
                Code::InvalidCursor,
                "`cursor` must be a `next_cursor` value from a previous page",
            )),
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
