//! Job rows as the API sees them: insert, read, list with filters. The state transitions a
//! worker makes (claim, heartbeat, complete, fail, release, rescue) live in [`crate::queue`].

use std::collections::BTreeMap;

use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{id_col, json_col, json_col_opt, Db, Result};
use crate::ids::{JobId, ModelId};

/// The life-cycle of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting to be claimed (possibly not before `run_at`).
    Queued,
    /// Claimed by a worker holding a lease.
    Running,
    /// Finished with a result.
    Succeeded,
    /// Finished with an error (fatal, or retries exhausted).
    Failed,
    /// Stopped on request.
    Cancelled,
}

impl JobState {
    /// The stored and serialised spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parse the stored spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }

    /// Whether no further transition can happen.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// Every state, for metrics.
    pub const ALL: [JobState; 5] = [
        Self::Queued,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
    ];
}

/// One job, as stored.
#[derive(Debug, Clone)]
pub struct JobRecord {
    /// Identifier.
    pub id: JobId,
    /// Current state.
    pub state: JobState,
    /// Input model.
    pub model_id: ModelId,
    /// The validated request: `steps`, `eval`, `seed`, `labels`, `webhook_url`, …
    pub spec: Value,
    /// Higher runs first.
    pub priority: i64,
    /// Attempts started so far (the claim increments it).
    pub attempt: i64,
    /// Attempts allowed before the job fails for good.
    pub max_attempts: i64,
    /// Wall-clock limit of one attempt.
    pub timeout_seconds: i64,
    /// Client-chosen idempotency key, if any.
    pub idempotency_key: Option<String>,
    /// sha256 of the request body that created the job (with an idempotency key).
    pub request_sha256: Option<String>,
    /// The worker holding the lease, while running.
    pub worker_id: Option<String>,
    /// When the current lease ends (µs), while running.
    pub lease_expires_at: Option<i64>,
    /// Not claimable before this time (µs).
    pub run_at: i64,
    /// A cancel was asked for while running.
    pub cancel_requested: bool,
    /// `{step, op, fraction, message, updated_at}`.
    pub progress: Option<Value>,
    /// `{code, message, retryable}`.
    pub error: Option<Value>,
    /// `{model_id, artifacts}`.
    pub result: Option<Value>,
    /// Metrics document (API.md "Metrics").
    pub metrics: Option<Value>,
    /// The last training checkpoint saved (`{step, sha256, epoch}`).
    pub checkpoint: Option<Value>,
    /// Timestamps (µs).
    pub created_at: i64,
    /// First claim.
    pub started_at: Option<i64>,
    /// Terminal transition.
    pub finished_at: Option<i64>,
    /// Last change.
    pub updated_at: i64,
    /// The tenant it belongs to (API.md "Access").
    pub tenant: String,
}

impl JobRecord {
    /// The job's labels (kept inside the spec).
    pub fn labels(&self) -> BTreeMap<String, String> {
        self.spec
            .get("labels")
            .and_then(|l| serde_json::from_value(l.clone()).ok())
            .unwrap_or_default()
    }
}

pub(crate) const COLUMNS: &str = "id, state, model_id, spec, priority, attempt, max_attempts, \
    timeout_seconds, idempotency_key, request_sha256, worker_id, lease_expires_at, run_at, \
    cancel_requested, progress, error, result, metrics, checkpoint, created_at, started_at, finished_at, \
    updated_at, tenant";

pub(crate) fn from_row(row: &AnyRow) -> Result<JobRecord> {
    let state: String = row.try_get("state")?;
    Ok(JobRecord {
        id: id_col(row, "id")?,
        state: JobState::parse(&state).ok_or_else(|| {
            super::Error::Sqlx(sqlx::Error::Decode(
                format!("unknown job state {state}").into(),
            ))
        })?,
        model_id: id_col(row, "model_id")?,
        spec: json_col(row, "spec")?,
        priority: row.try_get("priority")?,
        attempt: row.try_get("attempt")?,
        max_attempts: row.try_get("max_attempts")?,
        timeout_seconds: row.try_get("timeout_seconds")?,
        idempotency_key: row.try_get("idempotency_key")?,
        request_sha256: row.try_get("request_sha256")?,
        worker_id: row.try_get("worker_id")?,
        lease_expires_at: row.try_get("lease_expires_at")?,
        run_at: row.try_get("run_at")?,
        cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
        progress: json_col_opt(row, "progress")?,
        error: json_col_opt(row, "error")?,
        result: json_col_opt(row, "result")?,
        metrics: json_col_opt(row, "metrics")?,
        checkpoint: json_col_opt(row, "checkpoint")?,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        updated_at: row.try_get("updated_at")?,
        tenant: row.try_get("tenant")?,
    })
}

/// Insert a new queued job with its labels and its first `state` event, atomically.
///
/// PostgreSQL does it in one statement (data-modifying CTEs, one round trip, one implicit
/// transaction): a submit is then one commit, not begin + three inserts + commit.
/// SQLite is in-process, so round trips cost nothing there and the plain transaction stays.
pub async fn insert(db: &Db, job: &JobRecord) -> Result<()> {
    let event = serde_json::json!({"state": "queued"}).to_string();
    let labels = serde_json::to_string(&job.labels()).unwrap_or_else(|_| "{}".into());
    if db.backend() == super::Backend::Postgres {
        let query = sqlx::query(
            "with j as (insert into jobs (id, state, model_id, spec, priority, attempt, \
             max_attempts, timeout_seconds, idempotency_key, request_sha256, run_at, \
             cancel_requested, created_at, updated_at, tenant, webhook_url) \
             values ($1, $2, $3, $4, $5, 0, $6, $7, $8, $9, $10, 0, $11, $11, $12, $13) \
             returning id), \
             l as (insert into job_labels (job_id, key, value) \
             select j.id, t.key, t.value from j, json_each_text($14::json) as t) \
             insert into job_events (job_id, kind, data, created_at) \
             select j.id, 'state', $15, $11 from j",
        );
        bind_job(query, job)
            .bind(labels)
            .bind(event)
            .execute(db.pool())
            .await?;
        let _ = super::events::appended().send(job.id);
        return Ok(());
    }
    let mut tx = db.pool().begin().await?;
    let query = sqlx::query(
        "insert into jobs (id, state, model_id, spec, priority, attempt, max_attempts, \
         timeout_seconds, idempotency_key, request_sha256, run_at, cancel_requested, \
         created_at, updated_at, tenant, webhook_url) \
         values ($1, $2, $3, $4, $5, 0, $6, $7, $8, $9, $10, 0, $11, $11, $12, $13)",
    );
    bind_job(query, job).execute(&mut *tx).await?;
    sqlx::query(
        "insert into job_labels (job_id, key, value) \
         select $1, key, value from json_each($2)",
    )
    .bind(job.id.to_string())
    .bind(labels)
    .execute(&mut *tx)
    .await?;
    super::events::append(
        &mut tx,
        job.id,
        "state",
        &serde_json::json!({"state": "queued"}),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Binds `$1 … $13` of a new job's row, in the order both backends' inserts list them.
fn bind_job<'q>(
    query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    job: &'q JobRecord,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    query
        .bind(job.id.to_string())
        .bind(job.state.as_str())
        .bind(job.model_id.to_string())
        .bind(job.spec.to_string())
        .bind(job.priority)
        .bind(job.max_attempts)
        .bind(job.timeout_seconds)
        .bind(job.idempotency_key.clone())
        .bind(job.request_sha256.clone())
        .bind(job.run_at)
        .bind(job.created_at)
        .bind(&job.tenant)
        .bind(job.spec.get("webhook_url").and_then(Value::as_str))
}

/// One job by id.
pub async fn get(db: &Db, id: JobId) -> Result<Option<JobRecord>> {
    let row = sqlx::query(&format!("select {COLUMNS} from jobs where id = $1"))
        .bind(id.to_string())
        .fetch_optional(db.pool())
        .await?;
    row.as_ref().map(from_row).transpose()
}

/// The job created earlier with this idempotency key, if any.
pub async fn get_by_idempotency_key(db: &Db, key: &str) -> Result<Option<JobRecord>> {
    let row = sqlx::query(&format!(
        "select {COLUMNS} from jobs where idempotency_key = $1"
    ))
    .bind(key)
    .fetch_optional(db.pool())
    .await?;
    row.as_ref().map(from_row).transpose()
}

/// Filters of `GET /v1/jobs`.
#[derive(Debug, Default, Clone)]
pub struct JobFilter {
    /// Only jobs in this state.
    pub state: Option<JobState>,
    /// Only jobs on this input model.
    pub model_id: Option<ModelId>,
    /// Only jobs carrying this label (`key`, `value`).
    pub label: Option<(String, String)>,
    /// Only this tenant's jobs.
    pub tenant: Option<String>,
}

/// A page of jobs, newest first, after the cursor id.
pub async fn list(
    db: &Db,
    filter: &JobFilter,
    after: Option<JobId>,
    limit: i64,
) -> Result<Vec<JobRecord>> {
    let (label_key, label_value) = filter.label.clone().unwrap_or_default();
    let rows = sqlx::query(&format!(
        "select {COLUMNS} from jobs j where ($1 = '' or id < $1) \
         and ($2 = '' or state = $2) \
         and ($3 = '' or model_id = $3) \
         and ($4 = '' or exists (select 1 from job_labels l where l.job_id = j.id and l.key = $4 and l.value = $5)) \
         and ($7 = '' or tenant = $7) \
         order by id desc limit $6"
    ))
    .bind(after.map(|a| a.to_string()).unwrap_or_default())
    .bind(filter.state.map(|s| s.as_str()).unwrap_or_default())
    .bind(filter.model_id.map(|m| m.to_string()).unwrap_or_default())
    .bind(label_key)
    .bind(label_value)
    .bind(limit)
    .bind(filter.tenant.clone().unwrap_or_default())
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(from_row).collect()
}

/// Number of jobs in each state (for Prometheus gauges).
pub async fn count_by_state(db: &Db) -> Result<Vec<(String, i64)>> {
    let rows = sqlx::query("select state, count(*) as n from jobs group by state")
        .fetch_all(db.pool())
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("state")?, r.try_get("n")?)))
        .collect()
}

/// Delete a finished job with its labels, events, logs and artifact rows (their blobs, and
/// the checkpoint's, are reclaimed by the garbage collector once nothing references them).
/// `Ok(false)` when the job is queued or running (or absent): nothing is deleted.
pub async fn delete_finished(db: &Db, id: JobId) -> Result<bool> {
    let done = sqlx::query(
        "delete from jobs where id = $1 and state in ('succeeded', 'failed', 'cancelled')",
    )
    .bind(id.to_string())
    .execute(db.pool())
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Delete every finished job that ended before `cutoff` (µs), as [`delete_finished`] does;
/// the number deleted.
pub async fn delete_finished_before(db: &Db, cutoff: i64) -> Result<u64> {
    let done = sqlx::query(
        "delete from jobs where state in ('succeeded', 'failed', 'cancelled') \
         and finished_at is not null and finished_at < $1",
    )
    .bind(cutoff)
    .execute(db.pool())
    .await?;
    Ok(done.rows_affected())
}

/// When the oldest queued job was created (µs), if any is queued.
pub async fn oldest_queued_created_at(db: &Db) -> Result<Option<i64>> {
    let row = sqlx::query("select min(created_at) as t from jobs where state = 'queued'")
        .fetch_one(db.pool())
        .await?;
    Ok(row.try_get::<Option<i64>, _>("t")?)
}

/// The longest `timeout_seconds` of a running job (0 when none runs): blobs a running attempt
/// has written are referenced only when it completes, at most this long after it started.
pub async fn longest_running_timeout(db: &Db) -> Result<i64> {
    let row = sqlx::query(
        "select coalesce(max(timeout_seconds), 0) as t from jobs where state = 'running'",
    )
    .fetch_one(db.pool())
    .await?;
    Ok(row.try_get("t")?)
}
