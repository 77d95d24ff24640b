//! The `distill` step: the current model teaches a student (uploaded, or freshly initialised
//! from an architecture); the output is the student.

use serde_json::{json, Value};

use super::{current_arch, eval_json, with_architecture, Env, Input, PipelineError, StepOut};
use crate::compress::distill::{self, DistillParams};
use crate::compress::engine::masks::ZeroMasks;
use crate::compress::engine::sequential::arch::Architecture;
use crate::compress::engine::sequential::model::Model;
use crate::compress::engine::train::TrainHooks;
use crate::compress::engine::Network;
use crate::compress::formats::safetensors::SafetensorsFile;
use crate::spec::distill::StudentSpec;
use crate::spec::DistillSpec;

/// The `distill` step.
pub(super) fn distill(
    env: &Env,
    spec: &DistillSpec,
    input: &Input,
) -> Result<StepOut, PipelineError> {
    let teacher_arch = current_arch(input.architecture)?;
    let teacher = Model::from_safetensors(&teacher_arch, input.file)?;
    let (student_arch, student) = match &spec.student {
        StudentSpec::Model(id) => {
            let record = env.named_model(id, "student")?;
            let arch = current_arch(&record.architecture)?;
            let file = SafetensorsFile::open(env.store.materialize(&record.sha256)?)?;
            let m = Model::from_safetensors(&arch, &file)?;
            (arch, m)
        }
        StudentSpec::Architecture(a) => {
            let arch = Architecture::from_json(a)?;
            let m = Model::init(&arch, spec.train.seed.unwrap_or(env.seed))?;
            (arch, m)
        }
        StudentSpec::FromTeacher(_) | StudentSpec::Config(_) => {
            return Err(super::failed(
                crate::codes::Code::UnsupportedOperation,
                "`from_teacher` and `config` students are built from a transformer teacher; this one has neither blocks nor a config",
            ))
        }
    };
    let params = distill_params(env, spec)?;
    let masks = sparsity_masks(&student, spec.keep_sparsity)?;
    let held_zeros = masks.zeros()?;
    let keep_zero = |m: &dyn Network| masks.apply(m);
    let mut on_epoch = env.checkpointer(spec.train.epochs);
    let out = distill::distill(
        &teacher,
        Box::new(student),
        &params,
        env.ctx,
        TrainHooks {
            on_epoch: Some(&mut on_epoch),
            resume: env.resume_checkpoint()?,
            after_step: spec.keep_sparsity.then_some(&keep_zero as &_),
            ..Default::default()
        },
    )?;
    let teacher_eval = env.eval_weights(&teacher_arch, teacher.export()?, None)?;
    let student_eval = env.eval_weights(&student_arch, out.weights.clone(), Some(&teacher))?;
    let baseline_eval = match &out.baseline {
        Some(b) => env.eval_weights(&student_arch, b.weights.clone(), Some(&teacher))?,
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
    let (temp, _) = env.write_f32(&with_architecture(input.metadata, &new_arch), &out.weights)?;
    Ok(StepOut {
        outputs: None,
        file: Some(temp),
        artifact: None,
        architecture: Some(new_arch),
        record: json!({
            "summary": summary,
            "epochs": out.history,
        }),
    })
}

/// The engine's parameters of `spec`, with its datasets.
pub(super) fn distill_params<'a>(
    env: &'a Env,
    spec: &DistillSpec,
) -> Result<DistillParams<'a>, PipelineError> {
    Ok(DistillParams {
        train: env.datasets.training_params(&spec.train, env.seed)?,
        temperature: spec.temperature,
        alpha: spec.alpha,
        features: spec.features.clone(),
        baseline: spec.baseline,
        loss: spec.loss,
        kept_blocks: match &spec.student {
            crate::spec::distill::StudentSpec::FromTeacher(l) => Some(l.clone()),
            _ => None,
        },
        projection: spec.projection,
    })
}

/// `keep_sparsity`: the student's zero weights (matrices and kernels, not biases) stay zero
/// after every optimizer step, as in pruning's retraining rounds.
pub(super) fn sparsity_masks(
    student: &dyn Network,
    keep_sparsity: bool,
) -> Result<ZeroMasks, PipelineError> {
    if !keep_sparsity {
        return Ok(ZeroMasks::default());
    }
    let weights: Vec<String> = student
        .params()
        .iter()
        .filter(|p| p.var().as_tensor().rank() >= 2)
        .map(|p| p.name().to_string())
        .collect();
    Ok(ZeroMasks::of(student, &weights)?)
}
