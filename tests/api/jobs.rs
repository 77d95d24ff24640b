//! Jobs through the API: submit, run (float quantization end to end), result, metrics, logs,
//! events, validation, idempotency, cancel, filters.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::*;

async fn model_with_arch(t: &TestApp) -> Value {
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("whittle.architecture".to_string(), tiny_arch().to_string());
    meta.insert("user.note".to_string(), "kept".to_string());
    t.upload_model(tiny_model_with(meta)).await
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

async fn float16_job_runs_end_to_end_with_provenance_and_metrics(t: TestApp) {
    let input = model_with_arch(&t).await;
    let input_id = input["id"].as_str().unwrap();
    let job = t
        .submit(json!({"model_id": input_id, "steps": [{"op": "quantize", "method": "float", "dtype": "f16"}],
                       "labels": {"team": "vision"}, "seed": 3}))
        .await;
    let job_id = job["id"].as_str().unwrap();
    assert_eq!(job["state"], "queued");
    assert_eq!(job["attempt"], 0);
    assert_eq!(job["labels"], json!({"team": "vision"}));
    assert_eq!(job["steps"][0]["dtype"], "f16");

    let (ran, state) = t.run_one().await.expect("a job was claimable");
    assert_eq!(ran.to_string(), job_id);
    assert_eq!(state.as_str(), "succeeded");
    assert!(t.run_one().await.is_none());

    let job = t.get(&format!("/v1/jobs/{job_id}")).await.json();
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["attempt"], 1);
    assert!(job["finished_at"].is_string());
    // A finished job reads 100% at its last step, not its last heartbeat's figure.
    assert_eq!(job["progress"]["fraction"], 1.0, "{job}");
    assert_eq!(job["progress"]["message"], "done");
    assert_eq!(job["progress"]["op"], "quantize");
    let out_id = job["result"]["model_id"].as_str().unwrap();
    let artifacts = job["result"]["artifacts"].as_array().unwrap();
    assert_eq!(artifacts.len(), 2);
    assert_eq!(artifacts[0]["kind"], "model");
    assert_eq!(artifacts[1]["kind"], "report");

    // The output is a Model: chained from the job, smaller, with f16 weights (default
    // selection: ndim ≥ 2) and untouched biases.
    let out = t.get(&format!("/v1/models/{out_id}")).await.json();
    assert_eq!(out["source"], json!({"job_id": job_id, "step": 0}));
    assert_eq!(out["architecture"], tiny_arch());
    let dtypes: Vec<(&str, &str)> = out["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap(), t["dtype"].as_str().unwrap()))
        .collect();
    assert_eq!(
        dtypes,
        [
            ("fc1.weight", "F16"),
            ("fc1.bias", "F32"),
            ("fc2.weight", "F16"),
            ("fc2.bias", "F32")
        ]
    );

    // Independent reader: the safetensors crate.
    let bytes = t.get(&format!("/v1/models/{out_id}/content")).await.body;
    assert_eq!(sha256_hex(&bytes), out["sha256"]);
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["user.note"], "kept");
    assert_eq!(
        serde_json::from_str::<Value>(&meta["whittle.architecture"]).unwrap(),
        tiny_arch()
    );
    let prov: Value = serde_json::from_str(&meta["whittle.job"]).unwrap();
    assert_eq!(prov["id"], job_id);
    assert_eq!(prov["seed"], 3);
    assert_eq!(prov["source_model_sha256"], input["sha256"]);
    assert_eq!(prov["steps"][0]["op"], "quantize");
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let w = st.tensor("fc1.weight").unwrap();
    let halves: Vec<f32> = w
        .data()
        .chunks_exact(2)
        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect();
    let original = values(32, 1);
    let max_err = original
        .iter()
        .zip(&halves)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        max_err > 0.0 && max_err <= 1.0 / 2048.0,
        "f16 rounding error of values in [-1, 1): {max_err}"
    );
    assert_eq!(
        f32s(st.tensor("fc1.bias").unwrap().data()),
        values(8, 2),
        "biases untouched"
    );

    // The artifact is the same bytes.
    let art = &artifacts[0];
    let meta_res = t
        .get(&format!("/v1/artifacts/{}", art["id"].as_str().unwrap()))
        .await
        .json();
    assert_eq!(meta_res["sha256"], out["sha256"]);
    let content = t
        .get(&format!(
            "/v1/artifacts/{}/content",
            art["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(content.body, bytes);

    // Metrics: baseline, one step with per-tensor errors, final.
    let m = t.get(&format!("/v1/jobs/{job_id}/metrics")).await.json();
    assert_eq!(m["baseline"]["parameters"], 67);
    assert_eq!(m["baseline"]["size_bytes"], input["size_bytes"]);
    assert_eq!(m["baseline"]["bits_per_weight"], 32.0);
    let step = &m["steps"][0];
    assert_eq!(step["op"], "quantize");
    assert_eq!(step["summary"]["tensors_changed"], 2);
    // 56 weights go from 4 to 2 bytes; the 11 biases stay f32.
    assert_eq!(step["summary"]["tensor_bytes_before"], 67 * 4);
    assert_eq!(step["summary"]["tensor_bytes_after"], 56 * 2 + 11 * 4);
    let layer = &step["layers"][0];
    assert_eq!(layer["tensor"], "fc1.weight");
    assert!((layer["max_abs_error"].as_f64().unwrap() - max_err as f64).abs() < 1e-9);
    assert!(layer["sqnr_db"].as_f64().unwrap() > 60.0);
    assert_eq!(m["final"]["size_bytes"], out["size_bytes"]);
    let ratio = input["size_bytes"].as_f64().unwrap() / out["size_bytes"].as_f64().unwrap();
    assert!((m["final"]["compression_ratio"].as_f64().unwrap() - ratio).abs() < 1e-12);
    assert_eq!(
        m["final"]["bits_per_weight"].as_f64().unwrap(),
        (56.0 * 16.0 + 11.0 * 32.0) / 67.0
    );
    let report = t
        .get(&format!(
            "/v1/artifacts/{}/content",
            artifacts[1]["id"].as_str().unwrap()
        ))
        .await
        .json();
    assert_eq!(report, m);

    // Logs, as text and NDJSON.
    let logs = t.get(&format!("/v1/jobs/{job_id}/logs")).await;
    assert!(logs
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    let text = logs.text();
    assert!(
        text.contains("state: queued")
            && text.contains("step 1/1: quantize")
            && text.contains("state: succeeded"),
        "{text}"
    );
    let nd = t
        .get_with(
            &format!("/v1/jobs/{job_id}/logs"),
            &[("accept", "application/x-ndjson")],
        )
        .await;
    assert_eq!(nd.header("content-type"), Some("application/x-ndjson"));
    for line in nd.text().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert!(v["time"].is_string() && v["message"].is_string());
    }
}

fn parse_sse(text: &str) -> Vec<(i64, String, Value)> {
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let (mut id, mut event, mut data) = (None, None, None);
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("id:") {
                id = v.trim().parse().ok();
            } else if let Some(v) = line.strip_prefix("event:") {
                event = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("data:") {
                data = serde_json::from_str(v.trim()).ok();
            }
        }
        if let (Some(id), Some(event), Some(data)) = (id, event, data) {
            out.push((id, event, data));
        }
    }
    out
}

async fn events_stream_replays_the_job_and_ends_after_its_terminal_state(t: TestApp) {
    let model = t.upload_model(tiny_model()).await;
    let job = t.submit(f16_job(model["id"].as_str().unwrap())).await;
    let id = job["id"].as_str().unwrap();
    t.run_one().await.unwrap();
    let res = t.get(&format!("/v1/jobs/{id}/events")).await;
    assert_eq!(res.status, 200);
    assert!(res
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let events = parse_sse(&res.text());
    let kinds: Vec<&str> = events.iter().map(|(_, k, _)| k.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"state"));
    assert_eq!(events[0].2["state"], "queued");
    assert!(
        kinds.contains(&"progress") && kinds.contains(&"log") && kinds.contains(&"metrics"),
        "{kinds:?}"
    );
    let last = events.last().unwrap();
    assert_eq!(
        (last.1.as_str(), last.2["state"].as_str()),
        ("state", Some("succeeded"))
    );
    let progress: Vec<f64> = events
        .iter()
        .filter(|e| e.1 == "progress")
        .map(|e| e.2["fraction"].as_f64().unwrap())
        .collect();
    assert_eq!(progress.last(), Some(&1.0));
    assert!(events.windows(2).all(|w| w[0].0 < w[1].0), "ids increase");

    // Resume after the third event: exactly the rest.
    let resumed = t
        .get_with(
            &format!("/v1/jobs/{id}/events"),
            &[("last-event-id", &events[2].0.to_string())],
        )
        .await;
    let rest = parse_sse(&resumed.text());
    assert_eq!(rest.len(), events.len() - 3);
    assert_eq!(rest[0].0, events[3].0);
}

/// Many followers of one unfinished job: the process reads its events once per pass for all
/// of them (not once per client every 250 ms), they get new events as they come, and shutting
/// down ends every stream (a graceful shutdown is not held open by followers).
async fn followers_share_one_reader_and_end_on_shutdown(t: TestApp) {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let model = t.upload_model(tiny_model()).await;
    let job = t.submit(f16_job(model["id"].as_str().unwrap())).await;
    let id = job["id"].as_str().unwrap().to_string();
    let mut bodies = Vec::new();
    for _ in 0..200 {
        let res = t
            .router
            .clone()
            .oneshot(
                axum::http::Request::get(format!("/v1/jobs/{id}/events"))
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let mut body = res.into_body();
        // The replayed `queued` event.
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("the history comes at once")
            .unwrap()
            .unwrap();
        let text = String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap();
        assert!(text.contains("queued"), "{text}");
        bodies.push(body);
    }
    let before = t.app.state.live.queries();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = t.app.state.live.queries() - before;
    // One query a second, where polling per client would make 200 × 4 × 3 = 2,400.
    assert!(idle <= 4, "{idle} queries in 3 s for 200 idle followers");

    // A new event reaches every follower.
    let res = t
        .post_json(&format!("/v1/jobs/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(res.status, 202, "{}", res.text());
    for body in &mut bodies {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("the cancellation arrives")
            .unwrap()
            .unwrap();
        let text = String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap();
        assert!(text.contains("cancelled"), "{text}");
    }

    // Followers of a job that is still queued end when the server shuts down.
    let other = t.submit(f16_job(model["id"].as_str().unwrap())).await;
    let res = t
        .router
        .clone()
        .oneshot(
            axum::http::Request::get(format!("/v1/jobs/{}/events", other["id"].as_str().unwrap()))
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = res.into_body();
    body.frame().await.unwrap().unwrap();
    t.app.state.live.shutdown().cancel();
    let end = tokio::time::timeout(Duration::from_secs(2), body.frame())
        .await
        .expect("the stream ends on shutdown");
    assert!(end.is_none(), "no more frames after shutdown");
}

#[tokio::test]
async fn job_specs_are_validated_with_pointers_before_anything_is_queued() {
    let t = TestApp::sqlite().await;
    let model = t.upload_model(tiny_model()).await;
    let mid = model["id"].as_str().unwrap();
    let cases = [
        (
            json!({"steps": [{"op": "quantize", "method": "float", "dtype": "f16"}]}),
            "/model_id",
            "validation_failed",
        ),
        (
            f16_job("0190d4a0-0000-7000-8000-000000000000"),
            "/model_id",
            "model_not_found",
        ),
        (
            json!({"model_id": mid, "steps": []}),
            "/steps",
            "validation_failed",
        ),
        (
            json!({"model_id": mid, "steps": [{"op": "shrink"}]}),
            "/steps/0/op",
            "validation_failed",
        ),
        (
            json!({"model_id": mid, "steps": [{"op": "prune", "sparsity": 1.5}]}),
            "/steps/0/sparsity",
            "validation_failed",
        ),
        (
            json!({"model_id": mid, "steps": [{"op": "quantize", "method": "float", "dtype": "f8"}]}),
            "/steps/0/dtype",
            "validation_failed",
        ),
        (
            json!({"model_id": mid, "steps": [{"op": "quantize", "method": "uniform", "activations": {"bits": 8}}]}),
            "/steps/0/activations/calibration",
            "validation_failed",
        ),
        (
            json!({"model_id": mid, "steps": [{"op": "quantize", "method": "float", "dtype": "f16", "include": ["conv*"]}]}),
            "/steps/0/include/0",
            "validation_failed",
        ),
        (
            json!({"model_id": mid, "steps": [{"op": "quantize", "method": "float", "dtype": "f16", "colour": 1}]}),
            "/steps/0/colour",
            "validation_failed",
        ),
        (
            json!({"model_id": mid, "steps": [{"op": "quantize", "method": "float", "dtype": "f16"}], "priority": 1e9}),
            "/priority",
            "validation_failed",
        ),
        (
            json!({"model_id": mid, "steps": [{"op": "quantize", "method": "float", "dtype": "f16"}], "max_attempts": 0}),
            "/max_attempts",
            "validation_failed",
        ),
        (
            json!({"model_id": mid, "steps": [{"op": "quantize", "method": "float", "dtype": "f16"}], "labels": {"a": 1}}),
            "/labels/a",
            "validation_failed",
        ),
        (
            json!({"model_id": mid, "steps": [{"op": "quantize", "method": "float", "dtype": "f16"}], "nope": 1}),
            "/nope",
            "validation_failed",
        ),
    ];
    assert_job_refusals(&t, cases).await;
    // Several problems at once are all reported.
    let res = t
        .post_json(
            "/v1/jobs",
            &json!({"model_id": mid, "steps": [{"op": "quantize", "method": "float"}], "seed": -1}),
        )
        .await;
    let problem = res.assert_problem(422, "validation_failed");
    assert_eq!(problem["errors"].as_array().unwrap().len(), 2, "{problem}");

    t.post_bytes("/v1/jobs", "application/json", b"{\"model_id\":".to_vec())
        .await
        .assert_problem(400, "malformed_json");
    t.post_bytes("/v1/jobs", "text/plain", b"{}".to_vec())
        .await
        .assert_problem(415, "unsupported_media_type");
    assert_eq!(
        t.get("/v1/jobs").await.json()["items"],
        json!([]),
        "nothing was queued"
    );
}

#[tokio::test]
async fn dry_run_returns_the_plan_and_queues_nothing() {
    let t = TestApp::sqlite().await;
    let model = t.upload_model(tiny_model()).await;
    let res = t
        .post_json(
            "/v1/jobs?dry_run=true",
            &f16_job(model["id"].as_str().unwrap()),
        )
        .await;
    assert_eq!(res.status, 200, "{}", res.text());
    let plan = res.json();
    assert_eq!(
        plan["steps"][0]["tensors"],
        json!(["fc1.weight", "fc2.weight"])
    );
    assert!(plan["estimated_peak_memory_bytes"].as_u64().unwrap() > 0);
    assert_eq!(t.get("/v1/jobs").await.json()["items"], json!([]));
}

async fn idempotency_key_returns_the_first_job_or_refuses_another_body(t: TestApp) {
    let model = t.upload_model(tiny_model()).await;
    let body = f16_job(model["id"].as_str().unwrap());
    let key = [("idempotency-key", "nightly-2026-11-27")];
    let a = t.post_json_with("/v1/jobs", &body, &key).await;
    let b = t.post_json_with("/v1/jobs", &body, &key).await;
    assert_eq!(a.status, 202);
    assert_eq!(b.status, 202);
    assert_eq!(a.json()["id"], b.json()["id"]);
    let mut other = body.clone();
    other["priority"] = json!(5);
    t.post_json_with("/v1/jobs", &other, &key)
        .await
        .assert_problem(422, "idempotency_key_reused");
    assert_eq!(
        t.get("/v1/jobs").await.json()["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

async fn cancel_a_queued_job_at_once_and_refuse_to_cancel_a_finished_one(t: TestApp) {
    let model = t.upload_model(tiny_model()).await;
    let mid = model["id"].as_str().unwrap();
    let queued = t.submit(f16_job(mid)).await;
    let qid = queued["id"].as_str().unwrap();
    let res = t
        .request(
            axum::http::Request::post(format!("/v1/jobs/{qid}/cancel"))
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(res.status, 202);
    assert_eq!(res.json()["state"], "cancelled");
    assert!(
        t.run_one().await.is_none(),
        "a cancelled job is never claimed"
    );

    let done = t.submit(f16_job(mid)).await;
    let did = done["id"].as_str().unwrap();
    t.run_one().await.unwrap();
    let res = t
        .request(
            axum::http::Request::post(format!("/v1/jobs/{did}/cancel"))
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await;
    res.assert_problem(409, "job_already_finished");
    let res = t
        .request(
            axum::http::Request::post("/v1/jobs/0190d4a0-0000-7000-8000-000000000000/cancel")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await;
    res.assert_problem(404, "job_not_found");
}

async fn list_filters_by_state_model_and_label_and_paginates(t: TestApp) {
    let m1 = t.upload_model(tiny_model()).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let m2 = t.upload_model(tiny_model()).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut job = f16_job(&m1);
    job["labels"] = json!({"team": "vision"});
    let a = t.submit(job.clone()).await;
    t.run_one().await.unwrap();
    let b = t.submit(job).await;
    let c = t.submit(f16_job(&m2)).await;
    let ids = |v: Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        ids(t.get("/v1/jobs?state=succeeded").await.json()),
        [a["id"].as_str().unwrap()]
    );
    assert_eq!(
        ids(t.get("/v1/jobs?state=queued").await.json()),
        [c["id"].as_str().unwrap(), b["id"].as_str().unwrap()]
    );
    assert_eq!(
        ids(t.get(&format!("/v1/jobs?model_id={m2}")).await.json()),
        [c["id"].as_str().unwrap()]
    );
    assert_eq!(
        ids(t.get("/v1/jobs?label=team:vision").await.json()).len(),
        2
    );
    assert_eq!(
        ids(t.get("/v1/jobs?label=team:audio").await.json()).len(),
        0
    );
    let p1 = t.get("/v1/jobs?limit=2").await.json();
    let p2 = t
        .get(&format!(
            "/v1/jobs?limit=2&cursor={}",
            p1["next_cursor"].as_str().unwrap()
        ))
        .await
        .json();
    assert_eq!(ids(p2), [a["id"].as_str().unwrap()]);
    t.get("/v1/jobs?state=sleeping")
        .await
        .assert_problem(400, "invalid_parameter");
    t.get("/v1/jobs?label=novalue")
        .await
        .assert_problem(400, "invalid_parameter");
}

async fn job_get_supports_cheap_polling_with_etag(t: TestApp) {
    let model = t.upload_model(tiny_model()).await;
    let job = t.submit(f16_job(model["id"].as_str().unwrap())).await;
    let uri = format!("/v1/jobs/{}", job["id"].as_str().unwrap());
    let first = t.get(&uri).await;
    let etag = first.header("etag").unwrap().to_string();
    assert_eq!(
        t.get_with(&uri, &[("if-none-match", &etag)]).await.status,
        304
    );
    t.run_one().await.unwrap();
    let after = t.get_with(&uri, &[("if-none-match", &etag)]).await;
    assert_eq!(after.status, 200, "a changed job is sent again");
    assert_ne!(after.header("etag").unwrap(), etag);
    t.get("/v1/jobs/0190d4a0-0000-7000-8000-000000000000/metrics")
        .await
        .assert_problem(404, "job_not_found");

    // A running job's ETag moves with its progress, not with its lease renewals.
    let job = t.submit(f16_job(model["id"].as_str().unwrap())).await;
    let uri = format!("/v1/jobs/{}", job["id"].as_str().unwrap());
    let q = &t.app.state.queue;
    let lease = std::time::Duration::from_secs(30);
    let claimed = q
        .claim("etag-test", lease, whittle::ids::now_micros())
        .await
        .unwrap()
        .unwrap();
    let etag = t.get(&uri).await.header("etag").unwrap().to_string();
    let beat = |progress: Option<serde_json::Value>| async move {
        q.heartbeat(
            claimed.id,
            claimed.attempt,
            lease,
            progress.as_ref(),
            whittle::ids::now_micros() + 1_000_000,
        )
        .await
        .unwrap()
    };
    beat(None).await;
    assert_eq!(
        t.get_with(&uri, &[("if-none-match", &etag)]).await.status,
        304
    );
    let progress = serde_json::json!({"step": 0, "op": "quantize", "fraction": 0.5});
    beat(Some(progress.clone())).await;
    let moved = t.get_with(&uri, &[("if-none-match", &etag)]).await;
    assert_eq!(moved.status, 200);
    let etag = moved.header("etag").unwrap().to_string();
    beat(Some(progress)).await;
    assert_eq!(
        t.get_with(&uri, &[("if-none-match", &etag)]).await.status,
        304
    );
}

#[tokio::test]
async fn request_ids_are_echoed() {
    let t = TestApp::sqlite().await;
    let res = t.get_with("/healthz", &[("x-request-id", "abc-123")]).await;
    assert_eq!(res.header("x-request-id"), Some("abc-123"));
    let res = t.get("/v1/jobs/not-a-job").await;
    assert!(res.header("x-request-id").unwrap().len() >= 32);
    // An oversized or odd id is not echoed (nor logged): a fresh one replaces it.
    let long = "a".repeat(8192);
    for bad in [long.as_str(), "<script>", "a b"] {
        let res = t.get_with("/healthz", &[("x-request-id", bad)]).await;
        let got = res.header("x-request-id").unwrap();
        assert!(got != bad && got.len() <= 64, "{got}");
    }
}

/// Requests that would exhaust memory are refused before any work (they used to abort the
/// process): a model initialised with 2^31 parameters, and a distillation whose student needs
/// 27 GB to train although the dry-run estimate said 13 MB.
#[tokio::test]
async fn requests_that_would_exhaust_memory_are_refused_up_front() {
    let t = TestApp::with(Backend::Sqlite, |c| c.job_memory_bytes = Some(1 << 30))
        .await
        .unwrap();
    let huge = json!({"kind": "sequential", "input_shape": [65536], "layers": [
        {"type": "linear", "in_features": 65536, "out_features": 32768, "bias": false}]});
    let started = std::time::Instant::now();
    let p = t
        .post_json(
            "/v1/models",
            &json!({"architecture": huge, "init": {"seed": 0}}),
        )
        .await
        .assert_problem(422, "memory_limit_exceeded");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused, not attempted"
    );
    assert_eq!(p["errors"][0]["pointer"], "/architecture");
    assert!(p["detail"].as_str().unwrap().contains("2147483648"), "{p}");

    let teacher = fresh_model(
        &t,
        json!({"kind": "sequential", "input_shape": [784], "layers": [
        {"type": "linear", "in_features": 784, "out_features": 10}]}),
        0,
    )
    .await;
    let data = {
        use whittle::compress::formats::safetensors::{self as st, Dtype, TensorSpec};
        let x = st::encode_f32(&values(4 * 784, 1));
        let y = st::encode_i64(&[0, 1, 2, 3]);
        let bytes = st::serialize(
            &Default::default(),
            &[
                (TensorSpec::new("x", Dtype::F32, vec![4, 784]), &x),
                (TensorSpec::new("y", Dtype::I64, vec![4]), &y),
            ],
        )
        .unwrap();
        upload_dataset(&t, bytes).await
    };
    let student = json!({"kind": "sequential", "input_shape": [784], "layers": [
        {"type": "linear", "in_features": 784, "out_features": 2097152}, {"type": "relu"},
        {"type": "linear", "in_features": 2097152, "out_features": 10}]});
    let body = json!({"model_id": teacher, "steps": [{"op": "distill", "student": {"architecture": student},
        "dataset_id": data, "epochs": 1}]});
    // The dry run says what it needs...
    let plan = t.post_json("/v1/jobs?dry_run=true", &body).await;
    assert_eq!(plan.status, 200, "{}", plan.text());
    let needs = plan.json()["estimated_peak_memory_bytes"].as_u64().unwrap();
    assert!(
        needs > 20 << 30,
        "{needs} bytes: 1.66 G parameters trained in f32 with AdamW"
    );
    // ...and the job is refused, pointing at the step.
    let p = t
        .post_json("/v1/jobs", &body)
        .await
        .assert_problem(422, "memory_limit_exceeded");
    assert_eq!(p["errors"][0]["pointer"], "/steps/0");
    assert_eq!(
        t.get("/v1/jobs").await.json()["items"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    // A job that fits is accepted.
    let fits = json!({"model_id": teacher, "steps": [{"op": "quantize", "method": "float", "dtype": "f16"}]});
    assert_eq!(t.post_json("/v1/jobs", &fits).await.status, 202);
}

/// Inputs a hostile client sends: refused the same way on SQLite and Postgres, nothing stored.
async fn hostile_bodies_are_refused_alike_on_both_backends(t: TestApp) {
    let model = t.upload_model(tiny_model()).await;
    let mid = model["id"].as_str().unwrap();
    // NUL in a label (Postgres text cannot hold it; SQLite could): 422 at its pointer.
    let mut body = f16_job(mid);
    body["labels"] = json!({"team": "a\u{0}b"});
    let p = t
        .post_json("/v1/jobs", &body)
        .await
        .assert_problem(422, "validation_failed");
    assert_eq!(p["errors"][0]["pointer"], "/labels/team", "{p}");
    let mut body = f16_job(mid);
    body["labels"] = json!({"te\u{0}am": "x"});
    t.post_json("/v1/jobs", &body)
        .await
        .assert_problem(422, "validation_failed");
    t.get("/v1/jobs?label=a:%00")
        .await
        .assert_problem(400, "invalid_parameter");
    // Duplicate keys: parsers disagree on which wins, so neither does.
    let raw = format!(r#"{{"model_id": "{mid}", "model_id": "{mid}", "steps": []}}"#);
    let res = t
        .request(
            axum::http::Request::post("/v1/jobs")
                .header("content-type", "application/json")
                .body(axum::body::Body::from(raw))
                .unwrap(),
        )
        .await;
    let p = res.assert_problem(400, "malformed_json");
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("duplicate key `model_id`"),
        "{p}"
    );
    let raw = r#"{"architecture": {"kind": "sequential", "kind": "sequential"}}"#;
    t.post_bytes("/v1/models", "application/json", raw.as_bytes().to_vec())
        .await
        .assert_problem(400, "malformed_json");
    assert_eq!(
        t.get("/v1/jobs").await.json()["items"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    // A cross-site form cannot cancel a job.
    let job = t.submit(f16_job(mid)).await;
    let id = job["id"].as_str().unwrap();
    for ct in [
        "application/x-www-form-urlencoded",
        "text/plain",
        "multipart/form-data; boundary=x",
    ] {
        let res = t
            .request(
                axum::http::Request::post(format!("/v1/jobs/{id}/cancel"))
                    .header("content-type", ct)
                    .body(axum::body::Body::from("a=b"))
                    .unwrap(),
            )
            .await;
        res.assert_problem(415, "unsupported_media_type");
    }
    assert_eq!(
        t.get(&format!("/v1/jobs/{id}")).await.json()["state"],
        "queued"
    );
}

/// `DELETE /v1/jobs/{id}`: refused while the job can still run; afterwards the job, its
/// events and artifacts go, their blobs are reclaimed, the models it made stay.
async fn deleting_a_finished_job_removes_it_with_its_events_and_artifacts(t: TestApp) {
    let input = t.upload_model(tiny_model()).await;
    let job = t.submit(f16_job(input["id"].as_str().unwrap())).await;
    let uri = format!("/v1/jobs/{}", job["id"].as_str().unwrap());
    t.delete(&uri).await.assert_problem(409, "job_not_finished");
    t.run_one().await.unwrap();
    let done = t.get(&uri).await.json();
    assert_eq!(done["state"], "succeeded");
    let output = done["result"]["model_id"].as_str().unwrap().to_string();
    let artifacts: Vec<String> = done["result"]["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_string())
        .collect();
    let before = t.stored_files().len();

    assert_eq!(t.delete(&uri).await.status, 204);
    t.get(&uri).await.assert_problem(404, "job_not_found");
    t.get(&format!("{uri}/events"))
        .await
        .assert_problem(404, "job_not_found");
    t.delete(&uri).await.assert_problem(404, "job_not_found");
    for a in &artifacts {
        t.get(&format!("/v1/artifacts/{a}"))
            .await
            .assert_problem(404, "artifact_not_found");
    }
    let events: i64 = sqlx::query_scalar("select count(*) from job_events where job_id = $1")
        .bind(job["id"].as_str().unwrap())
        .fetch_one(t.app.state.db.pool())
        .await
        .unwrap();
    assert_eq!(events, 0);
    // The output model is a model of its own and stays; the report's blob is freed.
    assert_eq!(t.get(&format!("/v1/models/{output}")).await.status, 200);
    let freed = t
        .app
        .collect_garbage(std::time::Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(freed, 1, "the report artifact's blob");
    assert_eq!(t.stored_files().len(), before - 1);
    // Deleting the output model frees its blob too.
    assert_eq!(t.delete(&format!("/v1/models/{output}")).await.status, 204);
    assert_eq!(
        t.app
            .collect_garbage(std::time::Duration::ZERO)
            .await
            .unwrap(),
        1
    );
}

/// `WHITTLE_RETENTION_DAYS`: finished jobs older than the period go, others stay.
async fn retention_deletes_old_finished_jobs_only(backend: Backend) {
    let Some(t) = TestApp::with(backend, |c| c.retention_days = Some(0)).await else {
        return;
    };
    let m = t.upload_model(tiny_model()).await;
    let id = m["id"].as_str().unwrap();
    let finished = t.submit(f16_job(id)).await;
    t.run_one().await.unwrap();
    let queued = t.submit(f16_job(id)).await;
    assert_eq!(t.app.apply_retention().await.unwrap(), 1);
    let gone = format!("/v1/jobs/{}", finished["id"].as_str().unwrap());
    t.get(&gone).await.assert_problem(404, "job_not_found");
    let kept = format!("/v1/jobs/{}", queued["id"].as_str().unwrap());
    assert_eq!(t.get(&kept).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_deletes_old_finished_jobs_only_on_sqlite() {
    retention_deletes_old_finished_jobs_only(Backend::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_deletes_old_finished_jobs_only_on_postgres() {
    retention_deletes_old_finished_jobs_only(Backend::Postgres).await
}

on_both_backends!(
    deleting_a_finished_job_removes_it_with_its_events_and_artifacts,
    float16_job_runs_end_to_end_with_provenance_and_metrics,
    events_stream_replays_the_job_and_ends_after_its_terminal_state,
    followers_share_one_reader_and_end_on_shutdown,
    idempotency_key_returns_the_first_job_or_refuses_another_body,
    cancel_a_queued_job_at_once_and_refuse_to_cancel_a_finished_one,
    list_filters_by_state_model_and_label_and_paginates,
    job_get_supports_cheap_polling_with_etag,
    hostile_bodies_are_refused_alike_on_both_backends,
);
