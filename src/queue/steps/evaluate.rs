//! The `evaluate` step: metrics only; the model passes through unchanged.

use std::io::Write;

use serde_json::json;

use super::{evaluate_file, Env, Evaluated, Input, PipelineError, StepOut};
use crate::spec::EvalSpec;

/// The `evaluate` step.
pub(super) fn evaluate(
    env: &Env,
    spec: &EvalSpec,
    input: &Input,
) -> Result<StepOut, PipelineError> {
    let e = evaluate_file(
        input,
        input.file,
        env.datasets,
        spec,
        env.reference,
        env.ctx,
    )?;
    let outputs = match &e {
        Evaluated::Text(t) => match &t.outputs {
            Some(bytes) => {
                let mut temp = env.store.create_temp()?;
                temp.write_all(bytes)?;
                Some(temp)
            }
            None => None,
        },
        Evaluated::Classifier(_) => None,
    };
    Ok(StepOut {
        file: None,
        artifact: None,
        outputs,
        architecture: None,
        record: json!({ "summary": e.figures() }),
    })
}
