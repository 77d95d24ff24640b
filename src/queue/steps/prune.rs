//! The `prune` step: one shot (streamed file to file), structured (the architecture shrinks),
//! or gradual with retraining between rounds; optionally the sparse encoding as an artifact.

use serde_json::{json, Value};

use super::{
    current_arch, failed, with_architecture, Artifact, Env, Input, PipelineError, StepOut,
};
use crate::codes::Code;
use crate::compress::engine::sequential::model::Model;
use crate::compress::formats::safetensors::{tensor_bytes, SafetensorsFile};
use crate::compress::prune::schedule::{prune_gradually, GradualParams};
use crate::compress::prune::structured::prune_structured;
use crate::compress::prune::{self, LayerReport, Method, Output};
use crate::spec::PruneSpec;
use crate::store::TempBlob;

/// The `prune` step.
pub(super) fn prune(env: &Env, spec: &PruneSpec, input: &Input) -> Result<StepOut, PipelineError> {
    let file = input.file;
    let selected: Vec<String> = spec
        .selection
        .resolve(&file.header().tensors)
        .into_iter()
        .map(|t| t.name.clone())
        .collect();
    if selected.is_empty() {
        return Err(failed(
            Code::ValidationFailed,
            "the selection matches no tensor of this step's input",
        ));
    }
    if spec.schedule.is_some() {
        return gradual(env, spec, input, &selected);
    }
    if let Method::Structured { norm } = spec.method {
        let arch = current_arch(input.architecture)?;
        let out = prune_structured(
            &arch,
            file.float_tensors()?,
            &selected,
            &spec.targets(),
            norm,
        )?;
        let new_arch = out.architecture.to_json();
        let (temp, written) =
            env.write_f32(&with_architecture(input.metadata, &new_arch), &out.weights)?;
        let record = json!({
            "summary": {
                "method": "structured",
                "norm": norm,
                "parameters_before": arch.parameter_count(),
                "parameters_after": out.architecture.parameter_count(),
                "flops_before": arch.flops(),
                "flops_after": out.architecture.flops(),
                "tensor_bytes_before": file.header().data_len(),
                "tensor_bytes_after": tensor_bytes(&out.weights),
                "file_bytes_after": written,
                "skipped": out.skipped.iter().map(|(l, why)| json!({"layer": l, "reason": why})).collect::<Vec<_>>(),
            },
            "layers": out.layers,
        });
        return Ok(StepOut {
            outputs: None,
            file: Some(temp),
            artifact: None,
            architecture: Some(new_arch),
            record,
        });
    }
    let mut temp = env.store.create_temp()?;
    let reports = prune::prune_file(
        file,
        &prune::PruneFile {
            selected: &selected,
            method: spec.method,
            targets: &spec.targets(),
            seed: spec.seed.unwrap_or(env.seed),
            output: Output::Dense,
            metadata: input.metadata,
        },
        &mut temp,
        env.ctx,
    )?;
    let (file, artifact) = sparse_artifact(env, spec, temp, &selected, input)?;
    Ok(StepOut {
        outputs: None,
        file: Some(file),
        artifact,
        architecture: None,
        record: json!({
            "summary": summary(spec, &reports),
            "layers": reports,
        }),
    })
}

/// Gradual pruning: rounds of pruning to the schedule's sparsity, each followed by
/// retraining with the pruned weights held at zero.
fn gradual(
    env: &Env,
    spec: &PruneSpec,
    input: &Input,
    selected: &[String],
) -> Result<StepOut, PipelineError> {
    let Some(schedule) = &spec.schedule else {
        return Err(failed(
            Code::InternalError,
            "gradual pruning without a schedule",
        ));
    };
    let arch = current_arch(input.architecture)?;
    let weights = Model::from_safetensors(&arch, input.file)?.export()?;
    let retrain = env.datasets.training_params(&schedule.finetune, env.seed)?;
    let params = GradualParams {
        method: spec.method,
        targets: &spec.targets(),
        schedule: schedule.curve,
        retrain: &retrain,
        eval: env.eval_data()?,
        seed: spec.seed.unwrap_or(env.seed),
        splicing: schedule.splicing,
    };
    let mut on_epoch = |m: &_| (env.hooks.epoch_finished)(env.index, m);
    let out = prune_gradually(&arch, weights, selected, &params, env.ctx, &mut on_epoch)?;
    let new_arch = out.architecture.to_json();
    let metadata = with_architecture(input.metadata, &new_arch);
    let (temp, written) = env.write_f32(&metadata, &out.weights)?;
    let mut summary = json!({
        "method": spec.method.as_str(),
        "target_sparsity": spec.sparsity,
        "iterations": out.rounds,
        "schedule": schedule.curve.kind.as_str(),
        "splicing": schedule.splicing,
    });
    let layers;
    if matches!(spec.method, Method::Structured { .. }) {
        summary["parameters_before"] = json!(arch.parameter_count());
        summary["parameters_after"] = json!(out.architecture.parameter_count());
        summary["flops_before"] = json!(arch.flops());
        summary["flops_after"] = json!(out.architecture.flops());
        summary["tensor_bytes_before"] = json!(input.file.header().data_len());
        summary["tensor_bytes_after"] = json!(tensor_bytes(&out.weights));
        summary["file_bytes_after"] = json!(written);
        layers = serde_json::to_value(&out.structured_layers).unwrap_or(Value::Null);
    } else {
        let reports = prune::reports_of(&out.weights, selected);
        if let (Some(s), Some(t)) = (
            summary.as_object_mut(),
            self::summary(spec, &reports).as_object(),
        ) {
            for (k, v) in t {
                s.entry(k.clone()).or_insert(v.clone());
            }
        }
        layers = serde_json::to_value(&reports).unwrap_or(Value::Null);
    }
    let input = Input {
        metadata: &metadata,
        ..*input
    };
    let (file, artifact) = sparse_artifact(env, spec, temp, selected, &input)?;
    Ok(StepOut {
        outputs: None,
        file: Some(file),
        artifact,
        architecture: Some(new_arch),
        record: json!({"summary": summary, "layers": layers, "epochs": out.epochs}),
    })
}

/// With `output: sparse`, the dense pruned file is packed into a bitmask + values artifact;
/// the dense file stays the model (what later steps and `eval` read).
fn sparse_artifact(
    env: &Env,
    spec: &PruneSpec,
    mut dense: TempBlob,
    selected: &[String],
    input: &Input,
) -> Result<(TempBlob, Option<Artifact>), PipelineError> {
    if spec.output != Output::Sparse {
        return Ok((dense, None));
    }
    std::io::Write::flush(&mut dense)?;
    let dense_file = SafetensorsFile::open(dense.path())?;
    let mut packed = env.store.create_temp()?;
    prune::encode_sparse(&dense_file, selected, input.metadata, &mut packed, env.ctx)?;
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

/// The step's totals: method, target, and the sums of the per-tensor reports.
fn summary(spec: &PruneSpec, reports: &[LayerReport]) -> Value {
    let mut v = serde_json::to_value(prune::summarize(reports)).unwrap_or(Value::Null);
    v["method"] = json!(spec.method.as_str());
    v["target_sparsity"] = json!(spec.sparsity);
    v
}
