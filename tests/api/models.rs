//! Models: uploads in three forms, inventory, download (ETag, Range), refusals that store nothing.

use std::collections::BTreeMap;

use serde_json::json;

use crate::helpers::*;

async fn octet_stream_upload_records_inventory_and_downloads_byte_identical(t: TestApp) {
    let bytes = tiny_model();
    let res = t
        .post_bytes(
            "/v1/models?name=tiny",
            "application/octet-stream",
            bytes.clone(),
        )
        .await;
    assert_eq!(res.status, 201, "{}", res.text());
    let model = res.json();
    let id = model["id"].as_str().unwrap();
    assert_eq!(
        res.header("location"),
        Some(format!("/v1/models/{id}").as_str())
    );
    assert!(res.header("x-request-id").is_some());
    assert_eq!(model["name"], "tiny");
    assert_eq!(model["sha256"], sha256_hex(&bytes));
    assert_eq!(model["size_bytes"], bytes.len());
    assert_eq!(model["parameters"], 8 * 4 + 8 + 3 * 8 + 3);
    assert_eq!(
        model["tensors"][0],
        json!({"name": "fc1.weight", "dtype": "F32", "shape": [8, 4]})
    );
    assert_eq!(model["architecture"], serde_json::Value::Null);
    assert_eq!(model["source"], serde_json::Value::Null);

    let got = t.get(&format!("/v1/models/{id}")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json(), model);

    let content = t.get(&format!("/v1/models/{id}/content")).await;
    assert_eq!(content.status, 200);
    assert_eq!(content.body.as_ref(), bytes.as_slice());
    let etag = format!("\"{}\"", sha256_hex(&bytes));
    assert_eq!(content.header("etag"), Some(etag.as_str()));
    assert_eq!(content.header("accept-ranges"), Some("bytes"));

    let part = t
        .get_with(
            &format!("/v1/models/{id}/content"),
            &[("range", "bytes=8-15")],
        )
        .await;
    assert_eq!(part.status, 206);
    assert_eq!(part.body.as_ref(), &bytes[8..16]);
    assert_eq!(
        part.header("content-range"),
        Some(format!("bytes 8-15/{}", bytes.len()).as_str())
    );
    let tail = t
        .get_with(
            &format!("/v1/models/{id}/content"),
            &[("range", "bytes=-4")],
        )
        .await;
    assert_eq!(tail.body.as_ref(), &bytes[bytes.len() - 4..]);
    let past = t
        .get_with(
            &format!("/v1/models/{id}/content"),
            &[("range", &format!("bytes={}-", bytes.len()))],
        )
        .await;
    past.assert_problem(416, "range_not_satisfiable");
    let cached = t
        .get_with(
            &format!("/v1/models/{id}/content"),
            &[("if-none-match", &etag)],
        )
        .await;
    assert_eq!(cached.status, 304);
    assert!(cached.body.is_empty());
}

#[tokio::test]
async fn multipart_upload_with_architecture_and_architecture_in_metadata() {
    let t = TestApp::sqlite().await;
    let res = t
        .post_multipart(
            "/v1/models",
            &[
                Part {
                    name: "name",
                    filename: None,
                    bytes: b"mlp".to_vec(),
                },
                Part {
                    name: "architecture",
                    filename: None,
                    bytes: tiny_arch().to_string().into_bytes(),
                },
                Part {
                    name: "file",
                    filename: Some("mlp.safetensors"),
                    bytes: tiny_model(),
                },
            ],
        )
        .await;
    assert_eq!(res.status, 201, "{}", res.text());
    let model = res.json();
    assert_eq!(model["name"], "mlp");
    assert_eq!(model["architecture"], tiny_arch());

    let mut meta = BTreeMap::new();
    meta.insert("whittle.architecture".to_string(), tiny_arch().to_string());
    let model = t.upload_model(tiny_model_with(meta)).await;
    assert_eq!(model["architecture"], tiny_arch());
}

#[tokio::test]
async fn architecture_that_does_not_match_the_weights_is_refused_and_nothing_is_stored() {
    let t = TestApp::sqlite().await;
    let mut arch = tiny_arch();
    arch["layers"][2]["out_features"] = json!(5);
    let res = t
        .post_multipart(
            "/v1/models",
            &[
                Part {
                    name: "architecture",
                    filename: None,
                    bytes: arch.to_string().into_bytes(),
                },
                Part {
                    name: "file",
                    filename: Some("m.safetensors"),
                    bytes: tiny_model(),
                },
            ],
        )
        .await;
    let body = res.assert_problem(422, "architecture_mismatch");
    assert!(
        body["detail"].as_str().unwrap().contains("fc2.weight"),
        "{body}"
    );
    assert_eq!(t.get("/v1/models").await.json()["items"], json!([]));
    assert_eq!(t.stored_files(), Vec::<std::path::PathBuf>::new());
}

/// Build a file from a raw header string and a data section.
fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[tokio::test]
async fn malformed_safetensors_are_refused_with_a_clear_code_and_nothing_is_stored() {
    let t = TestApp::sqlite().await;
    let good = tiny_model();
    let mut huge_header = good.clone();
    huge_header[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("shorter than the length prefix", vec![1, 2, 3]),
        ("truncated", good[..good.len() - 5].to_vec()),
        ("garbage", b"this is not a safetensors file at all".to_vec()),
        ("header length larger than the file", huge_header),
        ("not JSON", raw_file("{nope", &[])),
        (
            "overlapping offsets",
            raw_file(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                &[0; 12],
            ),
        ),
        (
            "out of bounds offsets",
            raw_file(
                r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                &[0; 8],
            ),
        ),
        (
            "duplicate names",
            raw_file(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                &[0; 8],
            ),
        ),
        (
            "unknown dtype",
            raw_file(
                r#"{"a":{"dtype":"F7","shape":[1],"data_offsets":[0,4]}}"#,
                &[0; 4],
            ),
        ),
        (
            "shape and offsets disagree",
            raw_file(
                r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
        ),
    ];
    for (what, bytes) in cases {
        let res = t
            .post_bytes("/v1/models", "application/octet-stream", bytes)
            .await;
        let body = res.assert_problem(422, "invalid_safetensors");
        assert!(!body["detail"].as_str().unwrap().is_empty(), "{what}");
    }
    assert_eq!(t.get("/v1/models").await.json()["items"], json!([]));
    assert_eq!(
        t.stored_files(),
        Vec::<std::path::PathBuf>::new(),
        "refused uploads leave no file"
    );
}

#[tokio::test]
async fn uploads_over_the_limit_get_413_while_streaming() {
    let t = TestApp::with(Backend::Sqlite, |c| c.max_upload_bytes = 64)
        .await
        .unwrap();
    // Announced too large.
    t.post_bytes("/v1/models", "application/octet-stream", tiny_model())
        .await
        .assert_problem(413, "payload_too_large");
    // Not announced (chunked): caught while streaming.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..10).map(|_| Ok(vec![0u8; 16])).collect();
    let body = axum::body::Body::from_stream(futures_util::stream::iter(chunks));
    let req = axum::http::Request::post("/v1/models")
        .header("content-type", "application/octet-stream")
        .body(body)
        .unwrap();
    t.request(req)
        .await
        .assert_problem(413, "payload_too_large");
    assert_eq!(t.stored_files(), Vec::<std::path::PathBuf>::new());
}

#[tokio::test]
async fn json_body_creates_a_seeded_freshly_initialised_model() {
    let t = TestApp::sqlite().await;
    let lenet = json!({"kind": "sequential", "input_shape": [1, 28, 28], "layers": [
        {"type": "flatten"},
        {"type": "linear", "name": "fc1", "in_features": 784, "out_features": 300},
        {"type": "relu"},
        {"type": "linear", "name": "fc2", "in_features": 300, "out_features": 100},
        {"type": "relu"},
        {"type": "linear", "name": "fc3", "in_features": 100, "out_features": 10}]});
    let create =
        |seed: u64| json!({"name": "lenet", "architecture": lenet, "init": {"seed": seed}});
    let a = t.post_json("/v1/models", &create(7)).await;
    assert_eq!(a.status, 201, "{}", a.text());
    let a = a.json();
    assert_eq!(a["parameters"], 266_610);
    assert_eq!(a["architecture"], lenet);
    // Multiply-adds count 2 FLOPs: 2·(784·300 + 300·100 + 100·10) plus biases and ReLUs.
    let summary = &a["summary"];
    assert_eq!(summary["parameters"], 266_610);
    assert_eq!(summary["output_shape"], json!([10]));
    let fc1 = &summary["layers"][1];
    assert_eq!(
        (fc1["name"].as_str(), fc1["parameters"].as_u64()),
        (Some("fc1"), Some(235_500))
    );
    assert!(fc1["flops"].as_u64().unwrap() >= 2 * 784 * 300);
    assert_eq!(fc1["activation_bytes"], 300 * 4);
    let b = t.post_json("/v1/models", &create(7)).await.json();
    let c = t.post_json("/v1/models", &create(8)).await.json();
    assert_eq!(a["sha256"], b["sha256"], "same seed, same bytes");
    assert_ne!(a["sha256"], c["sha256"]);

    // PyTorch default init: |w| ≤ 1/sqrt(fan_in) for fc1 (fan_in 784).
    let bytes = t
        .get(&format!("/v1/models/{}/content", a["id"].as_str().unwrap()))
        .await
        .body;
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let w = st.tensor("fc1.weight").unwrap();
    let vals: Vec<f32> = w
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let bound = 1.0 / (784f32).sqrt();
    assert!(vals.iter().all(|v| v.abs() <= bound));
    assert!(
        vals.iter().any(|v| v.abs() > bound * 0.9),
        "values fill the range"
    );
}

#[tokio::test]
async fn bad_architecture_json_is_refused_with_a_pointer() {
    let t = TestApp::sqlite().await;
    let arch = json!({"kind": "sequential", "input_shape": [4], "layers": [
        {"type": "linear", "in_features": 4, "out_features": 8},
        {"type": "linear", "in_features": 9, "out_features": 2}]});
    let res = t
        .post_json("/v1/models", &json!({"architecture": arch}))
        .await;
    let body = res.assert_problem(422, "invalid_architecture");
    assert_eq!(
        body["errors"][0]["pointer"], "/architecture/layers/1/in_features",
        "{body}"
    );

    let unknown =
        json!({"kind": "sequential", "input_shape": [4], "layers": [{"type": "teleport"}]});
    t.post_json("/v1/models", &json!({"architecture": unknown}))
        .await
        .assert_problem(422, "invalid_architecture");
    t.post_json("/v1/models", &json!({"name": "x"}))
        .await
        .assert_problem(422, "architecture_required");
    t.post_bytes("/v1/models", "application/json", b"{not json".to_vec())
        .await
        .assert_problem(400, "malformed_json");
    t.post_bytes("/v1/models", "text/plain", b"hello".to_vec())
        .await
        .assert_problem(415, "unsupported_media_type");
}

async fn unknown_ids_are_404_and_delete_removes_the_model_and_its_blob(t: TestApp) {
    t.get("/v1/models/0190d4a0-0000-7000-8000-000000000000")
        .await
        .assert_problem(404, "model_not_found");
    t.get("/v1/models/not-a-uuid")
        .await
        .assert_problem(404, "model_not_found");
    t.get("/v1/nothing-here")
        .await
        .assert_problem(404, "route_not_found");
    t.request(
        axum::http::Request::put("/v1/models")
            .body(axum::body::Body::empty())
            .unwrap(),
    )
    .await
    .assert_problem(405, "method_not_allowed");

    let model = t.upload_model(tiny_model()).await;
    let id = model["id"].as_str().unwrap();
    assert_eq!(t.stored_files().len(), 1);
    assert_eq!(t.delete(&format!("/v1/models/{id}")).await.status, 204);
    t.get(&format!("/v1/models/{id}"))
        .await
        .assert_problem(404, "model_not_found");
    // The blob outlives the row until the garbage collector finds it unreferenced.
    assert_eq!(t.stored_files().len(), 1);
    let keep = t.upload_model(tiny_model()).await;
    let other = t.upload_model(tiny_model()).await;
    assert_eq!(keep["sha256"], other["sha256"], "same bytes, one blob");
    t.delete(&format!("/v1/models/{}", other["id"].as_str().unwrap()))
        .await;
    let gc = |age| t.app.collect_garbage(std::time::Duration::from_secs(age));
    assert_eq!(gc(3600).await.unwrap(), 0, "too recent");
    assert_eq!(gc(0).await.unwrap(), 0, "still referenced");
    t.delete(&format!("/v1/models/{}", keep["id"].as_str().unwrap()))
        .await;
    assert_eq!(gc(0).await.unwrap(), 1);
    assert_eq!(t.stored_files().len(), 0);
}

async fn a_model_used_by_a_queued_job_cannot_be_deleted(t: TestApp) {
    let model = t.upload_model(tiny_model()).await;
    let id = model["id"].as_str().unwrap();
    t.submit(f16_job(id)).await;
    t.delete(&format!("/v1/models/{id}"))
        .await
        .assert_problem(409, "model_in_use");
}

async fn lists_paginate_with_an_opaque_cursor_newest_first(t: TestApp) {
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            t.upload_model(tiny_model()).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    ids.reverse();
    let p1 = t.get("/v1/models?limit=2").await.json();
    let got: Vec<&str> = p1["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, &ids[..2]);
    let cursor = p1["next_cursor"].as_str().unwrap();
    let p2 = t
        .get(&format!("/v1/models?limit=2&cursor={cursor}"))
        .await
        .json();
    let cursor = p2["next_cursor"].as_str().unwrap();
    let p3 = t
        .get(&format!("/v1/models?limit=2&cursor={cursor}"))
        .await
        .json();
    assert_eq!(p3["items"].as_array().unwrap().len(), 1);
    assert_eq!(p3["items"][0]["id"], ids[4].as_str());
    assert_eq!(p3["next_cursor"], serde_json::Value::Null);
    t.get("/v1/models?cursor=garbage")
        .await
        .assert_problem(400, "invalid_cursor");
    t.get("/v1/models?limit=abc")
        .await
        .assert_problem(400, "invalid_parameter");
}

on_both_backends!(
    octet_stream_upload_records_inventory_and_downloads_byte_identical,
    unknown_ids_are_404_and_delete_removes_the_model_and_its_blob,
    a_model_used_by_a_queued_job_cannot_be_deleted,
    lists_paginate_with_an_opaque_cursor_newest_first,
);
