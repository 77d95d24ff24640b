//! The per-job event log (`state`, `progress`, `log`, `metrics`): SSE replays it by sequence
//! number and `GET /logs` reads its `log` entries.

use serde_json::Value;
use sqlx::Row;

use super::{id_col, json_col, Db, Result};
use crate::ids::{now_micros, JobId};

/// One event.
#[derive(Debug, Clone)]
pub struct JobEvent {
    /// Monotonic sequence number (the SSE event id).
    pub seq: i64,
    /// The job it belongs to.
    pub job_id: JobId,
    /// `state`, `progress`, `log` or `metrics`.
    pub kind: String,
    /// Event payload.
    pub data: Value,
    /// When it was written (µs).
    pub created_at: i64,
}

/// The job of every event this process appends (sent possibly before the transaction
/// commits), so live followers look for it at once instead of polling.
pub fn appended() -> &'static tokio::sync::broadcast::Sender<JobId> {
    static APPENDED: std::sync::OnceLock<tokio::sync::broadcast::Sender<JobId>> =
        std::sync::OnceLock::new();
    APPENDED.get_or_init(|| tokio::sync::broadcast::channel(1024).0)
}

/// How many of `job_id`'s events of `kind` mention `needle` in their data.
pub async fn count_with(db: &Db, job_id: JobId, kind: &str, needle: &str) -> Result<i64> {
    let row = sqlx::query(
        "select count(*) as n from job_events where job_id = $1 and kind = $2 and data like $3",
    )
    .bind(job_id.to_string())
    .bind(kind)
    .bind(format!("%{needle}%"))
    .fetch_one(db.pool())
    .await?;
    Ok(row.try_get("n")?)
}

/// The sequence number of `job_id`'s last event (0 without events).
pub async fn max_seq(db: &Db, job_id: JobId) -> Result<i64> {
    let row = sqlx::query("select coalesce(max(seq), 0) as m from job_events where job_id = $1")
        .bind(job_id.to_string())
        .fetch_one(db.pool())
        .await?;
    Ok(row.try_get("m")?)
}

/// Append an event (unfenced: for the API's own transitions, e.g. cancelling a queued job).
/// A `state` event that a webhook announces (running, succeeded, failed, cancelled) also
/// writes the delivery into the outbox, on the same connection: inside the caller's
/// transaction, the state change and its announcement commit together or not at all.
pub async fn append(
    conn: &mut sqlx::AnyConnection,
    job_id: JobId,
    kind: &str,
    data: &Value,
) -> Result<()> {
    let now = now_micros();
    sqlx::query("insert into job_events (job_id, kind, data, created_at) values ($1, $2, $3, $4)")
        .bind(job_id.to_string())
        .bind(kind)
        .bind(data.to_string())
        .bind(now)
        .execute(&mut *conn)
        .await?;
    if kind == "state" {
        if let Some(event_type) = data
            .get("state")
            .and_then(Value::as_str)
            .and_then(super::webhooks::event_type)
        {
            super::webhooks::enqueue(conn, job_id, event_type, data, now).await?;
        }
    }
    let _ = appended().send(job_id);
    Ok(())
}

/// Events of a job after `after_seq`, oldest first; `kind` filters when given.
pub async fn list_after(
    db: &Db,
    job_id: JobId,
    after_seq: i64,
    kind: Option<&str>,
    limit: i64,
) -> Result<Vec<JobEvent>> {
    let rows = sqlx::query(
        "select seq, job_id, kind, data, created_at from job_events \
         where job_id = $1 and seq > $2 and ($3 = '' or kind = $3) order by seq limit $4",
    )
    .bind(job_id.to_string())
    .bind(after_seq)
    .bind(kind.unwrap_or_default())
    .bind(limit)
    .fetch_all(db.pool())
    .await?;
    rows.iter()
        .map(|r| {
            Ok(JobEvent {
                seq: r.try_get("seq")?,
                job_id: id_col(r, "job_id")?,
                kind: r.try_get("kind")?,
                data: json_col(r, "data")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .collect()
}
