//! Operations endpoints: liveness, readiness, Prometheus metrics, the OpenAPI document.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::error::ApiError;
use super::{AppState, OPENAPI_YAML};
use crate::db::jobs::{self, JobState};

/// Routes of this resource; `/metrics` only when it has no address of its own
/// (`WHITTLE_METRICS_BIND`).
pub fn router(with_metrics: bool) -> Router<AppState> {
    let r = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.yaml", get(openapi));
    if with_metrics {
        r.route("/metrics", get(prometheus_metrics))
    } else {
        r
    }
}

/// The router of the metrics address (`WHITTLE_METRICS_BIND`, served by `serve` and `worker`
/// alike): `/metrics`, `/healthz`, `/readyz`.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(prometheus_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// `check`'s outcome, or a failure when it takes more than a second.
async fn within_a_second<E: std::fmt::Display>(
    check: impl std::future::Future<Output = Result<(), E>>,
) -> Result<(), String> {
    match tokio::time::timeout(std::time::Duration::from_secs(1), check).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("no answer within 1 s".to_string()),
    }
}

/// Ready when the database answers and the blob store can be reached.
async fn readyz(State(state): State<AppState>) -> Response {
    // Answer within a second even while the database hangs (a pool waiting to connect).
    let db = within_a_second(state.db.ping()).await;
    let store = within_a_second(state.store.check()).await;
    let body = json!({
        "database": if db.is_ok() { "ok" } else { "unavailable" },
        "storage": if store.is_ok() { "ok" } else { "unavailable" },
    });
    if let Err(e) = &db {
        tracing::warn!(error = %e, "readiness: database unavailable");
    }
    if let Err(e) = &store {
        tracing::warn!(error = %e, "readiness: storage unavailable");
    }
    let status = if db.is_ok() && store.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Prometheus text exposition; job-state gauges are read from the database at scrape time so
/// they are right across every process sharing it.
async fn prometheus_metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let counts = jobs::count_by_state(&state.db).await?;
    for s in JobState::ALL {
        let n = counts
            .iter()
            .find(|(name, _)| name == s.as_str())
            .map_or(0, |(_, n)| *n);
        metrics::gauge!("whittle_jobs", "state" => s.as_str()).set(n as f64);
    }
    let oldest = jobs::oldest_queued_created_at(&state.db).await?;
    metrics::gauge!("whittle_queue_oldest_queued_seconds")
        .set(oldest.map_or(0.0, |t| (crate::ids::now_micros() - t).max(0) as f64 / 1e6));
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.prometheus.render(),
    )
        .into_response())
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI_YAML).into_response()
}
