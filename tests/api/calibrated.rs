//! Calibration-based compression through the service: GPTQ, Wanda and SparseGPT on a
//! sequential network (digits) and on the tiny llama folder (text), each layer's output error
//! against its calibration-free baseline, the grids and sparsity patterns of the weights
//! written, and the refusals.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::compression::{content, digits, f32s, mlp, output, run, trained};
use crate::helpers::*;
use crate::transformers::{reference, upload_fixture, upload_text};

/// The tiny llama folder and the reference text (JSONL) uploaded: their ids.
async fn llama_and_text(t: &TestApp) -> (String, String) {
    let model = upload_fixture(t, "tiny-llama", &[]).await;
    let data = upload_text(
        t,
        "application/jsonl",
        reference()["jsonl"].as_str().unwrap().as_bytes(),
    )
    .await;
    (
        model["id"].as_str().unwrap().to_string(),
        data["id"].as_str().unwrap().to_string(),
    )
}

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
            // 256 rows: fewer than Wanda's 2,048, so its Gram matrix holds them all too.
            assert_eq!(l["output_error_rows"], 256, "{l}");
            assert_eq!(l["calibration_rows"], 256, "{l}");
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
        assert!((0.5..=1.0).contains(&num(&l["clip"])), "{l}");
    }
    assert_eq!(job["steps"][0]["clip"], true);
    // Without the clipping search the output moves at least as much.
    let (_, unclipped) = run(
        &t,
        json!({"model_id": net, "steps": [{"op": "quantize", "method": "awq", "bits": 3, "group_size": 16,
               "clip": false, "calibration": calibration}]}),
    )
    .await;
    let total = |m: &Value| {
        layers(m)
            .iter()
            .map(|l| num(&l["output_error"]))
            .sum::<f64>()
    };
    assert!(
        total(&m) <= total(&unclipped),
        "{} vs {}",
        total(&m),
        total(&unclipped)
    );
    assert!(layers(&unclipped).iter().all(|l| num(&l["clip"]) == 1.0));
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
            (gptq(json!({"format": "gguf", "bits": 3})), "/steps/0/format", "unsupported_operation"),
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
    let (model_id, data_id) = llama_and_text(&t).await;
    let (model_id, data_id) = (model_id.as_str(), data_id.as_str());
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
    let (llama, text) = llama_and_text(&t).await;
    let (_, m) = run(
        &t,
        json!({"model_id": llama, "steps": [{"op": "quantize", "method": "uniform", "bits": 4,
               "granularity": "per_group", "group_size": 16,
               "importance": {"dataset_id": text, "samples": 4}}]}),
    )
    .await;
    let imp = &m["steps"][0]["summary"]["importance"];
    assert_eq!(imp["kind"], "windows", "{imp}");
    assert_eq!(imp["weighted"].as_array().unwrap().len(), 14, "{imp}");
    assert_eq!(imp["unweighted"], json!([]));
}

/// `auto` on the tiny llama: a GGUF type per tensor within the budget, each tensor's
/// sensitivity measured per candidate, the file holding exactly the types chosen, the
/// solution no worse than every tensor at its smallest type; a generous budget takes each
/// tensor's least sensitive type; and the refusals.
#[tokio::test]
async fn auto_mixed_precision_picks_gguf_types_under_a_budget() {
    let t = TestApp::sqlite().await;
    let (model_id, data_id) = llama_and_text(&t).await;
    let (model_id, data_id) = (model_id.as_str(), data_id.as_str());
    let calibration = json!({"dataset_id": data_id, "samples": 4, "seq_len": 16, "seed": 3});
    let candidates = json!(["q4_0", "q5_0", "q8_0"]);
    let (job, m) = run(
        &t,
        json!({"model_id": model_id, "eval": {"dataset_id": data_id, "context": 16},
               "steps": [{"op": "quantize", "method": "auto", "budget": {"bits_per_weight": 6.0},
                          "candidates": candidates, "calibration": calibration}]}),
    )
    .await;
    assert_schema("Job", &job);
    assert_schema("Metrics", &m);
    let step = &m["steps"][0];
    let s = &step["summary"];
    assert_eq!(s["method"], "auto");
    assert_eq!(s["measure"], "kl_divergence");
    assert_eq!(s["tensors_quantized"], 14, "{s}");
    assert_eq!(s["passes"], 14 * 3);
    let bpw = num(&s["bits_per_weight"]);
    assert!(bpw <= 6.0 && bpw > 4.5, "{s}");
    let choices = step["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 14);
    let mut smallest = 0.0;
    let mut predicted = 0.0;
    let mut bytes = 0;
    for c in choices {
        let options = c["choices"].as_array().unwrap();
        assert_eq!(options.len(), 3, "{c}");
        // Smallest first, every divergence measured; q8_0 moves the output least.
        assert_eq!(options[0]["type"], "q4_0");
        assert!(
            num(&options[0]["divergence"]) > num(&options[2]["divergence"]),
            "{c}"
        );
        smallest += num(&options[0]["divergence"]);
        predicted += num(&c["divergence"]);
        bytes += c["bytes"].as_u64().unwrap();
    }
    assert!((predicted - num(&s["predicted_divergence"])).abs() < 1e-9);
    assert!(predicted < smallest, "{predicted} vs all-q4_0 {smallest}");
    assert_eq!(s["bytes"].as_u64().unwrap(), bytes);
    assert!(bytes <= s["budget_bytes"].as_u64().unwrap());
    assert!(num(&s["measured_divergence"]) > 0.0);
    // The file holds the chosen types, and the output model is what it decodes to.
    let layers = step["layers"].as_array().unwrap();
    for c in choices {
        let l = layers.iter().find(|l| l["tensor"] == c["tensor"]).unwrap();
        assert_eq!(l["type"], c["type"], "{l}");
    }
    let gguf = crate::compression::content(&t, &job, "gguf").await;
    let content =
        candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(&gguf)).unwrap();
    let count = |ty: candle_core::quantized::GgmlDType| {
        content
            .tensor_infos
            .values()
            .filter(|i| i.ggml_dtype == ty)
            .count()
    };
    let chosen = |ty: &str| choices.iter().filter(|c| c["type"] == ty).count();
    use candle_core::quantized::GgmlDType;
    assert_eq!(count(GgmlDType::Q4_0), chosen("q4_0"));
    assert_eq!(count(GgmlDType::Q5_0), chosen("q5_0"));
    assert_eq!(count(GgmlDType::Q8_0), chosen("q8_0"));
    assert!(num(&m["final"]["kl_divergence"]["mean"]) > 0.0);

    // A budget that does not bind: each tensor at its least sensitive type.
    let (_, m) = run(
        &t,
        json!({"model_id": model_id,
               "steps": [{"op": "quantize", "method": "auto", "budget": {"size_bytes": 100_000_000u64},
                          "candidates": candidates, "calibration": calibration}]}),
    )
    .await;
    for c in m["steps"][0]["choices"].as_array().unwrap() {
        let least = c["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| num(&o["divergence"]))
            .fold(f64::INFINITY, f64::min);
        assert_eq!(num(&c["divergence"]), least, "{c}");
    }

    // A bert encoder is compared by its embeddings, a sequential classifier by KL; both stay
    // within the budget and take a cheaper type where it costs least.
    let bert = upload_fixture(&t, "tiny-bert", &[]).await;
    let digits_data = upload_dataset(&t, digits()).await;
    let net = trained(&t, mlp(32), &digits_data, 2).await;
    for (model, calibration, measure) in [
        (
            bert["id"].as_str().unwrap().to_string(),
            json!({"dataset_id": data_id, "samples": 4, "seq_len": 16}),
            "one_minus_cosine",
        ),
        (
            net.clone(),
            json!({"dataset_id": digits_data, "samples": 64}),
            "kl_divergence",
        ),
    ] {
        let (_, m) = run(
            &t,
            json!({"model_id": model,
                   "steps": [{"op": "quantize", "method": "auto", "budget": {"bits_per_weight": 6.5},
                              "candidates": ["q4_0", "q8_0"], "calibration": calibration}]}),
        )
        .await;
        let s = &m["steps"][0]["summary"];
        assert_eq!(s["measure"], measure, "{s}");
        assert!(num(&s["bits_per_weight"]) <= 6.5, "{s}");
        let choices = m["steps"][0]["choices"].as_array().unwrap();
        assert!(!choices.is_empty());
        for c in choices {
            let o = c["choices"].as_array().unwrap();
            assert!(num(&o[0]["divergence"]) > num(&o[1]["divergence"]), "{c}");
        }
        assert!(choices.iter().any(|c| c["type"] == "q4_0"), "{s}");
    }

    let auto = |extra: Value| {
        let mut s = json!({"op": "quantize", "method": "auto", "budget": {"bits_per_weight": 6},
                           "calibration": calibration});
        for (k, v) in extra.as_object().unwrap() {
            s[k] = v.clone();
        }
        json!({"model_id": model_id, "steps": [s]})
    };
    assert_job_refusals(
        &t,
        [
            (
                auto(json!({"budget": {"bits_per_weight": 3.0}})),
                "/steps/0/budget",
                "validation_failed",
            ),
            (
                auto(json!({"budget": {"bits_per_weight": 5, "size_bytes": 10}})),
                "/steps/0/budget",
                "validation_failed",
            ),
            (
                auto(json!({"budget": null})),
                "/steps/0/budget",
                "validation_failed",
            ),
            (
                auto(json!({"budget": {"bits_per_weight": 99}})),
                "/steps/0/budget/bits_per_weight",
                "validation_failed",
            ),
            (
                auto(json!({"candidates": ["q4_0", "q9"]})),
                "/steps/0/candidates/1",
                "validation_failed",
            ),
            (
                auto(json!({"candidates": []})),
                "/steps/0/candidates",
                "validation_failed",
            ),
            (
                auto(json!({"format": "packed"})),
                "/steps/0/format",
                "validation_failed",
            ),
            (
                auto(json!({"calibration": null})),
                "/steps/0/calibration",
                "validation_failed",
            ),
            (
                auto(json!({"bits": 4})),
                "/steps/0/bits",
                "validation_failed",
            ),
        ],
    )
    .await;

    // Default draws: 8 windows of a transformer's text (each token's output distribution is
    // kept), 256 rows of a tensor dataset; GPTQ's 128 either way.
    for (model, data, method, samples) in [
        (model_id, data_id, "auto", 8),
        (net.as_str(), digits_data.as_str(), "auto", 256),
        (model_id, data_id, "gptq", 128),
    ] {
        let mut step = json!({"op": "quantize", "method": method,
                              "calibration": {"dataset_id": data}});
        if method == "auto" {
            step["budget"] = json!({"bits_per_weight": 6.5});
            step["candidates"] = json!(["q4_0", "q8_0"]);
        }
        let job = t.submit(json!({"model_id": model, "steps": [step]})).await;
        assert_eq!(job["steps"][0]["calibration"]["samples"], samples, "{job}");
    }
}

/// GPTQ's codes as GGUF blocks: 4-bit symmetric codes in q4_0, 5-bit affine in q5_1, with
/// f16 scales; the file llama.cpp reads decodes to exactly the output model's weights, and
/// GPTQ still beats round-to-nearest on the same grids. Widths and groups GGUF has no block
/// for are refused.
#[tokio::test]
async fn gptq_codes_are_written_as_gguf_blocks() {
    use candle_core::quantized::GgmlDType;
    let t = TestApp::sqlite().await;
    let (model_id, data_id) = llama_and_text(&t).await;
    let (model_id, data_id) = (model_id.as_str(), data_id.as_str());
    let calibration = json!({"dataset_id": data_id, "samples": 8, "seq_len": 16, "seed": 3});
    for (symmetric, bits, dtype, name) in [
        (true, 4, GgmlDType::Q4_0, "q4_0"),
        (false, 5, GgmlDType::Q5_1, "q5_1"),
    ] {
        let (job, m) = run(
            &t,
            json!({"model_id": model_id, "eval": {"dataset_id": data_id, "context": 16},
                   "steps": [{"op": "quantize", "method": "gptq", "bits": bits, "symmetric": symmetric,
                              "format": "gguf", "act_order": true, "calibration": calibration}]}),
        )
        .await;
        assert_schema("Job", &job);
        assert_schema("Metrics", &m);
        assert_eq!(job["steps"][0]["group_size"], 32);
        let s = &m["steps"][0]["summary"];
        assert_eq!(s["format"], "gguf");
        assert_eq!(s["gguf_type"], name);
        assert!(
            num(&s["mean_output_error"]) < num(&s["mean_output_error_rtn"]),
            "{s}"
        );
        let gguf = crate::compression::content(&t, &job, "gguf").await;
        let mut cursor = std::io::Cursor::new(&gguf);
        let content = candle_core::quantized::gguf_file::Content::read(&mut cursor).unwrap();
        assert_eq!(
            content.metadata["general.architecture"]
                .to_string()
                .unwrap(),
            "llama"
        );
        let quantized: Vec<&String> = content
            .tensor_infos
            .iter()
            .filter(|(_, i)| i.ggml_dtype == dtype)
            .map(|(n, _)| n)
            .collect();
        assert_eq!(quantized.len(), 14, "{:?}", content.tensor_infos.keys());
        // candle's decoding of the file equals the output model's weights bit for bit.
        let id = job["result"]["model_id"].as_str().unwrap();
        let bytes = t
            .get(&format!("/v1/models/{id}/files/model.safetensors"))
            .await
            .body
            .to_vec();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        // Query and key rows are permuted in the file as llama.cpp expects (4 and 2 heads):
        // undone, they are the output model's too.
        for (gguf_name, hf, heads) in [
            (
                "blk.0.attn_v.weight",
                "model.layers.0.self_attn.v_proj.weight",
                None,
            ),
            (
                "blk.1.ffn_down.weight",
                "model.layers.1.mlp.down_proj.weight",
                None,
            ),
            (
                "blk.0.attn_q.weight",
                "model.layers.0.self_attn.q_proj.weight",
                Some(4),
            ),
            (
                "blk.1.attn_k.weight",
                "model.layers.1.self_attn.k_proj.weight",
                Some(2),
            ),
        ] {
            let q = content
                .tensor(&mut cursor, gguf_name, &candle_core::Device::Cpu)
                .unwrap();
            let mut decoded = q
                .dequantize(&candle_core::Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            if let Some(heads) = heads {
                let rows = q.shape().dims()[0];
                decoded =
                    whittle::compress::formats::gguf_import::unpermute_rows(&decoded, rows, heads)
                        .unwrap();
            }
            let ours = crate::compression::f32s(&st, hf);
            assert_eq!(decoded.len(), ours.len());
            assert!(
                decoded
                    .iter()
                    .zip(&ours)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{hf} as {name}"
            );
        }
        assert!(num(&m["final"]["kl_divergence"]["mean"]) > 0.0);
    }
    let gptq = |extra: Value| {
        let mut s = json!({"op": "quantize", "method": "gptq", "format": "gguf", "calibration": calibration});
        for (k, v) in extra.as_object().unwrap() {
            s[k] = v.clone();
        }
        json!({"model_id": model_id, "steps": [s]})
    };
    assert_job_refusals(
        &t,
        [
            (
                gptq(json!({"bits": 3})),
                "/steps/0/format",
                "unsupported_operation",
            ),
            (
                gptq(json!({"bits": 8, "symmetric": false})),
                "/steps/0/format",
                "unsupported_operation",
            ),
            (
                gptq(json!({"group_size": 16})),
                "/steps/0/group_size",
                "validation_failed",
            ),
        ],
    )
    .await;
}

/// A calibrated step checkpoints after each block: an attempt that dies after the first block
/// is rescued, and the next attempt resumes at the second block (its log says so) and ends
/// with exactly the weights, codes and reports of an uninterrupted run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescued_gptq_job_resumes_at_the_next_block_with_identical_results() {
    use std::time::Duration;
    use whittle::db::jobs::JobState;
    use whittle::ids::JobId;
    let t = TestApp::sqlite().await;
    let (model_id, data_id) = llama_and_text(&t).await;
    // Enough windows that a block takes a while, so the rescue lands between blocks.
    let spec = json!({"model_id": model_id, "seed": 5, "steps": [{"op": "quantize", "method": "gptq",
        "bits": 4, "format": "gguf", "act_order": true,
        "calibration": {"dataset_id": data_id, "samples": 3000, "seq_len": 16}}]});
    let (reference, reference_m) = run(&t, spec.clone()).await;

    let job = t.submit(spec).await;
    let id: JobId = job["id"].as_str().unwrap().parse().unwrap();
    let second = t
        .kill_after_first_checkpoint(id, Duration::from_secs(300))
        .await;
    assert_eq!(
        t.app.worker("survivor").run_claimed(second).await.unwrap(),
        JobState::Succeeded
    );
    let logs = t.get(&format!("/v1/jobs/{id}/logs")).await.text();
    assert!(logs.contains("resuming step 1 after block 1"), "{logs}");
    let row = t.get(&format!("/v1/jobs/{id}")).await.json();
    let m = t.get(&format!("/v1/jobs/{id}/metrics")).await.json();
    // Every layer reported once, as in the uninterrupted run; the same files.
    assert_eq!(layers(&m), layers(&reference_m));
    // The GGUF's blocks restored from the checkpoint decode to the same model (the files
    // themselves differ in their provenance: the job's id).
    let files = |j: &Value| {
        let id = j["result"]["model_id"].as_str().unwrap().to_string();
        let t = &t;
        async move {
            t.get(&format!("/v1/models/{id}/files/model.safetensors"))
                .await
                .body
                .to_vec()
        }
    };
    let (a, b) = (files(&row).await, files(&reference).await);
    let (a, b) = (
        safetensors::SafeTensors::deserialize(&a).unwrap(),
        safetensors::SafeTensors::deserialize(&b).unwrap(),
    );
    for name in b.names() {
        assert_eq!(
            a.tensor(name).unwrap().data(),
            b.tensor(name).unwrap().data(),
            "{name}"
        );
    }
}
