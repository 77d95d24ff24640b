//! The `evaluate` step: metrics only; the model passes through unchanged.

use serde_json::json;

use super::{eval_json, evaluate_file, Env, Input, PipelineError, StepOut};
use crate::spec::EvalSpec;

/// The `evaluate` step.
pub(super) fn evaluate(
    env: &Env,
    spec: &EvalSpec,
    input: &Input,
) -> Result<StepOut, PipelineError> {
    let e = evaluate_file(
        input.architecture,
        input.file,
        env.datasets,
        spec,
        env.reference,
        env.ctx,
    )?;
    Ok(StepOut {
        file: None,
        artifact: None,
        architecture: None,
        record: json!({ "summary": eval_json(&e) }),
    })
}
