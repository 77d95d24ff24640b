//! The REST API (`API.md`): one file per resource, each exporting `router()`, assembled here
//! with the middleware stack (request ids, tracing, Prometheus metrics, problem+json
//! fallbacks). Handlers translate HTTP to calls on `db`, `store` and `queue`; they compute
//! nothing themselves beyond validating input.

pub mod artifacts;
pub mod auth;
pub mod bodies;
pub mod content;
pub mod datasets;
pub mod error;
pub mod extract;
pub mod folders;
pub mod jobs;
pub mod live;
pub mod models;
pub mod ops;
pub mod server;
pub mod ui;
pub mod upload;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::codes::Code;
use crate::config::Config;
use crate::db::Db;
use crate::queue::Queue;
use crate::store::Store;
use error::ApiError;

/// The OpenAPI document served at `/openapi.yaml` (and printed by `whittle openapi`).
pub const OPENAPI_YAML: &str = include_str!("../../openapi.yaml");

/// Every route the router serves, as (method, path template). The OpenAPI test checks this
/// list against `openapi.yaml` and checks that each entry is really routed.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.yaml"),
    ("POST", "/v1/models"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{id}"),
    ("DELETE", "/v1/models/{id}"),
    ("GET", "/v1/models/{id}/content"),
    ("GET", "/v1/models/{id}/files/{path}"),
    ("GET", "/v1/models/{id}/archive"),
    ("POST", "/v1/datasets"),
    ("GET", "/v1/datasets"),
    ("GET", "/v1/datasets/{id}"),
    ("DELETE", "/v1/datasets/{id}"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/{id}"),
    ("DELETE", "/v1/jobs/{id}"),
    ("POST", "/v1/jobs/{id}/cancel"),
    ("GET", "/v1/jobs/{id}/events"),
    ("GET", "/v1/jobs/{id}/metrics"),
    ("GET", "/v1/jobs/{id}/logs"),
    ("GET", "/v1/jobs/{id}/deliveries"),
    ("GET", "/v1/artifacts/{id}"),
    ("GET", "/v1/artifacts/{id}/content"),
    ("GET", "/v1/keys"),
    ("POST", "/v1/keys"),
    ("GET", "/v1/keys/{id}"),
    ("DELETE", "/v1/keys/{id}"),
];

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    /// Metadata database.
    pub db: Db,
    /// Blob store.
    pub store: Store,
    /// The job queue.
    pub queue: Queue,
    /// Configuration in force.
    pub config: Arc<Config>,
    /// Prometheus exposition.
    pub prometheus: PrometheusHandle,
    /// Live job events (one database reader for every follower in the process).
    pub live: live::EventHub,
    /// How requests are authenticated.
    pub auth: auth::AuthMode,
}

/// The whole application router with its middleware.
pub fn router(state: AppState) -> Router {
    let request_id = HeaderName::from_static("x-request-id");
    let api = Router::new()
        .merge(models::router())
        .merge(datasets::router())
        .merge(jobs::router())
        .merge(artifacts::router())
        .merge(auth::router())
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    Router::new()
        .nest("/v1", api)
        .merge(ops::router(state.config.metrics_bind.is_none()))
        .merge(ui::router())
        // A route layer runs after routing, so it sees the matched route template.
        .route_layer(middleware::from_fn(record_http_metrics))
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(
            ServiceBuilder::new()
                .layer(middleware::map_request(sanitize_request_id))
                .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
                .layer(
                    // Access log: one INFO line per response (status, latency) in the
                    // request's span (method, URI, request id).
                    TraceLayer::new_for_http()
                        .on_response(
                            tower_http::trace::DefaultOnResponse::new()
                                .level(tracing::Level::INFO),
                        )
                        .make_span_with(|req: &Request| {
                        let id = req
                            .headers()
                            .get("x-request-id")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-");
                        tracing::info_span!("http", method = %req.method(), uri = %req.uri(), request_id = %id)
                    }),
                )
                .layer(PropagateRequestIdLayer::new(request_id)),
        )
        .with_state(state)
}

/// Drops a client's `X-Request-Id` that is longer than 128 bytes or holds anything but
/// letters, digits and `-_.:`: it is echoed and logged, so it must stay short and plain; a
/// new id is made instead.
async fn sanitize_request_id(mut req: Request) -> Request {
    let ok = req.headers().get("x-request-id").is_none_or(|v| {
        let b = v.as_bytes();
        !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
    });
    if !ok {
        req.headers_mut().remove("x-request-id");
    }
    req
}

async fn route_not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        Code::RouteNotFound,
        "no such route; GET /openapi.yaml lists them",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        Code::MethodNotAllowed,
        "this route does not accept this method; GET /openapi.yaml lists them",
    )
}

/// Count requests and time them, labelled by route template (not raw path: bounded labels).
async fn record_http_metrics(req: Request, next: Next) -> Response {
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let started = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("whittle_http_requests_total", "method" => method.clone(), "path" => path.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("whittle_http_request_duration_seconds", "method" => method, "path" => path)
        .record(started.elapsed().as_secs_f64());
    response
}
