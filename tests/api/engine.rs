//! The model engine through the API on real data (scikit-learn's digits, via smartcore):
//! training from scratch, transfer learning (frozen body, new head), evaluation,
//! and a rescued training job that resumes from its checkpoint.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use whittle::compress::formats::safetensors::{self as tensors, Dtype, TensorSpec};
use whittle::db::jobs::JobState;
use whittle::ids::JobId;

use crate::helpers::*;

/// The 1,797 digits (8×8, values 0–16) as a safetensors dataset; `keep` filters by label.
fn digits(keep: impl Fn(i64) -> bool) -> Vec<u8> {
    let d = smartcore::dataset::digits::load_dataset();
    let mut x = Vec::new();
    let mut y = Vec::new();
    for (i, label) in d.target.iter().enumerate() {
        let label = *label as i64;
        if keep(label) {
            x.extend(d.data[i * 64..(i + 1) * 64].iter().map(|v| *v / 16.0));
            y.push(label);
        }
    }
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

fn mlp(classes: usize) -> Value {
    json!({"kind": "sequential", "input_shape": [1, 8, 8], "layers": [
        {"type": "flatten"},
        {"type": "linear", "name": "fc1", "in_features": 64, "out_features": 64},
        {"type": "relu"},
        {"type": "linear", "name": "fc2", "in_features": 64, "out_features": classes}]})
}

fn train_step(dataset: &str, epochs: usize) -> Value {
    json!({"op": "finetune", "dataset_id": dataset, "epochs": epochs, "batch_size": 32,
           "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.0},
           "validation": {"fraction": 0.2}})
}

#[tokio::test]
async fn training_from_scratch_on_digits_with_eval_before_and_after() {
    let t = TestApp::sqlite().await;
    let data = upload_dataset(&t, digits(|_| true)).await;
    let model = fresh_model(&t, mlp(10), 1).await;
    let job = t
        .submit(json!({"model_id": model, "steps": [train_step(&data, 4)],
                       "eval": {"dataset_id": data, "batch_size": 512}, "seed": 7}))
        .await;
    let (_, state) = t.run_one().await.unwrap();
    let id = job["id"].as_str().unwrap();
    let body = t.get(&format!("/v1/jobs/{id}")).await.json();
    assert_eq!(state, JobState::Succeeded, "{body}");
    let m = t.get(&format!("/v1/jobs/{id}/metrics")).await.json();
    let before = m["baseline"]["accuracy"].as_f64().unwrap();
    let after = m["final"]["accuracy"].as_f64().unwrap();
    assert!(before < 0.3, "an untrained model guesses: {before}");
    assert!(after > 0.93, "trained: {after}");
    let epochs = m["steps"][0]["epochs"].as_array().unwrap();
    assert_eq!(epochs.len(), 4);
    assert!(
        epochs[3]["val_accuracy"].as_f64().unwrap() > 0.9,
        "{epochs:?}"
    );
    assert!(epochs[3]["train_loss"].as_f64().unwrap() < epochs[0]["train_loss"].as_f64().unwrap());
    assert_eq!(
        m["final"]["per_class_accuracy"].as_array().unwrap().len(),
        10
    );
    assert!(m["final"]["top5_accuracy"].as_f64().unwrap() >= after);
    let agreement = m["final"]["agreement_with_baseline"].as_f64().unwrap();
    assert!(
        (0.0..0.5).contains(&agreement),
        "the trained model disagrees with the random one: {agreement}"
    );
    // Per-epoch figures were streamed as `metrics` events.
    let events = t.get(&format!("/v1/jobs/{id}/events")).await.text();
    assert_eq!(
        events.matches("event: metrics").count(),
        4 + 1,
        "4 epochs and the final document"
    );
}

#[tokio::test]
async fn transfer_learning_freezes_the_body_and_trains_a_new_head() {
    let t = TestApp::sqlite().await;
    // Pre-train on digits 0–4; transfer to 5–9 (labels shifted to 0–4) with 100 samples.
    let source = upload_dataset(&t, digits(|l| l < 5)).await;
    let model = fresh_model(&t, mlp(5), 2).await;
    t.submit(json!({"model_id": model, "steps": [train_step(&source, 5)]}))
        .await;
    assert_eq!(t.run_one().await.unwrap().1, JobState::Succeeded);
    let jobs = t.get("/v1/jobs?state=succeeded").await.json();
    let pretrained = jobs["items"][0]["result"]["model_id"]
        .as_str()
        .unwrap()
        .to_string();

    let d = smartcore::dataset::digits::load_dataset();
    let pick = |start: usize, count: usize| -> Vec<u8> {
        let idx: Vec<usize> = (0..d.target.len())
            .filter(|&i| d.target[i] >= 5.0)
            .skip(start)
            .take(count)
            .collect();
        let x: Vec<f32> = idx
            .iter()
            .flat_map(|&i| d.data[i * 64..(i + 1) * 64].iter().map(|v| *v / 16.0))
            .collect();
        let y: Vec<i64> = idx.iter().map(|&i| d.target[i] as i64 - 5).collect();
        tensors::serialize(
            &BTreeMap::new(),
            &[
                (
                    TensorSpec::new("x", Dtype::F32, vec![idx.len(), 64]),
                    tensors::encode_f32(&x).as_slice(),
                ),
                (
                    TensorSpec::new("y", Dtype::I64, vec![idx.len()]),
                    tensors::encode_i64(&y).as_slice(),
                ),
            ],
        )
        .unwrap()
    };
    let small = upload_dataset(&t, pick(0, 100)).await;
    let test = upload_dataset(&t, pick(100, 700)).await;
    let finetune = |model: &str, freeze: Value| {
        json!({"model_id": model, "eval": {"dataset_id": test},
               "steps": [{"op": "finetune", "dataset_id": small, "epochs": 30, "batch_size": 20,
                          "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.0},
                          "freeze": freeze, "head": {"layer": "fc2", "num_classes": 5}}]})
    };
    let transfer = t.submit(finetune(&pretrained, json!(["fc1.*"]))).await;
    assert_eq!(t.run_one().await.unwrap().1, JobState::Succeeded);
    // Only the head trained (64·5 + 5 parameters) and it learned the new classes.
    let m = t
        .get(&format!(
            "/v1/jobs/{}/metrics",
            transfer["id"].as_str().unwrap()
        ))
        .await
        .json();
    assert_eq!(m["steps"][0]["summary"]["trainable_parameters"], 64 * 5 + 5);
    let accuracy = m["final"]["accuracy"].as_f64().unwrap();
    assert!(
        accuracy > 0.6,
        "the new head learned digits 5–9 from 100 samples: {accuracy}"
    );

    // The frozen body is bit-identical in the output; the head has the new width.
    let job = t
        .get(&format!("/v1/jobs/{}", transfer["id"].as_str().unwrap()))
        .await
        .json();
    let out = job["result"]["model_id"].as_str().unwrap();
    let out_bytes = t.get(&format!("/v1/models/{out}/content")).await.body;
    let in_bytes = t
        .get(&format!("/v1/models/{pretrained}/content"))
        .await
        .body;
    let (a, b) = (
        safetensors::SafeTensors::deserialize(&out_bytes).unwrap(),
        safetensors::SafeTensors::deserialize(&in_bytes).unwrap(),
    );
    assert_eq!(
        a.tensor("fc1.weight").unwrap().data(),
        b.tensor("fc1.weight").unwrap().data()
    );
    assert_eq!(a.tensor("fc2.weight").unwrap().shape(), &[5, 64]);
    let out_model = t.get(&format!("/v1/models/{out}")).await.json();
    assert_eq!(out_model["architecture"]["layers"][3]["out_features"], 5);
}

#[tokio::test]
async fn engine_specs_are_checked_against_the_model_and_the_data() {
    let t = TestApp::sqlite().await;
    let data = upload_dataset(&t, digits(|_| true)).await;
    let model = fresh_model(&t, mlp(10), 1).await;
    let narrow = fresh_model(&t, mlp(5), 1).await;
    let weights_only = t.upload_model(tiny_model()).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let cases = [
        (
            json!({"model_id": weights_only, "steps": [train_step(&data, 1)]}),
            "/steps/0/op",
            "architecture_required",
        ),
        (
            json!({"model_id": model, "steps": [train_step("0190d4a0-0000-7000-8000-000000000000", 1)]}),
            "/steps/0/dataset_id",
            "dataset_not_found",
        ),
        (
            json!({"model_id": narrow, "steps": [train_step(&data, 1)]}),
            "/steps/0/dataset_id",
            "labels_out_of_range",
        ),
        (
            json!({"model_id": model, "steps": [{"op": "finetune", "dataset_id": data, "optimizer": {"lr": -1}}]}),
            "/steps/0/optimizer/lr",
            "validation_failed",
        ),
        (
            json!({"model_id": model, "steps": [{"op": "finetune", "dataset_id": data, "freeze": ["conv*"]}]}),
            "/steps/0/freeze/0",
            "validation_failed",
        ),
        (
            json!({"model_id": model, "steps": [{"op": "finetune", "dataset_id": data, "head": {"layer": "fc9", "num_classes": 10}}]}),
            "/steps/0/head/layer",
            "validation_failed",
        ),
        (
            json!({"model_id": model, "steps": [{"op": "finetune", "dataset_id": data, "early_stopping": {"patience": 2}}]}),
            "/steps/0/early_stopping",
            "validation_failed",
        ),
        (
            json!({"model_id": model, "steps": [{"op": "evaluate", "dataset_id": data}], "eval": {"dataset_id": "nope"}}),
            "/eval/dataset_id",
            "validation_failed",
        ),
    ];
    assert_job_refusals(&t, cases).await;
    // A dataset whose samples do not fit the model input.
    let wrong = tensors::serialize(
        &BTreeMap::new(),
        &[
            (
                TensorSpec::new("x", Dtype::F32, vec![2, 3]),
                tensors::encode_f32(&[0.0; 6]).as_slice(),
            ),
            (
                TensorSpec::new("y", Dtype::I64, vec![2]),
                tensors::encode_i64(&[0, 1]).as_slice(),
            ),
        ],
    )
    .unwrap();
    let wrong = upload_dataset(&t, wrong).await;
    t.post_json(
        "/v1/jobs",
        &json!({"model_id": model, "steps": [train_step(&wrong, 1)]}),
    )
    .await
    .assert_problem(422, "dataset_shape_mismatch");
}

/// An attempt that dies after its first epoch is rescued; the next attempt resumes from the
/// saved checkpoint and ends with exactly the weights of an uninterrupted run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescued_training_job_resumes_from_its_checkpoint_with_identical_results() {
    let t = TestApp::sqlite().await;
    let data = upload_dataset(&t, digits(|_| true)).await;
    let model = fresh_model(&t, mlp(10), 1).await;
    let spec = json!({"model_id": model, "steps": [train_step(&data, 3)], "seed": 5});

    let reference = t.submit(spec.clone()).await;
    assert_eq!(t.run_one().await.unwrap().1, JobState::Succeeded);
    let reference = t
        .get(&format!("/v1/jobs/{}", reference["id"].as_str().unwrap()))
        .await
        .json();
    let reference_out = t
        .get(&format!(
            "/v1/models/{}",
            reference["result"]["model_id"].as_str().unwrap()
        ))
        .await
        .json();

    let job = t.submit(spec).await;
    let id: JobId = job["id"].as_str().unwrap().parse().unwrap();
    // The first attempt dies after its first checkpoint; the second resumes from it.
    let second = t
        .kill_after_first_checkpoint(id, Duration::from_secs(120))
        .await;
    assert!(second.checkpoint.is_some());
    assert_eq!(
        t.app.worker("survivor").run_claimed(second).await.unwrap(),
        JobState::Succeeded
    );
    let row = t.get(&format!("/v1/jobs/{id}")).await.json();
    let out = t
        .get(&format!(
            "/v1/models/{}",
            row["result"]["model_id"].as_str().unwrap()
        ))
        .await
        .json();
    let logs = t.get(&format!("/v1/jobs/{id}/logs")).await.text();
    assert!(logs.contains("resuming step 1 after epoch"), "{logs}");
    let epochs =
        t.get(&format!("/v1/jobs/{id}/metrics")).await.json()["steps"][0]["epochs"].clone();
    assert_eq!(
        epochs.as_array().unwrap().len(),
        3,
        "history spans both attempts"
    );
    // Provenance names the job, so compare the weights, not the files.
    let tr = &t;
    let weights = |m: &Value| {
        let id = m["id"].as_str().unwrap().to_string();
        async move {
            let bytes = tr.get(&format!("/v1/models/{id}/content")).await.body;
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
            names.sort();
            names
                .into_iter()
                .map(|n| st.tensor(&n).unwrap().data().to_vec())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(weights(&out).await, weights(&reference_out).await);
}
