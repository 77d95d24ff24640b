//! Access (API.md "Access"): who a request is, from its `Authorization: Bearer` key, and
//! whether its scope allows the method; the `/v1/keys` routes for administrators.
//!
//! The middleware puts a [`Caller`] into every `/v1` request; handlers take it as an
//! extractor and ask it whether a row's tenant is visible (another tenant's rows are 404, as
//! if absent) and which tenant a list is restricted to.

use axum::extract::{FromRequestParts, OriginalUri, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ApiResult};
use super::extract::{page_body, parse_id, AppJson, AppQuery, Page, PageBody};
use super::AppState;
use crate::codes::Code;
use crate::db::keys::{self, KeyRecord, Scope, DEFAULT_TENANT};
use crate::ids::{rfc3339, KeyId};

pub use crate::db::keys::Caller;

/// How requests are authenticated (`WHITTLE_AUTH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Every request needs a live key.
    Keys,
    /// No keys: every request is an administrator of the `default` tenant.
    None,
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        // The middleware sets it on every /v1 route. A handler asking for a caller on a route
        // without the middleware is a wiring bug: refuse rather than grant anything.
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            ApiError::internal("a route asked for the caller without the access middleware")
        })
    }
}

/// The middleware of every `/v1` route: resolves the key into a [`Caller`] and checks its
/// scope against the method (`GET`/`HEAD` need `read`; anything else `write`; `/v1/keys`
/// `admin`).
pub async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let caller = match state.auth {
        AuthMode::None => Caller::unauthenticated_admin(),
        AuthMode::Keys => {
            match resolve(&state, req.headers().get(header::AUTHORIZATION).cloned()).await {
                Ok(c) => c,
                Err(e) => return e.into_response(),
            }
        }
    };
    let path = req
        .extensions()
        .get::<OriginalUri>()
        .map_or_else(|| req.uri().path().to_string(), |u| u.path().to_string());
    let needed = if path == "/v1/keys" || path.starts_with("/v1/keys/") {
        Scope::Admin
    } else if matches!(*req.method(), Method::GET | Method::HEAD) {
        Scope::Read
    } else {
        Scope::Write
    };
    if caller.scope < needed {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            Code::Forbidden,
            format!(
                "this key's scope is `{}`; this request needs `{}`",
                caller.scope.as_str(),
                needed.as_str()
            ),
        )
        .into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

async fn resolve(
    state: &AppState,
    authorization: Option<header::HeaderValue>,
) -> ApiResult<Caller> {
    let unauthenticated = |detail: &str| {
        ApiError::new(StatusCode::UNAUTHORIZED, Code::Unauthenticated, detail)
            .with_header(header::WWW_AUTHENTICATE, "Bearer")
    };
    let Some(value) = authorization else {
        return Err(unauthenticated(
            "this server needs an API key: send `Authorization: Bearer wh_…` (an administrator creates keys with `whittle keys create`)",
        ));
    };
    let secret = value
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|t| t.starts_with("wh_") && t.len() <= 128)
        .ok_or_else(|| unauthenticated("the Authorization header must be `Bearer wh_…`"))?;
    match keys::authenticate(&state.db, secret).await? {
        Some(key) => Ok(key.caller()),
        None => Err(unauthenticated("this API key is unknown or revoked")),
    }
}

/// Routes of `/v1/keys` (administrators only; the middleware checks the scope).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/keys", get(list_keys).post(create_key))
        .route("/keys/{id}", delete(revoke_key).get(get_key))
}

/// `ApiKey`: a key as listed (never its secret).
#[derive(Debug, Serialize)]
pub struct KeyBody {
    id: KeyId,
    name: String,
    tenant: String,
    scope: Scope,
    prefix: String,
    created_at: String,
    last_used_at: Option<String>,
}

impl From<&KeyRecord> for KeyBody {
    fn from(k: &KeyRecord) -> Self {
        KeyBody {
            id: k.id,
            name: k.name.clone(),
            tenant: k.tenant.clone(),
            scope: k.scope,
            prefix: k.prefix.clone(),
            created_at: rfc3339(k.created_at),
            last_used_at: k.last_used_at.map(rfc3339),
        }
    }
}

/// `NewApiKey`: the key plus its secret, answered once.
#[derive(Debug, Serialize)]
pub struct NewKeyBody {
    #[serde(flatten)]
    key: KeyBody,
    /// The secret (`wh_…`); it cannot be read again.
    secret: String,
}

impl NewKeyBody {
    /// The body answered when `record` was made with `secret`.
    pub fn new(record: &KeyRecord, secret: String) -> NewKeyBody {
        NewKeyBody {
            key: KeyBody::from(record),
            secret,
        }
    }
}

/// The body of `POST /v1/keys`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// Who or what the key is for.
    pub name: String,
    /// `read`, `write` or `admin`.
    pub scope: String,
    /// The tenant (default: `default`).
    pub tenant: Option<String>,
}

/// Checks a key request and makes the key: the one path shared by `POST /v1/keys` and
/// `whittle keys create` on the database.
pub fn mint(req: CreateKey) -> ApiResult<(KeyRecord, String)> {
    let mut errors = Vec::new();
    let name = req.name.trim().to_string();
    if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
        errors.push(crate::spec::FieldError::new(
            "/name",
            "must be 1–200 characters without control characters",
        ));
    }
    let scope = Scope::parse(&req.scope);
    if scope.is_none() {
        errors.push(crate::spec::FieldError::new(
            "/scope",
            "must be `read`, `write` or `admin`",
        ));
    }
    let tenant = req.tenant.unwrap_or_else(|| DEFAULT_TENANT.into());
    if !keys::valid_tenant(&tenant) {
        errors.push(crate::spec::FieldError {
            code: Code::InvalidTenant,
            ..crate::spec::FieldError::new(
                "/tenant",
                "must be 1–64 characters of a-z, 0-9, `-` and `_`, starting with a letter or digit",
            )
        });
    }
    match (errors.is_empty(), scope) {
        (true, Some(scope)) => Ok(KeyRecord::mint(name, scope, tenant)),
        _ => Err(ApiError::validation(errors)),
    }
}

async fn create_key(
    State(state): State<AppState>,
    AppJson(req): AppJson<CreateKey>,
) -> ApiResult<Response> {
    let (record, secret) = mint(req)?;
    keys::insert(&state.db, &record).await?;
    tracing::info!(key = %record.id, tenant = %record.tenant, scope = record.scope.as_str(), "API key created");
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/v1/keys/{}", record.id))],
        Json(NewKeyBody::new(&record, secret)),
    )
        .into_response())
}

async fn list_keys(
    State(state): State<AppState>,
    AppQuery(page): AppQuery<Page>,
) -> ApiResult<Json<PageBody<KeyBody>>> {
    let limit = page.limit();
    let rows = keys::list(&state.db, page.after()?, limit).await?;
    let last = rows.last().map(|k| k.id);
    Ok(Json(page_body(
        rows.iter().map(KeyBody::from).collect(),
        last,
        limit,
    )))
}

async fn get_key(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<KeyBody>> {
    let key_id: KeyId = parse_id(&id, Code::KeyNotFound, "key")?;
    let key = keys::get(&state.db, key_id)
        .await?
        .ok_or_else(|| ApiError::not_found(Code::KeyNotFound, "key", &id))?;
    Ok(Json(KeyBody::from(&key)))
}

/// `DELETE /v1/keys/{id}`: revoked at once; from then on the key is unknown to the API (the
/// row stays in the database, with its revocation time, for the record).
async fn revoke_key(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let key_id: KeyId = parse_id(&id, Code::KeyNotFound, "key")?;
    if !keys::revoke(&state.db, key_id).await? {
        return Err(ApiError::not_found(Code::KeyNotFound, "key", &id));
    }
    tracing::info!(key = %key_id, "API key revoked");
    Ok(StatusCode::NO_CONTENT)
}
