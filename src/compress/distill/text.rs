//! Distillation of transformers: what a student is matched on (a classifier's logits, a
//! language model's per-token distributions, a sentence encoder's embeddings), those losses,
//! and the validation figure that says how close the student came.

use candle_core::{DType, Tensor, D};

use crate::compress::engine::data::Subset;
use crate::compress::engine::{Family, Mode, Network, Objective};
use crate::compress::progress::Ctx;
use crate::compress::{Error, Result};

/// How two sentence embeddings are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distance {
    /// `1 − cos(s, t)`, averaged over the batch.
    Cosine,
    /// Mean squared difference of the elements.
    Mse,
}

impl Distance {
    /// API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Distance::Cosine => "cosine",
            Distance::Mse => "mse",
        }
    }
}

/// The loss asked for (`None` in [`super::DistillParams::loss`]: chosen from the models).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DistillLoss {
    /// KL of the output distributions at temperature T: a classifier's classes, a language
    /// model's next token at every position.
    Logits,
    /// Distance of the sentence embeddings (bert models without a classifier).
    Embeddings(Distance),
    /// Per-token MSE of block outputs (hidden states), each student block against the
    /// teacher block whose output it stands in for, through a learned projection
    /// (transformers only; the output itself is not matched).
    Hidden,
}

/// What the student is matched on, resolved for a teacher and student.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matched {
    /// Class logits `[batch, classes]` (sequential networks, bert classifiers).
    Classes,
    /// A language model's logits `[batch, seq, vocab]`, padding left out.
    Tokens,
    /// Sentence embeddings `[batch, hidden]`.
    Embeddings(Distance),
}

impl Matched {
    /// API spelling of the loss.
    pub fn loss_name(self) -> &'static str {
        match self {
            Matched::Classes | Matched::Tokens => "logits",
            Matched::Embeddings(_) => "embeddings",
        }
    }
}

/// What `student` is matched on with `teacher`: a language model's tokens, a classifier's
/// classes, or a bert encoder's sentence embeddings (its output when it has no
/// classifier); `asked` must fit (422 naming `loss` otherwise).
pub fn resolve(
    teacher: &dyn Network,
    student: &dyn Network,
    asked: Option<DistillLoss>,
) -> Result<Matched> {
    if teacher.family() != student.family() {
        return Err(Error::ArchitectureMismatch(format!(
            "the teacher is a {} model and the student a {} model: distillation needs one family",
            teacher.family().as_str(),
            student.family().as_str()
        )));
    }
    let natural = if student.objective() == Objective::CausalLm {
        Matched::Tokens
    } else if student.family() == Family::Bert && !student.has_head() {
        if teacher.has_head() {
            return Err(Error::ArchitectureMismatch(
                "the teacher has a classifier and the student does not: give the student the same head".into(),
            ));
        }
        Matched::Embeddings(Distance::Cosine)
    } else {
        Matched::Classes
    };
    match (asked, natural) {
        (None, m) => Ok(m),
        (Some(DistillLoss::Logits), m @ (Matched::Classes | Matched::Tokens)) => Ok(m),
        (Some(DistillLoss::Embeddings(d)), Matched::Embeddings(_)) => Ok(Matched::Embeddings(d)),
        (Some(DistillLoss::Logits), Matched::Embeddings(_)) => Err(Error::invalid(
            "loss",
            "a bert model without a classifier outputs sentence embeddings, not logits: use `embeddings`",
        )),
        (Some(DistillLoss::Embeddings(_)), _) => Err(Error::invalid(
            "loss",
            "`embeddings` applies to bert models without a classifier; this student outputs logits",
        )),
        (Some(DistillLoss::Hidden), _) if student.family() == Family::Sequential => {
            Err(Error::invalid(
                "loss",
                "`hidden` matches the blocks of a transformer; match a sequential network's layers with `features`",
            ))
        }
        (Some(DistillLoss::Hidden), m) => Ok(m),
    }
}

/// The block pairs of `loss: hidden`: `(student block, teacher block)` by tap name. A
/// student built from the teacher's blocks `kept` stands block `i` in for the teacher's
/// blocks `kept[i]..kept[i+1]`, so its output is matched to the last of them (the last
/// student block to the teacher's last); any other student is mapped uniformly (TinyBERT:
/// student block `i` of `S` to teacher block `⌈(i+1)·T/S⌉ − 1`).
pub fn hidden_pairs(
    teacher: &dyn Network,
    student: &dyn Network,
    kept: Option<&[usize]>,
) -> Result<Vec<(String, String)>> {
    let (t, s) = (teacher.layer_names(), student.layer_names());
    if t.is_empty() || s.is_empty() || s.len() > t.len() {
        return Err(Error::invalid(
            "loss",
            format!(
                "`hidden` pairs every student block with a teacher block: the student has {} blocks and the teacher {}",
                s.len(),
                t.len()
            ),
        ));
    }
    let target = |i: usize| -> usize {
        match kept {
            Some(k) if k.len() == s.len() => k.get(i + 1).map_or(t.len() - 1, |next| next - 1),
            _ => ((i + 1) * t.len()).div_ceil(s.len()) - 1,
        }
    };
    Ok((0..s.len())
        .map(|i| (s[i].clone(), t[target(i).min(t.len() - 1)].clone()))
        .collect())
}

/// Per-token MSE between hidden states `[b, s, h]` (the student's already projected to the
/// teacher's width), averaged over the elements of the positions `mask` `[b, s]` keeps.
pub fn hidden_mse(student: &Tensor, teacher: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let per_token = (student - teacher.detach())?.sqr()?.mean(D::Minus1)?;
    let (sum, positions) = masked_sum(&per_token, mask)?;
    Ok(sum.affine(1.0 / positions, 0.0)?)
}

/// The sum of per-position `values` `[b, s]` over the positions `mask` keeps (all when
/// `None`), and how many those are (at least one).
fn masked_sum(values: &Tensor, mask: Option<&Tensor>) -> Result<(Tensor, f64)> {
    let (kept, positions) = match mask {
        Some(m) => {
            let m = m.to_dtype(DType::F32)?;
            let n = m.sum_all()?.to_scalar::<f32>()? as f64;
            (values.mul(&m)?, n)
        }
        None => (values.clone(), values.elem_count() as f64),
    };
    Ok((kept.sum_all()?, positions.max(1.0)))
}

/// The unsupervised SimCSE loss (Gao et al. 2021) of two views `[b, h]` of the same
/// sentences (the encoder run twice with different dropout masks): cross-entropy of each
/// sentence's first view picking its own second view among the batch's, by cosine / `tau`.
/// The teacher-free way to train a sentence encoder on unlabelled text.
pub fn simcse_loss(a: &Tensor, b: &Tensor, tau: f64) -> Result<Tensor> {
    let unit = |x: &Tensor| -> Result<Tensor> {
        let n = x.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        Ok(x.broadcast_div(&n)?)
    };
    let sim = unit(a)?.matmul(&unit(b)?.t()?)?.affine(1.0 / tau, 0.0)?;
    let n = sim.dim(0)?;
    let targets = Tensor::arange(0u32, n as u32, sim.device())?;
    Ok(candle_nn::loss::cross_entropy(&sim, &targets)?)
}

/// `T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))` at every position of `[batch, seq, vocab]`
/// logits, averaged over the positions `mask` keeps (all when `None`).
pub fn token_kd_loss(
    student: &Tensor,
    teacher: &Tensor,
    mask: Option<&Tensor>,
    temperature: f64,
) -> Result<Tensor> {
    let inv_t = 1.0 / temperature;
    let log_ps = candle_nn::ops::log_softmax(&student.affine(inv_t, 0.0)?, D::Minus1)?;
    let log_pt = candle_nn::ops::log_softmax(&teacher.detach().affine(inv_t, 0.0)?, D::Minus1)?;
    let kl = (log_pt.exp()? * (log_pt - log_ps)?)?.sum(D::Minus1)?;
    let (sum, positions) = masked_sum(&kl, mask)?;
    Ok(sum.affine(temperature * temperature / positions, 0.0)?)
}

/// The distance of sentence embeddings `[batch, hidden]`, averaged over the batch.
pub fn embedding_loss(student: &Tensor, teacher: &Tensor, distance: Distance) -> Result<Tensor> {
    let teacher = teacher.detach();
    Ok(match distance {
        Distance::Mse => (student - teacher)?.sqr()?.mean_all()?,
        Distance::Cosine => {
            let norm = |x: &Tensor| -> Result<Tensor> {
                Ok(x.sqr()?.sum(1)?.sqrt()?.clamp(1e-12, f64::MAX)?)
            };
            let dot = (student * &teacher)?.sum(1)?;
            let cos = (dot / (norm(student)? * norm(&teacher)?)?)?;
            cos.affine(-1.0, 1.0)?.mean_all()?
        }
    })
}

/// How close the student is to the teacher on `data` (evaluation mode): for tokens the
/// fraction of positions where their top-1 next tokens agree, for embeddings the mean
/// cosine of the sentence embeddings. The teacher reads the student's batches (they share
/// the tokenizer).
pub fn closeness(
    student: &dyn Network,
    teacher: &dyn Network,
    data: &Subset<'_>,
    matched: Matched,
    batch_size: usize,
    ctx: &Ctx<'_>,
) -> Result<Option<f64>> {
    if matched == Matched::Classes {
        return Ok(None);
    }
    let (mut sum, mut count) = (0f64, 0f64);
    for batch in student.batches(data, batch_size) {
        ctx.check()?;
        let batch = batch?;
        let s = student.forward(&batch, Mode::Eval)?;
        let t = teacher.forward(&batch, Mode::Eval)?;
        match matched {
            Matched::Tokens => {
                let same = s.argmax(D::Minus1)?.eq(&t.argmax(D::Minus1)?)?;
                let same = same.to_dtype(DType::F32)?;
                let (agree, n) = match &batch.mask {
                    Some(m) => {
                        let m = m.to_dtype(DType::F32)?;
                        (same.mul(&m)?.sum_all()?, m.sum_all()?)
                    }
                    None => (
                        same.sum_all()?,
                        Tensor::new(same.elem_count() as f32, same.device())?,
                    ),
                };
                sum += agree.to_scalar::<f32>()? as f64;
                count += n.to_scalar::<f32>()? as f64;
            }
            Matched::Embeddings(_) => {
                let cos = embedding_loss(&s, &t, Distance::Cosine)?.to_scalar::<f32>()? as f64;
                sum += (1.0 - cos) * batch.len as f64;
                count += batch.len as f64;
            }
            Matched::Classes => {}
        }
    }
    Ok((count > 0.0).then(|| sum / count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn token_kd_is_the_per_position_kl_over_kept_positions() {
        let dev = Device::Cpu;
        let s: Vec<f32> = (0..12).map(|i| ((i * 5) % 7) as f32 / 3.0).collect();
        let t: Vec<f32> = (0..12).map(|i| ((i * 3) % 5) as f32 / 2.0).collect();
        let st = Tensor::from_slice(&s, (1, 3, 4), &dev).unwrap();
        let tt = Tensor::from_slice(&t, (1, 3, 4), &dev).unwrap();
        let mask = Tensor::from_slice(&[1f32, 1.0, 0.0], (1, 3), &dev).unwrap();
        let temp = 2.0;
        let got = token_kd_loss(&st, &tt, Some(&mask), temp)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let softmax = |row: &[f32]| {
            let e: Vec<f64> = row.iter().map(|&v| (v as f64 / temp).exp()).collect();
            let z: f64 = e.iter().sum();
            e.into_iter().map(|v| v / z).collect::<Vec<_>>()
        };
        let kl = |p: usize| {
            let (ps, pt) = (softmax(&s[p * 4..p * 4 + 4]), softmax(&t[p * 4..p * 4 + 4]));
            pt.iter()
                .zip(&ps)
                .map(|(a, b)| a * (a.ln() - b.ln()))
                .sum::<f64>()
        };
        let want = temp * temp * (kl(0) + kl(1)) / 2.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn embedding_losses_are_zero_for_equal_embeddings_and_follow_their_formulas() {
        let dev = Device::Cpu;
        let a = Tensor::from_slice(&[1f32, 0.0, 0.0, 2.0], (2, 2), &dev).unwrap();
        let b = Tensor::from_slice(&[0f32, 3.0, 0.0, 1.0], (2, 2), &dev).unwrap();
        let v = |t: Tensor| t.to_scalar::<f32>().unwrap();
        assert!(v(embedding_loss(&a, &a, Distance::Cosine).unwrap()).abs() < 1e-6);
        // Row 0 is orthogonal (1 − 0), row 1 parallel (1 − 1): mean 0.5.
        assert!((v(embedding_loss(&a, &b, Distance::Cosine).unwrap()) - 0.5).abs() < 1e-6);
        // ((1)² + (−3)² + 0 + (1)²) / 4.
        assert!((v(embedding_loss(&a, &b, Distance::Mse).unwrap()) - 2.75).abs() < 1e-6);
    }

    fn ctx_run<R>(f: impl FnOnce(&Ctx<'_>) -> R) -> R {
        let cancel = std::sync::atomic::AtomicBool::new(false);
        let ctx = Ctx::new(&|_, _| {}, &cancel);
        f(&ctx)
    }

    const TEXT: &[u8] = b"the cat sat on the mat.\n\nthe dog sat on the rug.\n\na cat and a dog sat on a mat.\n\nthe rain fell on the mat and the rug.";

    #[test]
    fn students_built_from_the_teacher_keep_its_blocks_and_learn_to_match_it() {
        use crate::compress::distill::{distill, DistillParams};
        use crate::compress::engine::data::Dataset;
        use crate::compress::engine::finetune::Validation;
        use crate::compress::engine::train::TrainHooks;
        use crate::compress::engine::transformer::fixtures::network;
        let data = Dataset::from_text(TEXT).unwrap();
        for (fixture, want) in [
            ("tiny-llama", Matched::Tokens),
            ("tiny-bert", Matched::Embeddings(Distance::Cosine)),
        ] {
            let teacher = network(fixture);
            let student = teacher.with_blocks(&[1]).unwrap();
            assert_eq!(student.describe()["num_hidden_layers"], 1);
            assert_eq!(student.layer_names().len(), 1);
            // Block 1's weights are the student's block 0.
            let w = |n: &dyn Network, name: &str| {
                n.export()
                    .unwrap()
                    .into_iter()
                    .find(|t| t.name.ends_with(name))
                    .map(|t| t.values)
            };
            let (t1, s0) = match want {
                Matched::Tokens => (
                    "layers.1.mlp.down_proj.weight",
                    "layers.0.mlp.down_proj.weight",
                ),
                _ => ("layer.1.output.dense.weight", "layer.0.output.dense.weight"),
            };
            assert_eq!(w(teacher.as_ref(), t1), w(student.as_ref(), s0));
            assert!(w(student.as_ref(), t1).is_none());
            assert_eq!(
                resolve(teacher.as_ref(), student.as_ref(), None).unwrap(),
                want
            );
            let all = Subset::all(&data);
            let before =
                ctx_run(|c| closeness(student.as_ref(), teacher.as_ref(), &all, want, 4, c))
                    .unwrap()
                    .unwrap();
            let mut p = DistillParams::new(&data);
            p.train.validation = Validation::Dataset(&data);
            p.train.epochs = 15;
            p.train.batch_size = 2;
            p.train.lr = 1e-2;
            p.train.seed = Some(2);
            p.alpha = 1.0;
            p.temperature = 1.0;
            let out = ctx_run(|c| distill(teacher.as_ref(), student, &p, c, TrainHooks::default()))
                .unwrap();
            assert_eq!(out.matched, want);
            assert_eq!(out.architecture["num_hidden_layers"], 1);
            let after = out.val_agreement.or(out.val_embedding_cosine).unwrap();
            assert!(after > before, "{fixture}: {before} → {after}");
            assert!(
                out.kd_history.last().unwrap().soft_loss.unwrap()
                    < 0.5 * out.kd_history[0].soft_loss.unwrap(),
                "{fixture}: {:?}",
                out.kd_history
            );
            // Out of range, repeated or unordered blocks are refused.
            let t = network(fixture);
            for bad in [&[2usize][..], &[1, 1], &[1, 0], &[]] {
                let e = t.with_blocks(bad).unwrap_err();
                assert_eq!(e.code().as_str(), "validation_failed", "{bad:?}: {e}");
            }
        }
    }

    #[test]
    fn hidden_pairs_stand_each_student_block_in_for_the_teacher_blocks_it_replaces() {
        use crate::compress::engine::transformer::fixtures::network;
        let teacher = network("tiny-llama");
        let student = teacher.with_blocks(&[0]).unwrap();
        let pairs = |kept: Option<&[usize]>| hidden_pairs(teacher.as_ref(), student.as_ref(), kept);
        let one = |s: &str, t: &str| vec![(s.to_string(), t.to_string())];
        // Block 0 kept: the student's only block replaces teacher blocks 0 and 1.
        assert_eq!(
            pairs(Some(&[0])).unwrap(),
            one("model.layers.0", "model.layers.1")
        );
        assert_eq!(
            pairs(None).unwrap(),
            one("model.layers.0", "model.layers.1")
        );
        // A student deeper than its teacher has blocks with nothing to match.
        let e = hidden_pairs(student.as_ref(), teacher.as_ref(), None).unwrap_err();
        assert_eq!(e.code().as_str(), "validation_failed");
        let e = resolve(
            teacher.as_ref(),
            student.as_ref(),
            Some(DistillLoss::Hidden),
        );
        assert_eq!(e.unwrap(), Matched::Tokens);
    }

    #[test]
    fn simcse_is_the_cross_entropy_of_each_view_picking_its_pair() {
        let dev = Device::Cpu;
        let a = Tensor::from_slice(&[1f32, 0.0, 0.0, 2.0], (2, 2), &dev).unwrap();
        let b = Tensor::from_slice(&[3f32, 1.0, 0.0, 1.0], (2, 2), &dev).unwrap();
        let got = simcse_loss(&a, &b, 0.5)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        // Unit rows: a = (1,0), (0,1); b = (3,1)/√10, (0,1).
        let c = 3.0 / 10f64.sqrt();
        let s = 1.0 / 10f64.sqrt();
        let sims = [[c / 0.5, 0.0], [s / 0.5, 1.0 / 0.5]];
        let ce = |row: [f64; 2], k: usize| -> f64 {
            let z = row[0].exp() + row[1].exp();
            z.ln() - row[k]
        };
        let want = (ce(sims[0], 0) + ce(sims[1], 1)) / 2.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn hidden_states_distil_with_and_without_projection_and_the_encoder_baseline_trains_alone() {
        use crate::compress::distill::{distill, DistillParams};
        use crate::compress::engine::data::Dataset;
        use crate::compress::engine::finetune::Validation;
        use crate::compress::engine::train::TrainHooks;
        use crate::compress::engine::transformer::fixtures::network;
        let data = Dataset::from_text(TEXT).unwrap();
        for (fixture, projection) in [("tiny-llama", true), ("tiny-bert", false)] {
            let teacher = network(fixture);
            let student = teacher.with_blocks(&[0]).unwrap();
            let last = teacher.layer_names().last().unwrap().clone();
            let first = student.layer_names()[0].clone();
            let mut p = DistillParams::new(&data);
            p.train.validation = Validation::Dataset(&data);
            p.train.epochs = 12;
            p.train.batch_size = 2;
            p.train.lr = 1e-2;
            p.train.seed = Some(3);
            p.loss = Some(DistillLoss::Hidden);
            p.kept_blocks = Some(vec![0]);
            p.projection = Some(projection);
            // An encoder's baseline trains alone (SimCSE); a language model's on its text.
            p.baseline = true;
            let all = Subset::all(&data);
            let matched = resolve(teacher.as_ref(), student.as_ref(), None).unwrap();
            let before =
                ctx_run(|c| closeness(student.as_ref(), teacher.as_ref(), &all, matched, 4, c))
                    .unwrap()
                    .unwrap();
            let out = ctx_run(|c| distill(teacher.as_ref(), student, &p, c, TrainHooks::default()))
                .unwrap();
            assert_eq!(out.hidden_pairs, vec![(first, last.clone())], "{fixture}");
            let k = &out.kd_history;
            assert!(
                k[0].soft_loss.is_none() && k[0].hard_loss.is_none(),
                "{fixture}: {k:?}"
            );
            let (f0, f1) = (
                k[0].feature_loss.unwrap(),
                k.last().unwrap().feature_loss.unwrap(),
            );
            assert!(f1 < 0.5 * f0, "{fixture}: hidden MSE {f0} → {f1}");
            // Matching the last block's states brings the outputs closer too.
            let after = out.val_agreement.or(out.val_embedding_cosine).unwrap();
            assert!(after > before, "{fixture}: {before} → {after}");
            let base = out.baseline.as_ref().unwrap();
            assert_eq!(base.history.len(), 12);
            assert!(base.val_agreement.is_some());
            let l = |h: &crate::compress::engine::train::EpochMetrics| h.train_loss;
            assert!(
                l(base.history.last().unwrap()) < l(&base.history[0]),
                "{fixture}"
            );
        }
    }

    #[test]
    fn students_drawn_from_a_config_learn_the_teachers_hidden_states_through_a_projection() {
        use crate::compress::distill::{distill, DistillParams};
        use crate::compress::engine::data::Dataset;
        use crate::compress::engine::families;
        use crate::compress::engine::train::TrainHooks;
        use crate::compress::engine::transformer::fixtures::network;
        let data = Dataset::from_text(TEXT).unwrap();
        for fixture in ["tiny-llama", "tiny-bert"] {
            let teacher = network(fixture);
            let overrides = serde_json::json!({"num_hidden_layers": 1, "hidden_size": 16,
                                               "intermediate_size": 24, "num_attention_heads": 2});
            let overrides = overrides.as_object().unwrap();
            let student = teacher.with_config(overrides, 4).unwrap();
            let doc = student.describe();
            assert_eq!(
                (
                    doc["num_hidden_layers"].as_u64(),
                    doc["hidden_size"].as_u64()
                ),
                (Some(1), Some(16))
            );
            // Drawn as the spec predicts, norms at one, biases at zero.
            let pooler = teacher
                .export()
                .unwrap()
                .iter()
                .any(|t| t.name.ends_with("pooler.dense.weight"));
            let shapes = families::shapes(&doc, None, pooler).unwrap();
            let exported = student.export().unwrap();
            assert_eq!(
                exported
                    .iter()
                    .map(|t| (t.name.clone(), t.shape.clone()))
                    .collect::<Vec<_>>()
                    .len(),
                shapes.len()
            );
            for t in &exported {
                assert!(
                    shapes.contains(&(t.name.clone(), t.shape.clone())),
                    "{fixture}: {}",
                    t.name
                );
                if t.name.to_ascii_lowercase().ends_with("norm.weight") {
                    assert!(t.values.iter().all(|&v| v == 1.0));
                }
            }
            // The same seed draws the same student.
            assert_eq!(
                teacher.with_config(overrides, 4).unwrap().export().unwrap(),
                exported
            );
            let mut p = DistillParams::new(&data);
            p.train.validation = crate::compress::engine::finetune::Validation::None;
            p.train.epochs = 10;
            p.train.batch_size = 2;
            p.train.lr = 1e-2;
            p.train.seed = Some(1);
            p.loss = Some(DistillLoss::Hidden);
            let out = ctx_run(|c| distill(teacher.as_ref(), student, &p, c, TrainHooks::default()))
                .unwrap();
            // One block of two: uniformly mapped to the teacher's last.
            assert_eq!(out.hidden_pairs.len(), 1);
            assert_eq!(
                &out.hidden_pairs[0].1,
                teacher.layer_names().last().unwrap()
            );
            let k = &out.kd_history;
            let (f0, f1) = (
                k[0].feature_loss.unwrap(),
                k.last().unwrap().feature_loss.unwrap(),
            );
            assert!(f1 < 0.5 * f0, "{fixture}: hidden MSE {f0} → {f1}");
            // Without a projection the widths cannot be compared.
            p.projection = Some(false);
            let again = teacher.with_config(overrides, 4).unwrap();
            let e = ctx_run(|c| distill(teacher.as_ref(), again, &p, c, TrainHooks::default()))
                .unwrap_err();
            assert_eq!(e.code().as_str(), "validation_failed", "{e}");
        }
    }
}
