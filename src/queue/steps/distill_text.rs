//! The `distill` step on a transformer teacher: the student keeps some of the teacher's
//! blocks (`from_teacher`), is trained to match it (a language model's per-token
//! distributions, a sentence encoder's embeddings, a classifier's logits), and its `config.json`
//! says how many blocks it has. With the job's `eval` on text, the step also compares with the
//! teacher, on the same tokens, the copied blocks before training, the trained student and
//! the baseline.

use serde_json::{json, Value};

use super::distill::{distill_params, sparsity_masks};
use super::{failed, Env, Input, PipelineError, StepOut, TransformerSource};
use crate::codes::Code;
use crate::compress::distill;
use crate::compress::distill::text::Matched;
use crate::compress::engine::text_eval::{comparable, evaluate_text, TextFigures};
use crate::compress::engine::train::TrainHooks;
use crate::compress::engine::Network;
use crate::compress::formats::safetensors::{NamedTensor, SafetensorsFile};
use crate::spec::distill::StudentSpec;
use crate::spec::DistillSpec;

/// Parameter elements of a network.
fn parameters(net: &dyn Network) -> u64 {
    net.params().iter().map(|p| p.spec().numel() as u64).sum()
}

/// The `distill` step of a transformer `source`.
pub(super) fn distill(
    env: &Env,
    spec: &DistillSpec,
    input: &Input,
    source: &TransformerSource,
) -> Result<StepOut, PipelineError> {
    let teacher = source.load(input.file)?;
    let (student, layers) = match &spec.student {
        StudentSpec::FromTeacher(layers) => (teacher.with_blocks(layers)?, Some(layers)),
        // An uploaded folder model of the same family (checked at submission).
        StudentSpec::Model(id) => {
            let record = env.named_model(id, "student")?;
            let source = TransformerSource::of(env.store, record)?.ok_or_else(|| {
                failed(
                    Code::UnsupportedFamily,
                    "the student is not a folder model of a family the engine runs",
                )
            })?;
            let file = SafetensorsFile::open(env.store.materialize(&record.sha256)?)?;
            (source.load(&file)?, None)
        }
        // Drawn afresh from the teacher's config with some keys changed.
        StudentSpec::Config(c) => (
            teacher.with_config(c, spec.train.seed.unwrap_or(env.seed))?,
            None,
        ),
        StudentSpec::Architecture(_) => {
            return Err(failed(
                Code::UnsupportedOperation,
                "a transformer teacher's student is built from it (`from_teacher`), drawn from its config (`config`) or uploaded (`model_id`)",
            ))
        }
    };
    let text_eval = env.eval.and_then(|e| e.text.as_ref().map(|t| (e, t)));
    // The copied blocks before training, kept only to be compared with the teacher; the
    // trained student and the baseline are compared through the same network.
    let untrained = match text_eval {
        Some(_) => Some(student.with_weights(student.export()?)?),
        None => None,
    };
    // Encoders are compared on their embeddings: a student of another hidden size is not.
    let comparable = comparable(student.as_ref(), teacher.as_ref())?;
    let params = distill_params(env, spec)?;
    let masks = sparsity_masks(student.as_ref(), spec.keep_sparsity)?;
    let held_zeros = masks.zeros()?;
    let keep_zero = |m: &dyn Network| masks.apply(m);
    let mut on_epoch = env.checkpointer(spec.train.epochs);
    let teacher_parameters = parameters(teacher.as_ref());
    let student_parameters = parameters(student.as_ref());
    let out = distill::distill(
        teacher.as_ref(),
        student,
        &params,
        env.ctx,
        TrainHooks {
            on_epoch: Some(&mut on_epoch),
            resume: env.resume_checkpoint()?,
            after_step: spec.keep_sparsity.then_some(&keep_zero as &_),
            ..Default::default()
        },
    )?;
    let compare = |weights: Option<&[NamedTensor]>| -> Result<Option<TextFigures>, PipelineError> {
        let (Some((eval, text)), Some(copy), true) = (text_eval, &untrained, comparable) else {
            return Ok(None);
        };
        let trained;
        let net = match weights {
            Some(w) => {
                trained = copy.with_weights(w.to_vec())?;
                trained.as_ref()
            }
            None => copy.as_ref(),
        };
        let data = env.datasets.get(&eval.dataset_id)?;
        let e = evaluate_text(
            net,
            Some(teacher.as_ref()),
            data,
            text,
            eval.batch_size,
            &env.ctx.silent(),
        )?;
        Ok(Some(e.model))
    };
    let untrained_figures = compare(None)?;
    let trained = compare(Some(&out.weights))?;
    let baseline = match &out.baseline {
        Some(b) => compare(Some(&b.weights))?,
        None => None,
    };
    let hidden = !out.hidden_pairs.is_empty();
    let embeddings = matches!(out.matched, Matched::Embeddings(_));
    let output_loss = !embeddings && !hidden;
    let summary = json!({
        "loss": if hidden { "hidden" } else { out.matched.loss_name() },
        "distance": match out.matched {
            Matched::Embeddings(d) if !hidden => json!(d.as_str()),
            _ => Value::Null,
        },
        "hidden_pairs": hidden.then(|| out.hidden_pairs.iter()
            .map(|(s, t)| json!({"student": s, "teacher": t}))
            .collect::<Vec<_>>()),
        "projection": hidden.then_some(spec.projection),
        "temperature": output_loss.then_some(spec.temperature),
        "alpha": output_loss.then_some(spec.alpha),
        "student_layers": layers,
        "student_model_id": match &spec.student {
            StudentSpec::Model(id) => Some(id),
            _ => None,
        },
        "student_config": match &spec.student {
            StudentSpec::Config(c) => Some(c),
            _ => None,
        },
        "keep_sparsity": spec.keep_sparsity.then_some(json!({"zero_weights_held": held_zeros})),
        "teacher_cached": out.teacher_cached,
        "teacher_parameters": teacher_parameters,
        "student_parameters": student_parameters,
        "parameter_ratio": teacher_parameters as f64 / student_parameters.max(1) as f64,
        "untrained": untrained_figures,
        "student": trained,
        "baseline": baseline,
        "validation": {
            "agreement_with_teacher": out.val_agreement,
            "embedding_cosine": out.val_embedding_cosine,
            "baseline_agreement_with_teacher": out.baseline.as_ref().and_then(|b| b.val_agreement).filter(|_| !embeddings),
            "baseline_embedding_cosine": out.baseline.as_ref().and_then(|b| b.val_agreement).filter(|_| embeddings),
        },
        "epochs_run": out.history.len(),
        "best_epoch": out.best_epoch,
        "stopped_early": out.stopped_early,
        "baseline_epochs": out.baseline.as_ref().map(|b| serde_json::to_value(&b.history).unwrap_or(Value::Null)),
    });
    let (temp, _) = env.write_f32(input.metadata, &out.weights)?;
    Ok(StepOut {
        outputs: None,
        file: Some(temp),
        artifact: None,
        // The student's config.json (fewer blocks) replaces the teacher's.
        architecture: Some(out.architecture),
        record: json!({
            "summary": summary,
            "epochs": out.history,
            "kd_epochs": out.kd_history,
        }),
    })
}
