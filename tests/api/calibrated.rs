//! Calibration-based compression through the service: GPTQ, Wanda and SparseGPT on a
//! sequential network (digits) and on the tiny llama folder (text), each layer's output error
//! against its calibration-free baseline, the grids and sparsity patterns of the weights
//! written, and the refusals.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::compression::{digits, f32s, mlp, output, run, trained};
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
            (gptq(json!({"format": "packed"})), "/steps/0/format", "unsupported_operation"),
            (gptq(json!({"sparsity": 0.5})), "/steps/0/sparsity", "validation_failed"),
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

    // A tensor dataset does not calibrate a llama.
    let tensors = upload_dataset(&t, digits()).await;
    assert_job_refusals(
        &t,
        [(
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
);
