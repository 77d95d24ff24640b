//! The durable job queue: claim, heartbeat, complete, fail, release, rescue, cancel.
//!
//! Protocol (DESIGN.md "The queue protocol"): a claim is one statement (`FOR UPDATE SKIP
//! LOCKED` on Postgres; SQLite serialises writers) that takes the best queued job, sets a lease
//! and increments `attempt`. No transaction is held while computing. Every later write by the
//! worker is fenced on `(id, attempt, state = 'running')`, so a worker that lost its lease
//! (rescued, cancelled, finished elsewhere) changes nothing: its calls return
//! [`Error::LeaseLost`]. Expired leases are rescued back to `queued` with exponential backoff
//! and jitter, or to `failed` once `max_attempts` is spent.

mod inputs;
pub mod runner;
pub mod steps;
pub mod webhooks;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde_json::{json, Value};
use sqlx::Row;
use tokio::sync::Notify;

use crate::codes::Code;
use crate::db::{
    self, artifacts::ArtifactRecord, jobs::JobRecord, jobs::JobState, models::ModelRecord, Backend,
    Db,
};
use crate::ids::{now_micros, JobId};
pub use inputs::JobInputs;

/// Postgres channel that announces new or re-queued jobs.
pub const NOTIFY_CHANNEL: &str = "whittle_jobs";

/// How long a submit's NOTIFY waits for others to share it.
pub const NOTIFY_COALESCE: Duration = Duration::from_millis(2);

/// Why a queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The fenced write matched no row: this worker no longer owns the job.
    #[error("lease lost: the job is no longer held by this attempt")]
    LeaseLost,
    /// The database failed.
    #[error(transparent)]
    Db(#[from] db::Error),
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Db(e.into())
    }
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// A job error as stored in `jobs.error` and shown by the API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JobError {
    /// Stable snake_case code.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
    /// Whether another attempt may succeed.
    pub retryable: bool,
}

impl JobError {
    /// An error that fails the job for good (bad spec, bad model).
    pub fn fatal(code: Code, message: impl Into<String>) -> Self {
        Self {
            code: code.as_str().into(),
            message: message.into(),
            retryable: false,
        }
    }

    /// An error another attempt may not meet (I/O, database).
    pub fn retryable(code: Code, message: impl Into<String>) -> Self {
        Self {
            code: code.as_str().into(),
            message: message.into(),
            retryable: true,
        }
    }
}

/// What a successful attempt produced, recorded exactly once by [`Queue::complete`].
#[derive(Debug, Clone, Default)]
pub struct Completion {
    /// Output models (the last one is the job's `result.model_id`).
    pub models: Vec<ModelRecord>,
    /// Artifacts.
    pub artifacts: Vec<ArtifactRecord>,
    /// The metrics document.
    pub metrics: Value,
    /// The job's last progress document, at 100% (`None` keeps what the heartbeats wrote).
    pub progress: Option<Value>,
}

/// Outcome of asking to cancel a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was queued and is now cancelled.
    Cancelled,
    /// It is running; the worker stops at its next check.
    Requested,
    /// It had already finished in this state.
    AlreadyFinished(JobState),
    /// No such job.
    NotFound,
}

/// Handle to the queue over one database.
#[derive(Debug, Clone)]
pub struct Queue {
    db: Db,
    wake: Arc<Notify>,
    /// A coalesced NOTIFY is scheduled (see [`Queue::submit`]).
    notify_pending: Arc<std::sync::atomic::AtomicBool>,
    /// Base of the retry backoff.
    pub backoff_base: Duration,
}

impl Queue {
    /// A queue over `db`.
    pub fn new(db: Db) -> Self {
        Self {
            db,
            wake: Arc::new(Notify::new()),
            notify_pending: Arc::default(),
            backoff_base: Duration::from_secs(2),
        }
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The in-process wake-up (notified on enqueue here and, with Postgres, on NOTIFY).
    pub fn wake_handle(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Store a new queued job (labels and first event included) and tell every worker:
    /// here at once, and on PostgreSQL by a NOTIFY sent after the commit and shared by every
    /// submit of the next [`NOTIFY_COALESCE`]. A NOTIFY inside the submitting transaction
    /// would take PostgreSQL's global notification-queue lock at every commit (measured:
    /// 15% of submit throughput); a wake-up is only a hint (workers also poll), so one per
    /// burst does.
    pub async fn submit(&self, job: &JobRecord) -> Result<()> {
        db::jobs::insert(&self.db, job).await?;
        self.wake.notify_waiters();
        if self.db.backend() == Backend::Postgres
            && !self
                .notify_pending
                .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            let (db, pending) = (self.db.clone(), self.notify_pending.clone());
            tokio::spawn(async move {
                tokio::time::sleep(NOTIFY_COALESCE).await;
                // Cleared before sending: a job committed after this point schedules its own.
                pending.store(false, std::sync::atomic::Ordering::Release);
                let _ = sqlx::query("select pg_notify($1, '')")
                    .bind(NOTIFY_CHANNEL)
                    .execute(db.pool())
                    .await;
            });
        }
        Ok(())
    }

    /// Tell workers a job is claimable: in this process, and on Postgres every listener.
    pub async fn announce(&self) {
        self.wake.notify_waiters();
        if self.db.backend() == Backend::Postgres {
            let _ = sqlx::query("select pg_notify($1, '')")
                .bind(NOTIFY_CHANNEL)
                .execute(self.db.pool())
                .await;
        }
    }

    /// Claim the best claimable job for `worker_id` with a lease of `lease`; `now` in µs.
    pub async fn claim(
        &self,
        worker_id: &str,
        lease: Duration,
        now: i64,
    ) -> Result<Option<JobRecord>> {
        let lock = match self.db.backend() {
            Backend::Postgres => "for update skip locked",
            Backend::Sqlite => "",
        };
        let sql = format!(
            "update jobs set state = 'running', attempt = attempt + 1, worker_id = $1, \
             lease_expires_at = $2, started_at = coalesce(started_at, $3), updated_at = $3, \
             cancel_requested = 0 \
             where id = (select id from jobs where state = 'queued' and run_at <= $3 \
                         order by priority desc, id asc limit 1 {lock}) \
             and state = 'queued' \
             returning {}",
            db::jobs::COLUMNS
        );
        let mut tx = self.db.pool().begin().await?;
        let row = sqlx::query(&sql)
            .bind(worker_id)
            .bind(now + lease.as_micros() as i64)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
        let job = match row {
            Some(row) => db::jobs::from_row(&row)?,
            None => return Ok(None),
        };
        db::events::append(
            &mut tx,
            job.id,
            "state",
            &json!({"state": "running", "attempt": job.attempt, "worker_id": worker_id}),
        )
        .await?;
        tx.commit().await?;
        Ok(Some(job))
    }

    /// Renew the lease and record progress; returns whether a cancel was asked for.
    pub async fn heartbeat(
        &self,
        id: JobId,
        attempt: i64,
        lease: Duration,
        progress: Option<&Value>,
        now: i64,
    ) -> Result<bool> {
        let row = sqlx::query(
            // `updated_at` (and so the job's ETag) moves only when the progress does: a bare
            // lease renewal is not a change a poller needs to see.
            "update jobs set lease_expires_at = $1, progress = coalesce($2, progress), \
             updated_at = case when $2 is null or $2 = progress then updated_at else $3 end \
             where id = $4 and attempt = $5 and state = 'running' returning cancel_requested",
        )
        .bind(now + lease.as_micros() as i64)
        .bind(progress.map(|p| p.to_string()))
        .bind(now)
        .bind(id.to_string())
        .bind(attempt)
        .fetch_optional(self.db.pool())
        .await?;
        match row {
            Some(row) => Ok(row.try_get::<i64, _>("cancel_requested")? != 0),
            None => Err(Error::LeaseLost),
        }
    }

    /// Append an event on behalf of the attempt holding the lease.
    pub async fn event(&self, id: JobId, attempt: i64, kind: &str, data: &Value) -> Result<()> {
        let done = sqlx::query(
            "insert into job_events (job_id, kind, data, created_at) \
             select $1, $2, $3, $4 where exists \
             (select 1 from jobs where id = $1 and attempt = $5 and state = 'running')",
        )
        .bind(id.to_string())
        .bind(kind)
        .bind(data.to_string())
        .bind(now_micros())
        .bind(attempt)
        .execute(self.db.pool())
        .await?;
        fenced(&done)
    }

    /// Record the latest training checkpoint of the attempt holding the lease.
    pub async fn save_checkpoint(&self, id: JobId, attempt: i64, checkpoint: &Value) -> Result<()> {
        let done = sqlx::query(
            "update jobs set checkpoint = $1 where id = $2 and attempt = $3 and state = 'running'",
        )
        .bind(checkpoint.to_string())
        .bind(id.to_string())
        .bind(attempt)
        .execute(self.db.pool())
        .await?;
        fenced(&done)
    }

    /// Record success: outputs, artifacts, result and metrics, all or nothing, once.
    pub async fn complete(
        &self,
        id: JobId,
        attempt: i64,
        done: &Completion,
        now: i64,
    ) -> Result<()> {
        let result = json!({
            "model_id": done.models.last().map(|m| m.id.to_string()),
            "artifacts": done.artifacts.iter().map(|a| json!({
                "id": a.id.to_string(), "kind": a.kind, "format": a.format,
                "size_bytes": a.size_bytes, "sha256": a.sha256,
            })).collect::<Vec<_>>(),
        });
        let mut tx = self.db.pool().begin().await?;
        let updated = sqlx::query(
            "update jobs set state = 'succeeded', result = $1, metrics = $2, finished_at = $3, \
             updated_at = $3, lease_expires_at = null, error = null, checkpoint = null, \
             progress = coalesce($6, progress) \
             where id = $4 and attempt = $5 and state = 'running'",
        )
        .bind(result.to_string())
        .bind(done.metrics.to_string())
        .bind(now)
        .bind(id.to_string())
        .bind(attempt)
        .bind(done.progress.as_ref().map(Value::to_string))
        .execute(&mut *tx)
        .await?;
        // On a lost lease, dropping the transaction rolls it back: nothing is recorded.
        fenced(&updated)?;
        for m in &done.models {
            db::models::insert(&mut *tx, m).await?;
        }
        for a in &done.artifacts {
            db::artifacts::insert(&mut *tx, a).await?;
        }
        db::events::append(&mut tx, id, "metrics", &done.metrics).await?;
        db::events::append(
            &mut tx,
            id,
            "state",
            &json!({"state": "succeeded", "result": result}),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Record a failed attempt: back to `queued` after a backoff when the error is retryable
    /// and attempts remain, `failed` otherwise. Returns the new state.
    pub async fn fail(
        &self,
        id: JobId,
        attempt: i64,
        error: &JobError,
        now: i64,
    ) -> Result<JobState> {
        let run_at = now + self.backoff(attempt).as_micros() as i64;
        let mut tx = self.db.pool().begin().await?;
        let row = sqlx::query(
            "update jobs set \
               state = case when $1 = 1 and attempt < max_attempts then 'queued' else 'failed' end, \
               finished_at = case when $1 = 1 and attempt < max_attempts then null else $2 end, \
               run_at = $3, error = $4, worker_id = null, lease_expires_at = null, updated_at = $2 \
             where id = $5 and attempt = $6 and state = 'running' returning state",
        )
        .bind(error.retryable as i64)
        .bind(now)
        .bind(run_at)
        .bind(json!(error).to_string())
        .bind(id.to_string())
        .bind(attempt)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Err(Error::LeaseLost);
        };
        let state: String = row.try_get("state")?;
        let state = JobState::parse(&state).unwrap_or(JobState::Failed);
        db::events::append(
            &mut tx,
            id,
            "state",
            &json!({"state": state.as_str(), "error": error}),
        )
        .await?;
        tx.commit().await?;
        if state == JobState::Queued {
            self.announce().await;
        }
        Ok(state)
    }

    /// Record that a running attempt stopped because a cancel was asked for.
    pub async fn finish_cancelled(&self, id: JobId, attempt: i64, now: i64) -> Result<()> {
        self.transition(
            id,
            attempt,
            "state = 'cancelled', finished_at = $1, updated_at = $1, lease_expires_at = null, \
             checkpoint = null",
            now,
            &json!({"state": "cancelled"}),
        )
        .await
    }

    /// Give a running job back without counting the attempt (graceful shutdown).
    pub async fn release(&self, id: JobId, attempt: i64, now: i64) -> Result<()> {
        self.transition(
            id,
            attempt,
            "state = 'queued', attempt = attempt - 1, worker_id = null, lease_expires_at = null, \
             run_at = $1, updated_at = $1",
            now,
            &json!({"state": "queued", "reason": "released by a worker shutting down"}),
        )
        .await?;
        self.announce().await;
        Ok(())
    }

    /// Apply `set` (an SQL assignment list in which `$1` is `now`) to the attempt holding the
    /// lease and log `event` as a `state` event, in one transaction.
    async fn transition(
        &self,
        id: JobId,
        attempt: i64,
        set: &str,
        now: i64,
        event: &Value,
    ) -> Result<()> {
        let mut tx = self.db.pool().begin().await?;
        let done = sqlx::query(&format!(
            "update jobs set {set} where id = $2 and attempt = $3 and state = 'running'"
        ))
        .bind(now)
        .bind(id.to_string())
        .bind(attempt)
        .execute(&mut *tx)
        .await?;
        fenced(&done)?;
        db::events::append(&mut tx, id, "state", event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Return jobs whose lease expired before `now` to the queue (or fail them when their
    /// attempts are spent). Returns what became of each.
    pub async fn rescue(&self, now: i64) -> Result<Vec<(JobId, JobState)>> {
        let rows = sqlx::query(
            "select id, attempt from jobs where state = 'running' and lease_expires_at < $1",
        )
        .bind(now)
        .fetch_all(self.db.pool())
        .await?;
        let mut rescued = Vec::new();
        for row in rows {
            let id: JobId = db::id_col(&row, "id")?;
            let attempt: i64 = row.try_get("attempt")?;
            // An attempt that took its worker down (out of memory, abort) would take the next
            // one down too: after the second lost lease the job fails for good.
            let lost_before =
                db::events::count_with(&self.db, id, "state", "lease_expired").await?;
            let error = if lost_before >= 1 {
                JobError::fatal(
                    Code::WorkerCrashed,
                    "two attempts of this job stopped their workers without a word (a crash: out of memory, abort, kill); it is not retried, so that it takes no more workers down",
                )
            } else {
                JobError::retryable(
                    Code::LeaseExpired,
                    "the worker running this job stopped renewing its lease (crash or network loss)",
                )
            };
            match self.fail(id, attempt, &error, now).await {
                Ok(state) => rescued.push((id, state)),
                // Finished or renewed between the select and the fenced update: not ours.
                Err(Error::LeaseLost) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(rescued)
    }

    /// Cancel a job: at once when queued, at the worker's next check when running.
    pub async fn cancel(&self, id: JobId) -> Result<CancelOutcome> {
        let now = now_micros();
        let mut tx = self.db.pool().begin().await?;
        let queued = sqlx::query(
            "update jobs set state = 'cancelled', finished_at = $1, updated_at = $1 \
             where id = $2 and state = 'queued'",
        )
        .bind(now)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        if queued.rows_affected() == 1 {
            db::events::append(&mut tx, id, "state", &json!({"state": "cancelled"})).await?;
            tx.commit().await?;
            return Ok(CancelOutcome::Cancelled);
        }
        let running = sqlx::query(
            "update jobs set cancel_requested = 1, updated_at = $1 where id = $2 and state = 'running'",
        )
        .bind(now)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        if running.rows_affected() == 1 {
            db::events::append(
                &mut tx,
                id,
                "log",
                &json!({"level": "info", "message": "cancellation requested"}),
            )
            .await?;
            tx.commit().await?;
            return Ok(CancelOutcome::Requested);
        }
        tx.commit().await?;
        Ok(match db::jobs::get(&self.db, id).await? {
            Some(job) => CancelOutcome::AlreadyFinished(job.state),
            None => CancelOutcome::NotFound,
        })
    }

    /// Exponential backoff with ±25% jitter: base · 2^(attempt−1), capped at 10 minutes.
    pub fn backoff(&self, attempt: i64) -> Duration {
        let exp = attempt.clamp(1, 16) as u32 - 1;
        let base = self.backoff_base.as_secs_f64() * 2f64.powi(exp as i32);
        let capped = base.min(600.0);
        let jitter = rand::thread_rng().gen_range(0.75..=1.25);
        Duration::from_secs_f64(capped * jitter)
    }
}

/// A fenced write that matched no row means the attempt no longer holds the lease.
fn fenced(done: &sqlx::any::AnyQueryResult) -> Result<()> {
    if done.rows_affected() == 0 {
        Err(Error::LeaseLost)
    } else {
        Ok(())
    }
}
