//! The pipeline steps that compress: `prune`, `quantize` (non-float methods) and `distill`.
//! Each reads the previous step's file and returns a new one (or none) with its figures; the
//! loop in [`super::runner`] commits outputs and records metrics.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use serde_json::{json, Value};

use super::runner::{
    current_arch, eval_json, write_named, DatasetCache, PipelineError, PipelineHooks, ResumePoint,
    CHECKPOINT_INTERVAL, META_ARCHITECTURE,
};
use crate::compress::distill::{self, DistillParams, FeaturePair};
use crate::compress::engine::data::Subset;
use crate::compress::engine::evaluate::{self, Evaluation};
use crate::compress::engine::sequential::arch::Architecture;
use crate::compress::engine::sequential::model::{Model, NamedTensor, WeightTransform};
use crate::compress::engine::train::{Checkpoint, EpochMetrics, TrainHooks};
use crate::compress::formats::gguf::{self, GgufType};
use crate::compress::formats::safetensors::SafetensorsFile;
use crate::compress::progress::Ctx;
use crate::compress::prune::{self as cprune, Method as CMethod, Output, PruneTargets, Scope};
use crate::compress::quant::activations::{self, ActivationParams, Calibration};
use crate::compress::quant::sharing::SharedWeights;
use crate::compress::quant::{self, Importance, Method as QMethod};
use crate::compress::{self, formats::packed};
use crate::db::models::ModelRecord;
use crate::spec::distill::StudentSpec;
use crate::spec::prune::{PruneMethod, PruneOutput, PruneScope};
use crate::spec::quantize::{
    CalibrationMethod, Granularity, ImportanceSource, KmeansInit, QuantFormat, QuantMethod,
};
use crate::spec::{DistillSpec, EvalSpec, FinetuneSpec, PruneSpec, QuantizeSpec};
use crate::store::{BlobStore, TempBlob};

/// What a step reads besides its input file.
pub(super) struct Env<'a> {
    pub store: &'a BlobStore,
    pub datasets: &'a DatasetCache<'a>,
    pub ctx: &'a Ctx<'a>,
    pub hooks: &'a PipelineHooks<'a>,
    /// Index of the step in the pipeline.
    pub index: usize,
    /// A checkpoint an earlier attempt saved for this step.
    pub resume: Option<&'a ResumePoint>,
    /// The job's seed.
    pub seed: u64,
    /// The job's `eval` dataset.
    pub eval: Option<&'a EvalSpec>,
    /// Other models the job names (`distill` students, `quantize` importance weights), by id.
    pub models: &'a std::collections::HashMap<String, ModelRecord>,
}

/// A model the job names besides its input (`role`: what it is for, for the error).
fn named_model<'a>(env: &Env<'a>, id: &str, role: &str) -> Result<&'a ModelRecord, PipelineError> {
    env.models.get(id).ok_or_else(|| {
        failed(
            "model_not_found",
            format!("{role} model {id} no longer exists"),
        )
    })
}

/// What a step produced.
pub(super) struct StepOut {
    /// The new float model file, when the step writes one (what the next step reads).
    pub file: Option<TempBlob>,
    /// A second encoding of the same model (`packed`, `gguf`), kept as an artifact.
    pub artifact: Option<Artifact>,
    /// The architecture after the step, when it changed.
    pub architecture: Option<Value>,
    /// `summary`, `layers`, `epochs`, … merged into the step's metrics record.
    pub record: Value,
}

fn failed(code: &str, message: impl Into<String>) -> PipelineError {
    PipelineError::Failed(crate::queue::JobError {
        code: code.into(),
        message: message.into(),
        retryable: false,
    })
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

/// Every float tensor of a file as f32, in file order.
fn load_f32(file: &SafetensorsFile) -> compress::Result<Vec<NamedTensor>> {
    file.header()
        .tensors
        .iter()
        .filter(|t| t.dtype.is_float())
        .map(|t| {
            Ok(NamedTensor {
                name: t.name.clone(),
                shape: t.shape.clone(),
                values: file.to_f32(t)?,
            })
        })
        .collect()
}

/// Evaluate `weights` (of `arch`) on the job's eval dataset, when there is one.
fn eval_weights(
    env: &Env,
    arch: &Architecture,
    weights: Vec<NamedTensor>,
    reference: Option<&Model>,
) -> Result<Option<Evaluation>, PipelineError> {
    let Some(spec) = env.eval else {
        return Ok(None);
    };
    let model = Model::new(arch, weights)?;
    let data = env.datasets.get(&spec.dataset_id)?;
    Ok(Some(evaluate::evaluate(
        &model,
        &Subset::all(data),
        reference,
        spec.batch_size,
        env.ctx,
    )?))
}

/// Saves training checkpoints of step `index`: the first epoch's, then at most one per
/// [`CHECKPOINT_INTERVAL`], none for the last epoch (the step's output follows at once).
pub(super) fn checkpointer<'a>(
    store: &'a BlobStore,
    hooks: &'a PipelineHooks<'a>,
    index: usize,
    epochs: usize,
) -> impl FnMut(&EpochMetrics, &Checkpoint) -> compress::Result<()> + 'a {
    let mut last_saved: Option<Instant> = None;
    move |m: &EpochMetrics, c: &Checkpoint| {
        (hooks.epoch_finished)(index, m);
        let due = last_saved.is_none_or(|t| t.elapsed() >= CHECKPOINT_INTERVAL);
        if !due || c.epoch >= epochs {
            return Ok(());
        }
        last_saved = Some(Instant::now());
        let bytes = c.to_safetensors_bytes()?;
        let blob = store
            .put_bytes(&bytes)
            .map_err(|e| compress::Error::Io(std::io::Error::other(e.to_string())))?;
        (hooks.checkpoint_saved)(ResumePoint {
            step: index,
            sha256: blob.sha256,
            epoch: c.epoch,
        });
        Ok(())
    }
}

/// The resume checkpoint of this step, if an earlier attempt left one.
fn resume_checkpoint(env: &Env) -> Result<Option<Checkpoint>, PipelineError> {
    match env.resume {
        Some(r) if r.step == env.index => {
            let bytes = std::fs::read(env.store.path(&r.sha256))?;
            Ok(Some(Checkpoint::from_safetensors_bytes(&bytes)?))
        }
        _ => Ok(None),
    }
}

// ---------------------------------------------------------------------------------------
// prune

fn prune_method(spec: &PruneSpec) -> CMethod {
    match spec.method {
        PruneMethod::Magnitude => CMethod::Magnitude,
        PruneMethod::Random => CMethod::Random,
        PruneMethod::NM { n, m } => CMethod::NM { n, m },
        // Structured pruning takes its own path; its masks are whole rows.
        PruneMethod::Structured { .. } => CMethod::Magnitude,
    }
}

fn targets(spec: &PruneSpec, sparsity: f64, scale_overrides: f64) -> PruneTargets {
    PruneTargets {
        sparsity,
        scope: match spec.scope {
            PruneScope::Global => Scope::Global,
            PruneScope::Layer => Scope::Layer,
        },
        overrides: spec
            .layers
            .iter()
            .map(|(p, s)| (p.clone(), s * scale_overrides))
            .collect(),
    }
}

/// The `prune` step.
pub(super) fn prune(
    env: &Env,
    spec: &PruneSpec,
    input: &SafetensorsFile,
    arch_json: &Option<Value>,
    metadata: &BTreeMap<String, String>,
) -> Result<StepOut, PipelineError> {
    let selected: Vec<String> = spec
        .selection
        .resolve(&input.header().tensors)
        .into_iter()
        .map(|t| t.name.clone())
        .collect();
    if selected.is_empty() {
        return Err(failed(
            "validation_failed",
            "the selection matches no tensor of this step's input",
        ));
    }
    let seed = spec.seed.unwrap_or(env.seed);
    if spec.schedule.is_some() {
        return prune_gradual(env, spec, input, arch_json, metadata, &selected, seed);
    }
    if let PruneMethod::Structured { norm } = spec.method {
        let arch = current_arch(arch_json)?;
        let weights = load_f32(input)?;
        let flops_before = arch.flops();
        let params_before = arch.parameter_count();
        let out = crate::compress::prune::structured::prune_structured(
            &arch,
            weights,
            &selected,
            &targets(spec, spec.sparsity, 1.0),
            norm,
        )?;
        let new_arch = out.architecture.to_json();
        let mut metadata = metadata.clone();
        metadata.insert(META_ARCHITECTURE.into(), new_arch.to_string());
        let mut temp = env.store.create_temp()?;
        let written = write_named(&mut temp, &metadata, &out.weights)?;
        let record = json!({
            "summary": {
                "method": "structured",
                "norm": norm,
                "parameters_before": params_before,
                "parameters_after": out.architecture.parameter_count(),
                "flops_before": flops_before,
                "flops_after": out.architecture.flops(),
                "tensor_bytes_before": input.header().data_len(),
                "tensor_bytes_after": tensor_bytes(&out.weights),
                "file_bytes_after": written,
                "skipped": out.skipped.iter().map(|(l, why)| json!({"layer": l, "reason": why})).collect::<Vec<_>>(),
            },
            "layers": out.layers,
        });
        return Ok(StepOut {
            file: Some(temp),
            artifact: None,
            architecture: Some(new_arch),
            record,
        });
    }
    let mut metadata = metadata.clone();
    if let Some(arch) = arch_json {
        metadata.insert(META_ARCHITECTURE.into(), arch.to_string());
    }
    let mut temp = env.store.create_temp()?;
    let reports = cprune::prune_file(
        input,
        &selected,
        &prune_method(spec),
        &targets(spec, spec.sparsity, 1.0),
        seed,
        Output::Dense,
        &metadata,
        &mut temp,
        env.ctx,
    )?;
    let (file, artifact) = sparse_artifact(env, spec, temp, &selected, &metadata)?;
    Ok(StepOut {
        file: Some(file),
        artifact,
        architecture: None,
        record: json!({
            "summary": prune_summary(spec, &reports),
            "layers": reports,
        }),
    })
}

/// With `output: sparse`, the dense pruned file is packed into a bitmask + values artifact;
/// the dense file stays the model (what later steps and `eval` read).
fn sparse_artifact(
    env: &Env,
    spec: &PruneSpec,
    mut dense: TempBlob,
    selected: &[String],
    metadata: &BTreeMap<String, String>,
) -> Result<(TempBlob, Option<Artifact>), PipelineError> {
    if spec.output != PruneOutput::Sparse {
        return Ok((dense, None));
    }
    std::io::Write::flush(&mut dense)?;
    let dense_file = SafetensorsFile::open(dense.path())?;
    let mut packed = env.store.create_temp()?;
    cprune::encode_sparse(&dense_file, selected, metadata, &mut packed, env.ctx)?;
    drop(dense_file);
    Ok((
        dense,
        Some(Artifact {
            kind: "packed",
            format: "safetensors",
            file: packed,
        }),
    ))
}

fn prune_summary(spec: &PruneSpec, reports: &[cprune::LayerReport]) -> Value {
    let numel: u64 = reports.iter().map(|r| r.numel).sum();
    let nonzero: u64 = reports.iter().map(|r| r.nonzero).sum();
    json!({
        "method": spec.method.as_str(),
        "target_sparsity": spec.sparsity,
        "sparsity": if numel == 0 { 0.0 } else { 1.0 - nonzero as f64 / numel as f64 },
        "numel": numel,
        "nonzero": nonzero,
        "dense_bytes": reports.iter().map(|r| r.dense_bytes).sum::<u64>(),
        "packed_bytes": reports.iter().map(|r| r.packed_bytes).sum::<u64>(),
    })
}

/// Gradual pruning: `iterations` rounds of prune-to-the-schedule's-sparsity then retrain with
/// pruned weights held at zero.
fn prune_gradual(
    env: &Env,
    spec: &PruneSpec,
    input: &SafetensorsFile,
    arch_json: &Option<Value>,
    metadata: &BTreeMap<String, String>,
    selected: &[String],
    seed: u64,
) -> Result<StepOut, PipelineError> {
    let Some(schedule) = &spec.schedule else {
        return Err(failed(
            "internal_error",
            "gradual pruning without a schedule",
        ));
    };
    let mut arch = current_arch(arch_json)?;
    let mut weights = Model::from_safetensors(&arch, input)?.export()?;
    let flops_before = arch.flops();
    let params_before = arch.parameter_count();
    let mut rounds = Vec::new();
    let mut epochs_all = Vec::new();
    let mut last_reports = Vec::new();
    let mut structured_layers = Value::Null;
    let mut previous = 0.0;
    // Output units of each selected layer before pruning (structured schedules count from them).
    let original_units: HashMap<String, usize> = arch
        .parameters()
        .into_iter()
        .map(|p| (p.name, p.shape.first().copied().unwrap_or(0)))
        .collect();
    for round in 1..=schedule.iterations {
        env.ctx.check()?;
        // The share of each final sparsity reached after this round (1 for `constant`).
        let fraction = schedule.sparsity_at(round, 1.0);
        let target = spec.sparsity * fraction;
        let before_eval = match spec.method {
            PruneMethod::Structured { norm } => {
                // Units removed earlier are gone: remove, of the units still there, the share
                // that brings the original count down to this round's target (per override
                // pattern too).
                let step = |final_sparsity: f64| {
                    let (now, before) = (final_sparsity * fraction, final_sparsity * previous);
                    if before >= 1.0 {
                        0.0
                    } else {
                        (1.0 - (1.0 - now) / (1.0 - before)).max(0.0)
                    }
                };
                let round_targets = match spec.scope {
                    PruneScope::Global => PruneTargets {
                        sparsity: step(spec.sparsity),
                        scope: Scope::Global,
                        overrides: spec
                            .layers
                            .iter()
                            .map(|(p, s)| (p.clone(), step(*s)))
                            .collect(),
                    },
                    // Per layer, count units rather than compound fractions, so the last round
                    // lands exactly on round(original · (1 − sparsity)).
                    PruneScope::Layer => {
                        let finals = targets(spec, spec.sparsity, 1.0);
                        let current: HashMap<String, usize> = arch
                            .parameters()
                            .into_iter()
                            .map(|p| (p.name, p.shape.first().copied().unwrap_or(0)))
                            .collect();
                        let overrides = selected_in(&arch, selected)
                            .into_iter()
                            .filter_map(|name| {
                                let (&now, &orig) =
                                    (current.get(&name)?, original_units.get(&name)?);
                                let s = finals.override_for(&name).unwrap_or(spec.sparsity);
                                let keep = ((orig as f64) * (1.0 - s * fraction)).round().max(1.0)
                                    as usize;
                                let remove = now.saturating_sub(keep);
                                Some((
                                    name,
                                    if now == 0 {
                                        0.0
                                    } else {
                                        remove as f64 / now as f64
                                    },
                                ))
                            })
                            .collect();
                        PruneTargets {
                            sparsity: 0.0,
                            scope: Scope::Layer,
                            overrides,
                        }
                    }
                };
                let out = crate::compress::prune::structured::prune_structured(
                    &arch,
                    weights,
                    &selected_in(&arch, selected),
                    &round_targets,
                    norm,
                )?;
                arch = out.architecture;
                weights = out.weights;
                structured_layers = serde_json::to_value(&out.layers).unwrap_or(Value::Null);
                eval_weights(env, &arch, weights.clone(), None)?
            }
            _ => {
                last_reports = cprune::prune_tensors(
                    &mut weights,
                    selected,
                    &prune_method(spec),
                    &targets(spec, target, fraction),
                    seed.wrapping_add(round as u64),
                )?;
                eval_weights(env, &arch, weights.clone(), None)?
            }
        };
        previous = fraction;
        // Retrain with the pruned weights held at zero.
        let model = Model::new(&arch, weights)?;
        let masks = zero_masks(&model, selected)?;
        let keep_zero = |m: &Model| -> compress::Result<()> { apply_masks(m, &masks) };
        let params = env.datasets.training_params(&schedule.finetune, env.seed)?;
        let mut on_epoch = |m: &EpochMetrics, _c: &Checkpoint| -> compress::Result<()> {
            (env.hooks.epoch_finished)(env.index, m);
            Ok(())
        };
        let out = crate::compress::engine::finetune::finetune(
            model,
            &params,
            env.ctx,
            TrainHooks {
                on_epoch: Some(&mut on_epoch),
                after_step: Some(&keep_zero),
                ..Default::default()
            },
        )?;
        weights = out.weights;
        let after_eval = eval_weights(env, &arch, weights.clone(), None)?;
        let mut r = json!({
            "iteration": round,
            "target_sparsity": target,
            "accuracy_after_pruning": before_eval.as_ref().and_then(|e| e.accuracy),
            "accuracy_after_retraining": after_eval.as_ref().and_then(|e| e.accuracy),
            "final_val_accuracy": out.history.last().and_then(|h| h.val_accuracy),
            "final_train_loss": out.history.last().map(|h| h.train_loss),
        });
        if !matches!(spec.method, PruneMethod::Structured { .. }) {
            let numel: u64 = last_reports.iter().map(|l| l.numel).sum();
            let nonzero = count_nonzero(&weights, selected);
            r["sparsity"] = json!(1.0 - nonzero as f64 / numel.max(1) as f64);
        } else {
            r["parameters"] = json!(arch.parameter_count());
        }
        for mut e in out.history {
            e.epoch += epochs_all.len();
            epochs_all.push(e);
        }
        rounds.push(r);
    }
    let new_arch = arch.to_json();
    let mut meta = metadata.clone();
    meta.insert(META_ARCHITECTURE.into(), new_arch.to_string());
    let mut temp = env.store.create_temp()?;
    let written = write_named(&mut temp, &meta, &weights)?;
    let mut summary = json!({
        "method": spec.method.as_str(),
        "target_sparsity": spec.sparsity,
        "iterations": rounds,
        "schedule": match schedule.kind {
            crate::spec::prune::ScheduleKind::Constant => "constant",
            crate::spec::prune::ScheduleKind::Polynomial { .. } => "polynomial",
        },
    });
    let layers;
    if matches!(spec.method, PruneMethod::Structured { .. }) {
        summary["parameters_before"] = json!(params_before);
        summary["parameters_after"] = json!(arch.parameter_count());
        summary["flops_before"] = json!(flops_before);
        summary["flops_after"] = json!(arch.flops());
        summary["tensor_bytes_before"] = json!(input.header().data_len());
        summary["tensor_bytes_after"] = json!(tensor_bytes(&weights));
        summary["file_bytes_after"] = json!(written);
        layers = structured_layers;
    } else {
        let reports = layer_reports(&weights, selected);
        let total = prune_summary(spec, &reports);
        if let (Some(s), Some(t)) = (summary.as_object_mut(), total.as_object()) {
            for (k, v) in t {
                s.entry(k.clone()).or_insert(v.clone());
            }
        }
        layers = serde_json::to_value(&reports).unwrap_or(Value::Null);
    }
    let (file, artifact) = sparse_artifact(env, spec, temp, selected, &meta)?;
    Ok(StepOut {
        file: Some(file),
        artifact,
        architecture: Some(new_arch),
        record: json!({"summary": summary, "layers": layers, "epochs": epochs_all}),
    })
}

/// Bytes of the tensor data of f32 `weights` (what a file holds besides its header).
fn tensor_bytes(weights: &[NamedTensor]) -> u64 {
    weights.iter().map(|w| w.values.len() as u64 * 4).sum()
}

/// The selected names that still exist in `arch` (structured pruning keeps names).
fn selected_in(arch: &Architecture, selected: &[String]) -> Vec<String> {
    let names: HashSet<String> = arch.parameters().into_iter().map(|p| p.name).collect();
    selected
        .iter()
        .filter(|s| names.contains(*s))
        .cloned()
        .collect()
}

/// For each selected parameter of `model`, a 0/1 mask of its non-zero weights.
fn zero_masks(
    model: &Model,
    selected: &[String],
) -> compress::Result<Vec<(usize, candle_core::Tensor)>> {
    let mut out = Vec::new();
    for (i, p) in model.params().iter().enumerate() {
        if selected.iter().any(|s| s == p.name()) {
            let w = p.var().as_tensor();
            let mask = w.ne(0f32)?.to_dtype(w.dtype())?;
            out.push((i, mask));
        }
    }
    Ok(out)
}

/// The number of ones in `masks`.
fn count_mask_ones(masks: &[(usize, candle_core::Tensor)]) -> compress::Result<usize> {
    let mut n = 0.0f64;
    for (_, m) in masks {
        n += m
            .to_dtype(candle_core::DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(n as usize)
}

/// Multiply every masked parameter by its mask (after an optimizer step).
fn apply_masks(model: &Model, masks: &[(usize, candle_core::Tensor)]) -> compress::Result<()> {
    let params = model.params();
    for (i, mask) in masks {
        let var = params[*i].var();
        var.set(&var.as_tensor().mul(mask)?)?;
    }
    Ok(())
}

fn count_nonzero(weights: &[NamedTensor], selected: &[String]) -> usize {
    weights
        .iter()
        .filter(|w| selected.contains(&w.name))
        .map(|w| w.values.iter().filter(|v| **v != 0.0).count())
        .sum()
}

/// Per-layer figures of already-pruned weights.
fn layer_reports(weights: &[NamedTensor], selected: &[String]) -> Vec<cprune::LayerReport> {
    weights
        .iter()
        .filter(|w| selected.contains(&w.name))
        .map(|w| {
            let numel = w.values.len() as u64;
            let nonzero = w.values.iter().filter(|v| **v != 0.0).count() as u64;
            cprune::LayerReport {
                tensor: w.name.clone(),
                shape: w.shape.clone(),
                dtype: "F32".into(),
                numel,
                pruned: numel - nonzero,
                nonzero,
                sparsity: if numel == 0 {
                    0.0
                } else {
                    1.0 - nonzero as f64 / numel as f64
                },
                threshold: None,
                dense_bytes: numel * 4,
                packed_bytes: numel.div_ceil(8) + nonzero * 4,
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// quantize

fn quant_method(m: &QuantMethod) -> Option<QMethod> {
    Some(match m {
        QuantMethod::Uniform {
            bits,
            symmetric,
            granularity,
            search,
            ..
        } => QMethod::Uniform {
            bits: *bits,
            symmetric: *symmetric,
            granularity: match granularity {
                Granularity::PerTensor => quant::Granularity::PerTensor,
                Granularity::PerChannel => quant::Granularity::PerChannel,
                Granularity::PerGroup(g) => quant::Granularity::PerGroup { group_size: *g },
            },
            search: *search,
        },
        QuantMethod::Kmeans { clusters, init } => QMethod::Kmeans {
            clusters: *clusters,
            max_iterations: quant::DEFAULT_KMEANS_MAX_ITERATIONS,
            tolerance: quant::DEFAULT_KMEANS_TOLERANCE,
            init: match init {
                KmeansInit::Linear => quant::KmeansInit::Linear,
                KmeansInit::Density => quant::KmeansInit::Density,
                KmeansInit::KmeansPlusPlus => quant::KmeansInit::KmeansPlusPlus,
            },
        },
        QuantMethod::Log2 { bits } => QMethod::Log2 { bits: *bits },
        QuantMethod::Nf4 { group_size } => QMethod::Nf4 {
            group_size: *group_size,
        },
        QuantMethod::Gguf { .. } => return None,
    })
}

/// The importance weights of a `uniform` step's selected tensors: read from the uploaded
/// file it names, or measured on the model over calibration samples; and what to report
/// about them.
fn load_importance(
    env: &Env,
    spec: &QuantizeSpec,
    method: &QMethod,
    input: &SafetensorsFile,
    arch_json: &Option<Value>,
    selected: &[String],
) -> Result<(Importance, Value), PipelineError> {
    let QuantMethod::Uniform {
        importance: Some(source),
        ..
    } = &spec.method
    else {
        return Ok((Importance::new(), Value::Null));
    };
    let (mut all, mut summary) = match source {
        ImportanceSource::Model(id) => {
            let record = named_model(env, id, "importance")?;
            let file = SafetensorsFile::open(env.store.path(&record.sha256))?;
            let mut all = Importance::new();
            for info in &file.header().tensors {
                if selected.contains(&info.name) {
                    all.insert(info.name.clone(), file.to_f32(info)?);
                }
            }
            (all, json!({ "model_id": id }))
        }
        ImportanceSource::Calibration {
            dataset_id,
            samples,
        } => {
            let arch = current_arch(arch_json)?;
            let model = Model::from_safetensors(&arch, input)?;
            let data = env.datasets.get(dataset_id)?;
            let (all, indices) =
                activations::input_importance(&model, data, *samples, env.seed, env.ctx)?;
            let summary = json!({"dataset_id": dataset_id.to_string(), "samples": indices.len(),
                                 "seed": env.seed, "indices": indices});
            (all, summary)
        }
    };
    let mut importance = Importance::new();
    let mut unweighted = Vec::new();
    for name in selected {
        let Some(w) = all.remove(name) else {
            unweighted.push(name.clone());
            continue;
        };
        if let Some(t) = input.header().tensors.iter().find(|t| &t.name == name) {
            quant::check_importance(name, &t.shape, method, &w)?;
        }
        importance.insert(name.clone(), w);
    }
    let mut weighted: Vec<&String> = importance.keys().collect();
    weighted.sort();
    summary["weighted"] = json!(weighted);
    summary["unweighted"] = json!(unweighted);
    Ok((importance, summary))
}

/// A quantization method and the importance weights of the tensors it weights.
#[derive(Clone)]
struct Quantizer {
    method: QMethod,
    importance: std::sync::Arc<Importance>,
}

impl Quantizer {
    fn quantize(
        &self,
        name: &str,
        values: &[f32],
        shape: &[usize],
        seed: u64,
    ) -> compress::Result<(quant::Quantized, compress::quant::float::ErrorStats)> {
        let importance = self.importance.get(name).map(Vec::as_slice);
        quant::quantize_named(name, values, shape, &self.method, seed, importance)
    }
}

/// The `quantize` step (every method but `float`).
pub(super) fn quantize(
    env: &Env,
    spec: &QuantizeSpec,
    input: &SafetensorsFile,
    arch_json: &Option<Value>,
    metadata: &BTreeMap<String, String>,
) -> Result<StepOut, PipelineError> {
    let mut selected: Vec<String> = spec
        .selection
        .resolve(&input.header().tensors)
        .into_iter()
        .map(|t| t.name.clone())
        .collect();
    let mut metadata = metadata.clone();
    if let Some(arch) = arch_json {
        metadata.insert(META_ARCHITECTURE.into(), arch.to_string());
    }
    let mut record = json!({});
    if let QuantMethod::Gguf { ty } = &spec.method {
        let ty: GgufType = ty
            .parse()
            .map_err(|_| failed("validation_failed", format!("unknown GGUF type {ty}")))?;
        gguf::check_gguf(&input.header().tensors, &selected, ty)?;
        let mut packed_file = env.store.create_temp()?;
        let reports = gguf::write_gguf(input, &selected, ty, &metadata, &mut packed_file, env.ctx)?;
        std::io::Write::flush(&mut packed_file)?;
        // The model of the step is the GGUF file read back and dequantized, so `eval` and later
        // jobs measure exactly what the GGUF holds.
        let dequantized = dequantize_gguf(packed_file.path(), &selected)?;
        let mut temp = env.store.create_temp()?;
        write_replacing(input, &dequantized, &metadata, &mut temp)?;
        record["summary"] = json!({
            "method": "gguf",
            "type": ty.as_str(),
            "format": "gguf",
            "tensors_quantized": selected.len(),
            "gguf_bytes": packed_file.size(),
        });
        record["layers"] = serde_json::to_value(&reports).unwrap_or(Value::Null);
        return Ok(StepOut {
            file: Some(temp),
            artifact: Some(Artifact {
                kind: "gguf",
                format: "gguf",
                file: packed_file,
            }),
            architecture: None,
            record,
        });
    }
    let method = quant_method(&spec.method).ok_or_else(|| failed("internal_error", "gguf"))?;
    let seed = env.seed;
    let (importance, importance_summary) =
        load_importance(env, spec, &method, input, arch_json, &selected)?;
    let quantizer = Quantizer {
        method,
        importance: std::sync::Arc::new(importance),
    };
    // QAT trains a float model first (an intermediate blob nothing references; the blob
    // collector reclaims it), which is then quantized exactly as PTQ would.
    let mut source_owned = None;
    if let Some(qat) = &spec.qat {
        let (file, epochs, summary) = quantization_aware_training(
            env, qat, &quantizer, input, arch_json, &metadata, &selected, seed,
        )?;
        record["epochs"] = epochs;
        record["qat"] = summary;
        source_owned = Some(file);
    }
    let source_file = match &source_owned {
        Some(blob) => Some(SafetensorsFile::open(env.store.path(&blob.sha256))?),
        None => None,
    };
    let source = source_file.as_ref().unwrap_or(input);
    if let Some(budget) = spec.max_accuracy_drop {
        let (kept, reverted) =
            accuracy_budget(env, &quantizer, source, arch_json, &selected, budget, seed)?;
        selected = kept;
        record["reverted"] = reverted;
    }
    if let Some(a) = &spec.activations {
        // Calibrate on the float network (the weights' error is measured separately), and
        // ship the ranges in the file so every later evaluation simulates them.
        let arch = current_arch(arch_json)?;
        let model = Model::from_safetensors(&arch, source)?;
        let data = env.datasets.get(&a.dataset_id)?;
        let params = ActivationParams {
            bits: a.bits,
            symmetric: a.symmetric,
            calibration: match a.method {
                CalibrationMethod::MinMax => Calibration::MinMax,
                CalibrationMethod::Percentile(p) => Calibration::Percentile(p),
                CalibrationMethod::Mse => Calibration::Mse,
            },
            samples: a.samples,
            seed,
        };
        let calibrated = activations::calibrate(&model, data, &params, env.ctx)?;
        metadata.insert(
            activations::METADATA_KEY.into(),
            serde_json::to_string(&calibrated.layers).unwrap_or_default(),
        );
        record["activations"] = json!({
            "bits": a.bits,
            "symmetric": a.symmetric,
            "calibration": {
                "dataset_id": a.dataset_id.to_string(),
                "method": calibrated.method,
                "samples": calibrated.indices.len(),
                "seed": seed,
                "indices": calibrated.indices,
            },
            "layers": calibrated.layers,
        });
    }
    let mut temp = env.store.create_temp()?;
    let reports = packed::quantize_file(
        source,
        &selected,
        &method,
        &quantizer.importance,
        seed,
        packed::Format::Dequantized,
        &metadata,
        &mut temp,
        env.ctx,
    )?;
    let artifact = if spec.format == QuantFormat::Packed {
        let mut packed_file = env.store.create_temp()?;
        packed::quantize_file(
            source,
            &selected,
            &method,
            &quantizer.importance,
            seed,
            packed::Format::Packed,
            &metadata,
            &mut packed_file,
            env.ctx,
        )?;
        Some(Artifact {
            kind: "packed",
            format: "safetensors",
            file: packed_file,
        })
    } else {
        None
    };
    let numel: u64 = reports
        .iter()
        .map(|r| r.shape.iter().product::<usize>() as u64)
        .sum();
    let bits: f64 = reports
        .iter()
        .map(|r| r.bits_per_weight * r.shape.iter().product::<usize>() as f64)
        .sum();
    record["summary"] = json!({
        "method": spec.method.as_str(),
        "format": spec.format.as_str(),
        "tensors_quantized": reports.len(),
        "bits_per_weight": if numel == 0 { 0.0 } else { bits / numel as f64 },
        "packed_bytes": reports.iter().map(|r| r.packed_bytes).sum::<u64>(),
        "dense_bytes": reports.iter().map(|r| r.dense_bytes).sum::<u64>(),
        "packed_file_bytes": artifact.as_ref().map(|a| a.file.size()),
        "max_mse": reports.iter().map(|r| r.mse).fold(0.0, f64::max),
        "min_sqnr_db": reports.iter().filter_map(|r| r.sqnr_db).reduce(f64::min),
    });
    if !importance_summary.is_null() {
        record["summary"]["importance"] = importance_summary;
    }
    record["layers"] = serde_json::to_value(&reports).unwrap_or(Value::Null);
    Ok(StepOut {
        file: Some(temp),
        artifact,
        architecture: None,
        record,
    })
}

/// The named tensors of a GGUF file, dequantized to f32 with candle's decoder.
fn dequantize_gguf(
    path: &std::path::Path,
    names: &[String],
) -> compress::Result<std::collections::HashMap<String, Vec<f32>>> {
    use candle_core::quantized::gguf_file;
    let mut file = std::io::BufReader::new(std::fs::File::open(path)?);
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| compress::Error::Internal(format!("reading back our GGUF file: {e}")))?;
    let device = candle_core::Device::Cpu;
    let mut out = std::collections::HashMap::new();
    for name in names {
        let q = content
            .tensor(&mut file, name, &device)
            .map_err(|e| compress::Error::Internal(format!("GGUF tensor {name}: {e}")))?;
        let values = q.dequantize(&device)?.flatten_all()?.to_vec1::<f32>()?;
        out.insert(name.clone(), values);
    }
    Ok(out)
}

/// Copy `input`, replacing the named tensors' values (f32, re-encoded in each tensor's dtype).
fn write_replacing(
    input: &SafetensorsFile,
    replacements: &std::collections::HashMap<String, Vec<f32>>,
    metadata: &BTreeMap<String, String>,
    out: &mut dyn std::io::Write,
) -> compress::Result<u64> {
    use crate::compress::formats::safetensors::{encode_as, write_safetensors, TensorSpec};
    let infos = &input.header().tensors;
    let specs: Vec<TensorSpec> = infos
        .iter()
        .map(|t| TensorSpec::new(t.name.clone(), t.dtype, t.shape.clone()))
        .collect();
    write_safetensors(out, metadata, &specs, |i, w| {
        let t = &infos[i];
        match replacements.get(&t.name) {
            Some(v) => w.write_all(&encode_as(t.dtype, v)?)?,
            None => w.write_all(input.bytes(t))?,
        }
        Ok(())
    })
}

/// Weights with the `chosen` tensors replaced by their dequantized values.
fn with_quantized(
    weights: &[NamedTensor],
    chosen: &[String],
    quantized: &std::collections::HashMap<String, Vec<f32>>,
) -> Vec<NamedTensor> {
    weights
        .iter()
        .map(
            |w| match (chosen.contains(&w.name), quantized.get(&w.name)) {
                (true, Some(q)) => NamedTensor {
                    name: w.name.clone(),
                    shape: w.shape.clone(),
                    values: q.clone(),
                },
                _ => w.clone(),
            },
        )
        .collect()
}

/// `max_accuracy_drop`: quantize everything; while the drop is over budget, put back to float
/// the tensor whose quantization alone costs the most accuracy. Returns the tensors still
/// quantized and a report of the reverted ones.
#[allow(clippy::too_many_arguments)]
fn accuracy_budget(
    env: &Env,
    quantizer: &Quantizer,
    source: &SafetensorsFile,
    arch_json: &Option<Value>,
    selected: &[String],
    budget: f64,
    seed: u64,
) -> Result<(Vec<String>, Value), PipelineError> {
    let arch = current_arch(arch_json)?;
    let weights = Model::from_safetensors(&arch, source)?.export()?;
    let accuracy = |w: Vec<NamedTensor>| -> Result<f64, PipelineError> {
        Ok(eval_weights(env, &arch, w, None)?
            .and_then(|e| e.accuracy)
            .unwrap_or(0.0))
    };
    let float_acc = accuracy(weights.clone())?;
    let mut quantized = std::collections::HashMap::new();
    for w in weights.iter().filter(|w| selected.contains(&w.name)) {
        env.ctx.check()?;
        let (q, _) = quantizer.quantize(&w.name, &w.values, &w.shape, seed)?;
        quantized.insert(w.name.clone(), q.dequantized);
    }
    let all_acc = accuracy(with_quantized(&weights, selected, &quantized))?;
    let mut kept: Vec<String> = selected.to_vec();
    let mut reverted = Vec::new();
    let mut steps = vec![json!({"reverted": 0, "accuracy": all_acc, "drop": float_acc - all_acc})];
    if float_acc - all_acc > budget {
        // Sensitivity: the accuracy lost by quantizing each tensor alone.
        let mut sensitivity = Vec::new();
        for name in selected {
            env.ctx.check()?;
            let acc = accuracy(with_quantized(
                &weights,
                std::slice::from_ref(name),
                &quantized,
            ))?;
            sensitivity.push((name.clone(), float_acc - acc));
        }
        sensitivity.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut best = (all_acc, kept.clone());
        for (name, drop_alone) in sensitivity {
            kept.retain(|k| *k != name);
            let acc = accuracy(with_quantized(&weights, &kept, &quantized))?;
            reverted.push(json!({
                "tensor": name,
                "reason": format!("quantizing it alone cost {:.4} accuracy, the most of the tensors still quantized", drop_alone),
                "accuracy_drop_alone": drop_alone,
                "accuracy_after_revert": acc,
            }));
            steps.push(
                json!({"reverted": reverted.len(), "accuracy": acc, "drop": float_acc - acc}),
            );
            if acc > best.0 {
                best = (acc, kept.clone());
            }
            if float_acc - acc <= budget {
                best = (acc, kept.clone());
                break;
            }
        }
        kept = best.1;
    }
    let final_acc = accuracy(with_quantized(&weights, &kept, &quantized))?;
    Ok((
        kept,
        json!({
            "budget": budget,
            "float_accuracy": float_acc,
            "all_quantized_accuracy": all_acc,
            "final_accuracy": final_acc,
            "tensors": reverted,
            "search": steps,
            "within_budget": float_acc - final_acc <= budget,
        }),
    ))
}

/// QAT: train with fake-quantized weights (straight-through gradients), return the trained
/// float file, its epochs and a summary; the caller quantizes it exactly as PTQ would.
#[allow(clippy::too_many_arguments)]
fn quantization_aware_training(
    env: &Env,
    qat: &FinetuneSpec,
    quantizer: &Quantizer,
    input: &SafetensorsFile,
    arch_json: &Option<Value>,
    metadata: &BTreeMap<String, String>,
    selected: &[String],
    seed: u64,
) -> Result<(crate::store::BlobRef, Value, Value), PipelineError> {
    let arch = current_arch(arch_json)?;
    let mut model = Model::from_safetensors(&arch, input)?;
    let method = quantizer.method;
    let quantizer = quantizer.clone();
    let selected_set: HashSet<String> = selected.iter().cloned().collect();
    // k-means: weights tied within their clusters (centroid fine-tuning); the others:
    // fake-quantized forward with straight-through gradients.
    let shared = if matches!(method, QMethod::Kmeans { .. }) {
        Some(SharedWeights::new(&model, &selected_set, &method, seed)?)
    } else {
        model.set_weight_transform(Some(WeightTransform(std::sync::Arc::new(
            move |name: &str, w: &candle_core::Tensor| {
                if !selected_set.contains(name) {
                    return Ok(None);
                }
                let shape = w.dims().to_vec();
                let values = w.flatten_all()?.to_vec1::<f32>()?;
                let (q, _) = quantizer.quantize(name, &values, &shape, seed)?;
                Ok(Some(candle_core::Tensor::from_vec(
                    q.dequantized,
                    shape,
                    w.device(),
                )?))
            },
        ))));
        None
    };
    let tie =
        |m: &Model| -> compress::Result<()> { shared.as_ref().map_or(Ok(()), |s| s.project(m)) };
    let params = env.datasets.training_params(qat, env.seed)?;
    let mut on_epoch = checkpointer(env.store, env.hooks, env.index, qat.epochs);
    let out = crate::compress::engine::finetune::finetune(
        model,
        &params,
        env.ctx,
        TrainHooks {
            on_epoch: Some(&mut on_epoch),
            resume: resume_checkpoint(env)?,
            after_step: shared.is_some().then_some(&tie as &_),
            ..Default::default()
        },
    )?;
    let mut temp = env.store.create_temp()?;
    write_named(&mut temp, metadata, &out.weights)?;
    let blob = env.store.commit(temp)?;
    Ok((
        blob,
        serde_json::to_value(&out.history).unwrap_or(Value::Null),
        json!({
            "epochs_run": out.history.len(),
            "final_train_loss": out.history.last().map(|h| h.train_loss),
            "final_val_accuracy": out.history.last().and_then(|h| h.val_accuracy),
            "mode": if shared.is_some() { "shared_centroids" } else { "fake_quant_ste" },
        }),
    ))
}

// ---------------------------------------------------------------------------------------
// distill

/// The `distill` step: the current model teaches the student; the output is the student.
pub(super) fn distill(
    env: &Env,
    spec: &DistillSpec,
    input: &SafetensorsFile,
    arch_json: &Option<Value>,
    metadata: &BTreeMap<String, String>,
) -> Result<StepOut, PipelineError> {
    let teacher_arch = current_arch(arch_json)?;
    let teacher = Model::from_safetensors(&teacher_arch, input)?;
    let (student_arch, student) = match &spec.student {
        StudentSpec::Model(id) => {
            let record = named_model(env, id, "student")?;
            let arch = current_arch(&record.architecture)?;
            let file = SafetensorsFile::open(env.store.path(&record.sha256))?;
            let m = Model::from_safetensors(&arch, &file)?;
            (arch, m)
        }
        StudentSpec::Architecture(a) => {
            let arch = Architecture::from_json(a)?;
            let m = Model::init(&arch, spec.train.seed.unwrap_or(env.seed))?;
            (arch, m)
        }
    };
    let params = DistillParams {
        train: env.datasets.training_params(&spec.train, env.seed)?,
        temperature: spec.temperature,
        alpha: spec.alpha,
        features: spec
            .features
            .iter()
            .map(|f| FeaturePair {
                teacher: f.teacher.clone(),
                student: f.student.clone(),
                weight: f.weight,
            })
            .collect(),
        baseline: spec.baseline,
    };
    // `keep_sparsity`: the student's zero weights (matrices and kernels, not biases) stay zero
    // after every optimizer step, as in pruning's retraining rounds.
    let masks = if spec.keep_sparsity {
        let weights: Vec<String> = student
            .params()
            .iter()
            .filter(|p| p.var().as_tensor().rank() >= 2)
            .map(|p| p.name().to_string())
            .collect();
        zero_masks(&student, &weights)?
    } else {
        Vec::new()
    };
    let held_zeros: usize = masks
        .iter()
        .map(|(_, m)| m.elem_count())
        .sum::<usize>()
        .saturating_sub(count_mask_ones(&masks)?);
    let keep_zero = |m: &Model| -> compress::Result<()> { apply_masks(m, &masks) };
    let mut on_epoch = checkpointer(env.store, env.hooks, env.index, spec.train.epochs);
    let out = distill::distill(
        &teacher,
        student,
        &params,
        env.ctx,
        TrainHooks {
            on_epoch: Some(&mut on_epoch),
            resume: resume_checkpoint(env)?,
            after_step: spec.keep_sparsity.then_some(&keep_zero as &_),
            ..Default::default()
        },
    )?;
    let teacher_eval = eval_weights(env, &teacher_arch, teacher.export()?, None)?;
    let student_eval = eval_weights(env, &student_arch, out.weights.clone(), Some(&teacher))?;
    let baseline_eval = match &out.baseline {
        Some(b) => eval_weights(env, &student_arch, b.weights.clone(), Some(&teacher))?,
        None => None,
    };
    let teacher_params = teacher_arch.parameter_count();
    let student_params = student_arch.parameter_count();
    let summary = json!({
        "temperature": spec.temperature,
        "alpha": spec.alpha,
        "keep_sparsity": spec.keep_sparsity.then_some(json!({"zero_weights_held": held_zeros})),
        "teacher_cached": out.teacher_cached,
        "teacher_parameters": teacher_params,
        "student_parameters": student_params,
        "parameter_ratio": teacher_params as f64 / student_params.max(1) as f64,
        "teacher_flops": teacher_arch.flops(),
        "student_flops": student_arch.flops(),
        "teacher": teacher_eval.as_ref().map(eval_json),
        "student": student_eval.as_ref().map(eval_json),
        "baseline": baseline_eval.as_ref().map(eval_json),
        "teacher_accuracy": teacher_eval.as_ref().and_then(|e| e.accuracy),
        "student_accuracy": student_eval.as_ref().and_then(|e| e.accuracy),
        "baseline_accuracy": baseline_eval.as_ref().and_then(|e| e.accuracy),
        "agreement_with_teacher": student_eval.as_ref().and_then(|e| e.agreement),
        "baseline_agreement_with_teacher": baseline_eval.as_ref().and_then(|e| e.agreement),
        "validation": {
            "teacher_accuracy": out.teacher_val_accuracy,
            "agreement_with_teacher": out.val_agreement,
        },
        "epochs_run": out.history.len(),
        "best_epoch": out.best_epoch,
        "stopped_early": out.stopped_early,
        "baseline_epochs": out.baseline.as_ref().map(|b| serde_json::to_value(&b.history).unwrap_or(Value::Null)),
    });
    let new_arch = student_arch.to_json();
    let mut meta = metadata.clone();
    meta.insert(META_ARCHITECTURE.into(), new_arch.to_string());
    let mut temp = env.store.create_temp()?;
    write_named(&mut temp, &meta, &out.weights)?;
    Ok(StepOut {
        file: Some(temp),
        artifact: None,
        architecture: Some(new_arch),
        record: json!({
            "summary": summary,
            "epochs": out.history,
        }),
    })
}
