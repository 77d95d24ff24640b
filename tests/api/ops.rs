//! Operations endpoints: health, readiness, Prometheus metrics.

use crate::helpers::*;

#[tokio::test]
async fn health_and_readiness() {
    let t = TestApp::sqlite().await;
    let h = t.get("/healthz").await;
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "ok");
    let r = t.get("/readyz").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        serde_json::json!({"database": "ok", "storage": "ok"})
    );
    t.app.state.db.close().await;
    let r = t.get("/readyz").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["database"], "unavailable");
}

#[tokio::test]
async fn prometheus_metrics_count_requests_and_jobs_by_state() {
    let t = TestApp::sqlite().await;
    let m = t.upload_model(tiny_model()).await;
    t.submit(f16_job(m["id"].as_str().unwrap())).await;
    t.submit(f16_job(m["id"].as_str().unwrap())).await;
    t.run_one().await.unwrap();
    let res = t.get("/metrics").await;
    assert_eq!(res.status, 200);
    let text = res.text();
    assert!(text.contains("whittle_jobs{state=\"queued\"} 1"), "{text}");
    assert!(
        text.contains("whittle_jobs{state=\"succeeded\"} 1"),
        "{text}"
    );
    assert!(
        text.contains(
            "whittle_http_requests_total{method=\"POST\",path=\"/v1/jobs\",status=\"202\"}"
        ),
        "{text}"
    );
    assert!(
        text.contains("whittle_http_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(
        text.contains("whittle_job_duration_seconds_bucket"),
        "{text}"
    );
}
