//! Evaluation of a classifier on a dataset (API.md, `evaluate` op and the job-level `eval`).
//!
//! This module owns the figures a user compares models by: cross-entropy loss, top-1 and
//! top-5 accuracy, per-class accuracy, agreement and KL divergence with a reference model
//! (the uncompressed original), and throughput / latency of the forward pass on this
//! machine. It also owns the check that a dataset fits a model (feature shape, labels
//! within the classifier's width). It runs models in evaluation mode only and never
//! changes them; the training loop reuses [`loss_and_accuracy`] for validation.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::compress::engine::data::{Dataset, Subset};
use crate::compress::engine::{Mode, Network};
use crate::compress::progress::Ctx;
use crate::compress::{Error, Result};

/// Accuracy on the samples of one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassAccuracy {
    /// The class index.
    pub class: usize,
    /// How many evaluated samples carry this label.
    pub samples: usize,
    /// Fraction of them classified correctly (top-1).
    pub accuracy: f64,
}

/// The figures of one evaluation. Label-based figures are `None` for an unlabelled
/// dataset; reference figures are `None` without a reference model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Number of samples evaluated.
    pub samples: usize,
    /// Mean cross-entropy loss (natural log).
    pub loss: Option<f64>,
    /// Top-1 accuracy.
    pub accuracy: Option<f64>,
    /// Top-5 accuracy, when the model has at least 5 classes.
    pub top5_accuracy: Option<f64>,
    /// Top-1 accuracy per class present in the labels, by class index.
    pub per_class: Vec<ClassAccuracy>,
    /// Fraction of samples where the model's top-1 class equals the reference's.
    pub agreement: Option<f64>,
    /// Mean over samples of KL(p_reference ‖ p_model), in nats.
    pub kl_divergence: Option<f64>,
    /// Samples per second through the model's forward pass (batching excluded).
    pub samples_per_second: f64,
    /// Mean wall-clock milliseconds of one batch's forward pass.
    pub mean_batch_latency_ms: f64,
    /// Batch size used.
    pub batch_size: usize,
}

/// `log_softmax` of one row of logits, in f64.
fn log_softmax_row(row: &[f32], out: &mut Vec<f64>) {
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = row
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    out.clear();
    out.extend(row.iter().map(|&v| v as f64 - lse));
}

/// Index of the first largest value (as `torch.argmax`).
fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Mean cross-entropy loss and top-1 accuracy of `model` on a labelled subset, in
/// evaluation mode. Used by the training loop for validation.
pub fn loss_and_accuracy(
    model: &dyn Network,
    data: &Subset<'_>,
    batch_size: usize,
    ctx: &Ctx<'_>,
) -> Result<(f64, f64)> {
    let e = evaluate(model, data, None, batch_size, ctx)?;
    match (e.loss, e.accuracy) {
        (Some(l), Some(a)) => Ok((l, a)),
        _ => Err(Error::DatasetMismatch(
            "the validation data has no labels".into(),
        )),
    }
}

/// A whole dataset to evaluate on, in batches of `batch_size`.
#[derive(Debug, Clone, Copy)]
pub struct EvalData<'a> {
    /// The dataset.
    pub dataset: &'a Dataset,
    /// Samples per forward pass.
    pub batch_size: usize,
}

/// Evaluates `model` (and optionally a `reference`) on `data` in batches of `batch_size`,
/// checking `ctx` for cancellation between batches.
pub fn evaluate(
    model: &dyn Network,
    data: &Subset<'_>,
    reference: Option<&dyn Network>,
    batch_size: usize,
    ctx: &Ctx<'_>,
) -> Result<Evaluation> {
    model.check_dataset(data.dataset, false)?;
    let classes = model.output_width()?;
    if let Some(r) = reference {
        r.check_dataset(data.dataset, false)?;
        if r.output_width()? != classes {
            return Err(Error::DatasetMismatch(format!(
                "the reference model has {} classes but the model has {classes}",
                r.output_width()?
            )));
        }
    }
    let labelled = data.dataset.y.is_some();
    let mut loss_sum = 0f64;
    let (mut top1, mut top5, mut agree) = (0usize, 0usize, 0usize);
    let mut kl_sum = 0f64;
    let mut class_total = vec![0usize; classes];
    let mut class_correct = vec![0usize; classes];
    let mut forward_seconds = 0f64;
    let mut batches = 0usize;
    let (mut lp, mut lq) = (Vec::new(), Vec::new());
    let iter = model.batches(data, batch_size);
    let total_batches = iter.batch_count().max(1);
    for batch in iter {
        ctx.check()?;
        let batch = batch?;
        let started = Instant::now();
        let out = model.forward(&batch, Mode::Eval)?;
        let logits = out.flatten_all()?.to_vec1::<f32>()?;
        forward_seconds += started.elapsed().as_secs_f64();
        let ref_logits = match reference {
            Some(r) => Some(
                r.forward(&batch, Mode::Eval)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            ),
            None => None,
        };
        for (s, row) in logits.chunks_exact(classes).enumerate() {
            let pred = argmax(row);
            if let Some(labels) = &batch.labels {
                let y = labels[s] as usize;
                log_softmax_row(row, &mut lp);
                loss_sum -= lp[y];
                let above = row.iter().filter(|&&v| v > row[y]).count();
                if pred == y {
                    top1 += 1;
                    class_correct[y] += 1;
                }
                if above < 5 {
                    top5 += 1;
                }
                class_total[y] += 1;
            }
            if let Some(rl) = &ref_logits {
                let rrow = &rl[s * classes..(s + 1) * classes];
                if argmax(rrow) == pred {
                    agree += 1;
                }
                log_softmax_row(row, &mut lp);
                log_softmax_row(rrow, &mut lq);
                kl_sum += lq
                    .iter()
                    .zip(&lp)
                    .map(|(q, p)| q.exp() * (q - p))
                    .sum::<f64>();
            }
        }
        batches += 1;
        ctx.report(batches as f64 / total_batches as f64, "evaluating");
    }
    let n = data.len().max(1) as f64;
    let per_class = class_total
        .iter()
        .zip(&class_correct)
        .enumerate()
        .filter(|(_, (t, _))| **t > 0)
        .map(|(class, (&t, &c))| ClassAccuracy {
            class,
            samples: t,
            accuracy: c as f64 / t as f64,
        })
        .collect();
    Ok(Evaluation {
        samples: data.len(),
        loss: labelled.then_some(loss_sum / n),
        accuracy: labelled.then_some(top1 as f64 / n),
        top5_accuracy: (labelled && classes >= 5).then_some(top5 as f64 / n),
        per_class,
        agreement: reference.map(|_| agree as f64 / n),
        kl_divergence: reference.map(|_| kl_sum / n),
        samples_per_second: if forward_seconds > 0.0 {
            data.len() as f64 / forward_seconds
        } else {
            0.0
        },
        mean_batch_latency_ms: 1000.0 * forward_seconds / batches.max(1) as f64,
        batch_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::engine::data::DatasetX;
    use crate::compress::engine::sequential::arch::Architecture;
    use crate::compress::engine::sequential::model::{check_dataset, Model};
    use crate::compress::formats::safetensors::NamedTensor;
    use serde_json::json;
    use std::sync::atomic::AtomicBool;

    fn identity_model(classes: usize, scale: f32) -> Model {
        let arch = Architecture::from_json(&json!({"kind":"sequential","input_shape":[classes],
            "layers":[{"type":"linear","in_features":classes,"out_features":classes,"bias":false}]}))
        .unwrap();
        let mut w = vec![0f32; classes * classes];
        for i in 0..classes {
            w[i * classes + i] = scale;
        }
        Model::new(
            &arch,
            vec![NamedTensor {
                name: "0.weight".into(),
                shape: vec![classes, classes],
                values: w,
            }],
        )
        .unwrap()
    }

    #[test]
    fn hand_checked_figures() {
        // The model returns its input as logits.
        let model = identity_model(2, 1.0);
        let x = vec![2.0, 0.0, 0.0, 1.0, 3.0, 0.0];
        let d = Dataset {
            x: DatasetX::F32(x),
            feature_shape: vec![2],
            samples: 3,
            y: Some(vec![0, 0, 1]),
            num_classes: Some(2),
        };
        let cancel = AtomicBool::new(false);
        let ctx = Ctx::new(&|_, _| {}, &cancel);
        let e = evaluate(&model, &Subset::all(&d), None, 2, &ctx).unwrap();
        let ce = |a: f64, b: f64| -(a - (a.exp() + b.exp()).ln());
        let want = (ce(2.0, 0.0) + ce(0.0, 1.0) + ce(0.0, 3.0)) / 3.0;
        assert!((e.loss.unwrap() - want).abs() < 1e-9, "{e:?}");
        assert!((e.accuracy.unwrap() - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(e.top5_accuracy, None);
        assert_eq!(
            e.per_class,
            vec![
                ClassAccuracy {
                    class: 0,
                    samples: 2,
                    accuracy: 0.5
                },
                ClassAccuracy {
                    class: 1,
                    samples: 1,
                    accuracy: 0.0
                },
            ]
        );
        assert_eq!((e.agreement, e.kl_divergence), (None, None));
        assert_eq!(e.samples, 3);

        // Against a reference that doubles the logits: same argmax everywhere; KL by hand.
        let reference = identity_model(2, 2.0);
        let e = evaluate(&model, &Subset::all(&d), Some(&reference), 8, &ctx).unwrap();
        assert_eq!(e.agreement, Some(1.0));
        let kl = |a: f64, b: f64| {
            let lq = [
                2.0 * a - (f64::exp(2.0 * a) + f64::exp(2.0 * b)).ln(),
                2.0 * b - (f64::exp(2.0 * a) + f64::exp(2.0 * b)).ln(),
            ];
            let lp = [a - (a.exp() + b.exp()).ln(), b - (a.exp() + b.exp()).ln()];
            lq[0].exp() * (lq[0] - lp[0]) + lq[1].exp() * (lq[1] - lp[1])
        };
        let want = (kl(2.0, 0.0) + kl(0.0, 1.0) + kl(0.0, 3.0)) / 3.0;
        assert!((e.kl_divergence.unwrap() - want).abs() < 1e-9);
        assert!(e.samples_per_second > 0.0 && e.mean_batch_latency_ms >= 0.0);
    }

    #[test]
    fn top5_counts_rank_of_true_class() {
        let model = identity_model(6, 1.0);
        // True class 5 has the 6th largest logit (miss), then the 5th largest (hit).
        let x = vec![6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 6.0, 5.0, 4.0, 3.0, 0.0, 1.0];
        let d = Dataset {
            x: DatasetX::F32(x),
            feature_shape: vec![6],
            samples: 2,
            y: Some(vec![5, 5]),
            num_classes: Some(6),
        };
        let cancel = AtomicBool::new(false);
        let ctx = Ctx::new(&|_, _| {}, &cancel);
        let e = evaluate(&model, &Subset::all(&d), None, 2, &ctx).unwrap();
        assert_eq!(e.top5_accuracy, Some(0.5));
        assert_eq!(e.accuracy, Some(0.0));
    }

    #[test]
    fn dataset_mismatches_are_refused() {
        let model = identity_model(2, 1.0);
        let arch = model.architecture();
        let d = |shape: Vec<usize>, labels: Vec<i64>| Dataset {
            x: DatasetX::F32(vec![0.0; shape.iter().product::<usize>() * labels.len()]),
            feature_shape: shape,
            samples: labels.len(),
            num_classes: Some(*labels.iter().max().unwrap() as usize + 1),
            y: Some(labels),
        };
        let e = check_dataset(arch, &d(vec![3], vec![0]), true).unwrap_err();
        assert_eq!(e.code().as_str(), "dataset_mismatch");
        assert!(e.to_string().contains("[3] (3 values)"), "{e}");
        let e = check_dataset(arch, &d(vec![2], vec![0, 2]), true).unwrap_err();
        assert!(
            e.to_string().contains("labels up to 2") && e.to_string().contains("only 2 classes"),
            "{e}"
        );
        let mut unlabelled = d(vec![2], vec![0]);
        unlabelled.y = None;
        unlabelled.num_classes = None;
        assert!(check_dataset(arch, &unlabelled, true).is_err());
        check_dataset(arch, &unlabelled, false).unwrap();
        let cancel = AtomicBool::new(true);
        let ctx = Ctx::new(&|_, _| {}, &cancel);
        assert!(matches!(
            evaluate(&model, &Subset::all(&d(vec![2], vec![0])), None, 1, &ctx),
            Err(Error::Cancelled)
        ));
    }
}
