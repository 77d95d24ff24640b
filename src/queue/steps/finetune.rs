//! The `finetune` step: transfer learning, or training from scratch, checkpointed per epoch
//! so a rescued job resumes where it stopped. Sequential networks, and the transformers of a
//! folder model (a bert classifier, a llama language model).

use serde_json::{json, Value};

use super::{network, with_architecture, Env, Input, PipelineError, StepOut};
use crate::compress::engine::finetune::finetune as train;
use crate::compress::engine::train::TrainHooks;
use crate::spec::FinetuneSpec;

/// The `finetune` step.
pub(super) fn finetune(
    env: &Env,
    spec: &FinetuneSpec,
    input: &Input,
) -> Result<StepOut, PipelineError> {
    let model = network(input)?;
    let objective = model.objective();
    let params = env.datasets.training_params(spec, env.seed)?;
    let mut on_epoch = env.checkpointer(spec.epochs);
    let out = train(
        model,
        &params,
        env.ctx,
        TrainHooks {
            on_epoch: Some(&mut on_epoch),
            resume: env.resume_checkpoint()?,
            ..Default::default()
        },
    )?;
    let (metadata, architecture) = match input.transformer {
        // A folder model keeps its config beside the weights: a changed one (a new head)
        // replaces it.
        Some(t) => (
            input.metadata.clone(),
            (out.architecture != t.config).then_some(out.architecture),
        ),
        None => (
            with_architecture(input.metadata, &out.architecture),
            Some(out.architecture),
        ),
    };
    let (temp, _) = env.write_f32(&metadata, &out.weights)?;
    let record = json!({
        "epochs": serde_json::to_value(&out.history).unwrap_or(Value::Null),
        "summary": {
            "objective": objective,
            "epochs_run": out.history.len(),
            "best_epoch": out.best_epoch,
            "stopped_early": out.stopped_early,
            "restored_best": out.restored_best,
            "trainable_parameters": out.trainable_parameters,
            "final_train_loss": out.history.last().map(|h| h.train_loss),
            "final_val_accuracy": out.history.last().and_then(|h| h.val_accuracy),
        },
    });
    Ok(StepOut {
        outputs: None,
        file: Some(temp),
        artifact: None,
        architecture,
        record,
    })
}
