//! The queue contract, run against SQLite and (when `WHITTLE_TEST_DATABASE_URL` is set, as in
//! CI) Postgres: claim order, fencing, lease expiry, retries, cancellation, restarts, and
//! concurrent workers never sharing a job.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use whittle::db::jobs::JobState;
use whittle::ids::{now_micros, JobId};
use whittle::queue::{Completion, Error, JobError};

use crate::helpers::*;

const LEASE: Duration = Duration::from_secs(30);

on_both_backends!(
    a_job_that_keeps_killing_workers_fails_with_worker_crashed,
    claims_by_priority_then_age,
    a_worker_that_dies_loses_its_lease_and_its_late_writes_are_rejected,
    cancelling_a_running_job_stops_it_and_keeps_nothing,
    retryable_failure_then_success,
    retries_exhausted_fail_the_job,
    queued_jobs_survive_a_restart,
    concurrent_workers_run_each_job_exactly_once,
);

async fn job_state(t: &TestApp, id: &str) -> serde_json::Value {
    t.get(&format!("/v1/jobs/{id}")).await.json()
}

async fn claims_by_priority_then_age(t: TestApp) {
    let m = t.upload_model(tiny_model()).await;
    let mid = m["id"].as_str().unwrap();
    let old = t.submit(f16_job(mid)).await;
    let mut urgent = f16_job(mid);
    urgent["priority"] = json!(5);
    let urgent = t.submit(urgent).await;
    let new = t.submit(f16_job(mid)).await;
    let q = &t.app.state.queue;
    let mut order = Vec::new();
    while let Some(job) = q.claim("w", LEASE, now_micros()).await.unwrap() {
        order.push(job.id.to_string());
    }
    assert_eq!(
        order,
        [&urgent["id"], &old["id"], &new["id"]].map(|v| v.as_str().unwrap().to_string())
    );
}

/// A job whose attempts take their workers down (out of memory, abort) is not handed to a
/// third worker: the second lost lease fails it with `worker_crashed`.
async fn a_job_that_keeps_killing_workers_fails_with_worker_crashed(t: TestApp) {
    let m = t.upload_model(tiny_model()).await;
    let mut body = f16_job(m["id"].as_str().unwrap());
    body["max_attempts"] = json!(5);
    let job = t.submit(body).await;
    let id: JobId = job["id"].as_str().unwrap().parse().unwrap();
    let q = &t.app.state.queue;
    let mut now = now_micros();
    for expected in [JobState::Queued, JobState::Failed] {
        let claimed = q
            .claim("doomed", LEASE, now)
            .await
            .unwrap()
            .expect("claimable");
        assert_eq!(claimed.id, id);
        // The worker dies: its lease runs out.
        now += LEASE.as_micros() as i64 + 1_000_000;
        assert_eq!(q.rescue(now).await.unwrap(), vec![(id, expected)]);
        now += 1;
    }
    let row = job_state(&t, &id.to_string()).await;
    assert_eq!(row["state"], "failed");
    assert_eq!(row["error"]["code"], "worker_crashed", "{row}");
    assert_eq!(row["error"]["retryable"], false);
    assert_eq!(row["attempt"], 2, "2 of 5 attempts used");
}

async fn a_worker_that_dies_loses_its_lease_and_its_late_writes_are_rejected(t: TestApp) {
    let m = t.upload_model(tiny_model()).await;
    let job = t.submit(f16_job(m["id"].as_str().unwrap())).await;
    let id: JobId = job["id"].as_str().unwrap().parse().unwrap();
    let q = &t.app.state.queue;
    let start = now_micros();
    let a = q
        .claim("worker-a", LEASE, start)
        .await
        .unwrap()
        .expect("claimable");
    assert_eq!(a.attempt, 1);
    // worker-a goes silent. Before its lease ends, nothing is rescued...
    assert!(q.rescue(start + 1_000_000).await.unwrap().is_empty());
    // ...after it, the job goes back to the queue.
    let later = start + LEASE.as_micros() as i64 + 1_000_000;
    assert_eq!(q.rescue(later).await.unwrap(), vec![(id, JobState::Queued)]);
    let row = job_state(&t, &id.to_string()).await;
    assert_eq!(row["state"], "queued");
    assert_eq!(row["error"]["code"], "lease_expired");

    let b = q
        .claim("worker-b", LEASE, later + 1)
        .await
        .unwrap()
        .expect("reclaimable");
    assert_eq!((b.id, b.attempt), (id, 2));
    // Every write of the stale attempt is fenced off.
    assert!(matches!(
        q.heartbeat(id, 1, LEASE, None, later + 2).await,
        Err(Error::LeaseLost)
    ));
    assert!(matches!(
        q.event(id, 1, "log", &json!({"message": "late"})).await,
        Err(Error::LeaseLost)
    ));
    assert!(matches!(
        q.complete(id, 1, &Completion::default(), later + 3).await,
        Err(Error::LeaseLost)
    ));
    let err = JobError {
        code: "x".into(),
        message: "late".into(),
        retryable: false,
    };
    assert!(matches!(
        q.fail(id, 1, &err, later + 4).await,
        Err(Error::LeaseLost)
    ));
    assert_eq!(job_state(&t, &id.to_string()).await["state"], "running");

    // worker-b finishes it, once.
    let state = t.app.worker("worker-b").run_claimed(b).await.unwrap();
    assert_eq!(state, JobState::Succeeded);
    let row = job_state(&t, &id.to_string()).await;
    assert_eq!(
        (row["state"].as_str(), row["attempt"].as_i64()),
        (Some("succeeded"), Some(2))
    );
    assert_eq!(
        t.get("/v1/models").await.json()["items"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "one output model"
    );
    let logs = t.get(&format!("/v1/jobs/{id}/logs")).await.text();
    assert!(!logs.contains("late"), "{logs}");
}

async fn cancelling_a_running_job_stops_it_and_keeps_nothing(t: TestApp) {
    let m = t.upload_model(tiny_model()).await;
    let job = t.submit(f16_job(m["id"].as_str().unwrap())).await;
    let id = job["id"].as_str().unwrap();
    let claimed = t
        .app
        .state
        .queue
        .claim("w", LEASE, now_micros())
        .await
        .unwrap()
        .unwrap();
    let res = t
        .request(
            axum::http::Request::post(format!("/v1/jobs/{id}/cancel"))
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(res.status, 202);
    let body = res.json();
    assert_eq!(
        (body["state"].as_str(), body["cancel_requested"].as_bool()),
        (Some("running"), Some(true))
    );

    let state = t.app.worker("w").run_claimed(claimed).await.unwrap();
    assert_eq!(state, JobState::Cancelled);
    let row = job_state(&t, id).await;
    assert_eq!(row["state"], "cancelled");
    assert_eq!(row["result"], serde_json::Value::Null);
    assert_eq!(
        t.get("/v1/models").await.json()["items"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "no output recorded"
    );
}

/// The input blob disappears (an I/O failure: retryable), then comes back.
async fn retryable_failure_then_success(t: TestApp) {
    let m = t.upload_model(tiny_model()).await;
    let job = t.submit(f16_job(m["id"].as_str().unwrap())).await;
    let id = job["id"].as_str().unwrap();
    let blob = t
        .app
        .state
        .store
        .materialize(m["sha256"].as_str().unwrap())
        .unwrap();
    let hidden = blob.with_extension("hidden");
    std::fs::rename(&blob, &hidden).unwrap();
    let (_, state) = t.run_one().await.unwrap();
    assert_eq!(state, JobState::Queued, "a retryable error re-queues");
    let row = job_state(&t, id).await;
    assert_eq!(row["attempt"], 1);
    assert_eq!(row["error"]["code"], "io_error");
    assert_eq!(row["error"]["retryable"], true);
    std::fs::rename(&hidden, &blob).unwrap();
    let (_, state) = t.run_one().await.unwrap();
    assert_eq!(state, JobState::Succeeded);
    let row = job_state(&t, id).await;
    assert_eq!(
        (row["attempt"].as_i64(), row["error"].is_null()),
        (Some(2), true)
    );
}

async fn retries_exhausted_fail_the_job(t: TestApp) {
    let m = t.upload_model(tiny_model()).await;
    let mut body = f16_job(m["id"].as_str().unwrap());
    body["max_attempts"] = json!(2);
    let job = t.submit(body).await;
    let id = job["id"].as_str().unwrap();
    std::fs::remove_file(
        t.app
            .state
            .store
            .materialize(m["sha256"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(t.run_one().await.unwrap().1, JobState::Queued);
    assert_eq!(t.run_one().await.unwrap().1, JobState::Failed);
    assert!(t.run_one().await.is_none());
    let row = job_state(&t, id).await;
    assert_eq!(row["state"], "failed");
    assert_eq!(row["attempt"], 2);
    assert_eq!(row["error"]["code"], "io_error");
    assert!(row["finished_at"].is_string());
}

async fn queued_jobs_survive_a_restart(t: TestApp) {
    let m = t.upload_model(tiny_model()).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            t.submit(f16_job(m["id"].as_str().unwrap())).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let t = t.restart().await;
    let listed = t.get("/v1/jobs?state=queued").await.json();
    assert_eq!(listed["items"].as_array().unwrap().len(), 3);
    for _ in 0..3 {
        assert_eq!(t.run_one().await.unwrap().1, JobState::Succeeded);
    }
    for id in ids {
        assert_eq!(job_state(&t, &id).await["state"], "succeeded");
    }
}

async fn concurrent_workers_run_each_job_exactly_once(t: TestApp) {
    const JOBS: usize = 500;
    const WORKERS: usize = 4;
    let m = t.upload_model(tiny_model()).await;
    for _ in 0..JOBS {
        t.submit(f16_job(m["id"].as_str().unwrap())).await;
    }
    let claims = Arc::new(tokio::sync::Mutex::new(HashMap::<JobId, Vec<String>>::new()));
    let mut handles = Vec::new();
    for w in 0..WORKERS {
        let q = t.app.state.queue.clone();
        let claims = claims.clone();
        handles.push(tokio::spawn(async move {
            let name = format!("worker-{w}");
            while let Some(job) = q.claim(&name, LEASE, now_micros()).await.unwrap() {
                claims
                    .lock()
                    .await
                    .entry(job.id)
                    .or_default()
                    .push(name.clone());
                q.complete(job.id, job.attempt, &Completion::default(), now_micros())
                    .await
                    .unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let claims = claims.lock().await;
    assert_eq!(claims.len(), JOBS, "every job was claimed");
    assert!(
        claims.values().all(|w| w.len() == 1),
        "no job was claimed twice"
    );
    let per_worker = claims
        .values()
        .fold(HashMap::<&str, usize>::new(), |mut acc, w| {
            *acc.entry(w[0].as_str()).or_default() += 1;
            acc
        });
    assert!(per_worker.len() > 1, "work was shared: {per_worker:?}");
    let succeeded = t.get("/v1/jobs?state=succeeded&limit=500").await.json();
    assert_eq!(succeeded["items"].as_array().unwrap().len(), JOBS);
    assert!(succeeded["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|j| j["attempt"] == 1));
}
