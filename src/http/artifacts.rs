//! `/v1/artifacts`: metadata and content of files produced by jobs.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};

use super::auth::Caller;
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

/// The artifact `raw` names, if the caller may see its job (another tenant's is 404).
async fn load_artifact(state: &AppState, caller: &Caller, raw: &str) -> ApiResult<ArtifactRecord> {
    let id: ArtifactId = parse_id(raw, Code::ArtifactNotFound, "artifact")?;
    let not_found = || ApiError::not_found(Code::ArtifactNotFound, "artifact", raw);
    let artifact = artifacts::get(&state.db, id).await?.ok_or_else(not_found)?;
    if caller.tenant_filter().is_some() {
        let job = crate::db::jobs::get(&state.db, artifact.job_id).await?;
        if !job.is_some_and(|j| caller.sees(&j.tenant)) {
            return Err(not_found());
        }
    }
    Ok(artifact)
}

async fn get_artifact(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<ArtifactBody>> {
    Ok(Json(ArtifactBody::from(
        &load_artifact(&state, &caller, &id).await?,
    )))
}

async fn download_artifact(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let a = load_artifact(&state, &caller, &id).await?;
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
