//! Same inputs, spec and seed → same outputs. The README's example operations run on fixtures
//! made in code, and each job's outputs are reduced to content digests: every file's tensors
//! and metadata (without `whittle.job`, which names the random job id) and the metrics
//! document (without wall-clock figures and ids). They are compared with
//! `tests/golden/outputs.json`, so a refactor that must not change behaviour proves it did not.
//!
//! Weight-only operations are plain scalar code and give the same bytes on any x86-64 machine;
//! operations that train or run the network go through matrix kernels chosen at run time
//! for the CPU, so their digests are compared only on a CPU like the one that recorded them.
//! After an intended change: `WHITTLE_GOLDEN=write cargo test golden`, and say why in the commit.
//! The normalised documents land in `target/golden/` for diffing.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use whittle::compress::formats::safetensors::{self as tensors, Dtype, TensorSpec};
use whittle::db::jobs::JobState;

use crate::compression::{cnn, digits, mlp};
use crate::helpers::*;

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/outputs.json");

/// Whether an operation trains / runs the network (CPU-dependent kernels) or only rewrites weights.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Weights,
    Network,
}

/// What the CPU-dependent digests depend on: the model name and the SIMD features the kernels pick from.
fn cpu_signature() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let flags: Vec<&str> = info
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| {
            l.split_whitespace()
                .filter(|f| f.starts_with("avx") || *f == "fma" || f.starts_with("f16c"))
                .collect()
        })
        .unwrap_or_default();
    format!("{} [{}]", field("model name"), flags.join(" "))
}

fn hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Tensors and metadata of a safetensors file, without the id-bearing provenance.
fn safetensors_digest(bytes: &[u8]) -> String {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).expect("safetensors");
    let st = safetensors::SafeTensors::deserialize(bytes).expect("safetensors");
    let mut h = Sha256::new();
    let mut metadata: BTreeMap<String, String> = meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    metadata.remove("whittle.job");
    h.update(serde_json::to_vec(&metadata).unwrap());
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    for name in names {
        let t = st.tensor(&name).unwrap();
        h.update(format!("{name}|{:?}|{:?}|", t.dtype(), t.shape()).as_bytes());
        h.update(t.data());
    }
    hex::encode(h.finalize())
}

/// Tensor infos, metadata (without `whittle.job`) and tensor data of a GGUF file.
fn gguf_digest(bytes: &[u8]) -> String {
    use candle_core::quantized::gguf_file;
    let content = gguf_file::Content::read(&mut std::io::Cursor::new(bytes)).expect("gguf");
    let mut h = Sha256::new();
    let mut keys: Vec<&String> = content
        .metadata
        .keys()
        .filter(|k| *k != "whittle.job")
        .collect();
    keys.sort();
    for k in keys {
        h.update(format!("{k}={:?}|", content.metadata[k]).as_bytes());
    }
    let mut infos: Vec<_> = content.tensor_infos.iter().collect();
    infos.sort_by(|a, b| a.0.cmp(b.0));
    for (name, info) in infos {
        h.update(
            format!(
                "{name}|{:?}|{:?}|{}|",
                info.ggml_dtype, info.shape, info.offset
            )
            .as_bytes(),
        );
    }
    h.update(&bytes[content.tensor_data_offset as usize..]);
    hex::encode(h.finalize())
}

/// The metrics document without wall-clock figures, ids and file hashes.
fn normalise(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| {
                    !(k.as_str() == "seconds"
                        || k.ends_with("_per_second")
                        || k.ends_with("latency_ms")
                        || k.as_str() == "updated_at")
                })
                .map(|(k, v)| (k.clone(), normalise(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(normalise).collect()),
        Value::String(s) if uuid::Uuid::parse_str(s).is_ok() => json!("<id>"),
        Value::String(s) if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) => {
            json!("<sha256>")
        }
        other => other.clone(),
    }
}

/// Run `body` to success; the digests of its output model, artifacts and metrics.
async fn digests(t: &TestApp, name: &str, body: Value) -> (Value, String) {
    let job = t.submit(body).await;
    let id = job["id"].as_str().unwrap().to_string();
    let (_, state) = t.run_one().await.unwrap();
    let job = t.get(&format!("/v1/jobs/{id}")).await.json();
    assert_eq!(state, JobState::Succeeded, "{name}: {job}");
    // Every body this job produced matches the contract.
    assert_schema("Job", &job);
    let model = t
        .get(&format!(
            "/v1/models/{}",
            job["result"]["model_id"].as_str().unwrap()
        ))
        .await;
    assert_schema("Model", &model.json());
    let mut out = serde_json::Map::new();
    for a in job["result"]["artifacts"].as_array().unwrap() {
        assert_schema(
            "Artifact",
            &t.get(&format!("/v1/artifacts/{}", a["id"].as_str().unwrap()))
                .await
                .json(),
        );
        let kind = a["kind"].as_str().unwrap();
        if kind == "report" {
            continue; // the metrics document, digested below without its timings
        }
        let bytes = t
            .get(&format!(
                "/v1/artifacts/{}/content",
                a["id"].as_str().unwrap()
            ))
            .await
            .body;
        let digest = match a["format"].as_str().unwrap() {
            "gguf" => gguf_digest(&bytes),
            _ => safetensors_digest(&bytes),
        };
        out.insert(kind.to_string(), json!(digest));
    }
    let raw = t.get(&format!("/v1/jobs/{id}/metrics")).await.json();
    assert_schema("Metrics", &raw);
    let metrics = normalise(&raw);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/golden");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_string_pretty(&metrics).unwrap(),
    )
    .unwrap();
    out.insert(
        "metrics".into(),
        json!(hex(serde_json::to_string(&metrics).unwrap().as_bytes())),
    );
    let model = job["result"]["model_id"].as_str().unwrap().to_string();
    (Value::Object(out), model)
}

/// An importance file for the MLP's `fc1.weight` (64 input columns).
fn importance() -> Vec<u8> {
    let w: Vec<f32> = (0..64).map(|j| 1.0 / (1.0 + j as f32)).collect();
    tensors::serialize(
        &BTreeMap::new(),
        &[(
            TensorSpec::new("fc1.weight", Dtype::F32, vec![64]),
            tensors::encode_f32(&w).as_slice(),
        )],
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn golden_outputs_are_unchanged() {
    let t = TestApp::sqlite().await;
    let data = upload_dataset(&t, digits()).await;
    let train = |epochs: usize, optimizer: Value| json!({"dataset_id": data, "epochs": epochs, "batch_size": 32, "optimizer": optimizer});
    let adamw = json!({"name": "adamw", "lr": 0.01, "weight_decay": 0.0});
    let sgd = json!({"name": "sgd", "lr": 0.02, "momentum": 0.9, "weight_decay": 0.0005});
    let eval = json!({"dataset_id": data});
    let mut results: BTreeMap<String, (Kind, Value)> = BTreeMap::new();

    // Models: an MLP and a CNN trained on digits (themselves cases) for the operations that run
    // the network; weight-only operations take the freshly initialised ones (seeded, no kernels).
    let fresh = fresh_model(&t, mlp(32), 3).await;
    let mut finetune = train(3, adamw.clone());
    finetune["op"] = json!("finetune");
    finetune["validation"] = json!({"fraction": 0.1});
    finetune["lr_schedule"] = json!({"kind": "cosine"});
    let (d, base) = digests(
        &t,
        "finetune",
        json!({"model_id": fresh, "eval": eval, "steps": [finetune.clone()]}),
    )
    .await;
    results.insert("finetune".into(), (Kind::Network, d));
    let fresh_cnn = fresh_model(&t, cnn(), 4).await;
    let (d, base_cnn) = digests(
        &t,
        "finetune_cnn",
        json!({"model_id": fresh_cnn, "steps": [finetune]}),
    )
    .await;
    results.insert("finetune_cnn".into(), (Kind::Network, d));
    let imp = t.upload_model(importance()).await["id"]
        .as_str()
        .unwrap()
        .to_string();

    let student = json!({"kind": "sequential", "input_shape": [1, 8, 8], "layers": [
        {"type": "flatten"},
        {"type": "linear", "name": "fc1", "in_features": 64, "out_features": 16}, {"type": "relu"},
        {"type": "linear", "name": "fc2", "in_features": 16, "out_features": 10}]});
    let cases: Vec<(&str, Kind, &str, Value, bool)> = vec![
        (
            "float_f16",
            Kind::Weights,
            &fresh,
            json!({"op": "quantize", "method": "float", "dtype": "f16"}),
            false,
        ),
        (
            "float_bf16",
            Kind::Weights,
            &fresh,
            json!({"op": "quantize", "method": "float", "dtype": "bf16"}),
            false,
        ),
        (
            "prune_global_sparse",
            Kind::Weights,
            &fresh,
            json!({"op": "prune", "method": "magnitude", "sparsity": 0.9, "scope": "global", "output": "sparse"}),
            false,
        ),
        (
            "prune_layers",
            Kind::Weights,
            &fresh,
            json!({"op": "prune", "sparsity": 0.8, "layers": {"fc1.weight": 0.9, "fc2.weight": 0.5}}),
            false,
        ),
        (
            "prune_random",
            Kind::Weights,
            &fresh,
            json!({"op": "prune", "method": "random", "sparsity": 0.5, "seed": 7}),
            false,
        ),
        (
            "prune_n_m",
            Kind::Weights,
            &fresh,
            json!({"op": "prune", "method": "n_m", "n": 2, "m": 4}),
            false,
        ),
        (
            "prune_structured_cnn",
            Kind::Weights,
            &fresh_cnn,
            json!({"op": "prune", "method": "structured", "sparsity": 0.5, "norm": 1, "include": ["conv*.weight"]}),
            false,
        ),
        (
            "prune_structured_mlp_l2",
            Kind::Weights,
            &fresh,
            json!({"op": "prune", "method": "structured", "sparsity": 0.25, "norm": 2, "include": ["fc1.weight"]}),
            false,
        ),
        (
            "uniform_int8_channel_packed",
            Kind::Weights,
            &fresh,
            json!({"op": "quantize", "method": "uniform", "bits": 8, "format": "packed"}),
            false,
        ),
        (
            "uniform_int4_affine_tensor",
            Kind::Weights,
            &fresh,
            json!({"op": "quantize", "method": "uniform", "bits": 4, "symmetric": false, "granularity": "per_tensor"}),
            false,
        ),
        (
            "uniform_int3_group_search",
            Kind::Weights,
            &fresh,
            json!({"op": "quantize", "method": "uniform", "bits": 3, "granularity": "per_group", "group_size": 16, "search": true, "format": "packed"}),
            false,
        ),
        (
            "uniform_int3_importance_file",
            Kind::Weights,
            &fresh,
            json!({"op": "quantize", "method": "uniform", "bits": 3, "granularity": "per_group", "group_size": 16, "importance": {"model_id": imp}}),
            false,
        ),
        (
            "kmeans_density_packed",
            Kind::Weights,
            &fresh,
            json!({"op": "quantize", "method": "kmeans", "clusters": 16, "init": "density", "format": "packed"}),
            false,
        ),
        (
            "kmeans_pp",
            Kind::Weights,
            &fresh,
            json!({"op": "quantize", "method": "kmeans", "clusters": 8, "init": "kmeans++"}),
            false,
        ),
        (
            "log2_packed",
            Kind::Weights,
            &fresh,
            json!({"op": "quantize", "method": "log2", "bits": 4, "format": "packed"}),
            false,
        ),
        (
            "nf4_packed",
            Kind::Weights,
            &fresh,
            json!({"op": "quantize", "method": "nf4", "group_size": 16, "format": "packed"}),
            false,
        ),
        (
            "gguf_q8_0",
            Kind::Weights,
            &fresh,
            json!({"op": "quantize", "method": "gguf", "type": "q8_0", "format": "gguf"}),
            false,
        ),
        (
            "gguf_q4_0",
            Kind::Weights,
            &fresh,
            json!({"op": "quantize", "method": "gguf", "type": "q4_0", "format": "gguf"}),
            false,
        ),
        (
            "gguf_q4_1_dequantized",
            Kind::Weights,
            &fresh,
            json!({"op": "quantize", "method": "gguf", "type": "q4_1"}),
            false,
        ),
        (
            "evaluate",
            Kind::Network,
            &base,
            json!({"op": "evaluate", "dataset_id": data}),
            true,
        ),
        (
            "han_schedule_then_kmeans_qat",
            Kind::Network,
            &base,
            json!([
            {"op": "prune", "sparsity": 0.8, "layers": {"fc1.weight": 0.85, "fc2.weight": 0.6},
             "schedule": {"kind": "polynomial", "iterations": 2, "power": 3, "finetune": {
                "dataset_id": data, "epochs": 1, "batch_size": 32, "optimizer": sgd, "lr_schedule": {"kind": "cosine"}}}},
            {"op": "quantize", "method": "kmeans", "clusters": 16, "format": "packed", "include": ["fc*.weight"],
             "qat": {"dataset_id": data, "epochs": 1, "optimizer": {"name": "adamw", "lr": 0.0001, "weight_decay": 0}}}]),
            true,
        ),
        (
            "structured_schedule_cnn",
            Kind::Network,
            &base_cnn,
            json!({"op": "prune", "method": "structured", "sparsity": 0.5, "include": ["conv*.weight"],
             "schedule": {"kind": "constant", "iterations": 2, "finetune": {"dataset_id": data, "epochs": 1, "batch_size": 32, "optimizer": adamw}}}),
            true,
        ),
        (
            "uniform_activations",
            Kind::Network,
            &base,
            json!({"op": "quantize", "method": "uniform", "bits": 8, "format": "packed",
             "activations": {"bits": 8, "calibration": {"dataset_id": data, "samples": 256, "method": "percentile"}}}),
            true,
        ),
        (
            "uniform_qat",
            Kind::Network,
            &base,
            json!({"op": "quantize", "method": "uniform", "bits": 4, "qat": {"dataset_id": data, "epochs": 1}}),
            true,
        ),
        (
            "uniform_accuracy_budget",
            Kind::Network,
            &base,
            json!({"op": "quantize", "method": "uniform", "bits": 2, "max_accuracy_drop": 0.005}),
            true,
        ),
        (
            "uniform_importance_dataset",
            Kind::Network,
            &base,
            json!({"op": "quantize", "method": "uniform", "bits": 3, "granularity": "per_group", "group_size": 16, "importance": {"dataset_id": data, "samples": 256}}),
            true,
        ),
        (
            "distill_baseline",
            Kind::Network,
            &base,
            json!({"op": "distill", "dataset_id": data, "temperature": 4, "alpha": 0.9, "baseline": true, "epochs": 2,
             "batch_size": 32, "student": {"architecture": student},
             "features": [{"teacher": "fc1", "student": "fc1", "weight": 0.1}]}),
            true,
        ),
        (
            "finetune_head_freeze",
            Kind::Network,
            &base,
            json!({"op": "finetune", "dataset_id": data, "epochs": 1, "batch_size": 64,
             "freeze": ["fc1.*"], "head": {"layer": "fc2", "num_classes": 10}, "optimizer": sgd, "lr_schedule": {"kind": "step", "step_size": 1, "gamma": 0.5}}),
            true,
        ),
    ];
    for (name, kind, model, steps, with_eval) in cases {
        let steps = if steps.is_array() {
            steps
        } else {
            json!([steps])
        };
        let mut body = json!({"model_id": model, "steps": steps, "seed": 5});
        if with_eval {
            body["eval"] = eval.clone();
        }
        let (d, _) = digests(&t, name, body).await;
        results.insert(name.into(), (kind, d));
    }
    // The unpruned model teaching its pruned copy, zeros held.
    let (_, pruned) = digests(
        &t,
        "prune_for_keep",
        json!({"model_id": base, "steps": [{"op": "prune", "sparsity": 0.7}]}),
    )
    .await;
    let (d, _) = digests(&t, "distill_keep_sparsity", json!({"model_id": base, "eval": eval, "steps": [{"op": "distill", "dataset_id": data,
        "temperature": 4, "epochs": 1, "batch_size": 32, "keep_sparsity": true, "student": {"model_id": pruned}}]})).await;
    results.insert("distill_keep_sparsity".into(), (Kind::Network, d));

    let cpu = cpu_signature();
    let current: BTreeMap<String, Value> = results
        .iter()
        .map(|(k, (kind, d))| {
            let mut d = d.clone();
            d["kind"] = json!(if *kind == Kind::Weights {
                "weights"
            } else {
                "network"
            });
            (k.clone(), d)
        })
        .collect();
    if std::env::var("WHITTLE_GOLDEN").as_deref() == Ok("write") {
        let doc = json!({"cpu": cpu, "cases": current});
        std::fs::create_dir_all(std::path::Path::new(GOLDEN).parent().unwrap()).unwrap();
        std::fs::write(GOLDEN, serde_json::to_string_pretty(&doc).unwrap() + "\n").unwrap();
        return;
    }
    let recorded: Value = serde_json::from_str(&std::fs::read_to_string(GOLDEN).expect(
        "tests/golden/outputs.json is missing: record it with WHITTLE_GOLDEN=write cargo test golden",
    ))
    .unwrap();
    let same_cpu = recorded["cpu"] == json!(cpu);
    let mut differences = Vec::new();
    for (name, digest) in &current {
        let network = digest["kind"] == "network";
        if network && !same_cpu {
            continue;
        }
        if recorded["cases"][name] != *digest {
            differences.push(format!(
                "{name}: recorded {} now {digest}",
                recorded["cases"][name]
            ));
        }
    }
    if !same_cpu {
        eprintln!("golden: the CPU differs from the recording one ({cpu} vs {}); only weight-only digests compared", recorded["cpu"]);
    }
    assert!(
        differences.is_empty(),
        "outputs changed (normalised metrics are in target/golden/):\n{}",
        differences.join("\n")
    );
}
