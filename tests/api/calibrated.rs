//! Calibration-based compression through the service: GPTQ, Wanda and SparseGPT on a
//! sequential network (digits) and on the tiny llama folder (text), each layer's output error
//! against its calibration-free baseline, the grids and sparsity patterns of the weights
//! written, and the refusals.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::compression::{content, digits, f32s, mlp, output, run, trained};
use crate::helpers::*;
use crate::transformers::{reference, upload_fixture, upload_text};

fn layers(m: &Value) -> &Vec<Value> {
    m["steps"][0]["layers"].as_array().unwrap()
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Distinct values in each `group`-long run of each row.
fn max_levels(w: &[f32], cols: usize, group: usize) -> usize {
    w.chunks(cols)
        .flat_map(|row| row.chunks(group))
        .map(|g| g.iter().map(|v| v.to_bits()).collect::<BTreeSet<_>>().len())
        .max()
        .unwrap()
}

async fn calibrated_compression_of_a_sequential_network(t: TestApp) {
    let data = upload_dataset(&t, digits()).await;
    let net = trained(&t, mlp(32), &data, 3).await;
    let calibration = json!({"dataset_id": data, "samples": 256, "seed": 1});

    // GPTQ, 3 bits in groups of 16: every layer's output moves less than round-to-nearest's
    // on the same grids, and every group of the written weights holds at most 2³ values.
    let (job, m) = run(
        &t,
        json!({"model_id": net, "eval": {"dataset_id": data},
               "steps": [{"op": "quantize", "method": "gptq", "bits": 3, "group_size": 16,
                          "calibration": calibration}]}),
    )
    .await;
    assert_schema("Job", &job);
    assert_schema("Metrics", &m);
    let summary = &m["steps"][0]["summary"];
    assert_eq!(summary["method"], "gptq");
    assert_eq!(summary["calibration"]["samples"], 256);
    assert_eq!(summary["calibration"]["kind"], "rows");
    assert_eq!(layers(&m).len(), 2, "{m}");
    for l in layers(&m) {
        assert_eq!(l["group_size"], 16);
        assert!(num(&l["output_error"]) < num(&l["output_error_rtn"]), "{l}");
    }
    assert!(num(&summary["mean_output_error"]) < 0.8 * num(&summary["mean_output_error_rtn"]));
    assert_eq!(job["steps"][0]["calibration"]["seq_len"], 512);
    let bytes = output(&t, &job).await;
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(max_levels(&f32s(&st, "fc1.weight"), 64, 16) <= 8);
    assert!(max_levels(&f32s(&st, "fc2.weight"), 32, 16) <= 8);
    assert!(num(&m["final"]["accuracy"]) > 0.8, "{}", m["final"]);

    // Packed: GPTQ's own codes and scales, decoding to exactly the weights of the output model,
    // 3-bit codes + one f32 scale per 16 weights = 5 bits per weight.
    let (packed_job, pm) = run(
        &t,
        json!({"model_id": net, "steps": [{"op": "quantize", "method": "gptq", "bits": 3, "group_size": 16,
               "format": "packed", "calibration": calibration}]}),
    )
    .await;
    assert_schema("Job", &packed_job);
    assert_schema("Metrics", &pm);
    assert_eq!(pm["steps"][0]["summary"]["format"], "packed");
    assert!((num(&pm["steps"][0]["summary"]["bits_per_weight"]) - 5.0).abs() < 1e-9);
    let packed = content(&t, &packed_job, "packed").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("packed.safetensors");
    std::fs::write(&path, &packed).unwrap();
    let file = whittle::compress::formats::safetensors::SafetensorsFile::open(&path).unwrap();
    let decoded = whittle::compress::formats::packed::decode_packed(&file).unwrap();
    let model_bytes = output(&t, &packed_job).await;
    let model = safetensors::SafeTensors::deserialize(&model_bytes).unwrap();
    for name in ["fc1.weight", "fc2.weight"] {
        let d = decoded.iter().find(|t| t.name == name).unwrap();
        assert!(d.values == f32s(&model, name), "{name}");
        assert!(
            f32s(&model, name) == f32s(&st, name),
            "{name}: packed and dequantized runs differ"
        );
    }
    assert!(
        num(&pm["final"]["packed_size_bytes"]) > 0.0,
        "{}",
        pm["final"]
    );
    // Packed must be the last step; AWQ has no integer codes to pack.
    assert_job_refusals(
        &t,
        [
            (
                json!({"model_id": net, "steps": [
                    {"op": "quantize", "method": "gptq", "format": "packed", "calibration": calibration},
                    {"op": "prune", "method": "magnitude", "sparsity": 0.5}]}),
                "/steps/0/format",
                "validation_failed",
            ),
            (
                json!({"model_id": net, "steps": [{"op": "quantize", "method": "awq", "format": "packed", "calibration": calibration}]}),
                "/steps/0/format",
                "unsupported_operation",
            ),
        ],
    )
    .await;

    // The same job again: the same weights (the draw and the sweep are deterministic).
    let (again, _) = run(
        &t,
        json!({"model_id": net, "steps": [{"op": "quantize", "method": "gptq", "bits": 3,
               "group_size": 16, "calibration": calibration}]}),
    )
    .await;
    let again = output(&t, &again).await;
    let again = safetensors::SafeTensors::deserialize(&again).unwrap();
    for name in ["fc1.weight", "fc2.weight"] {
        assert!(
            f32s(&again, name) == f32s(&st, name),
            "{name} differs between runs"
        );
    }

    // Wanda at 50% and SparseGPT at 2:4: exact counts and patterns, output error below
    // magnitude pruning's.
    for (step, check_nm) in [
        (
            json!({"op": "prune", "method": "wanda", "sparsity": 0.5, "calibration": calibration}),
            false,
        ),
        (
            json!({"op": "prune", "method": "sparsegpt", "n": 2, "m": 4, "calibration": calibration}),
            true,
        ),
    ] {
        let (job, m) = run(&t, json!({"model_id": net, "steps": [step]})).await;
        assert_schema("Job", &job);
        assert_schema("Metrics", &m);
        assert_eq!(num(&m["steps"][0]["summary"]["sparsity"]), 0.5);
        for l in layers(&m) {
            assert!(
                num(&l["output_error"]) < num(&l["output_error_magnitude"]),
                "{l}"
            );
        }
        let bytes = output(&t, &job).await;
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let w = f32s(&st, "fc1.weight");
        assert_eq!(w.iter().filter(|v| **v == 0.0).count(), w.len() / 2);
        if check_nm {
            for g in w.chunks(4) {
                assert_eq!(g.iter().filter(|v| **v != 0.0).count(), 2, "{g:?}");
            }
        }
        // Biases are not selected by default for these methods' linear-weight work.
        assert_eq!(
            f32s(&st, "fc1.bias").iter().filter(|v| **v == 0.0).count(),
            0
        );
    }

    // AWQ: never worse than round-to-nearest on the calibration inputs (α = 0 is RTN).
    let (job, m) = run(
        &t,
        json!({"model_id": net, "steps": [{"op": "quantize", "method": "awq", "bits": 3, "group_size": 16,
               "calibration": calibration}]}),
    )
    .await;
    assert_schema("Job", &job);
    assert_schema("Metrics", &m);
    for l in layers(&m) {
        assert!(
            num(&l["output_error"]) <= num(&l["output_error_rtn"]),
            "{l}"
        );
        assert!((0.0..1.0).contains(&num(&l["alpha"])), "{l}");
    }
    // HQQ: no data; the weight error below round-to-nearest's on the affine grid.
    let (job, m) = run(
        &t,
        json!({"model_id": net, "steps": [{"op": "quantize", "method": "hqq", "bits": 3, "group_size": 16}]}),
    )
    .await;
    assert_schema("Job", &job);
    assert_schema("Metrics", &m);
    let s = &m["steps"][0]["summary"];
    assert!(num(&s["mean_mse"]) < num(&s["mean_mse_rtn"]), "{s}");
    let bytes = output(&t, &job).await;
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(max_levels(&f32s(&st, "fc1.weight"), 64, 16) <= 8);

    // Refused before anything is queued.
    let unknown = "0190d4a0-0000-7000-8000-000000000000";
    let gptq = |extra: Value| {
        let mut s = json!({"op": "quantize", "method": "gptq", "calibration": calibration});
        for (k, v) in extra.as_object().unwrap() {
            s[k] = v.clone();
        }
        json!({"model_id": net, "steps": [s]})
    };
    let no_calibration =
        json!({"model_id": net, "steps": [{"op": "prune", "method": "wanda", "sparsity": 0.5}]});
    assert_job_refusals(
        &t,
        [
            (no_calibration, "/steps/0/calibration", "validation_failed"),
            (gptq(json!({"calibration": {"dataset_id": unknown}})), "/steps/0/calibration/dataset_id", "dataset_not_found"),
            (gptq(json!({"bits": 9})), "/steps/0/bits", "validation_failed"),
            (gptq(json!({"group_size": 24})), "/steps/0/group_size", "validation_failed"),
            (gptq(json!({"damp": -1})), "/steps/0/damp", "validation_failed"),
            (gptq(json!({"calibration": {"dataset_id": data, "samples": 0}})), "/steps/0/calibration/samples", "validation_failed"),
            (gptq(json!({"format": "gguf"})), "/steps/0/format", "unsupported_operation"),
            (gptq(json!({"sparsity": 0.5})), "/steps/0/sparsity", "validation_failed"),
            (gptq(json!({"op": "prune"})), "/steps/0/method", "validation_failed"),
            (
                json!({"model_id": net, "steps": [{"op": "quantize", "method": "wanda", "sparsity": 0.5, "calibration": calibration}]}),
                "/steps/0/method",
                "validation_failed",
            ),
            (
                json!({"model_id": net, "steps": [{"op": "quantize", "method": "hqq", "calibration": calibration}]}),
                "/steps/0/calibration",
                "validation_failed",
            ),
            (
                json!({"model_id": net, "steps": [{"op": "quantize", "method": "awq", "grid": 0, "calibration": calibration}]}),
                "/steps/0/grid",
                "validation_failed",
            ),
            (
                json!({"model_id": net, "steps": [{"op": "prune", "method": "sparsegpt", "n": 4, "m": 4, "calibration": calibration}]}),
                "/steps/0/n",
                "validation_failed",
            ),
            (
                json!({"model_id": net, "steps": [{"op": "prune", "method": "wanda", "calibration": calibration}]}),
                "/steps/0/sparsity",
                "validation_failed",
            ),
            (
                json!({"model_id": net, "steps": [{"op": "prune", "method": "wanda", "sparsity": 0.5, "include": ["fc1.bias"], "calibration": calibration}]}),
                "/steps/0/include",
                "validation_failed",
            ),
        ],
    )
    .await;
}

async fn calibrated_compression_of_a_llama_folder(t: TestApp) {
    let want = reference();
    let model = upload_fixture(&t, "tiny-llama", &[]).await;
    let data = upload_text(
        &t,
        "application/jsonl",
        want["jsonl"].as_str().unwrap().as_bytes(),
    )
    .await;
    let (model_id, data_id) = (model["id"].as_str().unwrap(), data["id"].as_str().unwrap());
    let calibration = json!({"dataset_id": data_id, "samples": 8, "seq_len": 16, "seed": 3});
    let eval = json!({"dataset_id": data_id, "context": 16, "stride": 8});
    let (job, m) = run(
        &t,
        json!({"model_id": model_id, "eval": eval,
               "steps": [{"op": "quantize", "method": "gptq", "bits": 3, "calibration": calibration}]}),
    )
    .await;
    assert_schema("Job", &job);
    assert_schema("Metrics", &m);
    let summary = &m["steps"][0]["summary"];
    assert_eq!(summary["calibration"]["kind"], "windows");
    assert_eq!(summary["calibration"]["tokens"], 8 * 16);
    // Every linear layer of both blocks: q, k, v, o, gate, up, down.
    assert_eq!(layers(&m).len(), 14, "{m}");
    for l in layers(&m) {
        let down = l["layer"].as_str().unwrap().ends_with("down_proj.weight");
        // The default group: 128 does not divide 32 or 64 columns; 64 and 32 do.
        assert_eq!(l["group_size"], if down { 64 } else { 32 }, "{l}");
        assert!(
            num(&l["output_error"]) <= num(&l["output_error_rtn"]),
            "{l}"
        );
    }
    assert!(num(&summary["mean_output_error"]) < num(&summary["mean_output_error_rtn"]));
    // The output is a folder model again, evaluated against the input.
    let out = t
        .get(&format!(
            "/v1/models/{}",
            job["result"]["model_id"].as_str().unwrap()
        ))
        .await
        .json();
    assert_eq!(out["family"], "llama", "{out}");
    assert!(num(&m["final"]["kl_divergence"]["mean"]) > 0.0);

    let (_, m) = run(
        &t,
        json!({"model_id": model_id,
               "steps": [{"op": "prune", "method": "sparsegpt", "sparsity": 0.5, "calibration": calibration}]}),
    )
    .await;
    for l in layers(&m) {
        assert!(
            num(&l["output_error"]) < num(&l["output_error_magnitude"]),
            "{l}"
        );
    }

    // A tensor dataset does not calibrate a llama; a draw beyond 262,144 tokens is refused.
    let tensors = upload_dataset(&t, digits()).await;
    assert_job_refusals(
        &t,
        [(
            json!({"model_id": model_id, "steps": [{"op": "quantize", "method": "gptq",
                   "calibration": {"dataset_id": data_id, "samples": 1000, "seq_len": 512}}]}),
            "/steps/0/calibration/samples",
            "validation_failed",
        ), (
            json!({"model_id": model_id, "steps": [{"op": "prune", "method": "wanda", "sparsity": 0.5,
                   "calibration": {"dataset_id": tensors}}]}),
            "/steps/0/calibration/dataset_id",
            "dataset_shape_mismatch",
        )],
    )
    .await;
}

on_both_backends!(
    calibrated_compression_of_a_sequential_network,
    calibrated_compression_of_a_llama_folder,
    importance_weights_gguf_k_quants_and_is_measured_on_transformers,
);

/// A tensor dataset of `n` rows of 256 features (a few loud ones) with 10 classes.
fn wide_dataset(n: usize) -> Vec<u8> {
    use whittle::compress::formats::safetensors::{self as st, Dtype, TensorSpec};
    let mut x = Vec::with_capacity(n * 256);
    let mut seed = 7u64;
    for _ in 0..n * 256 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x.push(((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5);
    }
    for r in 0..n {
        for c in (0..256).step_by(16) {
            x[r * 256 + c] *= 12.0;
        }
    }
    let y: Vec<i64> = (0..n as i64).map(|i| i % 10).collect();
    st::serialize(
        &Default::default(),
        &[
            (
                TensorSpec::new("x", Dtype::F32, vec![n, 256]),
                st::encode_f32(&x).as_slice(),
            ),
            (
                TensorSpec::new("y", Dtype::I64, vec![n]),
                st::encode_i64(&y).as_slice(),
            ),
        ],
    )
    .unwrap()
}

async fn importance_weights_gguf_k_quants_and_is_measured_on_transformers(t: TestApp) {
    let data = upload_dataset(&t, wide_dataset(200)).await;
    let arch = json!({"kind": "sequential", "input_shape": [256], "layers": [
        {"type": "linear", "name": "fc1", "in_features": 256, "out_features": 32},
        {"type": "relu"},
        {"type": "linear", "name": "fc2", "in_features": 32, "out_features": 10}]});
    let model = fresh_model(&t, arch, 5).await;
    let step = |importance: Value| {
        let mut s = json!({"op": "quantize", "method": "gguf", "type": "q3_k"});
        if !importance.is_null() {
            s["importance"] = importance;
        }
        json!({"model_id": model, "steps": [s]})
    };
    let (plain, _) = run(&t, step(Value::Null)).await;
    let (weighted, m) = run(&t, step(json!({"dataset_id": data, "samples": 100}))).await;
    assert_schema("Job", &weighted);
    assert_schema("Metrics", &m);
    let layers = layers(&m);
    let fc1 = layers.iter().find(|l| l["tensor"] == "fc1.weight").unwrap();
    assert_eq!(fc1["type"], "q3_k");
    assert_eq!(fc1["importance"], true, "{fc1}");
    // fc2's 32-wide rows fall back to q4_0, which has no weighted fit.
    let fc2 = layers.iter().find(|l| l["tensor"] == "fc2.weight").unwrap();
    assert!(fc2.get("importance").is_none(), "{fc2}");
    let imp = &m["steps"][0]["summary"]["importance"];
    assert_eq!(imp["samples"], 100, "{imp}");
    // The importance-weighted error Σ_j E[x_j²]·(w − ŵ)² is lower with the weights.
    let rows: Vec<usize> = imp["indices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let bytes = wide_dataset(200);
    let ds = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let x = f32s(&ds, "x");
    let w: Vec<f64> = (0..256)
        .map(|c| {
            rows.iter()
                .map(|r| f64::from(x[r * 256 + c]).powi(2))
                .sum::<f64>()
                / rows.len() as f64
        })
        .collect();
    let original = {
        let res = t.get(&format!("/v1/models/{model}/content")).await;
        f32s(
            &safetensors::SafeTensors::deserialize(&res.body).unwrap(),
            "fc1.weight",
        )
    };
    let weighted_error = |job: &Value| {
        let job = job.clone();
        let t = &t;
        let original = &original;
        let w = &w;
        async move {
            let bytes = output(t, &job).await;
            let q = f32s(
                &safetensors::SafeTensors::deserialize(&bytes).unwrap(),
                "fc1.weight",
            );
            q.iter()
                .zip(original)
                .enumerate()
                .map(|(i, (a, b))| w[i % 256] * f64::from(a - b).powi(2))
                .sum::<f64>()
        }
    };
    let (e_plain, e_weighted) = (
        weighted_error(&plain).await,
        weighted_error(&weighted).await,
    );
    assert!(e_weighted < 0.95 * e_plain, "{e_weighted} vs {e_plain}");

    // Measured on a llama folder (text): the uniform search weighted by it.
    let want = reference();
    let llama = upload_fixture(&t, "tiny-llama", &[]).await;
    let text = upload_text(
        &t,
        "application/jsonl",
        want["jsonl"].as_str().unwrap().as_bytes(),
    )
    .await;
    let (_, m) = run(
        &t,
        json!({"model_id": llama["id"], "steps": [{"op": "quantize", "method": "uniform", "bits": 4,
               "granularity": "per_group", "group_size": 16,
               "importance": {"dataset_id": text["id"], "samples": 4}}]}),
    )
    .await;
    let imp = &m["steps"][0]["summary"]["importance"];
    assert_eq!(imp["kind"], "windows", "{imp}");
    assert_eq!(imp["weighted"].as_array().unwrap().len(), 14, "{imp}");
    assert_eq!(imp["unweighted"], json!([]));
}
