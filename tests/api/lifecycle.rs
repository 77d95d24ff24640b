//! Worker life-cycle: wake-ups (in-process and Postgres LISTEN/NOTIFY across processes),
//! graceful shutdown that gives jobs back without spending an attempt, per-attempt timeouts.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;
use whittle::db::jobs::JobState;
use whittle::ids::JobId;

use crate::helpers::*;

/// Wait (bounded) until the job reaches `state`.
async fn wait_for(t: &TestApp, id: JobId, state: JobState, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let row = whittle::db::jobs::get(&t.app.state.db, id)
            .await
            .unwrap()
            .unwrap();
        if row.state == state {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "job still {:?} after {within:?}",
            row.state
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A long training job on a tiny dataset: runs for many seconds unless stopped.
async fn long_job(t: &TestApp, timeout_seconds: u64) -> JobId {
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("whittle.architecture".to_string(), tiny_arch().to_string());
    let model = t.upload_model(tiny_model_with(meta)).await;
    let x: Vec<f32> = values(4 * 64, 9);
    let y: Vec<i64> = (0..64).map(|i| i % 3).collect();
    let bytes = whittle::compress::formats::safetensors::serialize(
        &Default::default(),
        &[
            (
                whittle::compress::formats::safetensors::TensorSpec::new(
                    "x",
                    whittle::compress::formats::safetensors::Dtype::F32,
                    vec![64, 4],
                ),
                whittle::compress::formats::safetensors::encode_f32(&x).as_slice(),
            ),
            (
                whittle::compress::formats::safetensors::TensorSpec::new(
                    "y",
                    whittle::compress::formats::safetensors::Dtype::I64,
                    vec![64],
                ),
                whittle::compress::formats::safetensors::encode_i64(&y).as_slice(),
            ),
        ],
    )
    .unwrap();
    let data = t
        .post_bytes("/v1/datasets", "application/octet-stream", bytes)
        .await
        .json();
    let job = t
        .submit(json!({"model_id": model["id"], "timeout_seconds": timeout_seconds,
                       "steps": [{"op": "finetune", "dataset_id": data["id"], "epochs": 10000, "batch_size": 2}]}))
        .await;
    job["id"].as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_over_its_timeout_fails_with_code_timeout() {
    let t = TestApp::sqlite().await;
    let id = long_job(&t, 1).await;
    let started = Instant::now();
    let (ran, state) = t.run_one().await.unwrap();
    assert_eq!((ran, state), (id, JobState::Failed));
    assert!(started.elapsed() < Duration::from_secs(30));
    let row = t.get(&format!("/v1/jobs/{id}")).await.json();
    assert_eq!(row["error"]["code"], "timeout");
    assert_eq!(row["error"]["retryable"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_a_running_job_back_without_spending_an_attempt() {
    let t = TestApp::with(Backend::Sqlite, |c| c.shutdown_grace_seconds = 0)
        .await
        .unwrap();
    let id = long_job(&t, 3600).await;
    let shutdown = CancellationToken::new();
    let handles = t.app.spawn_workers(1, &shutdown);
    wait_for(&t, id, JobState::Running, Duration::from_secs(30)).await;
    shutdown.cancel();
    for h in handles {
        tokio::time::timeout(Duration::from_secs(30), h)
            .await
            .expect("workers stop")
            .unwrap();
    }
    let row = t.get(&format!("/v1/jobs/{id}")).await.json();
    assert_eq!(row["state"], "queued");
    assert_eq!(row["attempt"], 0, "a released job keeps its attempts");
    let logs = t.get(&format!("/v1/jobs/{id}/logs")).await.text();
    assert!(logs.contains("state: queued"), "{logs}");
}

/// With a 60 s poll interval, only a wake-up explains a job finishing within seconds.
async fn idle_worker_is_woken(api: &TestApp, workers: &whittle::app::App) {
    let shutdown = CancellationToken::new();
    let handles = workers.spawn_workers(1, &shutdown);
    // Let the worker reach its idle wait.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let model = api.upload_model(tiny_model()).await;
    let job = api.submit(f16_job(model["id"].as_str().unwrap())).await;
    let id: JobId = job["id"].as_str().unwrap().parse().unwrap();
    let took = wait_for(api, id, JobState::Succeeded, Duration::from_secs(20)).await;
    assert!(took < Duration::from_secs(20));
    shutdown.cancel();
    for h in handles {
        let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_an_idle_worker_in_the_same_process_is_woken_by_a_submission() {
    let t = TestApp::with(Backend::Sqlite, |c| c.poll_interval_ms = 60_000)
        .await
        .unwrap();
    idle_worker_is_woken(&t, &t.app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_worker_in_another_process_is_woken_by_listen_notify() {
    let Some(api) = TestApp::with(Backend::Postgres, |c| c.poll_interval_ms = 60_000).await else {
        return;
    };
    // A second app on the same database and data directory stands for another process: it
    // shares nothing in memory with the first, so only NOTIFY can wake it.
    let mut config = (*api.app.state.config).clone();
    config.poll_interval_ms = 60_000;
    let workers = whittle::app::App::open(config).await.unwrap();
    idle_worker_is_woken(&api, &workers).await;
}
