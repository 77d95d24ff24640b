//! Runs one job's pipeline: blocking, on a worker thread, step by step through
//! [`super::steps`], each step reading the previous step's committed blob and writing a new
//! content-addressed one. Returns the outputs for the queue to record; records nothing itself.

use std::collections::HashMap;
use std::time::Instant;

use serde::Serialize;
use serde_json::{json, Value};

use super::steps::{
    self, evaluate_file, evaluate_model, load_model, Env, EvalFigures, EvalFiguresOf, Evaluated,
    Input, Reference, TransformerSource,
};
pub use super::steps::{DatasetCache, PipelineError, PipelineHooks, ResumePoint};
use crate::compress::engine::sequential::arch::Architecture;
use crate::compress::engine::Network;
use crate::compress::formats::safetensors::{Header, SafetensorsFile, WeightSummary};
use crate::compress::formats::{ARCHITECTURE_KEY, JOB_KEY};
use crate::compress::progress::Ctx;
use crate::compress::quant::activations;
use crate::db::datasets::DatasetRecord;
use crate::db::jobs::JobRecord;
use crate::db::models::ModelRecord;
use crate::ids::DatasetId;
use crate::spec::{JobSpec, Step};
use crate::store::{BlobRef, BlobStore};

/// What a pipeline produced.
#[derive(Debug, Clone)]
pub struct PipelineOutput {
    /// The final model's blob.
    pub model: BlobRef,
    /// Its header (tensor inventory).
    pub header: Header,
    /// Its architecture (changed by a head replacement).
    pub architecture: Option<Value>,
    /// A folder model's new `config.json` and its blob, when a step changed it (a new
    /// classifier head); `None`: the input's config stands.
    pub config: Option<(Value, BlobRef)>,
    /// The metrics document (API.md "Metrics").
    pub metrics: Value,
    /// The metrics document stored as a `report` artifact.
    pub report: BlobRef,
    /// Compact encodings of the output (`packed`, `gguf`): `(kind, format, blob)`.
    pub encodings: Vec<(String, String, BlobRef)>,
    /// Evaluations' saved outputs (`save_outputs`), in order: `outputs` artifacts.
    pub outputs: Vec<BlobRef>,
}

/// Everything a pipeline reads.
pub struct PipelineInputs<'a> {
    /// Blob store (inputs are read from it, outputs written to it).
    pub store: &'a dyn BlobStore,
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

/// Run every step of the job's pipeline, reporting through `ctx` and `hooks`.
pub fn run_pipeline(
    inputs: &PipelineInputs,
    ctx: &Ctx,
    hooks: &PipelineHooks,
) -> Result<PipelineOutput, PipelineError> {
    run(inputs, ctx, hooks).map_err(|e| e.at(""))
}

fn run(
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
    let input = SafetensorsFile::open(store.materialize(&model.sha256)?)?;
    let baseline_weights = input.weight_summary();
    input.release_all();
    let input_arch = model
        .architecture
        .as_ref()
        .map(Architecture::from_json)
        .transpose()?;
    let transformer = TransformerSource::of(store, model)?;
    // The transformer as the steps see it: a step may change its config (a new head).
    let mut current_transformer = transformer
        .as_ref()
        .map(|t| t.with_config(t.config.clone()));
    let mut config_changed = false;
    drop(input);
    // The input model, loaded the first time something compares against it.
    let reference = Reference::new(|| -> Result<Option<Box<dyn Network>>, PipelineError> {
        if !needs_network(spec) {
            return Ok(None);
        }
        let input = SafetensorsFile::open(store.materialize(&model.sha256)?)?;
        Ok(match (&input_arch, &transformer) {
            (Some(arch), _) => Some(Box::new(load_model(arch, &input)?)),
            (None, Some(t)) => Some(t.load(&input)?),
            (None, None) => None,
        })
    });
    let mut baseline = Figures::of(&baseline_weights, model.size_bytes as u64);
    // A sequential baseline is evaluated first; a transformer's comes out of the final
    // evaluation's pass, which runs the reference beside the output window by window.
    if let (Some(eval), None) = (&spec.eval, &transformer) {
        if let Some(reference) = reference.get()? {
            let e = evaluate_model(reference, datasets.eval_data(eval)?, None, ctx)?;
            baseline.evaluation = Some(EvalFiguresOf::Classifier(EvalFigures::from(&e)));
        }
    }

    let steps_json: Vec<Value> = spec.steps.iter().map(Step::to_json).collect();
    let mut current = BlobRef {
        sha256: model.sha256.clone(),
        size: model.size_bytes as u64,
    };
    let mut arch_json = model.architecture.clone();
    let mut step_metrics = Vec::new();
    let mut encodings: Vec<(String, String, BlobRef)> = Vec::new();
    let mut outputs: Vec<BlobRef> = Vec::new();
    for (index, step) in spec.steps.iter().enumerate() {
        ctx.check()?;
        (hooks.step_started)(index, step.op());
        let started = Instant::now();
        let file = SafetensorsFile::open(store.materialize(&current.sha256)?)?;
        let mut metadata = file.header().metadata.clone();
        // Activation ranges belong to the weights they were calibrated with; a step that
        // writes new weights drops them (a quantize step with `activations` sets new ones).
        metadata.remove(activations::METADATA_KEY);
        metadata.insert(
            JOB_KEY.into(),
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
        if let Some(arch) = &arch_json {
            metadata.insert(ARCHITECTURE_KEY.into(), arch.to_string());
        }
        let env = Env {
            store,
            datasets: &datasets,
            ctx,
            hooks,
            index,
            resume: inputs.resume.as_ref(),
            seed: spec.seed,
            eval: spec.eval.as_ref(),
            reference: &reference,
            models: inputs.models,
        };
        let out = steps::run(
            &env,
            step,
            &Input {
                file: &file,
                architecture: &arch_json,
                transformer: current_transformer.as_ref(),
                unchanged: current.sha256 == model.sha256,
                metadata: &metadata,
            },
        )
        .map_err(|e| e.at(&format!("/steps/{index}")))?;
        drop(file);
        let mut record = json!({"op": step.op(), "epochs": []});
        merge(&mut record, &out.record);
        match (out.architecture, &mut current_transformer) {
            (Some(config), Some(t)) => {
                *t = t.with_config(config);
                config_changed = true;
            }
            (Some(a), None) => arch_json = Some(a),
            (None, _) => {}
        }
        if let Some(a) = out.artifact {
            let blob = store.commit(a.file)?;
            record["encoded_bytes"] = json!(blob.size);
            encodings.push((a.kind.to_string(), a.format.to_string(), blob));
        }
        if let Some(temp) = out.outputs {
            outputs.push(store.commit(temp)?);
        }
        if let Some(temp) = out.file {
            current = store.commit(temp)?;
        }
        record["seconds"] = json!(started.elapsed().as_secs_f64());
        metrics::histogram!("whittle_step_duration_seconds", "op" => step.op())
            .record(started.elapsed().as_secs_f64());
        step_metrics.push(record);
    }

    let output = SafetensorsFile::open(store.materialize(&current.sha256)?)?;
    let final_weights = output.weight_summary();
    // The summary read every tensor; evaluation loads its own copy.
    output.release_all();
    let mut end = Figures::of(&final_weights, current.size);
    end.compression_ratio = Some(model.size_bytes as f64 / current.size.max(1) as f64);
    if let Some((kind, _, blob)) = encodings.last() {
        end.encoding = Some(kind.clone());
        end.packed_size_bytes = Some(blob.size);
        end.compression_ratio = Some(model.size_bytes as f64 / blob.size.max(1) as f64);
        end.bits_per_weight = blob.size as f64 * 8.0 / final_weights.parameters.max(1) as f64;
    }
    if let Some(eval) = &spec.eval {
        let e = evaluate_file(
            &Input {
                file: &output,
                architecture: &arch_json,
                transformer: current_transformer.as_ref(),
                unchanged: current.sha256 == model.sha256,
                metadata: &Default::default(),
            },
            &output,
            &datasets,
            eval,
            &reference,
            ctx,
        )?;
        end.agreement_with_baseline = e.agreement().map(Some);
        end.evaluation = Some(e.figures());
        if let Evaluated::Text(t) = &e {
            if let Some(r) = &t.reference {
                baseline.evaluation = Some(EvalFiguresOf::Text(r.clone()));
            }
            if let Some(bytes) = &t.outputs {
                outputs.push(store.put_bytes(bytes)?);
            }
        }
    }
    let metrics = serde_json::to_value(MetricsDocument {
        baseline,
        steps: step_metrics,
        end,
    })
    .unwrap_or(Value::Null);
    let report = store.put_bytes(
        serde_json::to_vec_pretty(&metrics)
            .unwrap_or_default()
            .as_slice(),
    )?;
    let config = match current_transformer.filter(|_| config_changed) {
        Some(t) => {
            let bytes = serde_json::to_vec_pretty(&t.config).unwrap_or_default();
            let blob = store.put_bytes(&bytes)?;
            Some((t.config, blob))
        }
        None => None,
    };
    Ok(PipelineOutput {
        config,
        model: current,
        header: output.header().clone(),
        architecture: arch_json,
        metrics,
        report,
        encodings,
        outputs,
    })
}

/// Whether any step or the job's `eval` runs the network.
fn needs_network(spec: &JobSpec) -> bool {
    spec.eval.is_some()
        || spec.steps.iter().any(|s| match s {
            Step::Finetune(_) | Step::Evaluate(_) | Step::Distill(_) | Step::Calibrated(_) => true,
            Step::Prune(p) => p.schedule.is_some(),
            Step::Quantize(q) => {
                q.qat.is_some() || q.max_accuracy_drop.is_some() || q.activations.is_some()
            }
            Step::QuantizeFloat(_) => false,
        })
}

/// The metrics document (API.md "Metrics"): the input model, each step's record, the output.
#[derive(Debug, Serialize)]
struct MetricsDocument {
    baseline: Figures,
    /// One record per step: `op`, `seconds`, `epochs`, and the step's own `summary`,
    /// `layers` and extras (their shapes are per op; openapi.yaml `StepMetrics`).
    steps: Vec<Value>,
    #[serde(rename = "final")]
    end: Figures,
}

/// The figures of the metrics document's `baseline` (the input) and `final` (the output).
#[derive(Debug, Serialize)]
struct Figures {
    parameters: u64,
    nonzero: u64,
    size_bytes: u64,
    bits_per_weight: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    compression_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encoding: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    packed_size_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    agreement_with_baseline: Option<Option<f64>>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    evaluation: Option<EvalFiguresOf>,
}

impl Figures {
    fn of(s: &WeightSummary, size_bytes: u64) -> Figures {
        Figures {
            parameters: s.parameters,
            nonzero: s.nonzero,
            size_bytes,
            bits_per_weight: s.bits_per_weight(),
            compression_ratio: None,
            encoding: None,
            packed_size_bytes: None,
            agreement_with_baseline: None,
            evaluation: None,
        }
    }
}

fn merge(into: &mut Value, from: &Value) {
    if let (Some(a), Some(b)) = (into.as_object_mut(), from.as_object()) {
        for (k, v) in b {
            a.insert(k.clone(), v.clone());
        }
    }
}
