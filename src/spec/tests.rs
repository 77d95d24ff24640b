//! The spec parser without HTTP: every op's normalised form parses back to the same spec,
//! and refusals point at the offending field with the right code.

use serde_json::{json, Value};

use super::{parse_job, DatasetFacts, Facts, ModelFacts};
use crate::codes::Code;
use crate::compress::engine::sequential::arch::Architecture;
use crate::compress::formats::safetensors::{Dtype, TensorInfo};
use crate::ids::DatasetId;

const MODEL: &str = "0190d4a0-0000-7000-8000-000000000001";
const DATA: &str = "0190d4a0-0000-7000-8000-000000000002";
const OTHER: &str = "0190d4a0-0000-7000-8000-000000000003";

fn arch() -> Value {
    json!({"kind": "sequential", "input_shape": [1, 8, 8], "layers": [
        {"type": "flatten"},
        {"type": "linear", "name": "fc1", "in_features": 64, "out_features": 32},
        {"type": "relu"},
        {"type": "linear", "name": "fc2", "in_features": 32, "out_features": 10}]})
}

/// What the checks know about the MLP above, the digits-like dataset and an importance file.
fn facts() -> Facts {
    let arch = Architecture::from_json(&arch()).unwrap();
    let tensors = arch
        .parameters()
        .iter()
        .map(|p| TensorInfo {
            name: p.name.clone(),
            dtype: Dtype::F32,
            shape: p.shape.clone(),
            data_offsets: (0, 0),
        })
        .collect();
    let mut f = Facts {
        tensors,
        architecture: Some(arch),
        ..Default::default()
    };
    f.datasets.insert(
        DATA.parse::<DatasetId>().unwrap(),
        DatasetFacts {
            feature_shape: vec![1, 8, 8],
            num_classes: Some(10),
            text: false,
            mean_document_bytes: 0,
        },
    );
    f.models.insert(
        OTHER.to_string(),
        ModelFacts {
            tensors: vec![TensorInfo {
                name: "fc1.weight".into(),
                dtype: Dtype::F32,
                shape: vec![64],
                data_offsets: (0, 0),
            }],
            architecture: None,
            transformer: None,
        },
    );
    f
}

fn job(steps: Value) -> Value {
    json!({"model_id": MODEL, "steps": steps})
}

/// One step of every op and method, with most options set.
fn every_step() -> Vec<Value> {
    let train = json!({"dataset_id": DATA, "epochs": 2, "batch_size": 16,
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.8, "weight_decay": 0.001, "nesterov": true},
        "lr_schedule": {"kind": "step", "step_size": 1, "gamma": 0.5, "warmup_epochs": 1},
        "validation": {"fraction": 0.2}, "early_stopping": {"patience": 2, "metric": "val_accuracy"},
        "grad_clip": 1.0, "seed": 9});
    let mut finetune = train.clone();
    finetune["op"] = json!("finetune");
    finetune["freeze"] = json!(["fc1.*"]);
    finetune["head"] = json!({"layer": "fc2", "num_classes": 12});
    finetune["layer_lr"] = json!({"fc2.*": 2.0});
    let mut distill = train.clone();
    distill["op"] = json!("distill");
    distill["student"] = json!({"architecture": arch()});
    distill["temperature"] = json!(3.0);
    distill["alpha"] = json!(0.7);
    distill["features"] = json!([{"teacher": "fc1", "student": "fc1", "weight": 0.2}]);
    distill["baseline"] = json!(true);
    vec![
        json!({"op": "prune", "method": "magnitude", "sparsity": 0.5, "scope": "global", "output": "sparse"}),
        json!({"op": "prune", "sparsity": 0.8, "layers": {"fc1.weight": 0.9}, "exclude": ["fc2.*"], "seed": 3}),
        json!({"op": "prune", "method": "random", "sparsity": 0.3}),
        json!({"op": "prune", "method": "n_m", "n": 2, "m": 4}),
        json!({"op": "prune", "method": "structured", "sparsity": 0.25, "norm": 2, "include": ["fc1.weight"]}),
        json!({"op": "prune", "sparsity": 0.6, "schedule": {"kind": "polynomial", "iterations": 3, "power": 2,
               "finetune": {"dataset_id": DATA, "epochs": 1}}}),
        json!({"op": "prune", "sparsity": 0.6, "schedule": {"kind": "constant", "iterations": 2,
               "finetune": {"dataset_id": DATA}}}),
        json!({"op": "quantize", "method": "float", "dtype": "bf16", "skip": ["fc2.*"]}),
        json!({"op": "quantize", "method": "uniform", "bits": 4, "symmetric": false, "granularity": "per_group",
               "group_size": 16, "format": "packed", "importance": {"model_id": OTHER}}),
        json!({"op": "quantize", "method": "uniform", "bits": 3, "importance": {"dataset_id": DATA, "samples": 64}}),
        json!({"op": "quantize", "method": "uniform", "bits": 8, "granularity": "per_tensor",
               "activations": {"bits": 8, "symmetric": true, "calibration": {"dataset_id": DATA, "samples": 32,
               "method": "percentile", "percentile": 99.5}}}),
        json!({"op": "quantize", "method": "uniform", "bits": 4, "qat": {"dataset_id": DATA, "epochs": 1}}),
        json!({"op": "quantize", "method": "kmeans", "clusters": 8, "init": "kmeans++", "format": "packed"}),
        json!({"op": "quantize", "method": "log2", "bits": 5}),
        json!({"op": "quantize", "method": "nf4", "group_size": 32}),
        json!({"op": "quantize", "method": "gguf", "type": "q8_0"}),
        // Rows of 64 and 32 do not fill q4_k's 256-blocks: it falls back to q5_0 per tensor.
        json!({"op": "quantize", "method": "gguf", "type": "q4_k"}),
        finetune,
        distill,
        json!({"op": "evaluate", "dataset_id": DATA, "batch_size": 64}),
    ]
}

#[test]
fn every_op_parses_back_from_its_normalised_form() {
    let f = facts();
    for step in every_step() {
        let body = job(json!([step]));
        let spec = parse_job(&body, Some(&f)).unwrap_or_else(|e| panic!("{step}: {e:?}"));
        let again = parse_job(&spec.to_json(), Some(&f))
            .unwrap_or_else(|e| panic!("{}: {e:?}", spec.to_json()));
        assert_eq!(again, spec, "{step}");
        // Without the model's facts (the worker's re-parse) the spec is the same too.
        assert_eq!(parse_job(&spec.to_json(), None).unwrap(), spec, "{step}");
    }
    let mut body = job(json!([{"op": "quantize", "method": "float", "dtype": "f16"}]));
    body["eval"] = json!({"dataset_id": DATA});
    body["labels"] = json!({"team": "vision"});
    body["priority"] = json!(5);
    body["seed"] = json!(11);
    let spec = parse_job(&body, Some(&f)).unwrap();
    assert_eq!(parse_job(&spec.to_json(), Some(&f)).unwrap(), spec);
}

#[test]
fn refusals_point_at_the_field_with_a_code() {
    let f = facts();
    let unknown = "0190d4a0-0000-7000-8000-00000000dead";
    let cases: Vec<(Value, &str, Code)> = vec![
        (json!({"steps": []}), "/model_id", Code::ValidationFailed),
        (job(json!([])), "/steps", Code::ValidationFailed),
        (
            job(json!([{"op": "squash"}])),
            "/steps/0/op",
            Code::ValidationFailed,
        ),
        (
            job(json!([{"op": "prune", "sparsity": 1.0}])),
            "/steps/0/sparsity",
            Code::ValidationFailed,
        ),
        (
            job(json!([{"op": "prune", "sparsity": 0.5, "include": ["conv*"]}])),
            "/steps/0/include/0",
            Code::ValidationFailed,
        ),
        (
            job(json!([{"op": "prune", "method": "n_m", "n": 4, "m": 4}])),
            "/steps/0/n",
            Code::ValidationFailed,
        ),
        (
            job(json!([{"op": "prune", "method": "n_m", "n": 2, "m": 3}])),
            "/steps/0/m",
            Code::ValidationFailed,
        ),
        (
            job(json!([{"op": "prune", "method": "random", "sparsity": 0.5,
                     "schedule": {"finetune": {"dataset_id": DATA}}}])),
            "/steps/0/schedule",
            Code::ValidationFailed,
        ),
        (
            job(json!([{"op": "quantize", "method": "uniform", "bits": 9}])),
            "/steps/0/bits",
            Code::ValidationFailed,
        ),
        (
            job(
                json!([{"op": "quantize", "method": "uniform", "bits": 4, "granularity": "per_group", "group_size": 7}]),
            ),
            "/steps/0/group_size",
            Code::ValidationFailed,
        ),
        (
            job(json!([{"op": "quantize", "method": "float", "dtype": "f8"}])),
            "/steps/0/dtype",
            Code::ValidationFailed,
        ),
        (
            job(
                json!([{"op": "quantize", "method": "kmeans", "format": "packed"},
                    {"op": "quantize", "method": "float", "dtype": "f16"}]),
            ),
            "/steps/0/format",
            Code::ValidationFailed,
        ),
        (
            job(
                json!([{"op": "quantize", "method": "uniform", "importance": {"model_id": unknown}}]),
            ),
            "/steps/0/importance/model_id",
            Code::ModelNotFound,
        ),
        (
            job(json!([{"op": "finetune", "dataset_id": unknown}])),
            "/steps/0/dataset_id",
            Code::DatasetNotFound,
        ),
        (
            job(json!([{"op": "finetune", "dataset_id": DATA, "freeze": ["conv*"]}])),
            "/steps/0/freeze/0",
            Code::ValidationFailed,
        ),
        (
            job(
                json!([{"op": "finetune", "dataset_id": DATA, "optimizer": {"name": "adamw", "momentum": 0.9}}]),
            ),
            "/steps/0/optimizer/momentum",
            Code::ValidationFailed,
        ),
        (
            job(
                json!([{"op": "finetune", "dataset_id": DATA, "head": {"layer": "fc9", "num_classes": 3}}]),
            ),
            "/steps/0/head/layer",
            Code::ValidationFailed,
        ),
        (
            job(json!([{"op": "distill", "dataset_id": DATA, "student": {"model_id": unknown}}])),
            "/steps/0/student/model_id",
            Code::ModelNotFound,
        ),
        (
            job(
                json!([{"op": "distill", "dataset_id": DATA, "student": {"architecture": {"kind": "sequential"}}}]),
            ),
            "/steps/0/student/architecture/input_shape",
            Code::InvalidArchitecture,
        ),
        (
            json!({"model_id": MODEL, "steps": [{"op": "quantize", "method": "uniform", "max_accuracy_drop": 0.01}]}),
            "/steps/0/max_accuracy_drop",
            Code::ValidationFailed,
        ),
        (
            json!({"model_id": MODEL, "steps": [{"op": "evaluate", "dataset_id": DATA}], "priority": 5000}),
            "/priority",
            Code::ValidationFailed,
        ),
        (
            json!({"model_id": MODEL, "steps": [{"op": "evaluate", "dataset_id": DATA}], "labels": {"bad key!": "x"}}),
            "/labels/bad key!",
            Code::ValidationFailed,
        ),
        (
            json!({"model_id": MODEL, "steps": [{"op": "evaluate", "dataset_id": DATA}], "colour": "red"}),
            "/colour",
            Code::ValidationFailed,
        ),
    ];
    for (body, pointer, code) in cases {
        let errors = parse_job(&body, Some(&f)).expect_err(&body.to_string());
        assert!(
            errors
                .iter()
                .any(|e| e.pointer == pointer && e.code == code),
            "{body}: expected {pointer} ({code}), got {errors:?}"
        );
    }
}

#[test]
fn without_an_architecture_network_ops_need_one() {
    let mut f = facts();
    f.architecture = None;
    for step in [
        json!({"op": "finetune", "dataset_id": DATA}),
        json!({"op": "evaluate", "dataset_id": DATA}),
        json!({"op": "prune", "method": "structured", "sparsity": 0.5}),
    ] {
        let errors = parse_job(&job(json!([step])), Some(&f)).unwrap_err();
        assert!(
            errors.iter().any(|e| e.code == Code::ArchitectureRequired),
            "{step}: {errors:?}"
        );
    }
    // Weight-only ops do not.
    parse_job(&job(json!([{"op": "prune", "sparsity": 0.5}])), Some(&f)).unwrap();
}
