//! `/v1/jobs`: submit (idempotent, with dry runs), get (with ETag), list (filters + cursor),
//! cancel, events (SSE), metrics, logs.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::auth::Caller;
use super::bodies::{DeliveryBody, JobBody};
use super::error::{ApiError, ApiResult};
use super::extract::{is_hyphenated_uuid, page_body, parse_id, AppJson, AppQuery, Page, PageBody};
use super::AppState;
use crate::codes::Code;
use crate::db::events;
use crate::db::jobs::{self, JobFilter, JobRecord, JobState};
use crate::db::models::ModelRecord;
use crate::ids::{now_micros, rfc3339, JobId, ModelId};
use crate::queue::{CancelOutcome, JobInputs};
use crate::spec::{self, Facts, FieldError};

/// Routes of this resource.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/jobs", get(list_jobs).post(create_job))
        .route("/jobs/{id}", get(get_job).delete(delete_job))
        .route("/jobs/{id}/deliveries", get(job_deliveries))
        .route("/jobs/{id}/cancel", post(cancel_job))
        .route("/jobs/{id}/events", get(job_events))
        .route("/jobs/{id}/metrics", get(job_metrics))
        .route("/jobs/{id}/logs", get(job_logs))
}

#[derive(Debug, Deserialize)]
struct CreateQuery {
    dry_run: Option<bool>,
}

/// `POST /v1/jobs`.
async fn create_job(
    State(state): State<AppState>,
    caller: Caller,
    AppQuery(query): AppQuery<CreateQuery>,
    headers: HeaderMap,
    AppJson(body): AppJson<Value>,
) -> ApiResult<Response> {
    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => match v.to_str() {
            Ok(k) if !k.is_empty() && k.len() <= 255 => Some(k.to_string()),
            _ => {
                return Err(ApiError::bad_request(
                    Code::InvalidIdempotencyKey,
                    "Idempotency-Key must be 1–255 visible ASCII characters",
                ))
            }
        },
    };
    // serde_json maps are ordered, so equal bodies serialise identically.
    let body_sha = hex::encode(Sha256::digest(body.to_string().as_bytes()));
    let dry_run = query.dry_run.unwrap_or(false);
    // Keys are per tenant: another tenant's key is stored under its tenant's name.
    let idempotency_key = idempotency_key.map(|k| scoped_key(&caller.tenant, k));
    if let (Some(key), false) = (&idempotency_key, dry_run) {
        if let Some(existing) = jobs::get_by_idempotency_key(&state.db, key).await? {
            return replay(existing, &body_sha);
        }
    }

    let inputs = JobInputs::load(&state.db, caller.tenant_filter(), &body).await?;
    let facts = inputs.facts();
    let model = inputs.model;
    let parsed = spec::parse_job(&body, facts.as_ref());
    let mut errors = parsed.as_ref().err().cloned().unwrap_or_default();
    // A receiver named by a non-public address is refused now; one named by a host name is
    // checked when it is called (its address may change).
    if let Some(url) = parsed.as_ref().ok().and_then(|s| s.webhook_url.as_deref()) {
        let host = url::Url::parse(url)
            .ok()
            .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_string()));
        let private = host.as_deref().is_some_and(|h| {
            h.eq_ignore_ascii_case("localhost")
                || h.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| !crate::queue::webhooks::is_public(ip))
        });
        if private && !state.config.webhook_allow_private {
            errors.push(FieldError::new(
                "/webhook_url",
                "names a loopback, private or link-local address; this server calls only public receivers (WHITTLE_WEBHOOK_ALLOW_PRIVATE=true allows others)",
            ));
        }
    }
    if state.config.webhook_secret.is_none()
        && parsed.as_ref().is_ok_and(|s| s.webhook_url.is_some())
    {
        errors.push(FieldError::unsupported(
            "/webhook_url",
            "this server signs no webhooks (WHITTLE_WEBHOOK_SECRET is not set); follow the job \
             with GET /v1/jobs/{id}/events (SSE) or poll GET /v1/jobs/{id}",
        ));
    }
    if model.is_none()
        && body
            .get("model_id")
            .and_then(Value::as_str)
            .is_some_and(|s| s.parse::<ModelId>().is_ok())
    {
        errors.insert(
            0,
            FieldError {
                code: Code::ModelNotFound,
                ..FieldError::new("/model_id", "no model with this id")
            },
        );
    }
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let (Ok(spec), Some(model)) = (parsed, model) else {
        return Err(ApiError::internal("job spec parsed without a model"));
    };

    let facts = facts.unwrap_or_default();
    let estimate = spec::memory::estimate(&spec, &facts);
    if dry_run {
        return Ok(Json(dry_run_plan(&spec, &model, &facts, &estimate)).into_response());
    }
    let limit = state.config.job_memory_limit();
    if estimate.peak > limit {
        let worst = estimate
            .steps
            .iter()
            .position(|&b| b == estimate.peak)
            .map_or_else(|| "/eval".to_string(), |i| format!("/steps/{i}"));
        return Err(ApiError::validation(vec![FieldError {
            code: Code::MemoryLimitExceeded,
            ..FieldError::new(
                worst,
                format!(
                    "this needs about {} MiB of memory (estimated: weights, gradients, optimizer state and one batch's activations), above the limit of {} MiB (WHITTLE_JOB_MEMORY_BYTES); use a smaller model or batch",
                    estimate.peak >> 20,
                    limit >> 20
                ),
            )
        }]));
    }

    let now = now_micros();
    let record = JobRecord {
        id: JobId::new(),
        state: JobState::Queued,
        model_id: model.id,
        spec: spec.to_json(),
        priority: spec.priority,
        attempt: 0,
        max_attempts: spec.max_attempts,
        timeout_seconds: spec.timeout_seconds,
        idempotency_key: idempotency_key.clone(),
        request_sha256: idempotency_key.as_ref().map(|_| body_sha.clone()),
        worker_id: None,
        lease_expires_at: None,
        run_at: now,
        cancel_requested: false,
        progress: None,
        error: None,
        result: None,
        metrics: None,
        checkpoint: None,
        created_at: now,
        started_at: None,
        finished_at: None,
        updated_at: now,
        tenant: caller.tenant.clone(),
    };
    if let Err(e) = state.queue.submit(&record).await {
        // Two requests with one key raced: the loser answers with the winner's job.
        if let Some(key) = &idempotency_key {
            if let Some(existing) = jobs::get_by_idempotency_key(&state.db, key).await? {
                return replay(existing, &body_sha);
            }
        }
        return Err(e.into());
    }
    metrics::counter!("whittle_jobs_submitted_total").increment(1);
    accepted(&record)
}

/// The stored form of an idempotency key: as sent in the default tenant, prefixed with the
/// tenant elsewhere (a newline cannot occur in a header value, so no two tenants' keys meet).
fn scoped_key(tenant: &str, key: String) -> String {
    if tenant == crate::db::keys::DEFAULT_TENANT {
        key
    } else {
        format!("{tenant}\n{key}")
    }
}

fn accepted(job: &JobRecord) -> ApiResult<Response> {
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/v1/jobs/{}", job.id))],
        Json(JobBody::from(job)),
    )
        .into_response())
}

/// Answer a repeated `Idempotency-Key`: the first job for the same body, 422 otherwise.
fn replay(existing: JobRecord, body_sha: &str) -> ApiResult<Response> {
    if existing.request_sha256.as_deref() == Some(body_sha) {
        accepted(&existing)
    } else {
        Err(ApiError::unprocessable(
            Code::IdempotencyKeyReused,
            format!(
                "this Idempotency-Key was used for job {} with a different body",
                existing.id
            ),
        ))
    }
}

/// `?dry_run=true`: what each step touches and a memory estimate, without queueing.
fn dry_run_plan(
    spec: &spec::JobSpec,
    model: &ModelRecord,
    facts: &Facts,
    estimate: &spec::memory::MemoryEstimate,
) -> Value {
    let plan: Vec<Value> = spec
        .steps
        .iter()
        .enumerate()
        .map(|(i, step)| {
            let touched: Vec<&str> = match step.selection() {
                Some(sel) => sel
                    .resolve(&facts.tensors)
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect(),
                None => facts.tensors.iter().map(|t| t.name.as_str()).collect(),
            };
            json!({"index": i, "op": step.op(), "step": step.to_json(), "tensors": touched,
                   "estimated_memory_bytes": estimate.steps.get(i)})
        })
        .collect();
    json!({
        "dry_run": true,
        "model_id": model.id.to_string(),
        "steps": plan,
        "eval": spec.eval.as_ref().map(spec::EvalSpec::to_json),
        "estimated_peak_memory_bytes": estimate.peak,
        "input_size_bytes": model.size_bytes,
    })
}

/// The job `raw` names, if the caller may see it (another tenant's is 404).
async fn load_job(state: &AppState, caller: &Caller, raw: &str) -> ApiResult<JobRecord> {
    let id: JobId = parse_id(raw, Code::JobNotFound, "job")?;
    jobs::get(&state.db, id)
        .await?
        .filter(|j| caller.sees(&j.tenant))
        .ok_or_else(|| ApiError::not_found(Code::JobNotFound, "job", raw))
}

/// `GET /v1/jobs/{id}` with a weak ETag that changes whenever the row does.
async fn get_job(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let job = load_job(&state, &caller, &id).await?;
    let etag = format!(
        "W/\"{}-{}-{}\"",
        job.updated_at,
        job.state.as_str(),
        job.attempt
    );
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag))
    {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    Ok(([(header::ETAG, etag)], Json(JobBody::from(&job))).into_response())
}

/// `DELETE /v1/jobs/{id}`: a finished job goes with its events, logs and artifacts (their
/// blobs are reclaimed by the garbage collector); the models it made stay. A queued or
/// running job is 409 `job_not_finished`: cancel it first.
async fn delete_job(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    refuse_form_bodies(&headers)?;
    let job = load_job(&state, &caller, &id).await?;
    if !jobs::delete_finished(&state.db, job.id).await? {
        return Err(ApiError::conflict(
            Code::JobNotFinished,
            format!(
                "the job is {}; cancel it (POST /v1/jobs/{id}/cancel) and delete it once it has stopped",
                job.state.as_str()
            ),
        ));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/jobs/{id}/deliveries`: the job's webhook deliveries, oldest first, with every
/// attempt's answer.
async fn job_deliveries(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<PageBody<DeliveryBody>>> {
    let job = load_job(&state, &caller, &id).await?;
    let rows = crate::db::webhooks::for_job(&state.db, job.id).await?;
    // A job has a handful of deliveries: one page.
    Ok(Json(PageBody {
        items: rows.iter().map(DeliveryBody::from).collect(),
        next_cursor: None,
    }))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    state: Option<String>,
    model_id: Option<String>,
    label: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

async fn list_jobs(
    State(state): State<AppState>,
    caller: Caller,
    AppQuery(q): AppQuery<ListQuery>,
) -> ApiResult<Json<PageBody<JobBody>>> {
    let page = Page {
        limit: q.limit,
        cursor: q.cursor,
    };
    let filter = JobFilter {
        state: match q.state.as_deref() {
            None | Some("") => None,
            Some(s) => Some(JobState::parse(s).ok_or_else(|| {
                ApiError::bad_request(
                    Code::InvalidParameter,
                    "`state` is one of queued, running, succeeded, failed, cancelled",
                )
            })?),
        },
        model_id: match q.model_id.as_deref() {
            None | Some("") => None,
            Some(m) => Some(
                m.parse()
                    .ok()
                    .filter(|_| is_hyphenated_uuid(m))
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            Code::InvalidParameter,
                            "`model_id` must be a model id",
                        )
                    })?,
            ),
        },
        label: match q.label.as_deref() {
            None | Some("") => None,
            Some(l) => {
                if l.contains('\0') {
                    return Err(ApiError::bad_request(
                        Code::InvalidParameter,
                        "`label` may not contain the NUL character",
                    ));
                }
                let (k, v) = l.split_once(':').ok_or_else(|| {
                    ApiError::bad_request(Code::InvalidParameter, "`label` is `key:value`")
                })?;
                Some((k.to_string(), v.to_string()))
            }
        },
        tenant: caller.tenant_filter().map(str::to_string),
    };
    let limit = page.limit();
    let rows = jobs::list(&state.db, &filter, page.after()?, limit).await?;
    let last = rows.last().map(|j| j.id);
    Ok(Json(page_body(
        rows.iter().map(JobBody::from).collect(),
        last,
        limit,
    )))
}

async fn cancel_job(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    refuse_form_bodies(&headers)?;
    let job = load_job(&state, &caller, &id).await?;
    match state.queue.cancel(job.id).await? {
        CancelOutcome::Cancelled
        | CancelOutcome::Requested
        | CancelOutcome::AlreadyFinished(JobState::Cancelled) => {
            let job = load_job(&state, &caller, &id).await?;
            Ok((StatusCode::ACCEPTED, Json(JobBody::from(&job))).into_response())
        }
        CancelOutcome::AlreadyFinished(s) => Err(ApiError::conflict(
            Code::JobAlreadyFinished,
            format!(
                "the job already finished ({}); there is nothing to cancel",
                s.as_str()
            ),
        )),
        CancelOutcome::NotFound => Err(ApiError::not_found(Code::JobNotFound, "job", &id)),
    }
}

/// Refuses the bodies an HTML form can send from another site without a CORS preflight
/// (`application/x-www-form-urlencoded`, `multipart/form-data`, `text/plain`) on a route that
/// takes no body: such a request can only be a cross-site forgery.
fn refuse_form_bodies(headers: &HeaderMap) -> ApiResult<()> {
    let media = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase());
    match media.as_deref() {
        Some("application/x-www-form-urlencoded" | "multipart/form-data" | "text/plain") => {
            Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                Code::UnsupportedMediaType,
                "this route takes no form body; send no body or application/json",
            ))
        }
        _ => Ok(()),
    }
}

/// `GET /v1/jobs/{id}/events`: replay from `Last-Event-ID`, then follow until the job ends
/// (or the server shuts down).
async fn job_events(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let job = load_job(&state, &caller, &id).await?;
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or(0);
    // Subscribe before reading the history, so nothing falls between the two.
    let live = state.live.subscribe(job.id).await?;
    let stream = event_stream(state, job.id, after, live);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// Whether an event is the job's terminal state.
fn is_terminal(ev: &events::JobEvent) -> bool {
    ev.kind == "state"
        && ev
            .data
            .get("state")
            .and_then(Value::as_str)
            .and_then(JobState::parse)
            .is_some_and(JobState::is_terminal)
}

fn event_stream(
    state: AppState,
    job_id: JobId,
    after: i64,
    live: tokio::sync::broadcast::Receiver<events::JobEvent>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    struct Cursor {
        state: AppState,
        job_id: JobId,
        /// The last event sent.
        after: i64,
        /// Events read from the database, not sent yet.
        buffer: std::collections::VecDeque<events::JobEvent>,
        /// Whether the database history has been read up to the live feed.
        caught_up: bool,
        live: tokio::sync::broadcast::Receiver<events::JobEvent>,
        done: bool,
    }
    let cursor = Cursor {
        state,
        job_id,
        after,
        buffer: Default::default(),
        caught_up: false,
        live,
        done: false,
    };
    futures_util::stream::unfold(cursor, |mut c| async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            if c.done || c.state.live.shutdown().is_cancelled() {
                return None;
            }
            if let Some(ev) = c.buffer.pop_front() {
                if ev.seq <= c.after {
                    continue;
                }
                c.after = ev.seq;
                c.done = is_terminal(&ev);
                let event = Event::default()
                    .id(ev.seq.to_string())
                    .event(ev.kind.clone())
                    .data(ev.data.to_string());
                return Some((Ok(event), c));
            }
            if !c.caught_up {
                // The history, page by page; then, if the job already ended (its terminal
                // event was before Last-Event-ID), stop.
                match events::list_after(&c.state.db, c.job_id, c.after, None, 200).await {
                    Ok(batch) if !batch.is_empty() => {
                        c.buffer.extend(batch);
                        continue;
                    }
                    Ok(_) => {
                        c.caught_up = true;
                        match jobs::get(&c.state.db, c.job_id).await {
                            Ok(Some(job)) if !job.state.is_terminal() => continue,
                            Ok(Some(_)) => {
                                // It ended meanwhile: its last events may have come after
                                // the read above.
                                match events::list_after(&c.state.db, c.job_id, c.after, None, 200)
                                    .await
                                {
                                    Ok(batch) if !batch.is_empty() => {
                                        c.buffer.extend(batch);
                                        continue;
                                    }
                                    _ => return None,
                                }
                            }
                            _ => return None,
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reading job events failed; ending the stream");
                        return None;
                    }
                }
            }
            tokio::select! {
                got = c.live.recv() => match got {
                    Ok(ev) => c.buffer.push_back(ev),
                    // Fell behind the broadcast: read the gap from the database.
                    Err(RecvError::Lagged(_)) => c.caught_up = false,
                    Err(RecvError::Closed) => return None,
                },
                _ = c.state.live.shutdown().cancelled() => return None,
            }
        }
    })
}

async fn job_metrics(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let job = load_job(&state, &caller, &id).await?;
    Ok(Json(job.metrics.unwrap_or_else(
        || json!({"baseline": null, "steps": [], "final": null}),
    )))
}

/// `GET /v1/jobs/{id}/logs`: text lines, or NDJSON with `Accept: application/x-ndjson`.
async fn job_logs(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let job = load_job(&state, &caller, &id).await?;
    let mut lines = Vec::new();
    let mut after = 0;
    loop {
        let batch = events::list_after(&state.db, job.id, after, None, 1000).await?;
        let Some(last) = batch.last() else { break };
        after = last.seq;
        for ev in batch {
            let (level, message) = match ev.kind.as_str() {
                "log" => (
                    ev.data
                        .get("level")
                        .and_then(Value::as_str)
                        .unwrap_or("info")
                        .to_string(),
                    ev.data
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                ),
                "state" => (
                    "info".to_string(),
                    format!(
                        "state: {}",
                        ev.data.get("state").and_then(Value::as_str).unwrap_or("?")
                    ),
                ),
                _ => continue,
            };
            lines.push((ev.created_at, level, message, ev.data));
        }
    }
    let ndjson = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/x-ndjson"));
    if ndjson {
        let body: String = lines
            .iter()
            .map(|(t, level, message, data)| {
                format!(
                    "{}\n",
                    json!({"time": rfc3339(*t), "level": level, "message": message, "data": data})
                )
            })
            .collect();
        Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
    } else {
        let body: String = lines
            .iter()
            .map(|(t, level, message, _)| format!("{} {:5} {}\n", rfc3339(*t), level, message))
            .collect();
        Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response())
    }
}
