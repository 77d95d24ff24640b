//! Runs one job's pipeline: blocking, on a worker thread, step by step through `compress`,
//! each step reading the previous step's committed blob and writing a new content-addressed
//! one. Returns the outputs for the queue to record; records nothing itself.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::compress::engine::data::{Dataset, Subset};
use crate::compress::engine::evaluate::{self, Evaluation};
use crate::compress::engine::finetune::{
    self, EarlyStoppingParams, FinetuneParams, HeadParams, OptimizerName, OptimizerParams,
    ScheduleName, ScheduleParams,
};
use crate::compress::engine::sequential::arch::Architecture;
use crate::compress::engine::sequential::model::{Model, NamedTensor};
use crate::compress::engine::train::{Checkpoint, EpochMetrics, StopMetric, TrainHooks};
use crate::compress::formats::safetensors::{
    encode_f32, write_safetensors, Dtype, SafetensorsFile, TensorSpec,
};
use crate::compress::progress::Ctx;
use crate::compress::{self, quant::activations, quant::float};
use crate::db::datasets::DatasetRecord;
use crate::db::jobs::JobRecord;
use crate::db::models::ModelRecord;
use crate::ids::DatasetId;
use crate::queue::{ops, JobError};
use crate::spec::{self, EvalSpec, FinetuneSpec, JobSpec, Step};
use crate::store::{BlobRef, BlobStore, TempBlob};

/// Metadata key carrying the architecture JSON in every file we write.
pub const META_ARCHITECTURE: &str = "whittle.architecture";
/// Metadata key carrying the provenance of a produced file.
pub const META_JOB: &str = "whittle.job";

/// Shortest time between two saved training checkpoints.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);

/// What a pipeline produced.
#[derive(Debug, Clone)]
pub struct PipelineOutput {
    /// The final model's blob.
    pub model: BlobRef,
    /// Its tensor inventory (`[{name, dtype, shape}]`).
    pub tensors: Value,
    /// Its element count.
    pub parameters: i64,
    /// Its architecture (changed by a head replacement).
    pub architecture: Option<Value>,
    /// The metrics document (API.md "Metrics").
    pub metrics: Value,
    /// The metrics document stored as a `report` artifact.
    pub report: BlobRef,
    /// Compact encodings of the output (`packed`, `gguf`): `(kind, format, blob)`.
    pub encodings: Vec<(String, String, BlobRef)>,
}

/// Why a pipeline stopped without output.
#[derive(Debug)]
pub enum PipelineError {
    /// The cancel flag was raised (by a cancel request, the timeout or shutdown).
    Cancelled,
    /// The job failed.
    Failed(JobError),
}

impl From<compress::Error> for PipelineError {
    fn from(e: compress::Error) -> Self {
        match e {
            compress::Error::Cancelled => PipelineError::Cancelled,
            compress::Error::Io(io) => PipelineError::Failed(JobError {
                code: "io_error".into(),
                message: format!("reading or writing a blob failed: {io}"),
                retryable: true,
            }),
            other => PipelineError::Failed(JobError {
                code: other.code().into(),
                message: other.to_string(),
                retryable: false,
            }),
        }
    }
}

impl From<crate::store::Error> for PipelineError {
    fn from(e: crate::store::Error) -> Self {
        PipelineError::Failed(JobError {
            code: "storage_error".into(),
            message: format!("the blob store failed: {e}"),
            retryable: true,
        })
    }
}

impl From<std::io::Error> for PipelineError {
    fn from(e: std::io::Error) -> Self {
        crate::store::Error::Io(e).into()
    }
}

/// Everything a pipeline reads.
pub struct PipelineInputs<'a> {
    /// Blob store (inputs are read from it, outputs written to it).
    pub store: &'a BlobStore,
    /// The job being run.
    pub job: &'a JobRecord,
    /// Its parsed spec.
    pub spec: &'a JobSpec,
    /// The input model.
    pub model: &'a ModelRecord,
    /// Every dataset the spec names.
    pub datasets: &'a HashMap<DatasetId, DatasetRecord>,
    /// Other models the job names (`distill` students, `quantize` importance weights), by id.
    pub models: &'a HashMap<String, ModelRecord>,
    /// Where an earlier attempt left off, if it saved a training checkpoint.
    pub resume: Option<ResumePoint>,
}

/// A training checkpoint saved by an earlier attempt: the step it belongs to and its blob.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResumePoint {
    /// Index of the training step.
    pub step: usize,
    /// Blob holding the checkpoint.
    pub sha256: String,
    /// Epochs it covers.
    pub epoch: usize,
}

/// Callbacks from the pipeline to the worker (called on the compute thread).
pub struct PipelineHooks<'a> {
    /// A step begins.
    pub step_started: &'a (dyn Fn(usize, &str) + Sync),
    /// A training epoch finished (step index, figures).
    pub epoch_finished: &'a (dyn Fn(usize, &EpochMetrics) + Sync),
    /// A checkpoint was stored; the worker records it so a rescued job resumes from it.
    pub checkpoint_saved: &'a (dyn Fn(ResumePoint) + Sync),
}

/// Run every step of the job's pipeline, reporting through `ctx` and `hooks`.
pub fn run_pipeline(
    inputs: &PipelineInputs,
    ctx: &Ctx,
    hooks: &PipelineHooks,
) -> Result<PipelineOutput, PipelineError> {
    let PipelineInputs {
        store,
        job,
        spec,
        model,
        ..
    } = *inputs;
    let datasets = DatasetCache::load(store, inputs.datasets)?;
    let input = SafetensorsFile::open(store.path(&model.sha256))?;
    let baseline_weights = weight_summary(&input);
    let input_arch = model
        .architecture
        .as_ref()
        .map(Architecture::from_json)
        .transpose()?;
    // The input model, loaded once when anything compares against it.
    let reference = match (&input_arch, needs_network(spec)) {
        (Some(arch), true) => Some(load_model(arch, &input)?),
        _ => None,
    };
    drop(input);
    let mut baseline = baseline_weights.to_json(model.size_bytes as u64);
    if let (Some(eval), Some(reference)) = (&spec.eval, &reference) {
        let data = datasets.get(&eval.dataset_id)?;
        let e = evaluate::evaluate(reference, &Subset::all(data), None, eval.batch_size, ctx)?;
        merge(&mut baseline, &eval_json(&e));
    }

    let steps_json: Vec<Value> = spec.steps.iter().map(Step::to_json).collect();
    let mut current = BlobRef {
        sha256: model.sha256.clone(),
        size: model.size_bytes as u64,
    };
    let mut arch_json = model.architecture.clone();
    let mut step_metrics = Vec::new();
    let mut encodings: Vec<(String, String, BlobRef)> = Vec::new();
    let env = |index: usize| ops::Env {
        store,
        datasets: &datasets,
        ctx,
        hooks,
        index,
        resume: inputs.resume.as_ref(),
        seed: spec.seed,
        eval: spec.eval.as_ref(),
        models: inputs.models,
    };
    for (index, step) in spec.steps.iter().enumerate() {
        ctx.check()?;
        (hooks.step_started)(index, step.op());
        let started = Instant::now();
        let input = SafetensorsFile::open(store.path(&current.sha256))?;
        let mut metadata = input.header().metadata.clone();
        // Activation ranges belong to the weights they were calibrated with; a step that
        // writes new weights drops them (a quantize step with `activations` sets new ones).
        metadata.remove(activations::METADATA_KEY);
        metadata.insert(
            META_JOB.into(),
            json!({
                "id": job.id.to_string(),
                "step": index,
                "steps": steps_json,
                "seed": spec.seed,
                "source_model_sha256": model.sha256,
                "dataset_sha256s": datasets.hashes(),
                "whittle_version": env!("CARGO_PKG_VERSION"),
            })
            .to_string(),
        );
        let mut record = json!({"op": step.op(), "epochs": []});
        let output: Option<TempBlob> = match step {
            Step::QuantizeFloat(q) => {
                if let Some(arch) = &arch_json {
                    metadata.insert(META_ARCHITECTURE.into(), arch.to_string());
                }
                let mut temp = store.create_temp()?;
                let selected: HashSet<String> = q
                    .selection
                    .resolve(&input.header().tensors)
                    .into_iter()
                    .map(|t| t.name.clone())
                    .collect();
                let reports =
                    float::quantize_float(&input, &selected, q.dtype, &metadata, &mut temp, ctx)?;
                let changed: Vec<_> = reports.iter().filter(|r| r.changed).collect();
                record["summary"] = json!({
                    "method": "float",
                    "dtype": q.dtype.as_str(),
                    "tensors_changed": changed.len(),
                    "tensor_bytes_before": reports.iter().map(|r| r.bytes_before).sum::<u64>(),
                    "tensor_bytes_after": reports.iter().map(|r| r.bytes_after).sum::<u64>(),
                    "max_abs_error": changed.iter().map(|r| r.max_abs_error).fold(0.0, f64::max),
                });
                record["layers"] = serde_json::to_value(&reports).unwrap_or(Value::Null);
                Some(temp)
            }
            Step::Evaluate(e) => {
                let eval =
                    evaluate_file(&arch_json, &input, &datasets, e, reference.as_ref(), ctx)?;
                record["summary"] = eval_json(&eval);
                None
            }
            Step::Finetune(f) => {
                let arch = current_arch(&arch_json)?;
                let m = Model::from_safetensors(&arch, &input)?;
                let params = datasets.training_params(f, spec.seed)?;
                let resume = match &inputs.resume {
                    Some(r) if r.step == index => {
                        let bytes = std::fs::read(store.path(&r.sha256))?;
                        Some(Checkpoint::from_safetensors_bytes(&bytes)?)
                    }
                    _ => None,
                };
                let mut on_epoch = ops::checkpointer(store, hooks, index, f.epochs);
                let out = finetune::finetune(
                    m,
                    &params,
                    ctx,
                    TrainHooks {
                        on_epoch: Some(&mut on_epoch),
                        resume,
                        ..Default::default()
                    },
                )?;
                let new_arch = out.architecture.to_json();
                metadata.insert(META_ARCHITECTURE.into(), new_arch.to_string());
                arch_json = Some(new_arch);
                record["epochs"] = serde_json::to_value(&out.history).unwrap_or(Value::Null);
                record["summary"] = json!({
                    "epochs_run": out.history.len(),
                    "best_epoch": out.best_epoch,
                    "stopped_early": out.stopped_early,
                    "restored_best": out.restored_best,
                    "trainable_parameters": out.trainable_parameters,
                    "final_train_loss": out.history.last().map(|h| h.train_loss),
                    "final_val_accuracy": out.history.last().and_then(|h| h.val_accuracy),
                });
                let mut temp = store.create_temp()?;
                write_named(&mut temp, &metadata, &out.weights)?;
                Some(temp)
            }
            Step::Prune(p) => {
                let out = ops::prune(&env(index), p, &input, &arch_json, &metadata)?;
                absorb(store, &mut record, &mut arch_json, &mut encodings, out)?
            }
            Step::Quantize(q) => {
                let out = ops::quantize(&env(index), q, &input, &arch_json, &metadata)?;
                absorb(store, &mut record, &mut arch_json, &mut encodings, out)?
            }
            Step::Distill(d) => {
                let out = ops::distill(&env(index), d, &input, &arch_json, &metadata)?;
                absorb(store, &mut record, &mut arch_json, &mut encodings, out)?
            }
        };
        drop(input);
        if let Some(temp) = output {
            current = store.commit(temp)?;
        }
        record["seconds"] = json!(started.elapsed().as_secs_f64());
        step_metrics.push(record);
    }

    let output = SafetensorsFile::open(store.path(&current.sha256))?;
    let final_weights = weight_summary(&output);
    let (tensors, parameters) = crate::db::models::inventory(output.header());
    let mut final_json = json!({
        "parameters": final_weights.parameters,
        "nonzero": final_weights.nonzero,
        "size_bytes": current.size,
        "bits_per_weight": final_weights.bits_per_weight(),
        "compression_ratio": model.size_bytes as f64 / current.size.max(1) as f64,
    });
    if let Some((kind, _, blob)) = encodings.last() {
        final_json["encoding"] = json!(kind);
        final_json["packed_size_bytes"] = json!(blob.size);
        final_json["compression_ratio"] = json!(model.size_bytes as f64 / blob.size.max(1) as f64);
        final_json["bits_per_weight"] =
            json!(blob.size as f64 * 8.0 / final_weights.parameters.max(1) as f64);
    }
    if let Some(eval) = &spec.eval {
        let e = evaluate_file(
            &arch_json,
            &output,
            &datasets,
            eval,
            reference.as_ref(),
            ctx,
        )?;
        merge(&mut final_json, &eval_json(&e));
        final_json["agreement_with_baseline"] = json!(e.agreement);
    }
    let metrics = json!({
        "baseline": baseline,
        "steps": step_metrics,
        "final": final_json,
    });
    let report = store.put_bytes(
        serde_json::to_vec_pretty(&metrics)
            .unwrap_or_default()
            .as_slice(),
    )?;
    Ok(PipelineOutput {
        model: current,
        tensors,
        parameters,
        architecture: arch_json,
        metrics,
        report,
        encodings,
    })
}

/// Evaluate the network in `file` (with architecture `arch`) on `spec`'s dataset.
pub(super) fn evaluate_file(
    arch: &Option<Value>,
    file: &SafetensorsFile,
    datasets: &DatasetCache,
    spec: &EvalSpec,
    reference: Option<&Model>,
    ctx: &Ctx,
) -> Result<Evaluation, PipelineError> {
    let model = load_model(&current_arch(arch)?, file)?;
    let data = datasets.get(&spec.dataset_id)?;
    Ok(evaluate::evaluate(
        &model,
        &Subset::all(data),
        reference,
        spec.batch_size,
        ctx,
    )?)
}

/// The network in `file`, simulating its calibrated activation quantization if it has one.
pub(super) fn load_model(arch: &Architecture, file: &SafetensorsFile) -> compress::Result<Model> {
    let mut model = Model::from_safetensors(arch, file)?;
    if let Some(ranges) = activations::from_metadata(&file.header().metadata)? {
        model.set_activation_transform(Some(activations::transform(&ranges)));
    }
    Ok(model)
}

/// Whether any step or the job's `eval` runs the network.
fn needs_network(spec: &JobSpec) -> bool {
    spec.eval.is_some()
        || spec.steps.iter().any(|s| match s {
            Step::Finetune(_) | Step::Evaluate(_) | Step::Distill(_) => true,
            Step::Prune(p) => p.schedule.is_some(),
            Step::Quantize(q) => {
                q.qat.is_some() || q.max_accuracy_drop.is_some() || q.activations.is_some()
            }
            Step::QuantizeFloat(_) => false,
        })
}

/// Merge a compress step's output into its metrics record; returns its file.
fn absorb(
    store: &BlobStore,
    record: &mut Value,
    arch_json: &mut Option<Value>,
    encodings: &mut Vec<(String, String, BlobRef)>,
    out: ops::StepOut,
) -> Result<Option<TempBlob>, PipelineError> {
    merge(record, &out.record);
    if let Some(a) = out.architecture {
        *arch_json = Some(a);
    }
    if let Some(a) = out.artifact {
        let blob = store.commit(a.file)?;
        record["encoded_bytes"] = json!(blob.size);
        encodings.push((a.kind.to_string(), a.format.to_string(), blob));
    }
    Ok(out.file)
}

pub(super) fn current_arch(arch: &Option<Value>) -> Result<Architecture, PipelineError> {
    match arch {
        Some(a) => Ok(Architecture::from_json(a)?),
        None => Err(PipelineError::Failed(JobError {
            code: "architecture_required".into(),
            message: "this step runs the network and the model has no architecture".into(),
            retryable: false,
        })),
    }
}

/// The job's datasets, loaded from the store once, before the first step.
pub(super) struct DatasetCache<'a> {
    records: &'a HashMap<DatasetId, DatasetRecord>,
    loaded: HashMap<DatasetId, Dataset>,
}

impl<'a> DatasetCache<'a> {
    fn load(
        store: &BlobStore,
        records: &'a HashMap<DatasetId, DatasetRecord>,
    ) -> Result<Self, PipelineError> {
        let mut loaded = HashMap::new();
        for (id, record) in records {
            loaded.insert(*id, Dataset::from_safetensors(store.path(&record.sha256))?);
        }
        Ok(Self { records, loaded })
    }

    pub(super) fn get(&self, id: &DatasetId) -> Result<&Dataset, PipelineError> {
        self.loaded.get(id).ok_or_else(|| {
            PipelineError::Failed(JobError {
                code: "dataset_not_found".into(),
                message: format!("dataset {id} no longer exists"),
                retryable: false,
            })
        })
    }

    /// The engine's training parameters for `f`, with its training and validation data.
    pub(super) fn training_params(
        &self,
        f: &FinetuneSpec,
        job_seed: u64,
    ) -> Result<FinetuneParams<'_>, PipelineError> {
        let validation = match &f.validation {
            spec::train::Validation::Dataset(d) => Some(self.get(d)?),
            _ => None,
        };
        Ok(finetune_params(
            f,
            job_seed,
            self.get(&f.dataset_id)?,
            validation,
        ))
    }

    /// `{dataset_id: sha256}` of every dataset the job names (for provenance).
    fn hashes(&self) -> Value {
        Value::Object(
            self.records
                .iter()
                .map(|(id, r)| (id.to_string(), json!(r.sha256)))
                .collect(),
        )
    }
}

/// The API's figures of an evaluation.
pub(super) fn eval_json(e: &Evaluation) -> Value {
    json!({
        "samples": e.samples,
        "loss": e.loss,
        "accuracy": e.accuracy,
        "top5_accuracy": e.top5_accuracy,
        "per_class_accuracy": e.per_class,
        "agreement": e.agreement,
        "kl_divergence": e.kl_divergence,
        "samples_per_second": e.samples_per_second,
        "mean_batch_latency_ms": e.mean_batch_latency_ms,
    })
}

fn merge(into: &mut Value, from: &Value) {
    if let (Some(a), Some(b)) = (into.as_object_mut(), from.as_object()) {
        for (k, v) in b {
            a.insert(k.clone(), v.clone());
        }
    }
}

/// Map the validated spec onto the engine's parameters.
fn finetune_params<'d>(
    f: &FinetuneSpec,
    job_seed: u64,
    train: &'d Dataset,
    validation: Option<&'d Dataset>,
) -> FinetuneParams<'d> {
    use spec::train::{LrScheduleSpec, OptimizerSpec, Validation as V};
    let mut p = FinetuneParams::new(train);
    p.validation = match (&f.validation, validation) {
        (V::Fraction(x), _) => finetune::Validation::Fraction(*x),
        (V::Dataset(_), Some(d)) => finetune::Validation::Dataset(d),
        _ => finetune::Validation::None,
    };
    p.epochs = f.epochs;
    p.batch_size = f.batch_size;
    p.optimizer = match f.optimizer {
        OptimizerSpec::AdamW { lr, weight_decay } => OptimizerParams {
            name: OptimizerName::AdamW,
            lr,
            weight_decay,
            momentum: 0.0,
            nesterov: false,
        },
        OptimizerSpec::Sgd {
            lr,
            momentum,
            weight_decay,
            nesterov,
        } => OptimizerParams {
            name: OptimizerName::Sgd,
            lr,
            weight_decay,
            momentum,
            nesterov,
        },
    };
    p.lr_schedule = ScheduleParams {
        kind: match f.lr_schedule {
            LrScheduleSpec::Constant => ScheduleName::Constant,
            LrScheduleSpec::Cosine => ScheduleName::Cosine,
            LrScheduleSpec::Step { .. } => ScheduleName::Step,
        },
        step_size: match f.lr_schedule {
            LrScheduleSpec::Step { step_size, .. } => step_size,
            _ => 1,
        },
        gamma: match f.lr_schedule {
            LrScheduleSpec::Step { gamma, .. } => gamma,
            _ => 0.1,
        },
        warmup_epochs: f.warmup_epochs,
    };
    p.freeze = f.freeze.clone();
    p.head = f.head.as_ref().map(|h| HeadParams {
        layer: h.layer.clone(),
        num_classes: h.num_classes,
    });
    p.layer_lr = f.layer_lr.clone();
    p.early_stopping = f.early_stopping.as_ref().map(|e| EarlyStoppingParams {
        patience: e.patience,
        metric: if e.metric == "val_accuracy" {
            StopMetric::ValAccuracy
        } else {
            StopMetric::ValLoss
        },
    });
    p.grad_clip = f.grad_clip;
    p.seed = f.seed.unwrap_or(job_seed);
    p
}

/// Write f32 tensors as a safetensors file.
pub(super) fn write_named(
    out: &mut dyn std::io::Write,
    metadata: &std::collections::BTreeMap<String, String>,
    weights: &[NamedTensor],
) -> compress::Result<u64> {
    let specs: Vec<TensorSpec> = weights
        .iter()
        .map(|w| TensorSpec::new(w.name.clone(), Dtype::F32, w.shape.clone()))
        .collect();
    write_safetensors(out, metadata, &specs, |i, w| {
        w.write_all(&encode_f32(&weights[i].values))?;
        Ok(())
    })
}

/// Element and size counts of a model.
#[derive(Debug, Default, Clone, Copy)]
struct WeightSummary {
    parameters: u64,
    nonzero: u64,
    float_bytes: u64,
}

impl WeightSummary {
    fn bits_per_weight(&self) -> f64 {
        if self.parameters == 0 {
            0.0
        } else {
            self.float_bytes as f64 * 8.0 / self.parameters as f64
        }
    }

    fn to_json(self, size_bytes: u64) -> Value {
        json!({
            "parameters": self.parameters,
            "nonzero": self.nonzero,
            "size_bytes": size_bytes,
            "bits_per_weight": self.bits_per_weight(),
        })
    }
}

/// One pass over a file's floating-point tensors: elements, non-zero elements, bytes.
fn weight_summary(file: &SafetensorsFile) -> WeightSummary {
    let mut s = WeightSummary::default();
    for t in file.header().tensors.iter().filter(|t| t.dtype.is_float()) {
        let width = t.dtype.size_in_bytes();
        // A float is zero when every bit but the sign bit (top bit of the last byte,
        // little-endian) is zero, so -0.0 counts as zero too.
        s.nonzero += file
            .bytes(t)
            .chunks_exact(width)
            .filter(|e| {
                let last = e.len() - 1;
                e[..last].iter().any(|&b| b != 0) || e[last] & 0x7f != 0
            })
            .count() as u64;
        s.parameters += t.numel() as u64;
        s.float_bytes += t.nbytes() as u64;
    }
    s
}
