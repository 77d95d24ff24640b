//! One file per op: load what the step reads, call `compress`, describe what it did. Glue
//! only — the algorithms live in `compress`, the loop over a job's steps in
//! [`super::runner`], which is the only caller of `run`.
//!
//! A step reads the previous step's committed file and returns a new one in a temp blob (or
//! none, for `evaluate`), optionally a second encoding kept as an artifact (`packed`,
//! `gguf`), the architecture when it changed, and its metrics record.

mod auto;
mod calibrated;
mod distill;
mod distill_text;
mod evaluate;
mod finetune;
mod prune;
mod quantize;
mod sweep_state;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::codes::Code;
use crate::compress::engine::data::{Dataset, Subset, TextEncoder};
use crate::compress::engine::evaluate::{evaluate, ClassAccuracy, EvalData, Evaluation};
use crate::compress::engine::families;
use crate::compress::engine::finetune::{FinetuneParams, Validation};
use crate::compress::engine::sequential::arch::Architecture;
use crate::compress::engine::sequential::evaluate_weights;
use crate::compress::engine::sequential::model::Model;
use crate::compress::engine::text_eval::{self, evaluate_text, TextEvaluation, TextFigures};
use crate::compress::engine::train::{Checkpoint, EpochMetrics};
use crate::compress::engine::Network;
use crate::compress::formats::hf;
use crate::compress::formats::safetensors::{self, NamedTensor, SafetensorsFile};
use crate::compress::progress::Ctx;
use crate::compress::quant::activations;
use crate::compress::{self};
use crate::db::datasets::DatasetRecord;
use crate::db::models::ModelRecord;
use crate::ids::DatasetId;
use crate::queue::JobError;
use crate::spec::{EvalSpec, FinetuneSpec, Step};
use crate::store::{BlobStore, TempBlob};

/// Shortest time between two saved training checkpoints.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);

/// Why a pipeline stopped without output.
#[derive(Debug)]
pub enum PipelineError {
    /// The cancel flag was raised (by a cancel request, the timeout or shutdown).
    Cancelled,
    /// The job failed.
    Failed(JobError),
    /// A parameter was refused by `compress` (named its way; [`PipelineError::at`] locates it).
    Invalid {
        /// The parameter, as `compress` names it.
        field: String,
        /// What is wrong.
        detail: String,
    },
}

impl PipelineError {
    /// This error with a refused parameter located under the JSON pointer `base` (a step's).
    pub fn at(self, base: &str) -> PipelineError {
        match self {
            PipelineError::Invalid { field, detail } => {
                PipelineError::Failed(located(base, &field, &detail))
            }
            other => other,
        }
    }

    /// The job error to record for this failure.
    pub fn job_error(self) -> JobError {
        match self {
            PipelineError::Failed(e) => e,
            PipelineError::Cancelled => JobError::fatal(Code::Cancelled, "the job was cancelled"),
            PipelineError::Invalid { field, detail } => located("", &field, &detail),
        }
    }
}

impl From<compress::Error> for PipelineError {
    fn from(e: compress::Error) -> Self {
        match e {
            compress::Error::Cancelled => PipelineError::Cancelled,
            compress::Error::InvalidParameter { field, detail } => {
                PipelineError::Invalid { field, detail }
            }
            compress::Error::Io(io) => PipelineError::Failed(JobError::retryable(
                Code::IoError,
                format!("reading or writing a blob failed: {io}"),
            )),
            other => PipelineError::Failed(JobError::fatal(other.code(), other.to_string())),
        }
    }
}

impl From<crate::store::Error> for PipelineError {
    fn from(e: crate::store::Error) -> Self {
        PipelineError::Failed(JobError::retryable(
            Code::StorageError,
            format!("the blob store failed: {e}"),
        ))
    }
}

impl From<std::io::Error> for PipelineError {
    fn from(e: std::io::Error) -> Self {
        crate::store::Error::Io(e).into()
    }
}

/// A refused parameter as a job error naming its JSON pointer under `base`.
fn located(base: &str, field: &str, detail: &str) -> JobError {
    JobError::fatal(
        Code::ValidationFailed,
        format!(
            "invalid parameter at {}: {detail}",
            crate::spec::pointer_of(base, field)
        ),
    )
}

/// A fatal failure of the job with `code`.
pub(super) fn failed(code: Code, message: impl Into<String>) -> PipelineError {
    PipelineError::Failed(JobError::fatal(code, message))
}

/// A training checkpoint saved by an earlier attempt: the step it belongs to and its blob.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResumePoint {
    /// Index of the training step.
    pub step: usize,
    /// Blob holding the checkpoint.
    pub sha256: String,
    /// Epochs it covers (blocks, for a calibrated step: see `unit`).
    pub epoch: usize,
    /// What `epoch` counts when not epochs (`block`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
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

/// The job's datasets, loaded from the store once, before the first step.
pub struct DatasetCache<'a> {
    records: &'a HashMap<DatasetId, DatasetRecord>,
    loaded: HashMap<DatasetId, Dataset>,
}

impl<'a> DatasetCache<'a> {
    /// Loads every dataset in `records`.
    pub fn load(
        store: &dyn BlobStore,
        records: &'a HashMap<DatasetId, DatasetRecord>,
    ) -> Result<Self, PipelineError> {
        let mut loaded = HashMap::new();
        for (id, record) in records {
            loaded.insert(
                *id,
                Dataset::load(&record.format, store.materialize(&record.sha256)?)?,
            );
        }
        Ok(Self { records, loaded })
    }

    /// The dataset `id`.
    pub fn get(&self, id: &DatasetId) -> Result<&Dataset, PipelineError> {
        self.loaded.get(id).ok_or_else(|| {
            failed(
                Code::DatasetNotFound,
                format!("dataset {id} no longer exists"),
            )
        })
    }

    /// The engine's training parameters for `f`, with its training and validation data.
    pub fn training_params(
        &self,
        f: &FinetuneSpec,
        job_seed: u64,
    ) -> Result<FinetuneParams<&Dataset>, PipelineError> {
        let validation = match &f.validation {
            Validation::None => Validation::None,
            Validation::Fraction(x) => Validation::Fraction(*x),
            Validation::Dataset(d) => Validation::Dataset(self.get(d)?),
        };
        Ok(f.with_data(self.get(&f.dataset)?, validation, job_seed))
    }

    /// The evaluation data of `spec`.
    pub fn eval_data(&self, spec: &EvalSpec) -> Result<EvalData<'_>, PipelineError> {
        Ok(EvalData {
            dataset: self.get(&spec.dataset_id)?,
            batch_size: spec.batch_size,
        })
    }

    /// `{dataset_id: sha256}` of every dataset the job names (for provenance).
    pub fn hashes(&self) -> Value {
        Value::Object(
            self.records
                .iter()
                .map(|(id, r)| (id.to_string(), json!(r.sha256)))
                .collect(),
        )
    }
}

/// What a step reads besides its input file.
pub(super) struct Env<'a> {
    pub store: &'a dyn BlobStore,
    pub datasets: &'a DatasetCache<'a>,
    pub ctx: &'a Ctx<'a>,
    pub hooks: &'a PipelineHooks<'a>,
    /// Index of the step in the pipeline.
    pub index: usize,
    /// A checkpoint an earlier attempt saved, if any (it belongs to step `resume.step`).
    pub resume: Option<&'a ResumePoint>,
    /// The job's seed.
    pub seed: u64,
    /// The job's `eval`.
    pub eval: Option<&'a EvalSpec>,
    /// The job's input model, loaded the first time something compares against it.
    pub reference: &'a Reference<'a>,
    /// Other models the job names (`distill` students, `quantize` importance weights), by id.
    pub models: &'a HashMap<String, ModelRecord>,
}

/// The file a step reads and what is known about it.
pub(super) struct Input<'a> {
    /// The previous step's output (the job's model for the first step).
    pub file: &'a SafetensorsFile,
    /// Its architecture, when it has one.
    pub architecture: &'a Option<Value>,
    /// Its transformer (config and tokenizer), when it is a folder model the engine runs.
    pub transformer: Option<&'a TransformerSource>,
    /// Whether the file is the job's input model itself (no step changed it yet).
    pub unchanged: bool,
    /// Metadata for the files the step writes: the input's, with the job's provenance and
    /// the architecture set (a step that changes the architecture replaces it).
    pub metadata: &'a BTreeMap<String, String>,
}

/// What a step produced.
pub(super) struct StepOut {
    /// The new float model file, when the step writes one (what the next step reads).
    pub file: Option<TempBlob>,
    /// A second encoding of the same model (`packed`, `gguf`), kept as an artifact.
    pub artifact: Option<Artifact>,
    /// An evaluation's saved outputs (`save_outputs`), kept as an `outputs` artifact.
    pub outputs: Option<TempBlob>,
    /// The architecture after the step (a folder model's: its `config.json`), when it
    /// changed.
    pub architecture: Option<Value>,
    /// `summary`, `layers`, `epochs`, … merged into the step's metrics record.
    pub record: Value,
}

/// A compact encoding of a step's output, stored as an artifact of the job.
pub(super) struct Artifact {
    /// Artifact kind (`packed`, `gguf`).
    pub kind: &'static str,
    /// File format (`safetensors`, `gguf`).
    pub format: &'static str,
    /// Its bytes.
    pub file: TempBlob,
}

/// Runs one step.
pub(super) fn run(env: &Env, step: &Step, input: &Input) -> Result<StepOut, PipelineError> {
    match step {
        Step::QuantizeFloat(q) => quantize::float(env, q, input),
        Step::Quantize(q) => quantize::quantize(env, q, input),
        Step::Prune(p) => prune::prune(env, p, input),
        Step::Finetune(f) => finetune::finetune(env, f, input),
        Step::Distill(d) => match input.transformer {
            Some(source) => distill_text::distill(env, d, input, source),
            None => distill::distill(env, d, input),
        },
        Step::Evaluate(e) => evaluate::evaluate(env, e, input),
        Step::Calibrated(c) => calibrated::calibrated(env, c, input),
    }
}

impl Env<'_> {
    /// A model the job names besides its input (`role`: what it is for, for the error).
    fn named_model(&self, id: &str, role: &str) -> Result<&ModelRecord, PipelineError> {
        self.models.get(id).ok_or_else(|| {
            failed(
                Code::ModelNotFound,
                format!("{role} model {id} no longer exists"),
            )
        })
    }

    /// The job's eval data, when it has an `eval`.
    fn eval_data(&self) -> Result<Option<EvalData<'_>>, PipelineError> {
        self.eval.map(|e| self.datasets.eval_data(e)).transpose()
    }

    /// Evaluates `weights` (of `arch`) on the job's eval dataset, when there is one.
    fn eval_weights(
        &self,
        arch: &Architecture,
        weights: Vec<NamedTensor>,
        reference: Option<&dyn Network>,
    ) -> Result<Option<Evaluation>, PipelineError> {
        match self.eval_data()? {
            Some(data) => Ok(Some(evaluate_weights(
                arch, weights, data, reference, self.ctx,
            )?)),
            None => Ok(None),
        }
    }

    /// The training checkpoint an earlier attempt left for this step, if any.
    fn resume_checkpoint(&self) -> Result<Option<Checkpoint>, PipelineError> {
        match self.resume_bytes()? {
            Some(bytes) => Ok(Some(Checkpoint::from_safetensors_bytes(&bytes)?)),
            None => Ok(None),
        }
    }

    /// The bytes of the checkpoint an earlier attempt left for this step, if any.
    fn resume_bytes(&self) -> Result<Option<Vec<u8>>, PipelineError> {
        match self.resume {
            Some(r) if r.step == self.index => {
                Ok(Some(std::fs::read(self.store.materialize(&r.sha256)?)?))
            }
            _ => Ok(None),
        }
    }

    /// Stores a checkpoint of this step covering `done` epochs (or `unit`s), written by
    /// `write`, and tells the worker, so a rescued attempt resumes from it.
    fn save_checkpoint(
        &self,
        write: impl FnOnce(&mut dyn std::io::Write) -> compress::Result<()>,
        done: usize,
        unit: Option<&str>,
    ) -> compress::Result<()> {
        let mut temp = self.store.create_temp()?;
        {
            let mut w = std::io::BufWriter::new(&mut temp);
            write(&mut w)?;
            std::io::Write::flush(&mut w)?;
        }
        let blob = self
            .store
            .commit(temp)
            .map_err(|e| compress::Error::Io(std::io::Error::other(e.to_string())))?;
        (self.hooks.checkpoint_saved)(ResumePoint {
            step: self.index,
            sha256: blob.sha256,
            epoch: done,
            unit: unit.map(str::to_string),
        });
        Ok(())
    }

    /// Reports every epoch and saves training checkpoints of this step: the first epoch's,
    /// then at most one per [`CHECKPOINT_INTERVAL`], none for the last epoch (the step's
    /// output follows at once).
    fn checkpointer(
        &self,
        epochs: usize,
    ) -> impl FnMut(&EpochMetrics, &Checkpoint) -> compress::Result<()> + '_ {
        let mut last_saved: Option<Instant> = None;
        move |m: &EpochMetrics, c: &Checkpoint| {
            (self.hooks.epoch_finished)(self.index, m);
            let due = last_saved.is_none_or(|t| t.elapsed() >= CHECKPOINT_INTERVAL);
            if !due || c.epoch >= epochs {
                return Ok(());
            }
            last_saved = Some(Instant::now());
            let bytes = c.to_safetensors_bytes()?;
            self.save_checkpoint(|w| Ok(w.write_all(&bytes)?), c.epoch, None)
        }
    }

    /// f32 `weights` written as a new safetensors temp blob.
    fn write_f32(
        &self,
        metadata: &BTreeMap<String, String>,
        weights: &[NamedTensor],
    ) -> Result<(TempBlob, u64), PipelineError> {
        let mut temp = self.store.create_temp()?;
        let written = safetensors::write_f32(&mut temp, metadata, weights)?;
        Ok((temp, written))
    }
}

/// The architecture a step that runs the network needs.
pub(super) fn current_arch(arch: &Option<Value>) -> Result<Architecture, PipelineError> {
    match arch {
        Some(a) => Ok(Architecture::from_json(a)?),
        None => Err(failed(
            Code::ArchitectureRequired,
            "this step runs the network and the model has no architecture",
        )),
    }
}

/// The network a training step trains: the input's transformer, or its sequential
/// architecture over the input file.
pub(super) fn network(input: &Input) -> Result<Box<dyn Network>, PipelineError> {
    Ok(match input.transformer {
        Some(t) => t.load(input.file)?,
        None => Box::new(Model::from_safetensors(
            &current_arch(input.architecture)?,
            input.file,
        )?),
    })
}

/// The network in `file`, simulating its calibrated activation quantization if it has one.
pub(super) fn load_model(arch: &Architecture, file: &SafetensorsFile) -> compress::Result<Model> {
    let mut model = Model::from_safetensors(arch, file)?;
    if let Some(ranges) = activations::from_metadata(&file.header().metadata)? {
        model.set_activation_transform(Some(activations::transform(&ranges)));
    }
    Ok(model)
}

/// The job's input model as the reference of comparisons, loaded the first time one needs
/// it (an evaluation of the unchanged input never does), then kept for the job.
pub struct Reference<'a> {
    cell: std::sync::OnceLock<Option<Box<dyn Network>>>,
    load: Box<LoadReference<'a>>,
}

/// How a [`Reference`] is loaded.
type LoadReference<'a> =
    dyn Fn() -> Result<Option<Box<dyn Network>>, PipelineError> + Send + Sync + 'a;

impl<'a> Reference<'a> {
    /// A reference that `load` loads (`None`: the model is not a network the engine runs).
    pub fn new(
        load: impl Fn() -> Result<Option<Box<dyn Network>>, PipelineError> + Send + Sync + 'a,
    ) -> Self {
        Reference {
            cell: std::sync::OnceLock::new(),
            load: Box::new(load),
        }
    }

    /// The reference network, loading it on first use.
    pub fn get(&self) -> Result<Option<&dyn Network>, PipelineError> {
        if let Some(r) = self.cell.get() {
            return Ok(r.as_deref());
        }
        let loaded = (self.load)()?;
        Ok(self.cell.get_or_init(|| loaded).as_deref())
    }
}

/// A folder model's transformer: its config and tokenizer, for the steps that run it.
pub struct TransformerSource {
    /// The parsed `config.json`.
    pub config: Value,
    /// The model's name (a GGUF export's `general.name`).
    pub name: String,
    /// Where its `tokenizer.json` is, when the folder has one.
    tokenizer_path: Option<std::path::PathBuf>,
    /// The tokenizer, loaded the first time a step reads text.
    encoder: std::sync::OnceLock<Option<Arc<TextEncoder>>>,
}

impl TransformerSource {
    /// The source of `model` when it is a folder model of a family the engine runs.
    pub fn of(store: &dyn BlobStore, model: &ModelRecord) -> Result<Option<Self>, PipelineError> {
        let Some(config) = model.config.as_ref().filter(|c| hf::family_of(c).is_some()) else {
            return Ok(None);
        };
        let tokenizer_path = match model.file(hf::TOKENIZER) {
            Some(f) => Some(store.materialize(&f.sha256)?),
            None => None,
        };
        Ok(Some(Self {
            config: config.clone(),
            name: model.name.clone(),
            tokenizer_path,
            encoder: std::sync::OnceLock::new(),
        }))
    }

    /// The same folder with `config` as its `config.json` (after a step changed it).
    pub fn with_config(&self, config: Value) -> Self {
        Self {
            config,
            name: self.name.clone(),
            tokenizer_path: self.tokenizer_path.clone(),
            encoder: self.encoder.clone(),
        }
    }

    /// The family its config names.
    pub fn family(&self) -> Option<crate::compress::engine::Family> {
        hf::family_of(&self.config)
    }

    /// The parsed `tokenizer.json`, when the folder has one.
    pub fn tokenizer_json(&self) -> Result<Option<Value>, PipelineError> {
        match &self.tokenizer_path {
            Some(p) => Ok(Some(hf::parse_json_object(
                hf::TOKENIZER,
                &std::fs::read(p)?,
            )?)),
            None => Ok(None),
        }
    }

    fn encoder(&self) -> compress::Result<Option<Arc<TextEncoder>>> {
        if let Some(e) = self.encoder.get() {
            return Ok(e.clone());
        }
        let loaded = match &self.tokenizer_path {
            Some(p) => Some(Arc::new(TextEncoder::from_file(p)?)),
            None => None,
        };
        Ok(self.encoder.get_or_init(|| loaded).clone())
    }

    /// The network with the weights of `file`.
    pub fn load(&self, file: &SafetensorsFile) -> compress::Result<Box<dyn Network>> {
        families::load(&self.config, file, self.encoder()?)
    }
}

/// What an evaluation produced: a classifier's figures, or a transformer's on text.
pub(super) enum Evaluated {
    /// A sequential network on a tensor dataset.
    Classifier(Evaluation),
    /// A transformer on text.
    Text(TextEvaluation),
}

impl Evaluated {
    /// The model's figures as the metrics document shows them.
    pub fn figures(&self) -> EvalFiguresOf {
        match self {
            Evaluated::Classifier(e) => EvalFiguresOf::Classifier(EvalFigures::from(e)),
            Evaluated::Text(t) => EvalFiguresOf::Text(t.model.clone()),
        }
    }

    /// The fraction of top-1 predictions equal to the reference's, when compared.
    pub fn agreement(&self) -> Option<f64> {
        match self {
            Evaluated::Classifier(e) => e.agreement,
            Evaluated::Text(t) => match &t.model {
                TextFigures::Language(l) => l.top1_agreement,
                TextFigures::Encoder(_) => None,
            },
        }
    }
}

/// Evaluates the network in `file` (with architecture `arch`, or the transformer of
/// `transformer`) on `spec`'s dataset, against `reference` when given.
pub(super) fn evaluate_file(
    input: &Input,
    file: &SafetensorsFile,
    datasets: &DatasetCache,
    spec: &EvalSpec,
    reference: &Reference,
    ctx: &Ctx,
) -> Result<Evaluated, PipelineError> {
    if let (Some(t), Some(params)) = (input.transformer, &spec.text) {
        let model = t.load(file)?;
        let data = datasets.get(&spec.dataset_id)?;
        // The job's input compared with itself: run once, not twice (nor loaded twice).
        if input.unchanged {
            let e = evaluate_text(model.as_ref(), None, data, params, spec.batch_size, ctx)?;
            return Ok(Evaluated::Text(e.compared_with_itself()));
        }
        // A student of another width (an encoder drawn narrower) is evaluated alone.
        let reference = match reference.get()? {
            Some(r) if !text_eval::comparable(model.as_ref(), r)? => None,
            r => r,
        };
        return Ok(Evaluated::Text(evaluate_text(
            model.as_ref(),
            reference,
            data,
            params,
            spec.batch_size,
            ctx,
        )?));
    }
    let model = load_model(&current_arch(input.architecture)?, file)?;
    Ok(Evaluated::Classifier(evaluate_model(
        &model,
        datasets.eval_data(spec)?,
        reference.get()?,
        ctx,
    )?))
}

/// Evaluates `model` on all of `data`, against `reference` when given.
pub(super) fn evaluate_model(
    model: &dyn Network,
    data: EvalData<'_>,
    reference: Option<&dyn Network>,
    ctx: &Ctx,
) -> Result<Evaluation, PipelineError> {
    Ok(evaluate(
        model,
        &Subset::all(data.dataset),
        reference,
        data.batch_size,
        ctx,
    )?)
}

/// The API's figures of an evaluation (the metrics document's `EvaluationFigures`).
#[derive(Debug, serde::Serialize)]
pub struct EvalFigures {
    samples: usize,
    loss: Option<f64>,
    accuracy: Option<f64>,
    top5_accuracy: Option<f64>,
    per_class_accuracy: Vec<ClassAccuracy>,
    agreement: Option<f64>,
    kl_divergence: Option<f64>,
    samples_per_second: f64,
    mean_batch_latency_ms: f64,
}

impl From<&Evaluation> for EvalFigures {
    fn from(e: &Evaluation) -> Self {
        EvalFigures {
            samples: e.samples,
            loss: e.loss,
            accuracy: e.accuracy,
            top5_accuracy: e.top5_accuracy,
            per_class_accuracy: e.per_class.clone(),
            agreement: e.agreement,
            kl_divergence: e.kl_divergence,
            samples_per_second: e.samples_per_second,
            mean_batch_latency_ms: e.mean_batch_latency_ms,
        }
    }
}

/// The figures of an evaluation of either kind (flattened into `baseline` and `final`).
#[derive(Debug, serde::Serialize)]
#[serde(untagged)]
pub enum EvalFiguresOf {
    /// A classifier's.
    Classifier(EvalFigures),
    /// A transformer's on text.
    Text(TextFigures),
}

/// [`EvalFigures`] as JSON, for step summaries that nest them.
pub(super) fn eval_json(e: &Evaluation) -> Value {
    serde_json::to_value(EvalFigures::from(e)).unwrap_or(Value::Null)
}

/// `metadata` with the architecture `arch` set.
fn with_architecture(
    metadata: &BTreeMap<String, String>,
    arch: &Value,
) -> BTreeMap<String, String> {
    let mut meta = metadata.clone();
    meta.insert(compress::formats::ARCHITECTURE_KEY.into(), arch.to_string());
    meta
}
