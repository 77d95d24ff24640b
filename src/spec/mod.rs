//! Job specifications: the body of `POST /v1/jobs`, parsed into types that can only hold valid
//! values ("parse, don't validate"). Every problem found is reported with a JSON pointer so
//! the API can answer one 422 listing all of them.
//!
//! Checks that need stored state (does the model exist, which tensors does it have) take that
//! state as arguments; this module does no I/O.

pub mod calibrated;
pub mod distill;
mod fields;
pub mod memory;
pub use fields::pointer_of;
pub mod prune;
pub mod quantize;
pub mod train;

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Map, Value};

use crate::codes::Code;
use crate::compress::engine::sequential::arch::Architecture;
use crate::compress::engine::Family;
use crate::compress::formats::safetensors::TensorInfo;
pub use crate::compress::quant::float::FloatDtype;
use crate::compress::select;
use crate::ids::DatasetId;
pub use distill::DistillSpec;
use fields::escape;
pub use prune::PruneSpec;
pub use quantize::QuantizeSpec;
pub use train::{EvalSpec, FinetuneSpec};

/// What is known about the job's inputs when it is submitted, for the checks that need it.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// The input model's tensors.
    pub tensors: Vec<TensorInfo>,
    /// The input model's architecture, if it has one.
    pub architecture: Option<Architecture>,
    /// The input model's transformer configuration, when it is a folder model of a family
    /// the engine runs (`bert`, `llama`).
    pub transformer: Option<TransformerFacts>,
    /// The `model_type` of a folder model whose family the engine does not run (for the
    /// `unsupported_family` refusal of ops that run the network).
    pub other_family: Option<String>,
    /// Every dataset the request names that exists.
    pub datasets: HashMap<DatasetId, DatasetFacts>,
    /// Every other model the request names (distillation students, importance weights) that
    /// exists, by id.
    pub models: HashMap<String, ModelFacts>,
}

/// What is known about a model other than the job's input.
#[derive(Debug, Clone, Default)]
pub struct ModelFacts {
    /// Its tensors.
    pub tensors: Vec<TensorInfo>,
    /// Its architecture, if it has one.
    pub architecture: Option<Architecture>,
    /// Its transformer, when it is one (a student built from a transformer teacher).
    pub transformer: Option<TransformerFacts>,
}

impl ModelFacts {
    /// The facts of a model freshly initialised from `arch` (f32 parameters).
    pub fn from_architecture(arch: Architecture) -> Self {
        let tensors = arch
            .parameters()
            .iter()
            .map(|p| TensorInfo {
                name: p.name.clone(),
                dtype: crate::compress::formats::safetensors::Dtype::F32,
                shape: p.shape.clone(),
                data_offsets: (0, 0),
            })
            .collect();
        Self {
            tensors,
            architecture: Some(arch),
            transformer: None,
        }
    }
}

impl Facts {
    /// Names of the network's parameters (from the architecture, else the tensors).
    pub fn parameter_names(&self) -> Vec<String> {
        match &self.architecture {
            Some(a) => a.parameters().into_iter().map(|p| p.name).collect(),
            None => self.tensors.iter().map(|t| t.name.clone()).collect(),
        }
    }
}

/// What the checks need to know about a transformer model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransformerFacts {
    /// Its family.
    pub family: Family,
    /// Longest input (`max_position_embeddings`).
    pub max_positions: usize,
    /// Whether the folder has a `tokenizer.json` (text datasets need it).
    pub has_tokenizer: bool,
    /// The sha256 of its `tokenizer.json` (a student must read text as its teacher does).
    pub tokenizer_sha256: Option<String>,
    /// Its parsed `config.json`.
    pub config: Value,
    /// Classes of a bert classification head, when the weights have one.
    pub classes: Option<usize>,
    /// The vocabulary size (`vocab_size`; 0 when the config does not say).
    pub vocab_size: usize,
    /// Blocks (`num_hidden_layers`; 0 when the config does not say).
    pub layers: usize,
    /// Width of the hidden states (`hidden_size`; 0 when the config does not say).
    pub hidden: usize,
    /// Width of the feed-forward layers (`intermediate_size`).
    pub intermediate: usize,
    /// Attention heads (`num_attention_heads`).
    pub heads: usize,
}

impl TransformerFacts {
    /// The facts of a folder model with `config` (its parsed `config.json`), `tensors` and
    /// a tokenizer or not; `None` when the config names no family the engine runs.
    pub fn of(config: &Value, tensors: &[TensorInfo], tokenizer: Option<&str>) -> Option<Self> {
        let has_tokenizer = tokenizer.is_some();
        let family = crate::compress::formats::hf::family_of(config)?;
        let max_positions = config
            .get("max_position_embeddings")
            .and_then(Value::as_u64)
            .map_or(512, |v| v as usize);
        let classes = tensors
            .iter()
            .find(|t| t.name == "classifier.weight")
            .and_then(|t| t.shape.first().copied());
        let vocab_size = config
            .get("vocab_size")
            .and_then(Value::as_u64)
            .map_or(0, |v| v as usize);
        let field = |k: &str| {
            config
                .get(k)
                .and_then(Value::as_u64)
                .map_or(0, |v| v as usize)
        };
        let layers = field("num_hidden_layers");
        Some(Self {
            family,
            max_positions,
            has_tokenizer,
            tokenizer_sha256: tokenizer.map(str::to_string),
            config: config.clone(),
            classes,
            vocab_size,
            layers,
            hidden: field("hidden_size"),
            intermediate: field("intermediate_size"),
            heads: field("num_attention_heads"),
        })
    }
}

/// The shape summary of a dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetFacts {
    /// Shape of one sample (empty for text).
    pub feature_shape: Vec<usize>,
    /// Classes (max label + 1), when labelled.
    pub num_classes: Option<usize>,
    /// Whether it holds text documents (formats `text`, `jsonl`).
    pub text: bool,
    /// Text: the mean UTF-8 bytes of a document (0 for tensor datasets).
    pub mean_document_bytes: u64,
}

/// Every other model a request body names (for loading their facts): `distill` students
/// (`/student/model_id`) and `quantize` importance weights (`/importance/model_id`).
pub fn referenced_models(body: &Value) -> Vec<String> {
    let mut out: Vec<String> = body
        .get("steps")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|s| match s.get("op").and_then(Value::as_str) {
            Some("distill") => s.pointer("/student/model_id"),
            Some("quantize") => s.pointer("/importance/model_id"),
            _ => None,
        })
        .filter_map(Value::as_str)
        .filter(|id| uuid::Uuid::parse_str(id).is_ok())
        .map(str::to_string)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Every `dataset_id` a request body mentions (steps, validation, eval), for loading facts.
pub fn referenced_datasets(body: &Value) -> Vec<DatasetId> {
    fn walk(v: &Value, out: &mut Vec<DatasetId>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    if k == "dataset_id" {
                        if let Some(id) = v.as_str().and_then(|s| s.parse().ok()) {
                            out.push(id);
                        }
                    } else {
                        walk(v, out);
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(body, &mut out);
    out.sort();
    out.dedup();
    out
}

/// One problem in a request body.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldError {
    /// JSON pointer (RFC 6901) to the offending value, e.g. `/steps/0/dtype`.
    pub pointer: String,
    /// What is wrong and what would be right.
    pub detail: String,
    /// Stable code of this problem (`validation_failed`, `unsupported_operation`, …).
    pub code: Code,
}

impl FieldError {
    /// A `validation_failed` problem at `pointer`.
    pub fn new(pointer: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            pointer: pointer.into(),
            detail: detail.into(),
            code: Code::ValidationFailed,
        }
    }

    /// An `unsupported_operation` problem at `pointer`.
    pub fn unsupported(pointer: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            code: Code::UnsupportedOperation,
            ..Self::new(pointer, detail)
        }
    }
}

/// Limits on job-level parameters.
pub mod limits {
    /// Most steps one job may have.
    pub const MAX_STEPS: usize = 16;
    /// Priority range (higher runs first).
    pub const PRIORITY: (i64, i64) = (-1000, 1000);
    /// Attempts range.
    pub const MAX_ATTEMPTS: (i64, i64) = (1, 20);
    /// Timeout range, seconds (one week at most).
    pub const TIMEOUT_SECONDS: (i64, i64) = (1, 7 * 24 * 3600);
    /// Most labels on a job.
    pub const MAX_LABELS: usize = 32;
}

/// `Some("packed" | "gguf" | "sparse")` when a step writes something only a last step may.
fn final_only_output(step: &Step) -> Option<&'static str> {
    match step {
        Step::Quantize(q) if q.format != crate::compress::quant::Format::Dequantized => {
            Some(q.format.as_str())
        }
        Step::Prune(p) if p.output == crate::compress::prune::Output::Sparse => Some("sparse"),
        Step::Calibrated(c) if c.packed => Some("packed"),
        Step::Calibrated(c) if c.gguf || c.method_name() == "auto" => Some("gguf"),
        _ => None,
    }
}

/// Which tensors a weight operation touches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Glob patterns to include (empty = the default selection: float tensors with ndim ≥ 2).
    pub include: Vec<String>,
    /// Glob patterns to leave alone.
    pub exclude: Vec<String>,
}

impl Selection {
    /// The selection of `include` / `exclude`. An empty `include` on a transformer becomes
    /// its family's default (the linear layers of its blocks), written out so that the job
    /// and its dry-run plan show what will be touched.
    pub fn of(include: Vec<String>, exclude: Vec<String>, facts: Option<&Facts>) -> Self {
        let include = match facts.and_then(|f| f.transformer.as_ref().map(|t| (f, t))) {
            // The patterns that name something in this model (a model without the family's
            // usual names keeps the generic default).
            Some((f, t)) if include.is_empty() => select::family_default(t.family)
                .unwrap_or_default()
                .into_iter()
                .filter(|p| f.tensors.iter().any(|t| select::glob_match(p, &t.name)))
                .collect(),
            _ => include,
        };
        Selection { include, exclude }
    }

    /// The tensors selected from a model's inventory.
    pub fn resolve<'a>(&self, tensors: &'a [TensorInfo]) -> Vec<&'a TensorInfo> {
        select::select(tensors, &self.include, &self.exclude)
    }
}

/// `quantize` with `method: float`: cast selected tensors to f16 / bf16.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FloatQuantize {
    /// Target dtype.
    pub dtype: FloatDtype,
    /// Tensors to cast (`skip` patterns are folded into `exclude`).
    pub selection: Selection,
}

/// One step of a job's pipeline.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Cast weights to a smaller float type.
    QuantizeFloat(FloatQuantize),
    /// Train on a labelled dataset (transfer learning, or from scratch).
    Finetune(Box<FinetuneSpec>),
    /// Measure on a dataset; the model passes through unchanged.
    Evaluate(EvalSpec),
    /// Remove weights (unstructured, N:M) or whole units (structured).
    Prune(Box<PruneSpec>),
    /// Integer, codebook or GGUF quantization.
    Quantize(Box<QuantizeSpec>),
    /// Knowledge distillation into a student.
    Distill(Box<DistillSpec>),
    /// GPTQ quantization, Wanda or SparseGPT pruning, from calibration data.
    Calibrated(Box<calibrated::CalibratedSpec>),
}

impl Step {
    /// The `op` name, for progress and metrics.
    pub fn op(&self) -> &'static str {
        match self {
            Step::QuantizeFloat(_) => "quantize",
            Step::Finetune(_) => "finetune",
            Step::Evaluate(_) => "evaluate",
            Step::Prune(_) => "prune",
            Step::Quantize(_) => "quantize",
            Step::Distill(_) => "distill",
            Step::Calibrated(c) => c.op(),
        }
    }

    /// The normalised JSON form (defaults filled in), as stored and shown.
    pub fn to_json(&self) -> Value {
        match self {
            Step::QuantizeFloat(q) => json!({
                "op": "quantize",
                "method": "float",
                "dtype": q.dtype.as_str(),
                "include": q.selection.include,
                "exclude": q.selection.exclude,
                "format": "dequantized",
            }),
            Step::Finetune(f) => f.to_json(),
            Step::Evaluate(e) => {
                let mut v = e.to_json();
                v["op"] = json!("evaluate");
                v
            }
            Step::Prune(p) => p.to_json(),
            Step::Quantize(q) => q.to_json(),
            Step::Distill(d) => d.to_json(),
            Step::Calibrated(c) => c.to_json(),
        }
    }

    /// The tensor selection of a weight operation.
    pub fn selection(&self) -> Option<&Selection> {
        match self {
            Step::QuantizeFloat(q) => Some(&q.selection),
            Step::Prune(p) => Some(&p.selection),
            Step::Quantize(q) => Some(&q.selection),
            Step::Calibrated(c) => Some(&c.selection),
            Step::Finetune(_) | Step::Evaluate(_) | Step::Distill(_) => None,
        }
    }
}

/// A validated job request.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    /// Input model id (as given; existence is checked by the caller).
    pub model_id: String,
    /// The pipeline.
    pub steps: Vec<Step>,
    /// Evaluation before and after the pipeline.
    pub eval: Option<EvalSpec>,
    /// Higher runs first.
    pub priority: i64,
    /// Attempts before failing for good.
    pub max_attempts: i64,
    /// Wall-clock limit per attempt.
    pub timeout_seconds: i64,
    /// Free-form labels for filtering.
    pub labels: BTreeMap<String, String>,
    /// Called with the job when it reaches a terminal state.
    pub webhook_url: Option<String>,
    /// Seed for everything random.
    pub seed: u64,
}

impl JobSpec {
    /// The normalised JSON form stored in the `spec` column.
    pub fn to_json(&self) -> Value {
        json!({
            "model_id": self.model_id,
            "steps": self.steps.iter().map(Step::to_json).collect::<Vec<_>>(),
            "eval": self.eval.as_ref().map(EvalSpec::to_json),
            "priority": self.priority,
            "max_attempts": self.max_attempts,
            "timeout_seconds": self.timeout_seconds,
            "labels": self.labels,
            "webhook_url": self.webhook_url,
            "seed": self.seed,
        })
    }
}

const OPS: &[&str] = &["prune", "quantize", "finetune", "distill", "evaluate"];

/// Parse a job request. `tensors` is the input model's inventory when the model exists (used
/// to check that patterns match something); pass `None` when it does not, and the model error
/// is reported by the caller.
pub fn parse_job(body: &Value, facts: Option<&Facts>) -> Result<JobSpec, Vec<FieldError>> {
    let mut errors = Vec::new();
    let Some(obj) = body.as_object() else {
        return Err(vec![FieldError::new("", "the body must be a JSON object")]);
    };
    let known = [
        "model_id",
        "steps",
        "eval",
        "priority",
        "max_attempts",
        "timeout_seconds",
        "labels",
        "webhook_url",
        "seed",
    ];
    for key in obj.keys() {
        if !known.contains(&key.as_str()) {
            errors.push(FieldError::new(
                format!("/{}", escape(key)),
                format!("unknown field; expected one of {}", known.join(", ")),
            ));
        }
    }
    let model_id = match obj.get("model_id") {
        Some(Value::String(s)) if uuid::Uuid::parse_str(s).is_ok() => s.clone(),
        Some(_) => {
            errors.push(FieldError::new(
                "/model_id",
                "must be a model id (a UUID string)",
            ));
            String::new()
        }
        None => {
            errors.push(FieldError::new("/model_id", "is required"));
            String::new()
        }
    };
    let mut steps = Vec::new();
    match obj.get("steps") {
        Some(Value::Array(items)) if items.is_empty() => {
            errors.push(FieldError::new("/steps", "must hold at least one step"))
        }
        Some(Value::Array(items)) if items.len() > limits::MAX_STEPS => {
            errors.push(FieldError::new(
                "/steps",
                format!("at most {} steps per job", limits::MAX_STEPS),
            ))
        }
        Some(Value::Array(items)) => {
            // Each step is checked against the model as the steps before it leave it (after
            // `distill`, later steps operate on the student).
            let mut current = facts.cloned();
            for (i, item) in items.iter().enumerate() {
                let pointer = format!("/steps/{i}");
                let parsed = match item.get("op").and_then(Value::as_str) {
                    Some("distill") => item
                        .as_object()
                        .ok_or_else(|| vec![FieldError::new(&pointer, "a step must be an object")])
                        .and_then(|obj| distill::parse(obj, &pointer, current.as_ref()))
                        .map(|(d, student)| {
                            if let (Some(c), Some(s)) = (current.as_mut(), student) {
                                c.tensors = s.tensors;
                                c.architecture = s.architecture;
                                c.transformer = s.transformer;
                                c.other_family = None;
                            }
                            Step::Distill(Box::new(d))
                        }),
                    _ => parse_step(item, &pointer, current.as_ref()),
                };
                match parsed {
                    Ok(step) => {
                        if i + 1 < items.len() {
                            if let Some(kind) = final_only_output(&step) {
                                errors.push(FieldError::new(
                                    format!("{pointer}/{}", if kind == "sparse" { "output" } else { "format" }),
                                    format!("`{kind}` output is not a float model the next step can read: put this step last"),
                                ));
                            }
                        }
                        steps.push(step)
                    }
                    Err(mut e) => errors.append(&mut e),
                }
            }
        }
        Some(_) => errors.push(FieldError::new(
            "/steps",
            "must be an array of step objects",
        )),
        None => errors.push(FieldError::new("/steps", "is required")),
    }
    let eval = match fields::object(obj, "eval", "", &mut errors) {
        None => None,
        Some(e) => {
            if let Some(f) = facts {
                train::require_runnable(f, "/eval", &mut errors);
            }
            train::parse_eval(e, "/eval", &[], facts, &mut errors)
        }
    };
    if eval.is_none() {
        for (i, step) in steps.iter().enumerate() {
            if let Step::Quantize(q) = step {
                if q.max_accuracy_drop.is_some() {
                    errors.push(FieldError::new(
                        format!("/steps/{i}/max_accuracy_drop"),
                        "needs the job's `eval` dataset to measure the accuracy drop",
                    ));
                }
            }
        }
    }
    let priority = int_in(obj, "priority", 0, limits::PRIORITY, &mut errors);
    let max_attempts = int_in(obj, "max_attempts", 3, limits::MAX_ATTEMPTS, &mut errors);
    let timeout_seconds = int_in(
        obj,
        "timeout_seconds",
        3600,
        limits::TIMEOUT_SECONDS,
        &mut errors,
    );
    let seed = match obj.get("seed") {
        None | Some(Value::Null) => 0,
        Some(v) => match v.as_u64() {
            Some(s) => s,
            None => {
                errors.push(FieldError::new("/seed", "must be a non-negative integer"));
                0
            }
        },
    };
    let labels = parse_labels(obj.get("labels"), &mut errors);
    let webhook_url = match obj.get("webhook_url") {
        None | Some(Value::Null) => None,
        Some(Value::String(u))
            if u.len() <= 2048
                && url::Url::parse(u).is_ok_and(|p| {
                    matches!(p.scheme(), "http" | "https")
                        && p.host_str().is_some_and(|h| !h.is_empty())
                        && p.username().is_empty()
                        && p.password().is_none()
                }) =>
        {
            Some(u.clone())
        }
        Some(_) => {
            errors.push(FieldError::new(
                "/webhook_url",
                "must be an http:// or https:// URL with a host, without credentials, of at most 2,048 characters",
            ));
            None
        }
    };
    if errors.is_empty() {
        Ok(JobSpec {
            model_id,
            steps,
            eval,
            priority,
            max_attempts,
            timeout_seconds,
            labels,
            webhook_url,
            seed,
        })
    } else {
        Err(errors)
    }
}

/// Parse one step object found at `pointer`.
pub fn parse_step(
    item: &Value,
    pointer: &str,
    facts: Option<&Facts>,
) -> Result<Step, Vec<FieldError>> {
    let Some(obj) = item.as_object() else {
        return Err(vec![FieldError::new(
            pointer,
            "a step must be an object with an `op`",
        )]);
    };
    let op = match obj.get("op").and_then(Value::as_str) {
        Some(op) => op,
        None => {
            return Err(vec![FieldError::new(
                format!("{pointer}/op"),
                format!("is required; one of {}", OPS.join(", ")),
            )])
        }
    };
    match op {
        "quantize" | "prune"
            if matches!(
                (op, obj.get("method").and_then(Value::as_str)),
                ("quantize", Some("gptq" | "awq" | "hqq" | "auto"))
                    | ("prune", Some("wanda" | "sparsegpt"))
            ) =>
        {
            calibrated::parse(obj, pointer, facts).map(|c| Step::Calibrated(Box::new(c)))
        }
        "quantize" => quantize::parse(obj, pointer, facts),
        "prune" => prune::parse(obj, pointer, facts).map(|p| Step::Prune(Box::new(p))),
        "distill" => distill::parse(obj, pointer, facts).map(|(d, _)| Step::Distill(Box::new(d))),
        "finetune" => {
            let mut errors = Vec::new();
            match train::parse_finetune(obj, pointer, facts, &mut errors) {
                Some(f) if errors.is_empty() => Ok(Step::Finetune(Box::new(f))),
                _ => Err(errors),
            }
        }
        "evaluate" => {
            let mut errors = Vec::new();
            if let Some(f) = facts {
                train::require_runnable(f, pointer, &mut errors);
            }
            match train::parse_eval(obj, pointer, &["op"], facts, &mut errors) {
                Some(e) if errors.is_empty() => Ok(Step::Evaluate(e)),
                _ => Err(errors),
            }
        }
        other => Err(vec![FieldError::new(
            format!("{pointer}/op"),
            format!("unknown op `{other}`; expected one of {}", OPS.join(", ")),
        )]),
    }
}

/// An optional list of non-empty glob patterns.
fn patterns(v: Option<&Value>, pointer: &str, errors: &mut Vec<FieldError>) -> Vec<String> {
    match v {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                match item.as_str() {
                    Some(s) if !s.is_empty() => out.push(s.to_string()),
                    _ => errors.push(FieldError::new(
                        format!("{pointer}/{i}"),
                        "must be a non-empty glob pattern string",
                    )),
                }
            }
            out
        }
        Some(_) => {
            errors.push(FieldError::new(
                pointer,
                "must be an array of glob patterns",
            ));
            Vec::new()
        }
    }
}

fn check_patterns(
    tensors: &[TensorInfo],
    pats: &[String],
    pointer: &str,
    errors: &mut Vec<FieldError>,
) {
    for (i, p) in pats.iter().enumerate() {
        if !tensors.iter().any(|t| select::glob_match(p, &t.name)) {
            errors.push(FieldError::new(
                format!("{pointer}/{i}"),
                format!("pattern `{p}` matches no tensor of the model"),
            ));
        }
    }
}

fn int_in(
    obj: &Map<String, Value>,
    key: &str,
    default: i64,
    (lo, hi): (i64, i64),
    errors: &mut Vec<FieldError>,
) -> i64 {
    match obj.get(key) {
        None | Some(Value::Null) => default,
        Some(v) => match v.as_i64() {
            Some(n) if (lo..=hi).contains(&n) => n,
            _ => {
                errors.push(FieldError::new(
                    format!("/{key}"),
                    format!("must be an integer in [{lo}, {hi}]"),
                ));
                default
            }
        },
    }
}

fn parse_labels(v: Option<&Value>, errors: &mut Vec<FieldError>) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    match v {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            if map.len() > limits::MAX_LABELS {
                errors.push(FieldError::new(
                    "/labels",
                    format!("at most {} labels", limits::MAX_LABELS),
                ));
            }
            for (k, v) in map {
                let key_ok = !k.is_empty()
                    && k.len() <= 63
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_.-/".contains(c));
                if !key_ok {
                    errors.push(FieldError::new(
                        format!("/labels/{}", escape(k)),
                        "label keys are 1–63 characters of [A-Za-z0-9_.-/]",
                    ));
                    continue;
                }
                match v.as_str() {
                    Some(s) if s.len() <= 255 => {
                        labels.insert(k.clone(), s.to_string());
                    }
                    _ => errors.push(FieldError::new(
                        format!("/labels/{}", escape(k)),
                        "label values are strings of at most 255 characters",
                    )),
                }
            }
        }
        Some(_) => errors.push(FieldError::new(
            "/labels",
            "must be an object of string values",
        )),
    }
    labels
}

#[cfg(test)]
mod tests;
