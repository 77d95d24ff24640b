//! The webhook outbox (API.md "Access"; the Standard Webhooks spec): one row per delivery of
//! one job event to the job's `webhook_url`, written with the state change it announces and
//! sent at least once by the queue's webhook sender, with retries and backoff. The attempts
//! and the receiver's answers are kept for `GET /v1/jobs/{id}/deliveries`.

use serde_json::{json, Value};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{id_col, json_col, Db, Result};
use crate::ids::{rfc3339, JobId};

/// Attempts before a delivery is given up (`failed`); the backoff between them is
/// [`backoff_seconds`].
pub const MAX_ATTEMPTS: i64 = 10;

/// Answers kept per delivery.
const KEPT_RESPONSES: usize = 20;

/// The webhook event type announcing a job `state`, for the states that have one.
pub fn event_type(state: &str) -> Option<&'static str> {
    Some(match state {
        "running" => "job.started",
        "succeeded" => "job.succeeded",
        "failed" => "job.failed",
        "cancelled" => "job.cancelled",
        _ => return None,
    })
}

/// Seconds to wait after the `attempt`-th failed attempt (1-based): 5 s, 30 s, 2 min, 5 min,
/// 15 min, 30 min, then hourly (about 5 hours over the ten attempts).
pub fn backoff_seconds(attempt: i64) -> i64 {
    match attempt {
        ..=1 => 5,
        2 => 30,
        3 => 120,
        4 => 300,
        5 => 900,
        6 => 1800,
        _ => 3600,
    }
}

/// Writes the delivery of `event_type` for `job_id` when the job has a `webhook_url` (on the
/// caller's connection, so inside its transaction). The body follows the Standard Webhooks
/// layout: `{"type", "timestamp", "data": {"job_id", "state", …the event's fields}}`.
pub async fn enqueue(
    conn: &mut sqlx::AnyConnection,
    job_id: JobId,
    event_type: &str,
    event: &Value,
    now: i64,
) -> Result<()> {
    let mut data = json!({"job_id": job_id.to_string()});
    if let (Some(d), Some(e)) = (data.as_object_mut(), event.as_object()) {
        for (k, v) in e {
            d.insert(k.clone(), v.clone());
        }
    }
    let payload = json!({"type": event_type, "timestamp": rfc3339(now), "data": data});
    sqlx::query(
        "insert into webhook_deliveries (id, job_id, event_type, payload, url, state, attempts, \
         next_attempt_at, responses, created_at) \
         select $1, id, $2, $3, webhook_url, 'pending', 0, $4, '[]', $4 from jobs \
         where id = $5 and webhook_url is not null",
    )
    .bind(format!("msg_{}", uuid::Uuid::now_v7().simple()))
    .bind(event_type)
    .bind(payload.to_string())
    .bind(now)
    .bind(job_id.to_string())
    .execute(conn)
    .await?;
    Ok(())
}

/// One delivery, as stored.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The `webhook-id` (`msg_…`), the same on every attempt.
    pub id: String,
    /// The job announced.
    pub job_id: JobId,
    /// `job.started`, `job.succeeded`, `job.failed` or `job.cancelled`.
    pub event_type: String,
    /// The body sent.
    pub payload: String,
    /// Where it goes.
    pub url: String,
    /// `pending`, `delivered` or `failed`.
    pub state: String,
    /// Attempts made.
    pub attempts: i64,
    /// When the next attempt is due (µs), while pending.
    pub next_attempt_at: i64,
    /// `[{at, status, error, duration_ms, body}]`, oldest first (the last 20).
    pub responses: Value,
    /// Written (µs).
    pub created_at: i64,
    /// Accepted by the receiver (µs).
    pub delivered_at: Option<i64>,
}

const COLUMNS: &str = "id, job_id, event_type, payload, url, state, attempts, next_attempt_at, \
    responses, created_at, delivered_at";

fn from_row(row: &AnyRow) -> Result<Delivery> {
    Ok(Delivery {
        id: row.try_get("id")?,
        job_id: id_col(row, "job_id")?,
        event_type: row.try_get("event_type")?,
        payload: row.try_get("payload")?,
        url: row.try_get("url")?,
        state: row.try_get("state")?,
        attempts: row.try_get("attempts")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        responses: json_col(row, "responses")?,
        created_at: row.try_get("created_at")?,
        delivered_at: row.try_get("delivered_at")?,
    })
}

/// Claims up to `limit` deliveries due at `now` by moving their next attempt `lease_micros`
/// on (a sender that dies mid-send leaves them to be sent again then: at least once). Each
/// row is claimed by one compare-and-set, so two senders never take the same delivery.
pub async fn claim_due(db: &Db, now: i64, lease_micros: i64, limit: i64) -> Result<Vec<Delivery>> {
    let due = sqlx::query(&format!(
        "select {COLUMNS} from webhook_deliveries where state = 'pending' \
         and next_attempt_at <= $1 order by next_attempt_at limit $2"
    ))
    .bind(now)
    .bind(limit)
    .fetch_all(db.pool())
    .await?;
    let mut claimed = Vec::new();
    for row in &due {
        let d = from_row(row)?;
        let done = sqlx::query(
            "update webhook_deliveries set next_attempt_at = $1 \
             where id = $2 and state = 'pending' and next_attempt_at = $3",
        )
        .bind(now + lease_micros)
        .bind(&d.id)
        .bind(d.next_attempt_at)
        .execute(db.pool())
        .await?;
        if done.rows_affected() == 1 {
            // The claim's mark: the outcome is recorded only while the claim still holds.
            claimed.push(Delivery {
                next_attempt_at: now + lease_micros,
                ..d
            });
        }
    }
    Ok(claimed)
}

/// The outcome of one attempt to deliver.
#[derive(Debug, Clone, Default)]
pub struct Attempt {
    /// When it was made (µs).
    pub at: i64,
    /// The receiver's status; `None` when no answer came.
    pub status: Option<u16>,
    /// Why no answer came (or why the receiver was not called).
    pub error: Option<String>,
    /// How long it took.
    pub duration_ms: u64,
    /// The first KiB of the answer.
    pub body: String,
    /// Give the delivery up now (a receiver that may not be called at all).
    pub give_up: bool,
}

/// Records one attempt: `delivered` on a 2xx answer; otherwise pending again after the
/// backoff, or `failed` once [`MAX_ATTEMPTS`] are spent or when the attempt gives up.
pub async fn record_attempt(db: &Db, d: &Delivery, a: Attempt) -> Result<()> {
    let Attempt {
        at: now,
        status,
        error,
        duration_ms,
        body,
        give_up,
    } = a;
    let attempts = d.attempts + 1;
    let ok = status.is_some_and(|s| (200..300).contains(&s));
    let mut responses = d.responses.as_array().cloned().unwrap_or_default();
    responses.push(json!({
        "at": rfc3339(now), "status": status, "error": error,
        "duration_ms": duration_ms, "body": body,
    }));
    let skip = responses.len().saturating_sub(KEPT_RESPONSES);
    let responses: Vec<Value> = responses.into_iter().skip(skip).collect();
    let (state, next) = if ok {
        ("delivered", now)
    } else if give_up || attempts >= MAX_ATTEMPTS {
        ("failed", now)
    } else {
        ("pending", now + backoff_seconds(attempts) * 1_000_000)
    };
    // Fenced on the claim: a sender whose claim lapsed (another took the delivery over)
    // records nothing over the other's outcome.
    sqlx::query(
        "update webhook_deliveries set state = $1, attempts = $2, next_attempt_at = $3, \
         responses = $4, delivered_at = $5 where id = $6 and state = 'pending' \
         and next_attempt_at = $7",
    )
    .bind(state)
    .bind(attempts)
    .bind(next)
    .bind(Value::Array(responses).to_string())
    .bind(ok.then_some(now))
    .bind(&d.id)
    .bind(d.next_attempt_at)
    .execute(db.pool())
    .await?;
    Ok(())
}

/// Every delivery of a job, oldest first.
pub async fn for_job(db: &Db, job_id: JobId) -> Result<Vec<Delivery>> {
    let rows = sqlx::query(&format!(
        "select {COLUMNS} from webhook_deliveries where job_id = $1 order by created_at, id"
    ))
    .bind(job_id.to_string())
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(from_row).collect()
}
