//! `/v1/artifacts`: metadata and content of files produced by jobs.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};

use super::bodies::ArtifactBody;
use super::error::{ApiError, ApiResult};
use super::extract::parse_id;
use super::AppState;
use crate::codes::Code;
use crate::db::artifacts::{self, ArtifactRecord};
use crate::ids::ArtifactId;

/// Routes of this resource.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/artifacts/{id}", get(get_artifact))
        .route("/artifacts/{id}/content", get(download_artifact))
}

async fn load_artifact(state: &AppState, raw: &str) -> ApiResult<ArtifactRecord> {
    let id: ArtifactId = parse_id(raw, Code::ArtifactNotFound, "artifact")?;
    artifacts::get(&state.db, id)
        .await?
        .ok_or_else(|| ApiError::not_found(Code::ArtifactNotFound, "artifact", raw))
}

async fn get_artifact(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<ArtifactBody>> {
    Ok(Json(ArtifactBody::from(&load_artifact(&state, &id).await?)))
}

async fn download_artifact(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let a = load_artifact(&state, &id).await?;
    let content_type = match a.format.as_str() {
        "json" => "application/json",
        _ => "application/octet-stream",
    };
    super::content::serve_blob(
        state.store.as_ref(),
        &a.sha256,
        a.size_bytes as u64,
        content_type,
        &format!("{}-{}.{}", a.kind, a.id, a.format),
        &headers,
    )
    .await
}
