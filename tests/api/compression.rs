//! `prune`, `quantize` (integer, codebook, GGUF) and `distill` through the API: the bytes
//! written, the figures reported, and the refusals.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use whittle::compress::formats::safetensors::{self as tensors, Dtype, TensorSpec};
use whittle::db::jobs::JobState;

use crate::helpers::*;

/// The 1,797 digits (8×8 scaled to [0, 1]) as a safetensors dataset.
pub(crate) fn digits() -> Vec<u8> {
    let d = smartcore::dataset::digits::load_dataset();
    let x: Vec<f32> = d.data.iter().map(|v| *v / 16.0).collect();
    let y: Vec<i64> = d.target.iter().map(|v| *v as i64).collect();
    let n = y.len();
    tensors::serialize(
        &BTreeMap::new(),
        &[
            (
                TensorSpec::new("x", Dtype::F32, vec![n, 1, 8, 8]),
                tensors::encode_f32(&x).as_slice(),
            ),
            (
                TensorSpec::new("y", Dtype::I64, vec![n]),
                tensors::encode_i64(&y).as_slice(),
            ),
        ],
    )
    .unwrap()
}

pub(crate) fn mlp(hidden: usize) -> Value {
    json!({"kind": "sequential", "input_shape": [1, 8, 8], "layers": [
        {"type": "flatten"},
        {"type": "linear", "name": "fc1", "in_features": 64, "out_features": hidden},
        {"type": "relu"},
        {"type": "linear", "name": "fc2", "in_features": hidden, "out_features": 10}]})
}

pub(crate) fn cnn() -> Value {
    json!({"kind": "sequential", "input_shape": [1, 8, 8], "layers": [
        {"type": "conv2d", "name": "conv1", "in_channels": 1, "out_channels": 8, "kernel_size": 3, "padding": 1},
        {"type": "batch_norm2d", "name": "bn1", "num_features": 8},
        {"type": "relu"},
        {"type": "max_pool2d", "kernel_size": 2},
        {"type": "conv2d", "name": "conv2", "in_channels": 8, "out_channels": 16, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "max_pool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "linear", "name": "fc", "in_features": 64, "out_features": 10}]})
}

fn train(dataset: &str, epochs: usize) -> Value {
    json!({"dataset_id": dataset, "epochs": epochs, "batch_size": 32,
           "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.0}})
}

/// Run the job `body` to success; returns (job, metrics).
pub(crate) async fn run(t: &TestApp, body: Value) -> (Value, Value) {
    let job = t.submit(body).await;
    let id = job["id"].as_str().unwrap().to_string();
    let (_, state) = t.run_one().await.unwrap();
    let job = t.get(&format!("/v1/jobs/{id}")).await.json();
    assert_eq!(state, JobState::Succeeded, "{job}");
    let metrics = t.get(&format!("/v1/jobs/{id}/metrics")).await.json();
    (job, metrics)
}

/// A model trained on digits for `epochs` (its id).
pub(crate) async fn trained(t: &TestApp, arch: Value, data: &str, epochs: usize) -> String {
    let model = fresh_model(t, arch, 3).await;
    let mut step = train(data, epochs);
    step["op"] = json!("finetune");
    let (job, _) = run(t, json!({"model_id": model, "steps": [step]})).await;
    job["result"]["model_id"].as_str().unwrap().to_string()
}

/// The bytes of a job's output model.
pub(crate) async fn output(t: &TestApp, job: &Value) -> Vec<u8> {
    let id = job["result"]["model_id"].as_str().unwrap();
    t.get(&format!("/v1/models/{id}/content"))
        .await
        .body
        .to_vec()
}

pub(crate) async fn content(t: &TestApp, job: &Value, kind: &str) -> Vec<u8> {
    let art = job["result"]["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} artifact in {job}"));
    let res = t
        .get(&format!(
            "/v1/artifacts/{}/content",
            art["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(res.status, 200);
    assert_eq!(res.body.len() as u64, art["size_bytes"].as_u64().unwrap());
    res.body.to_vec()
}

pub(crate) fn f32s(st: &safetensors::SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// A model with one 16×32 and one 8×16 weight: every input dimension splits into groups of 4.
fn wide_model() -> Vec<u8> {
    let w1 = values(16 * 32, 11);
    let w2 = values(8 * 16, 12);
    tensors::serialize(
        &BTreeMap::new(),
        &[
            (
                TensorSpec::new("a.weight", Dtype::F32, vec![16, 32]),
                tensors::encode_f32(&w1).as_slice(),
            ),
            (
                TensorSpec::new("b.weight", Dtype::F32, vec![8, 16]),
                tensors::encode_f32(&w2).as_slice(),
            ),
            (
                TensorSpec::new("b.bias", Dtype::F32, vec![8]),
                tensors::encode_f32(&values(8, 13)).as_slice(),
            ),
        ],
    )
    .unwrap()
}

#[tokio::test]
async fn magnitude_pruning_layer_and_global_prunes_exactly_the_smallest_weights() {
    let t = TestApp::sqlite().await;
    let model = t.upload_model(wide_model()).await;
    let mid = model["id"].as_str().unwrap();
    let original = wide_model();
    let src = safetensors::SafeTensors::deserialize(&original).unwrap();

    // Layer scope: each tensor loses round(0.75 · n) of its smallest weights; biases untouched.
    let (job, m) = run(
        &t,
        json!({"model_id": mid, "steps": [{"op": "prune", "method": "magnitude", "sparsity": 0.75, "scope": "layer"}]}),
    )
    .await;
    let out = output(&t, &job).await;
    let st = safetensors::SafeTensors::deserialize(&out).unwrap();
    for (name, n) in [("a.weight", 512usize), ("b.weight", 128)] {
        let before = f32s(&src, name);
        let after = f32s(&st, name);
        let zeros = after.iter().filter(|v| **v == 0.0).count();
        assert_eq!(zeros, n * 3 / 4, "{name}");
        let largest_pruned = before
            .iter()
            .zip(&after)
            .filter(|(_, a)| **a == 0.0)
            .map(|(b, _)| b.abs())
            .fold(0f32, f32::max);
        let smallest_kept = after
            .iter()
            .filter(|a| **a != 0.0)
            .map(|a| a.abs())
            .fold(f32::INFINITY, f32::min);
        assert!(largest_pruned <= smallest_kept, "{name}");
        // Kept weights are bit-identical.
        assert!(before.iter().zip(&after).all(|(b, a)| *a == 0.0 || a == b));
    }
    assert_eq!(f32s(&st, "b.bias"), f32s(&src, "b.bias"));
    let summary = &m["steps"][0]["summary"];
    assert_eq!(summary["nonzero"], 128 + 32);
    assert!((summary["sparsity"].as_f64().unwrap() - 0.75).abs() < 1e-9);
    assert_eq!(m["steps"][0]["layers"].as_array().unwrap().len(), 2);
    assert_eq!(m["final"]["nonzero"], 128 + 32 + 8);

    // Global scope: one threshold across both tensors.
    let (job, _) = run(
        &t,
        json!({"model_id": mid, "steps": [{"op": "prune", "sparsity": 0.5, "scope": "global"}]}),
    )
    .await;
    let out = output(&t, &job).await;
    let st = safetensors::SafeTensors::deserialize(&out).unwrap();
    let mut pruned_max = 0f32;
    let mut kept_min = f32::INFINITY;
    let mut zeros = 0;
    for name in ["a.weight", "b.weight"] {
        for (b, a) in f32s(&src, name).iter().zip(f32s(&st, name)) {
            if a == 0.0 {
                zeros += 1;
                pruned_max = pruned_max.max(b.abs());
            } else {
                kept_min = kept_min.min(a.abs());
            }
        }
    }
    assert_eq!(zeros, 320);
    assert!(pruned_max <= kept_min);
}

#[tokio::test]
async fn n_m_and_sparse_output_write_what_they_report() {
    let t = TestApp::sqlite().await;
    let model = t.upload_model(wide_model()).await;
    let mid = model["id"].as_str().unwrap();
    let (job, m) = run(
        &t,
        json!({"model_id": mid, "steps": [{"op": "prune", "method": "n_m", "n": 2, "m": 4, "output": "sparse"}]}),
    )
    .await;
    // The dense model: every group of 4 consecutive inputs keeps exactly 2.
    let dense = output(&t, &job).await;
    let st = safetensors::SafeTensors::deserialize(&dense).unwrap();
    for name in ["a.weight", "b.weight"] {
        let w = f32s(&st, name);
        for group in w.chunks(4) {
            assert_eq!(group.iter().filter(|v| **v != 0.0).count(), 2, "{name}");
        }
    }
    // The packed artifact: a bitmask and the kept values, matching the dense file.
    let packed = content(&t, &job, "packed").await;
    let sp = safetensors::SafeTensors::deserialize(&packed).unwrap();
    for name in ["a.weight", "b.weight"] {
        let w = f32s(&st, name);
        let mask = sp.tensor(&format!("{name}.sparse_mask")).unwrap();
        assert_eq!(mask.data().len(), w.len().div_ceil(8));
        let values = f32s(&sp, &format!("{name}.sparse_values"));
        let mut k = 0;
        for (i, v) in w.iter().enumerate() {
            let bit = mask.data()[i / 8] >> (i % 8) & 1;
            assert_eq!(bit == 1, *v != 0.0, "{name}[{i}]");
            if bit == 1 {
                assert_eq!(values[k], *v);
                k += 1;
            }
        }
        assert_eq!(k, values.len());
    }
    assert!(
        sp.tensor("b.bias").is_ok(),
        "unselected tensors are kept as they are"
    );
    let (_, meta) = safetensors::SafeTensors::read_metadata(&packed).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert!(meta["whittle.sparse"].contains("bitmask"));
    assert!(meta.contains_key("whittle.job"));
    assert_eq!(
        m["final"]["packed_size_bytes"].as_u64().unwrap(),
        packed.len() as u64
    );
    assert!((m["steps"][0]["summary"]["sparsity"].as_f64().unwrap() - 0.5).abs() < 1e-9);
}

#[tokio::test]
async fn pruning_requests_are_checked_before_anything_is_queued() {
    let t = TestApp::sqlite().await;
    let plain = t.upload_model(wide_model()).await;
    let pid = plain["id"].as_str().unwrap();
    let data = upload_dataset(&t, digits()).await;
    let with_arch = fresh_model(&t, mlp(8), 1).await;
    let cases = [
        (
            json!({"model_id": pid, "steps": [{"op": "prune", "sparsity": 1.0}]}),
            "/steps/0/sparsity",
            "validation_failed",
        ),
        (
            json!({"model_id": pid, "steps": [{"op": "prune", "sparsity": -0.1}]}),
            "/steps/0/sparsity",
            "validation_failed",
        ),
        (
            json!({"model_id": pid, "steps": [{"op": "prune", "method": "n_m", "n": 4, "m": 4}]}),
            "/steps/0/n",
            "validation_failed",
        ),
        (
            json!({"model_id": pid, "steps": [{"op": "prune", "method": "n_m", "n": 2, "m": 3}]}),
            "/steps/0/m",
            "validation_failed",
        ),
        (
            json!({"model_id": pid, "steps": [{"op": "prune", "method": "structured", "sparsity": 0.5}]}),
            "/steps/0/op",
            "architecture_required",
        ),
        (
            json!({"model_id": pid, "steps": [{"op": "prune", "sparsity": 0.5, "include": ["conv*"]}]}),
            "/steps/0/include/0",
            "validation_failed",
        ),
        (
            json!({"model_id": pid, "steps": [{"op": "prune", "sparsity": 0.5, "layers": {"nothing*": 0.9}}]}),
            "/steps/0/layers/nothing*",
            "validation_failed",
        ),
        (
            json!({"model_id": with_arch, "steps": [{"op": "prune", "method": "structured", "sparsity": 0.5, "layers": {"fc1.weight": 0.99}}]}),
            "/steps/0/layers",
            "validation_failed",
        ),
        (
            json!({"model_id": with_arch, "steps": [{"op": "prune", "sparsity": 0.5, "schedule": {"iterations": 2}}]}),
            "/steps/0/schedule/finetune",
            "validation_failed",
        ),
        (
            json!({"model_id": with_arch, "steps": [{"op": "prune", "method": "n_m", "n": 2, "m": 4,
                   "schedule": {"iterations": 2, "finetune": {"dataset_id": data}, "splicing": {}}}]}),
            "/steps/0/schedule/splicing",
            "validation_failed",
        ),
        (
            json!({"model_id": with_arch, "steps": [{"op": "prune", "sparsity": 0.5,
                   "schedule": {"iterations": 2, "finetune": {"dataset_id": data}, "splicing": {"until": 0}}}]}),
            "/steps/0/schedule/splicing/until",
            "validation_failed",
        ),
        (
            json!({"model_id": with_arch, "steps": [{"op": "prune", "sparsity": 0.5,
                   "schedule": {"iterations": 2, "finetune": {"dataset_id": data}, "splicing": {"margin": 1.5}}}]}),
            "/steps/0/schedule/splicing/margin",
            "validation_failed",
        ),
        (
            json!({"model_id": with_arch, "steps": [{"op": "prune", "sparsity": 0.5, "output": "sparse"}, {"op": "evaluate", "dataset_id": data}]}),
            "/steps/0/output",
            "validation_failed",
        ),
    ];
    assert_job_refusals(&t, cases).await;
    assert_eq!(
        t.get("/v1/jobs").await.json()["items"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
}

#[tokio::test]
async fn gradual_pruning_retrains_with_pruned_weights_held_at_zero() {
    let t = TestApp::sqlite().await;
    let data = upload_dataset(&t, digits()).await;
    let model = trained(&t, mlp(64), &data, 4).await;
    let mut finetune = train(&data, 2);
    finetune["validation"] = json!({"fraction": 0.2});
    let (job, m) = run(
        &t,
        json!({"model_id": model, "eval": {"dataset_id": data},
               "steps": [{"op": "prune", "sparsity": 0.9, "scope": "layer",
                          "schedule": {"kind": "polynomial", "iterations": 3, "power": 3, "finetune": finetune}}]}),
    )
    .await;
    let step = &m["steps"][0];
    let rounds = step["summary"]["iterations"].as_array().unwrap();
    assert_eq!(rounds.len(), 3);
    // The bar only moves forward: each round is a third of the step, not its own 0→1.
    let events = t
        .get(&format!("/v1/jobs/{}/events", job["id"].as_str().unwrap()))
        .await
        .text();
    let fractions: Vec<f64> = events
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|v| v["op"] == "prune")
        .filter_map(|v| v["fraction"].as_f64())
        .collect();
    assert!(fractions.len() >= 2, "{events}");
    assert!(fractions.windows(2).all(|w| w[1] >= w[0]), "{fractions:?}");
    assert!(events.contains("round 3/3: "), "{events}");
    let targets: Vec<f64> = rounds
        .iter()
        .map(|r| r["target_sparsity"].as_f64().unwrap())
        .collect();
    assert!(
        targets[0] < targets[1] && targets[1] < targets[2],
        "{targets:?}"
    );
    assert!((targets[2] - 0.9).abs() < 1e-9);
    // The retraining kept every pruned weight at exactly zero: the final sparsity is the target.
    for r in rounds {
        let s = r["sparsity"].as_f64().unwrap();
        assert!(
            (s - r["target_sparsity"].as_f64().unwrap()).abs() < 0.01,
            "{r}"
        );
        assert!(r["accuracy_after_retraining"].as_f64().is_some(), "{r}");
    }
    assert_eq!(step["epochs"].as_array().unwrap().len(), 6);
    let out = output(&t, &job).await;
    let st = safetensors::SafeTensors::deserialize(&out).unwrap();
    let w = f32s(&st, "fc1.weight");
    let zeros = w.iter().filter(|v| **v == 0.0).count();
    assert_eq!(zeros, (64.0f64 * 64.0 * 0.9).round() as usize);
    let before = m["baseline"]["accuracy"].as_f64().unwrap();
    let after = m["final"]["accuracy"].as_f64().unwrap();
    assert!(
        after > before - 0.05,
        "90% sparse after retraining: {before} → {after}"
    );
}

#[tokio::test]
async fn splicing_brings_pruned_weights_back_and_ends_each_round_exactly_at_its_sparsity() {
    let t = TestApp::sqlite().await;
    let data = upload_dataset(&t, digits()).await;
    let model = trained(&t, mlp(64), &data, 4).await;
    let (job, m) = run(
        &t,
        json!({"model_id": model, "eval": {"dataset_id": data},
               "steps": [{"op": "prune", "sparsity": 0.9, "scope": "layer",
                          "schedule": {"kind": "polynomial", "iterations": 2, "power": 3,
                                       "finetune": train(&data, 2), "splicing": {"until": 0.5}}}]}),
    )
    .await;
    let step = &m["steps"][0];
    assert_eq!(
        step["summary"]["splicing"],
        json!({"until": 0.5, "margin": 0.1})
    );
    let rounds = step["summary"]["iterations"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    let mut recovered = 0;
    for r in rounds {
        // The mask moved during the first of the two epochs, then froze as an exact cut.
        assert_eq!(r["splicing"]["epochs"], 1, "{r}");
        recovered += r["splicing"]["recovered"].as_u64().unwrap();
        let s = r["sparsity"].as_f64().unwrap();
        assert!(
            (s - r["target_sparsity"].as_f64().unwrap()).abs() < 0.01,
            "{r}"
        );
    }
    assert!(recovered > 0, "no pruned weight came back: {rounds:?}");
    let out = output(&t, &job).await;
    let st = safetensors::SafeTensors::deserialize(&out).unwrap();
    let w = f32s(&st, "fc1.weight");
    assert_eq!(
        w.iter().filter(|v| **v == 0.0).count(),
        (64.0f64 * 64.0 * 0.9).round() as usize
    );
    let before = m["baseline"]["accuracy"].as_f64().unwrap();
    let after = m["final"]["accuracy"].as_f64().unwrap();
    assert!(after > before - 0.05, "{before} → {after}");
    // The stored spec says what ran.
    let spec = t
        .get(&format!("/v1/jobs/{}", job["id"].as_str().unwrap()))
        .await
        .json();
    assert_eq!(
        spec["steps"][0]["schedule"]["splicing"]["margin"], 0.1,
        "{spec}"
    );
}

#[tokio::test]
async fn structured_pruning_shrinks_the_file_and_the_architecture() {
    let t = TestApp::sqlite().await;
    let data = upload_dataset(&t, digits()).await;
    let model = trained(&t, cnn(), &data, 3).await;
    let (job, m) = run(
        &t,
        json!({"model_id": model, "eval": {"dataset_id": data},
               "steps": [{"op": "prune", "method": "structured", "sparsity": 0.5, "norm": 1,
                          "include": ["conv*.weight"]},
                         {"op": "finetune", "dataset_id": data, "epochs": 2, "batch_size": 32,
                          "optimizer": {"name": "adamw", "lr": 0.005, "weight_decay": 0.0}}]}),
    )
    .await;
    let out_id = job["result"]["model_id"].as_str().unwrap();
    let out_model = t.get(&format!("/v1/models/{out_id}")).await.json();
    let layers = &out_model["architecture"]["layers"];
    assert_eq!(layers[0]["out_channels"], 4);
    assert_eq!(layers[1]["num_features"], 4);
    assert_eq!(layers[4]["in_channels"], 4);
    assert_eq!(layers[4]["out_channels"], 8);
    assert_eq!(layers[8]["in_features"], 32);
    let out = t.get(&format!("/v1/models/{out_id}/content")).await.body;
    let st = safetensors::SafeTensors::deserialize(&out).unwrap();
    assert_eq!(st.tensor("conv1.weight").unwrap().shape(), &[4, 1, 3, 3]);
    assert_eq!(st.tensor("bn1.running_var").unwrap().shape(), &[4]);
    assert_eq!(st.tensor("conv2.weight").unwrap().shape(), &[8, 4, 3, 3]);
    assert_eq!(st.tensor("fc.weight").unwrap().shape(), &[10, 32]);
    let s = &m["steps"][0]["summary"];
    assert!(
        s["tensor_bytes_after"].as_u64().unwrap()
            < s["tensor_bytes_before"].as_u64().unwrap() * 6 / 10
    );
    assert!(s["flops_after"].as_u64().unwrap() < s["flops_before"].as_u64().unwrap() * 6 / 10);
    assert!(
        m["final"]["accuracy"].as_f64().unwrap() > 0.8,
        "{}",
        m["final"]
    );
}

#[tokio::test]
async fn uniform_int8_packed_codes_follow_the_standard_formula() {
    let t = TestApp::sqlite().await;
    let model = t.upload_model(wide_model()).await;
    let mid = model["id"].as_str().unwrap();
    let (job, m) = run(
        &t,
        json!({"model_id": mid, "steps": [{"op": "quantize", "method": "uniform", "bits": 8,
               "symmetric": true, "granularity": "per_channel", "format": "packed"}]}),
    )
    .await;
    let original = wide_model();
    let src = safetensors::SafeTensors::deserialize(&original).unwrap();
    let dense = output(&t, &job).await;
    let deq = safetensors::SafeTensors::deserialize(&dense).unwrap();
    let packed = content(&t, &job, "packed").await;
    let pk = safetensors::SafeTensors::deserialize(&packed).unwrap();
    for (name, rows, cols) in [("a.weight", 16usize, 32usize), ("b.weight", 8, 16)] {
        let w = f32s(&src, name);
        let d = f32s(&deq, name);
        let scales = f32s(&pk, &format!("{name}.qscale"));
        assert_eq!(scales.len(), rows);
        let codes = pk
            .tensor(&format!("{name}.qcodes"))
            .unwrap()
            .data()
            .to_vec();
        assert_eq!(codes.len(), rows * cols);
        for r in 0..rows {
            let row = &w[r * cols..(r + 1) * cols];
            let amax = row.iter().fold(0f32, |a, v| a.max(v.abs()));
            let scale = amax / 127.0;
            assert!((scales[r] - scale).abs() <= scale * 1e-6, "{name} row {r}");
            for c in 0..cols {
                let q = (row[c] / scales[r]).round().clamp(-127.0, 127.0);
                // Codes are stored offset by 128.
                assert_eq!(
                    codes[r * cols + c] as i32 - 128,
                    q as i32,
                    "{name}[{r},{c}]"
                );
                assert_eq!(d[r * cols + c], q * scales[r]);
            }
        }
    }
    let (_, meta) = safetensors::SafeTensors::read_metadata(&packed).unwrap();
    assert!(meta
        .metadata()
        .as_ref()
        .unwrap()
        .contains_key("whittle.quantization"));
    let layer = &m["steps"][0]["layers"][0];
    assert!(layer["sqnr_db"].as_f64().unwrap() > 35.0, "{layer}");
    assert_eq!(layer["bits"], 8);
    assert_eq!(
        m["final"]["packed_size_bytes"].as_u64().unwrap(),
        packed.len() as u64
    );
}

#[tokio::test]
async fn kmeans_log2_and_nf4_use_their_codebooks() {
    let t = TestApp::sqlite().await;
    let model = t.upload_model(wide_model()).await;
    let mid = model["id"].as_str().unwrap();
    let distinct = |v: &[f32]| {
        let mut bits: Vec<u32> = v.iter().map(|x| x.to_bits()).collect();
        bits.sort_unstable();
        bits.dedup();
        bits.len()
    };
    let (job, m) = run(
        &t,
        json!({"model_id": mid, "steps": [{"op": "quantize", "method": "kmeans", "clusters": 4, "init": "linear"}]}),
    )
    .await;
    let out = output(&t, &job).await;
    let st = safetensors::SafeTensors::deserialize(&out).unwrap();
    assert!(distinct(&f32s(&st, "a.weight")) <= 4);
    assert!(m["steps"][0]["layers"][0]["mse"].as_f64().unwrap() > 0.0);

    let (job, _) = run(
        &t,
        json!({"model_id": mid, "steps": [{"op": "quantize", "method": "log2", "bits": 4}]}),
    )
    .await;
    let out = output(&t, &job).await;
    let st = safetensors::SafeTensors::deserialize(&out).unwrap();
    let w = f32s(&st, "a.weight");
    for row in w.chunks(32) {
        let amax = row.iter().fold(0f32, |a, v| a.max(v.abs()));
        for v in row.iter().filter(|v| **v != 0.0) {
            let e = (v.abs() / amax).log2();
            assert!(
                (e - e.round()).abs() < 1e-4,
                "{v} is not a power of two of {amax}"
            );
        }
    }

    let (job, _) = run(
        &t,
        json!({"model_id": mid, "steps": [{"op": "quantize", "method": "nf4", "group_size": 16}]}),
    )
    .await;
    let out = output(&t, &job).await;
    let st = safetensors::SafeTensors::deserialize(&out).unwrap();
    for group in f32s(&st, "a.weight").chunks(16) {
        assert!(distinct(group) <= 16);
    }
}

#[tokio::test]
async fn gguf_output_is_a_gguf_file_with_our_provenance() {
    let t = TestApp::sqlite().await;
    let data = upload_dataset(&t, digits()).await;
    let model = trained(&t, mlp(64), &data, 2).await;
    let (job, m) = run(
        &t,
        json!({"model_id": model, "eval": {"dataset_id": data},
               "steps": [{"op": "quantize", "method": "gguf", "type": "q8_0"}]}),
    )
    .await;
    let gguf = content(&t, &job, "gguf").await;
    assert_eq!(&gguf[..4], b"GGUF");
    let mut cursor = std::io::Cursor::new(&gguf);
    let content = candle_core::quantized::gguf_file::Content::read(&mut cursor).unwrap();
    assert!(content.metadata.contains_key("whittle.job"));
    assert!(content.metadata.contains_key("whittle.architecture"));
    let info = &content.tensor_infos["fc1.weight"];
    assert_eq!(info.ggml_dtype, candle_core::quantized::GgmlDType::Q8_0);
    let drop =
        m["baseline"]["accuracy"].as_f64().unwrap() - m["final"]["accuracy"].as_f64().unwrap();
    assert!(drop.abs() < 0.01, "q8_0 costs almost nothing: {drop}");

    // Rows of 64 do not split into 256-value k-quant blocks: like llama-quantize, q4_k falls
    // back to q5_0 for those tensors, and the summary says which.
    let job = t
        .submit(json!({"model_id": model, "steps": [{"op": "quantize", "method": "gguf", "type": "q4_k"}]}))
        .await;
    let (_, state) = t.run_one().await.unwrap();
    assert_eq!(state, JobState::Succeeded);
    let id = job["id"].as_str().unwrap();
    let m = t.get(&format!("/v1/jobs/{id}/metrics")).await.json();
    let fallbacks = m["steps"][0]["summary"]["fallbacks"]
        .as_array()
        .unwrap()
        .clone();
    assert!(!fallbacks.is_empty(), "{m}");
    assert!(
        fallbacks.iter().all(|f| f["type"] == "q5_0"),
        "{fallbacks:?}"
    );
    let layer = m["steps"][0]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["tensor"] == fallbacks[0]["tensor"])
        .unwrap()
        .clone();
    assert!(
        layer["note"].as_str().unwrap().contains("fallback"),
        "{layer}"
    );
}

/// Canonical Huffman decoding as the README documents it (written again here, apart from
/// the server's decoder): `n` symbols from MSB-first `bytes` under per-symbol `lengths`.
fn huffman_decode(bytes: &[u8], lengths: &[u8], n: usize) -> Vec<u8> {
    let mut symbols: Vec<(u8, usize)> = lengths
        .iter()
        .enumerate()
        .filter(|(_, l)| **l > 0)
        .map(|(s, l)| (*l, s))
        .collect();
    symbols.sort();
    // (length, code) → symbol, codes consecutive within a length, shifted left between.
    let mut table = std::collections::HashMap::new();
    let (mut code, mut len) = (0u32, 0u8);
    for (l, s) in symbols {
        code <<= l - len;
        len = l;
        table.insert((l, code), s as u8);
        code += 1;
    }
    let (mut out, mut bit) = (Vec::new(), 0usize);
    while out.len() < n {
        let (mut c, mut l) = (0u32, 0u8);
        loop {
            c = c << 1 | u32::from(bytes[bit / 8] >> (7 - bit % 8) & 1);
            bit += 1;
            l += 1;
            if let Some(s) = table.get(&(l, c)) {
                out.push(*s);
                break;
            }
        }
    }
    assert_eq!(bit.div_ceil(8), bytes.len(), "trailing bytes");
    out
}

#[tokio::test]
async fn huffman_entropy_coding_shrinks_a_pruned_shared_model_and_decodes_to_its_output() {
    let t = TestApp::sqlite().await;
    let data = upload_dataset(&t, digits()).await;
    let model = trained(&t, mlp(64), &data, 2).await;
    let steps = |entropy: &str| {
        json!([{"op": "prune", "sparsity": 0.85},
               {"op": "quantize", "method": "kmeans", "clusters": 16, "format": "packed",
                "entropy": entropy}])
    };
    let (fixed_job, fixed) = run(
        &t,
        json!({"model_id": model, "seed": 3, "steps": steps("none")}),
    )
    .await;
    let (job, m) = run(
        &t,
        json!({"model_id": model, "seed": 3, "steps": steps("huffman")}),
    )
    .await;
    let step = &m["steps"][1];
    assert_eq!(job["steps"][1]["entropy"], "huffman", "{job}");
    let stages = &step["summary"]["stages"];
    let fixed_stages = &fixed["steps"][1]["summary"]["stages"];
    // The fixed-width sizes are the `none` job's, and Huffman coding stores fewer bytes.
    assert_eq!(
        stages["weights_quantized_bytes"],
        fixed_stages["weights_stored_bytes"]
    );
    assert_eq!(fixed_stages["entropy_ratio"].as_f64(), Some(1.0));
    let entropy = stages["entropy_ratio"].as_f64().unwrap();
    assert!(entropy > 1.0, "{stages}");
    let ratio = stages["weights_ratio"].as_f64().unwrap();
    let q = stages["quantization_ratio"].as_f64().unwrap();
    assert!((ratio - q * entropy).abs() < 1e-9 * ratio, "{stages}");
    // The tensors' bytes in the files (their JSON headers differ in ways unrelated to coding).
    let data_bytes = |bytes: &[u8]| {
        let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
        st.tensors()
            .iter()
            .map(|(_, v)| v.data().len())
            .sum::<usize>()
    };
    let stored = stages["weights_stored_bytes"].as_u64().unwrap() as usize;
    let fixed_packed = content(&t, &fixed_job, "packed").await;
    let biases =
        data_bytes(&fixed_packed) - fixed_stages["weights_stored_bytes"].as_u64().unwrap() as usize;
    assert_eq!(
        data_bytes(&content(&t, &job, "packed").await),
        stored + biases
    );
    let layer = &step["layers"][0];
    assert!(
        layer["entropy"]["code_bits_huffman"].as_f64()
            < layer["entropy"]["code_bits_fixed"].as_f64(),
        "{layer}"
    );
    // Decoded by the README's rules, the artifact is the output model bit for bit.
    let packed = content(&t, &job, "packed").await;
    let st = safetensors::SafeTensors::deserialize(&packed).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&packed).unwrap();
    let meta: Value =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["whittle.quantization"]).unwrap();
    assert_eq!(meta["version"], 3);
    let out = output(&t, &job).await;
    let out = safetensors::SafeTensors::deserialize(&out).unwrap();
    for (name, tm) in meta["tensors"].as_object().unwrap() {
        assert_eq!(tm["entropy"], "huffman", "{tm}");
        let bytes = |key: &str| {
            st.tensor(tm[key].as_str().unwrap())
                .unwrap()
                .data()
                .to_vec()
        };
        let numel: usize = tm["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .product();
        let nonzero = tm["nonzero"].as_u64().map(|n| n as usize);
        let codes = huffman_decode(
            &bytes("codes"),
            &bytes("code_lengths"),
            nonzero.unwrap_or(numel),
        );
        let codebook: Vec<f32> = bytes("codebook")
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let mut values = vec![0f32; numel];
        match (tm["index"].as_str(), nonzero) {
            (Some(_), Some(_)) => {
                let bits = tm["index_bits"].as_u64().unwrap() as u32;
                let entries = tm["index_entries"].as_u64().unwrap() as usize;
                let gaps = match tm["index_lengths"].as_str() {
                    Some(_) => huffman_decode(&bytes("index"), &bytes("index_lengths"), entries),
                    None => {
                        // Fixed-width entries, LSB-first.
                        let b = bytes("index");
                        (0..entries)
                            .map(|i| {
                                (0..bits).fold(0u8, |g, k| {
                                    let at = i * bits as usize + k as usize;
                                    g | (b[at / 8] >> (at % 8) & 1) << k
                                })
                            })
                            .collect()
                    }
                };
                let full = (1usize << bits) - 1;
                let (mut p, mut next) = (0usize, codes.iter());
                for g in gaps {
                    p += g as usize;
                    if g as usize == full {
                        continue;
                    }
                    values[p] = codebook[*next.next().unwrap() as usize];
                    p += 1;
                }
            }
            (None, None) => {
                for (v, c) in values.iter_mut().zip(&codes) {
                    *v = codebook[*c as usize];
                }
            }
            other => panic!("{name}: {other:?} (mask) not expected at 85% zeros"),
        }
        let want = f32s(&out, name);
        let a: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
        let b: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
        assert_eq!(a, b, "{name}");
    }
}

#[tokio::test]
async fn quantization_requests_are_checked_before_anything_is_queued() {
    let t = TestApp::sqlite().await;
    let plain = t.upload_model(wide_model()).await;
    let pid = plain["id"].as_str().unwrap();
    let cases = [
        (
            json!({"model_id": pid, "steps": [{"op": "quantize", "method": "uniform", "bits": 9}]}),
            "/steps/0/bits",
            "validation_failed",
        ),
        (
            json!({"model_id": pid, "steps": [{"op": "quantize", "method": "uniform", "bits": 1}]}),
            "/steps/0/bits",
            "validation_failed",
        ),
        (
            json!({"model_id": pid, "steps": [{"op": "quantize", "method": "uniform", "granularity": "per_group", "group_size": 12}]}),
            "/steps/0/group_size",
            "validation_failed",
        ),
        (
            json!({"model_id": pid, "steps": [{"op": "quantize", "method": "kmeans", "clusters": 256}]}),
            "/steps/0/clusters",
            "validation_failed",
        ),
        (
            json!({"model_id": pid, "steps": [{"op": "quantize", "method": "kmeans", "entropy": "huffman"}]}),
            "/steps/0/entropy",
            "validation_failed",
        ),
        (
            json!({"model_id": pid, "steps": [{"op": "quantize", "method": "uniform", "format": "packed", "entropy": "zstd"}]}),
            "/steps/0/entropy",
            "validation_failed",
        ),
        (
            json!({"model_id": pid, "steps": [{"op": "quantize", "method": "float", "dtype": "f16", "entropy": "huffman"}]}),
            "/steps/0/entropy",
            "validation_failed",
        ),
        (
            json!({"model_id": pid, "steps": [{"op": "quantize", "method": "gguf", "type": "q4_k"}]}),
            "/steps/0/type",
            "validation_failed",
        ),
        (
            json!({"model_id": pid, "steps": [{"op": "quantize", "method": "uniform", "activations": {"bits": 9, "calibration": {"dataset_id": "0190d4a0-0000-7000-8000-000000000000"}}}]}),
            "/steps/0/activations/bits",
            "validation_failed",
        ),
        (
            json!({"model_id": pid, "steps": [{"op": "quantize", "method": "gguf", "type": "q8_0", "activations": {"calibration": {}}}]}),
            "/steps/0/activations",
            "validation_failed",
        ),
        (
            json!({"model_id": pid, "steps": [{"op": "quantize", "method": "uniform", "max_accuracy_drop": 0.01}]}),
            "/steps/0/op",
            "architecture_required",
        ),
        (
            json!({"model_id": pid, "steps": [{"op": "quantize", "method": "uniform", "format": "gguf"}]}),
            "/steps/0/format",
            "validation_failed",
        ),
        (
            json!({"model_id": pid, "steps": [{"op": "quantize", "method": "uniform", "format": "packed"}, {"op": "quantize", "method": "float", "dtype": "f16"}]}),
            "/steps/0/format",
            "validation_failed",
        ),
    ];
    assert_job_refusals(&t, cases).await;
}

/// `a.weight`'s 32 columns: the first 8 matter (weight 1), the rest hardly (1e-4).
fn importance_file(len_a: usize) -> Vec<u8> {
    let w: Vec<f32> = (0..len_a).map(|j| if j < 8 { 1.0 } else { 1e-4 }).collect();
    tensors::serialize(
        &BTreeMap::new(),
        &[(
            TensorSpec::new("a.weight", Dtype::F32, vec![len_a]),
            tensors::encode_f32(&w).as_slice(),
        )],
    )
    .unwrap()
}

#[tokio::test]
async fn importance_weights_steer_the_clipping_search_toward_the_columns_that_matter() {
    let t = TestApp::sqlite().await;
    let model = t.upload_model(wide_model()).await;
    let mid = model["id"].as_str().unwrap();
    let imp = t.upload_model(importance_file(32)).await;
    let iid = imp["id"].as_str().unwrap();
    let with = |extra: Value| {
        let mut s = json!({"op": "quantize", "method": "uniform", "bits": 3,
                           "granularity": "per_group", "group_size": 16});
        for (k, v) in extra.as_object().unwrap() {
            s[k] = v.clone();
        }
        json!({"model_id": mid, "steps": [s]})
    };
    let (plain, _) = run(&t, with(json!({"search": true}))).await;
    let (job, metrics) = run(&t, with(json!({"importance": {"model_id": iid}}))).await;
    // `importance` turns the search on, is echoed, and says which tensors it weighted.
    let summary = &metrics["steps"][0]["summary"];
    assert_eq!(summary["importance"]["model_id"], iid, "{summary}");
    assert_eq!(summary["importance"]["weighted"], json!(["a.weight"]));
    assert_eq!(summary["importance"]["unweighted"], json!(["b.weight"]));
    assert_eq!(job["steps"][0]["search"], true, "{job}");
    assert_eq!(job["steps"][0]["importance"]["model_id"], iid);
    let original = wide_model();
    let original = f32s(
        &safetensors::SafeTensors::deserialize(&original).unwrap(),
        "a.weight",
    );
    let mut outputs = Vec::new();
    for j in [&plain, &job] {
        let bytes = output(&t, j).await;
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        outputs.push((f32s(&st, "a.weight"), f32s(&st, "b.weight")));
    }
    let err = |a: &[f32], cols: std::ops::Range<usize>| -> f64 {
        (0..16)
            .flat_map(|r| cols.clone().map(move |c| r * 32 + c))
            .map(|i| f64::from(a[i] - original[i]).powi(2))
            .sum()
    };
    let (plain_a, weighted_a) = (&outputs[0].0, &outputs[1].0);
    // The important columns come out closer, the others further, than with the plain search.
    let (p, w) = (err(plain_a, 0..8), err(weighted_a, 0..8));
    assert!(w < 0.95 * p, "important columns: {w} vs {p}");
    assert!(err(weighted_a, 8..32) > err(plain_a, 8..32));
    // A tensor the file does not name gets the plain search.
    assert_eq!(outputs[0].1, outputs[1].1);

    // Refused before anything is queued.
    let wrong = t.upload_model(importance_file(31)).await;
    let wid = wrong["id"].as_str().unwrap();
    let unknown = "0190d4a0-0000-7000-8000-000000000000";
    let iid = json!({"model_id": iid});
    assert_job_refusals(
        &t,
        [
            (with(json!({"importance": {"model_id": unknown}})), "/steps/0/importance/model_id", "model_not_found"),
            (with(json!({"importance": {"model_id": wid}})), "/steps/0/importance/model_id", "validation_failed"),
            (with(json!({"importance": iid, "search": false})), "/steps/0/search", "validation_failed"),
            (with(json!({"importance": {}})), "/steps/0/importance/model_id", "validation_failed"),
            (with(json!({"importance": iid, "include": ["b.weight"]})), "/steps/0/importance/model_id", "validation_failed"),
            (json!({"model_id": mid, "steps": [{"op": "quantize", "method": "nf4", "group_size": 16, "importance": iid}]}), "/steps/0/importance", "validation_failed"),
            (with(json!({"importance": {"model_id": iid, "samples": 10}})), "/steps/0/importance/samples", "validation_failed"),
            // Measuring needs an architecture to run.
            (with(json!({"importance": {"dataset_id": unknown}})), "/steps/0/importance/dataset_id", "dataset_not_found"),
        ],
    )
    .await;

    // Measured on the model: each layer's mean squared input over a seeded calibration draw.
    let data = upload_dataset(&t, digits()).await;
    let net = trained(&t, mlp(16), &data, 2).await;
    let step = |importance: Value| {
        json!({"model_id": net, "steps": [{"op": "quantize", "method": "uniform", "bits": 3,
               "importance": importance}]})
    };
    let (job, m) = run(&t, step(json!({"dataset_id": data, "samples": 100}))).await;
    let imp = &m["steps"][0]["summary"]["importance"];
    assert_eq!(imp["dataset_id"], data.as_str(), "{imp}");
    assert_eq!(imp["samples"], 100);
    assert_eq!(imp["indices"].as_array().unwrap().len(), 100);
    assert_eq!(imp["weighted"], json!(["fc1.weight", "fc2.weight"]));
    assert_eq!(imp["unweighted"], json!([]));
    assert_eq!(
        job["steps"][0]["importance"],
        json!({"dataset_id": data, "samples": 100})
    );
    assert_job_refusals(
        &t,
        [
            (
                with(json!({"importance": {"dataset_id": data}})),
                "/steps/0/op",
                "architecture_required",
            ),
            (
                step(json!({"dataset_id": data, "model_id": iid["model_id"]})),
                "/steps/0/importance",
                "validation_failed",
            ),
            (
                step(json!({"dataset_id": data, "samples": 0})),
                "/steps/0/importance/samples",
                "validation_failed",
            ),
        ],
    )
    .await;
}

#[tokio::test]
async fn an_accuracy_budget_reverts_the_most_sensitive_layers() {
    let t = TestApp::sqlite().await;
    let data = upload_dataset(&t, digits()).await;
    let model = trained(&t, mlp(64), &data, 4).await;
    let (_, m) = run(
        &t,
        json!({"model_id": model, "eval": {"dataset_id": data},
               "steps": [{"op": "quantize", "method": "uniform", "bits": 2, "granularity": "per_tensor",
                          "max_accuracy_drop": 0.01}]}),
    )
    .await;
    let reverted = &m["steps"][0]["reverted"];
    let all = reverted["all_quantized_accuracy"].as_f64().unwrap();
    let float = reverted["float_accuracy"].as_f64().unwrap();
    assert!(
        float - all > 0.01,
        "2-bit per-tensor must hurt: {float} → {all}"
    );
    assert!(
        !reverted["tensors"].as_array().unwrap().is_empty(),
        "{reverted}"
    );
    let final_acc = m["final"]["accuracy"].as_f64().unwrap();
    assert!(
        float - final_acc <= 0.01 + 1e-9,
        "{float} → {final_acc}: {reverted}"
    );
    assert_eq!(reverted["within_budget"], true);
}

#[tokio::test]
async fn quantization_aware_training_beats_post_training_quantization_at_low_bits() {
    let t = TestApp::sqlite().await;
    let data = upload_dataset(&t, digits()).await;
    let model = trained(&t, mlp(64), &data, 4).await;
    let quant =
        json!({"op": "quantize", "method": "uniform", "bits": 2, "granularity": "per_channel"});
    let (_, ptq) = run(
        &t,
        json!({"model_id": model, "eval": {"dataset_id": data}, "steps": [quant]}),
    )
    .await;
    let mut qat = quant.clone();
    qat["qat"] = train(&data, 3);
    let (job, m) = run(
        &t,
        json!({"model_id": model, "eval": {"dataset_id": data}, "steps": [qat]}),
    )
    .await;
    let ptq_acc = ptq["final"]["accuracy"].as_f64().unwrap();
    let qat_acc = m["final"]["accuracy"].as_f64().unwrap();
    assert!(qat_acc > ptq_acc, "QAT {qat_acc} vs PTQ {ptq_acc}");
    assert_eq!(m["steps"][0]["epochs"].as_array().unwrap().len(), 3);
    // The output holds at most 4 levels per output channel (2-bit codes).
    let out = output(&t, &job).await;
    let st = safetensors::SafeTensors::deserialize(&out).unwrap();
    for row in f32s(&st, "fc1.weight").chunks(64) {
        let mut bits: Vec<u32> = row.iter().map(|x| x.to_bits()).collect();
        bits.sort_unstable();
        bits.dedup();
        assert!(bits.len() <= 4, "{}", bits.len());
    }
}

#[tokio::test]
async fn kmeans_qat_fine_tunes_shared_centroids_and_keeps_pruned_weights_at_zero() {
    let t = TestApp::sqlite().await;
    let data = upload_dataset(&t, digits()).await;
    let model = trained(&t, mlp(64), &data, 4).await;
    let (job, _) = run(
        &t,
        json!({"model_id": model, "steps": [{"op": "prune", "sparsity": 0.8}]}),
    )
    .await;
    let pruned_id = job["result"]["model_id"].as_str().unwrap().to_string();
    let pruned = t.get(&format!("/v1/models/{pruned_id}/content")).await.body;
    let pruned = f32s(
        &safetensors::SafeTensors::deserialize(&pruned).unwrap(),
        "fc1.weight",
    );
    let quant = json!({"op": "quantize", "method": "kmeans", "clusters": 4, "format": "packed"});
    let (_, ptq) = run(
        &t,
        json!({"model_id": pruned_id, "eval": {"dataset_id": data}, "steps": [quant]}),
    )
    .await;
    let mut qat = quant.clone();
    qat["qat"] = train(&data, 3);
    let (job, m) = run(
        &t,
        json!({"model_id": pruned_id, "eval": {"dataset_id": data}, "steps": [qat]}),
    )
    .await;
    let step = &m["steps"][0];
    assert_eq!(step["qat"]["mode"], "shared_centroids", "{step}");
    assert_eq!(step["epochs"].as_array().unwrap().len(), 3);
    // Training kept every tensor on its shared values, so the final k-means is exact.
    for layer in step["layers"].as_array().unwrap() {
        assert_eq!(layer["mse"].as_f64(), Some(0.0), "{layer}");
    }
    let ptq_acc = ptq["final"]["accuracy"].as_f64().unwrap();
    let qat_acc = m["final"]["accuracy"].as_f64().unwrap();
    assert!(qat_acc > ptq_acc, "QAT {qat_acc} vs PTQ {ptq_acc}");
    // At most 4 values (one of them the pinned 0) and every pruned weight still 0.
    let out = output(&t, &job).await;
    let w = f32s(
        &safetensors::SafeTensors::deserialize(&out).unwrap(),
        "fc1.weight",
    );
    let mut levels: Vec<u32> = w.iter().map(|x| x.to_bits()).collect();
    levels.sort_unstable();
    levels.dedup();
    assert!(levels.len() <= 4 && levels.contains(&0), "{levels:?}");
    assert!(pruned.iter().zip(&w).all(|(p, q)| *p != 0.0 || *q == 0.0));
    // 80% zeros: the packed file locates the non-zeros by relative index, not a bitmask.
    let packed = content(&t, &job, "packed").await;
    let st = safetensors::SafeTensors::deserialize(&packed).unwrap();
    let names = st.names();
    assert!(names.contains(&"fc1.weight.qindex"), "{names:?}");
    assert!(!names.contains(&"fc1.weight.qmask"), "{names:?}");
}

#[tokio::test]
async fn augmentation_shifts_training_images_reproducibly_and_runs_the_teacher_live() {
    let t = TestApp::sqlite().await;
    let data = upload_dataset(&t, digits()).await;
    let model = fresh_model(&t, mlp(32), 3).await;
    let finetune = |augment: Option<Value>| {
        let mut s = train(&data, 2);
        s["op"] = json!("finetune");
        s["seed"] = json!(5);
        if let Some(a) = augment {
            s["augment"] = a;
        }
        json!({"model_id": model, "eval": {"dataset_id": data}, "steps": [s]})
    };
    let (a, ma) = run(&t, finetune(Some(json!({"translate": 1})))).await;
    let (b, _) = run(&t, finetune(Some(json!({"translate": 1})))).await;
    let (c, _) = run(&t, finetune(None)).await;
    assert_eq!(a["steps"][0]["augment"], json!({"translate": 1}), "{a}");
    assert!(c["steps"][0].get("augment").is_none(), "{c}");
    // Seeded: the same shifts twice; and not the unaugmented run.
    let weights = |bytes: Vec<u8>| {
        f32s(
            &safetensors::SafeTensors::deserialize(&bytes).unwrap(),
            "fc1.weight",
        )
    };
    let (wa, wb, wc) = (
        weights(output(&t, &a).await),
        weights(output(&t, &b).await),
        weights(output(&t, &c).await),
    );
    assert!(wa == wb, "the same seed gave different weights");
    assert!(wa != wc, "augmentation changed nothing");
    assert!(ma["final"]["accuracy"].as_f64().unwrap() > 0.5, "{ma}");

    // Distillation with augmentation runs the teacher on every (shifted) batch.
    let teacher = trained(&t, mlp(64), &data, 3).await;
    let mut step = train(&data, 1);
    step["op"] = json!("distill");
    step["student"] = json!({"architecture": mlp(16)});
    step["augment"] = json!({"translate": 2});
    step["baseline"] = json!(true);
    let (_, m) = run(&t, json!({"model_id": teacher, "steps": [step.clone()]})).await;
    let s = &m["steps"][0]["summary"];
    assert_eq!(s["teacher_cached"], false, "{s}");
    assert_eq!(
        s["baseline_epochs"].as_array().map(Vec::len),
        Some(1),
        "{s}"
    );
    step["augment"] = Value::Null;
    let (_, m) = run(&t, json!({"model_id": teacher, "steps": [step]})).await;
    assert_eq!(m["steps"][0]["summary"]["teacher_cached"], true);

    // Refused: flat samples, a shift as large as the image, unknown fields.
    let d = smartcore::dataset::digits::load_dataset();
    let x: Vec<f32> = d.data.iter().map(|v| *v / 16.0).collect();
    let y: Vec<i64> = d.target.iter().map(|v| *v as i64).collect();
    let flat = tensors::serialize(
        &BTreeMap::new(),
        &[
            (
                TensorSpec::new("x", Dtype::F32, vec![y.len(), 64]),
                tensors::encode_f32(&x).as_slice(),
            ),
            (
                TensorSpec::new("y", Dtype::I64, vec![y.len()]),
                tensors::encode_i64(&y).as_slice(),
            ),
        ],
    )
    .unwrap();
    let flat = upload_dataset(&t, flat).await;
    let linear = fresh_model(
        &t,
        json!({"kind": "sequential", "input_shape": [64], "layers": [
            {"type": "linear", "name": "fc", "in_features": 64, "out_features": 10}]}),
        1,
    )
    .await;
    let step = |dataset: &str, augment: Value| {
        let mut s = train(dataset, 1);
        s["op"] = json!("finetune");
        s["augment"] = augment;
        vec![s]
    };
    for (model, steps, pointer) in [
        (
            &linear,
            step(&flat, json!({"translate": 2})),
            "/steps/0/augment/translate",
        ),
        (
            &model,
            step(&data, json!({"translate": 8})),
            "/steps/0/augment/translate",
        ),
        (
            &model,
            step(&data, json!({"translate": 65})),
            "/steps/0/augment/translate",
        ),
        (
            &model,
            step(&data, json!({"rotate": 10})),
            "/steps/0/augment/rotate",
        ),
    ] {
        let r = t
            .post_json("/v1/jobs", &json!({"model_id": model, "steps": steps}))
            .await;
        assert_eq!(r.status, 422, "{}", r.text());
        let body = r.json();
        let pointers: Vec<&str> = body["errors"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["pointer"].as_str())
            .collect();
        assert!(pointers.contains(&pointer), "{body}");
    }
}

#[tokio::test]
async fn distillation_trains_a_smaller_student_and_reports_the_baseline() {
    let t = TestApp::sqlite().await;
    let data = upload_dataset(&t, digits()).await;
    let teacher = trained(&t, mlp(128), &data, 5).await;
    let teacher_bytes = t.get(&format!("/v1/models/{teacher}/content")).await.body;
    let mut step = train(&data, 4);
    step["op"] = json!("distill");
    step["student"] = json!({"architecture": mlp(16)});
    step["temperature"] = json!(4.0);
    step["alpha"] = json!(0.9);
    step["baseline"] = json!(true);
    step["validation"] = json!({"fraction": 0.2});
    let (job, m) = run(
        &t,
        json!({"model_id": teacher, "eval": {"dataset_id": data}, "steps": [step]}),
    )
    .await;
    let s = &m["steps"][0]["summary"];
    assert_eq!(s["teacher_cached"], true);
    assert!(s["parameter_ratio"].as_f64().unwrap() > 7.0, "{s}");
    let student = s["student_accuracy"].as_f64().unwrap();
    assert!(student > 0.85, "{s}");
    assert!(s["baseline_accuracy"].as_f64().unwrap() > 0.5, "{s}");
    assert!(s["agreement_with_teacher"].as_f64().unwrap() > 0.85, "{s}");
    assert_eq!(m["steps"][0]["epochs"].as_array().unwrap().len(), 4);
    // The output is the student (its architecture, its size); the teacher is untouched.
    let out_id = job["result"]["model_id"].as_str().unwrap();
    let out = t.get(&format!("/v1/models/{out_id}")).await.json();
    assert_eq!(out["architecture"]["layers"][1]["out_features"], 16);
    assert_eq!(out["parameters"], 64 * 16 + 16 + 16 * 10 + 10);
    assert_eq!(
        t.get(&format!("/v1/models/{teacher}/content")).await.body,
        teacher_bytes
    );
    assert!((m["final"]["accuracy"].as_f64().unwrap() - student).abs() < 1e-9);

    // Distillation composes: distill → quantize in one job, the quantize sees the student.
    let mut step2 = step.clone();
    step2["baseline"] = json!(false);
    step2["epochs"] = json!(2);
    let (job, _) = run(
        &t,
        json!({"model_id": teacher, "steps": [step2, {"op": "quantize", "method": "uniform", "bits": 8, "include": ["fc1.weight"]}]}),
    )
    .await;
    let out = t
        .get(&format!(
            "/v1/models/{}",
            job["result"]["model_id"].as_str().unwrap()
        ))
        .await
        .json();
    assert_eq!(out["parameters"], 64 * 16 + 16 + 16 * 10 + 10);

    // A pruned copy of the teacher retrained by distillation keeps its zeros.
    let (pruned, _) = run(
        &t,
        json!({"model_id": teacher, "steps": [{"op": "prune", "method": "magnitude", "sparsity": 0.8}]}),
    )
    .await;
    let pruned = pruned["result"]["model_id"].as_str().unwrap();
    let zeros_of = |bytes: &[u8]| -> Vec<Vec<bool>> {
        let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
        ["fc1.weight", "fc2.weight"]
            .iter()
            .map(|n| f32s(&st, n).iter().map(|v| *v == 0.0).collect())
            .collect()
    };
    let before = zeros_of(&t.get(&format!("/v1/models/{pruned}/content")).await.body);
    let mut step3 = train(&data, 2);
    step3["op"] = json!("distill");
    step3["student"] = json!({"model_id": pruned});
    step3["keep_sparsity"] = json!(true);
    step3["baseline"] = json!(true);
    let (job, m) = run(&t, json!({"model_id": teacher, "steps": [step3]})).await;
    let after = zeros_of(&output(&t, &job).await);
    let held: usize = before.iter().flatten().filter(|z| **z).count();
    assert!(held > 0);
    for (b, a) in before.iter().zip(&after) {
        for (i, (zb, za)) in b.iter().zip(a).enumerate() {
            assert!(!zb || *za, "weight {i} was pruned and came back");
        }
    }
    let s = &m["steps"][0]["summary"];
    assert_eq!(s["keep_sparsity"]["zero_weights_held"], held, "{s}");
    assert_eq!(job["steps"][0]["keep_sparsity"], true);
}

#[tokio::test]
async fn distillation_requests_are_checked_before_anything_is_queued() {
    let t = TestApp::sqlite().await;
    let data = upload_dataset(&t, digits()).await;
    let teacher = fresh_model(&t, mlp(32), 1).await;
    let plain = t.upload_model(wide_model()).await;
    let base = |extra: Value| {
        let mut s =
            json!({"op": "distill", "dataset_id": data, "student": {"architecture": mlp(8)}});
        for (k, v) in extra.as_object().unwrap() {
            s[k] = v.clone();
        }
        json!({"model_id": teacher, "steps": [s]})
    };
    let narrow = json!({"kind": "sequential", "input_shape": [1, 8, 8], "layers": [
        {"type": "flatten"}, {"type": "linear", "name": "fc1", "in_features": 64, "out_features": 5}]});
    let wrong_input = json!({"kind": "sequential", "input_shape": [32], "layers": [
        {"type": "linear", "name": "fc1", "in_features": 32, "out_features": 10}]});
    let cases = [
        (
            base(json!({"temperature": 0})),
            "/steps/0/temperature",
            "validation_failed",
        ),
        (
            base(json!({"alpha": 1.5})),
            "/steps/0/alpha",
            "validation_failed",
        ),
        (
            base(json!({"keep_sparsity": true})),
            "/steps/0/keep_sparsity",
            "validation_failed",
        ),
        (
            base(json!({"keep_sparsity": 1})),
            "/steps/0/keep_sparsity",
            "validation_failed",
        ),
        (
            base(json!({"student": {"architecture": narrow}})),
            "/steps/0/student",
            "validation_failed",
        ),
        (
            base(json!({"student": {"architecture": wrong_input}})),
            "/steps/0/student",
            "dataset_shape_mismatch",
        ),
        (
            base(json!({"features": [{"teacher": "fc9", "student": "fc1"}]})),
            "/steps/0/features/0/teacher",
            "validation_failed",
        ),
        (
            base(json!({"student": {"model_id": "0190d4a0-0000-7000-8000-000000000000"}})),
            "/steps/0/student/model_id",
            "model_not_found",
        ),
        (
            base(json!({"student": {"model_id": plain["id"]}})),
            "/steps/0/student/model_id",
            "architecture_required",
        ),
        (
            base(json!({"freeze": ["fc1.*"]})),
            "/steps/0/freeze",
            "validation_failed",
        ),
    ];
    assert_job_refusals(&t, cases).await;
}

#[tokio::test]
async fn activation_quantization_is_calibrated_recorded_and_simulated_by_later_evaluations() {
    let t = TestApp::sqlite().await;
    let data = upload_dataset(&t, digits()).await;
    let model = trained(&t, mlp(64), &data, 4).await;
    let step = |bits: u64, method: &str| {
        json!({"op": "quantize", "method": "uniform", "bits": 8,
               "activations": {"bits": bits, "calibration": {"dataset_id": data, "samples": 200, "method": method}}})
    };
    let (job, m8) = run(
        &t,
        json!({"model_id": model, "eval": {"dataset_id": data}, "steps": [step(8, "minmax")]}),
    )
    .await;
    let a = &m8["steps"][0]["activations"];
    assert_eq!(a["calibration"]["samples"], 200);
    assert_eq!(a["calibration"]["indices"].as_array().unwrap().len(), 200);
    let layers = a["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2, "{a}");
    assert_eq!(layers[1]["layer"], "fc2");
    assert_eq!(layers[1]["observed_min"], 0.0, "fc2's input follows a ReLU");
    let float = m8["baseline"]["accuracy"].as_f64().unwrap();
    let w8a8 = m8["final"]["accuracy"].as_f64().unwrap();
    assert!((float - w8a8).abs() < 0.01, "W8A8 {w8a8} vs float {float}");
    // The ranges travel in the file: a later job evaluating the output simulates them too.
    let out = job["result"]["model_id"].as_str().unwrap();
    let bytes = t.get(&format!("/v1/models/{out}/content")).await.body;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert!(meta
        .metadata()
        .as_ref()
        .unwrap()
        .contains_key("whittle.activations"));
    let (_, again) = run(
        &t,
        json!({"model_id": out, "steps": [{"op": "evaluate", "dataset_id": data}]}),
    )
    .await;
    assert_eq!(
        again["steps"][0]["summary"]["accuracy"].as_f64().unwrap(),
        w8a8
    );
    // 2-bit activations cost accuracy; MSE-calibrated ranges lose less than min/max.
    let (_, m2) = run(
        &t,
        json!({"model_id": model, "eval": {"dataset_id": data}, "steps": [step(2, "minmax")]}),
    )
    .await;
    let (_, m2mse) = run(
        &t,
        json!({"model_id": model, "eval": {"dataset_id": data}, "steps": [step(2, "mse")]}),
    )
    .await;
    let a2 = m2["final"]["accuracy"].as_f64().unwrap();
    let a2mse = m2mse["final"]["accuracy"].as_f64().unwrap();
    assert!(a2 < w8a8 - 0.01, "A2 {a2} vs A8 {w8a8}");
    assert!(a2mse >= a2, "mse {a2mse} vs minmax {a2}");
}

#[tokio::test]
async fn gradual_structured_pruning_reaches_the_target_unit_count() {
    let t = TestApp::sqlite().await;
    let data = upload_dataset(&t, digits()).await;
    let model = trained(&t, mlp(64), &data, 2).await;
    let mut finetune = train(&data, 1);
    finetune["validation"] = json!({"fraction": 0.2});
    let (job, m) = run(
        &t,
        json!({"model_id": model, "steps": [{"op": "prune", "method": "structured", "sparsity": 0.5,
               "include": ["fc1.weight"],
               "schedule": {"kind": "polynomial", "iterations": 3, "power": 1, "finetune": finetune}}]}),
    )
    .await;
    // 64 → 64·(1 − 0.5/3) → 64·(1 − 1/3) → 32 units, over three rounds of retraining.
    let rounds = m["steps"][0]["summary"]["iterations"].as_array().unwrap();
    let params: Vec<u64> = rounds
        .iter()
        .map(|r| r["parameters"].as_u64().unwrap())
        .collect();
    assert!(params[0] > params[1] && params[1] > params[2], "{params:?}");
    let out = t
        .get(&format!(
            "/v1/models/{}",
            job["result"]["model_id"].as_str().unwrap()
        ))
        .await
        .json();
    assert_eq!(out["architecture"]["layers"][1]["out_features"], 32);
    assert_eq!(out["architecture"]["layers"][3]["in_features"], 32);
}

/// The committed recipes (`examples/*.json`) are valid job specs: each model body creates a
/// model, and each job, with `${MODEL}`, `${TRAIN}`, `${TEST}` (and `${PRUNED}`) filled as
/// the README's `envsubst` does, passes a dry run against the model it is meant for.
#[tokio::test]
async fn example_recipes_are_valid_jobs() {
    let t = TestApp::sqlite().await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    // A few labelled 28×28 images stand in for MNIST.
    let n = 20;
    let x: Vec<f32> = (0..n * 784).map(|i| (i % 255) as f32 / 255.0).collect();
    let y: Vec<i64> = (0..n as i64).map(|i| i % 10).collect();
    let data = tensors::serialize(
        &BTreeMap::new(),
        &[
            (
                TensorSpec::new("x", Dtype::F32, vec![n, 1, 28, 28]),
                tensors::encode_f32(&x).as_slice(),
            ),
            (
                TensorSpec::new("y", Dtype::I64, vec![n]),
                tensors::encode_i64(&y).as_slice(),
            ),
        ],
    )
    .unwrap();
    let data = upload_dataset(&t, data).await;
    let mut models = BTreeMap::new();
    for body in ["lenet300_model.json", "hinton_teacher_model.json"] {
        let r = t
            .post_json("/v1/models", &serde_json::from_str(&read(body)).unwrap())
            .await;
        assert_eq!(r.status, 201, "{body}: {}", r.text());
        models.insert(body, r.json()["id"].as_str().unwrap().to_string());
    }
    for (job, model) in [
        ("lenet300_dense.json", "lenet300_model.json"),
        ("lenet300_dense_jitter.json", "lenet300_model.json"),
        ("han_lenet300.json", "lenet300_model.json"),
        ("prune_lenet300_57x.json", "lenet300_model.json"),
        ("deep_compression_lenet300.json", "lenet300_model.json"),
        (
            "deep_compression_lenet300_prune.json",
            "lenet300_model.json",
        ),
        (
            "deep_compression_lenet300_distill.json",
            "lenet300_model.json",
        ),
        ("deep_compression_lenet300_57x.json", "lenet300_model.json"),
        ("hinton_teacher.json", "hinton_teacher_model.json"),
        ("hinton_student.json", "hinton_teacher_model.json"),
    ] {
        // `${PRUNED}`: the prune job's output, a LeNet-300-100 like the dense one.
        let text = read(job)
            .replace("${MODEL}", &models[model])
            .replace("${PRUNED}", &models["lenet300_model.json"])
            .replace("${TRAIN}", &data)
            .replace("${TEST}", &data);
        let body: Value = serde_json::from_str(&text).unwrap();
        let r = t.post_json("/v1/jobs?dry_run=true", &body).await;
        assert_eq!(r.status, 200, "{job}: {}", r.text());
    }
    let listed = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(listed, 12, "a new example needs a place in this test");
}
