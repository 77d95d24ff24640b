//! The `distill` operation (API.md, "Operations"): knowledge distillation of a teacher
//! model into a student.
//!
//! This module owns the distillation loss (Hinton et al.: `α·T²·KL(p_T^teacher ‖
//! p_T^student) + (1−α)·CE(student, y)`, batch mean), optional intermediate-feature
//! matching through learned linear projections, caching the teacher's outputs once for
//! the whole transfer set (there is no augmentation, so they are the same every epoch and
//! a distillation step costs about a plain step), the student-versus-teacher figures on
//! the validation split, and an optional hard-label baseline of the same student trained
//! under the same budget. Training itself is the one loop of [`crate::compress::engine::train`], so
//! schedules, early stopping, checkpoints, resume, cancellation and progress work as in
//! `finetune`. It does not parse JSON or persist anything.

pub mod text;

use std::cell::RefCell;
use std::sync::atomic::AtomicBool;

use candle_core::{Device, Tensor, Var};
use rand_chacha::ChaCha8Rng;

use crate::compress::engine::data::{Batch, Dataset, Subset};
use crate::compress::engine::evaluate::evaluate;
use crate::compress::engine::finetune::{FinetuneParams, Validation};
use crate::compress::engine::lm::causal_lm_loss;
use crate::compress::engine::sequential::arch::Architecture;
use crate::compress::engine::train::{
    self, cross_entropy, EpochMetrics, StepLossFn, TrainConfig, TrainHooks,
};
use crate::compress::engine::{Family, Mode, Network, Objective};
use crate::compress::formats::safetensors::NamedTensor;
use crate::compress::progress::{sub_range, Ctx};
use crate::compress::select::glob_match;
use crate::compress::{Error, Result};
use text::{DistillLoss, Matched};

/// The most memory the cached teacher features of `features` may take; above it the
/// teacher runs live on every batch (its logits stay cached).
pub const FEATURE_CACHE_LIMIT_BYTES: usize = 2 << 30;

/// Samples per batch of the teacher's caching pass and of the final evaluations.
const EVAL_BATCH: usize = 256;

/// One intermediate-layer match: `weight · MSE(P · f_student, f_teacher)`, with `P` a
/// learned linear projection from the student layer's width to the teacher's.
#[derive(Debug, Clone, PartialEq)]
pub struct FeaturePair {
    /// Top-level teacher layer (its `name`, or its index when unnamed).
    pub teacher: String,
    /// Top-level student layer (its `name`, or its index when unnamed).
    pub student: String,
    /// Weight of the term (finite, non-negative).
    pub weight: f64,
}

/// Whether the teacher's outputs are computed once up front or on every batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TeacherCache {
    /// Cache the logits (and the matched features while they fit
    /// [`FEATURE_CACHE_LIMIT_BYTES`]).
    #[default]
    Auto,
    /// Run the teacher on every batch (slower; for comparisons and tests).
    Live,
}

/// Everything the `distill` step takes.
#[derive(Debug, Clone, PartialEq)]
pub struct DistillParams<'a> {
    /// The training settings as in `finetune`, on the transfer set `train.dataset`
    /// (labels optional when `alpha` is 1). `head` must be `None`; `freeze` and
    /// `layer_lr` apply to the student.
    pub train: FinetuneParams<&'a Dataset>,
    /// Softmax temperature T (finite, positive).
    pub temperature: f64,
    /// Weight α of the soft-target term, in [0, 1].
    pub alpha: f64,
    /// Intermediate-layer matches (may be empty).
    pub features: Vec<FeaturePair>,
    /// Also train the student from the same initial weights on hard labels only.
    pub baseline: bool,
    /// What the student is matched on (`None`: chosen from the models, see [`text::resolve`]).
    pub loss: Option<DistillLoss>,
    /// With `loss: hidden`, the teacher's blocks a student built from it kept (the block
    /// pairs follow from them; see [`text::hidden_pairs`]).
    pub kept_blocks: Option<Vec<usize>>,
    /// Whether feature and hidden-state matches go through a learned projection (`false`:
    /// plain MSE, the widths must be equal). `None`: a sequential network's features always
    /// do; a transformer's blocks only where the widths differ (where they agree, the
    /// student's own states are what the next block and the output read).
    pub projection: Option<bool>,
}

impl<'a> DistillParams<'a> {
    /// [`FinetuneParams::new`] training defaults with T = 4, α = 0.9, no feature
    /// matching and no baseline.
    pub fn new(dataset: &'a Dataset) -> DistillParams<'a> {
        DistillParams {
            train: FinetuneParams::new(dataset),
            temperature: 4.0,
            alpha: 0.9,
            features: Vec::new(),
            baseline: false,
            loss: None,
            kept_blocks: None,
            projection: None,
        }
    }
}

/// The distillation loss's parts over one epoch, as per-sample means (of the epochs run
/// in this call: a resumed run lacks those before the checkpoint).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KdEpochMetrics {
    /// 1-based epoch number (matches [`EpochMetrics::epoch`]).
    pub epoch: usize,
    /// `T²·KL(teacher ‖ student)`, before the α weight (`None` when α = 0).
    pub soft_loss: Option<f64>,
    /// Cross-entropy against the labels, before the 1−α weight (`None` when α = 1).
    pub hard_loss: Option<f64>,
    /// The weighted sum of the feature-matching terms (`None` without `features`).
    pub feature_loss: Option<f64>,
}

/// The hard-label baseline's result.
#[derive(Debug, Clone, PartialEq)]
pub struct BaselineOutput {
    /// Its trained parameters and buffers, in architecture order.
    pub weights: Vec<NamedTensor>,
    /// Its per-epoch metrics.
    pub history: Vec<EpochMetrics>,
    /// Its best validation epoch.
    pub best_epoch: Option<usize>,
    /// Whether early stopping ended it early.
    pub stopped_early: bool,
    /// Its top-1 agreement with the teacher on the validation data (a sentence encoder: its
    /// mean embedding cosine to the teacher's).
    pub val_agreement: Option<f64>,
}

/// What `distill` produces.
#[derive(Debug, Clone, PartialEq)]
pub struct DistillOutput {
    /// The trained student's parameters and buffers (no projections), in architecture order.
    pub weights: Vec<NamedTensor>,
    /// The student's architecture document ([`Network::describe`]).
    pub architecture: serde_json::Value,
    /// Per-epoch metrics (`train_loss` is the whole distillation loss).
    pub history: Vec<EpochMetrics>,
    /// The loss's parts per epoch.
    pub kd_history: Vec<KdEpochMetrics>,
    /// The epoch with the best validation figure, when validating with labels.
    pub best_epoch: Option<usize>,
    /// Whether early stopping ended training early.
    pub stopped_early: bool,
    /// Whether the weights are the best epoch's rather than the last's.
    pub restored_best: bool,
    /// Whether the teacher's logits were computed once up front.
    pub teacher_cached: bool,
    /// Whether the teacher's matched features were cached (`false` without `features`).
    pub features_cached: bool,
    /// The teacher's top-1 accuracy on labelled validation data.
    pub teacher_val_accuracy: Option<f64>,
    /// Fraction of validation samples (a language model: positions) where the student's
    /// top-1 class (next token) is the teacher's.
    pub val_agreement: Option<f64>,
    /// A sentence encoder's mean embedding cosine to the teacher on the validation data.
    pub val_embedding_cosine: Option<f64>,
    /// What the student was matched on.
    pub matched: Matched,
    /// With `loss: hidden`, the `(student, teacher)` blocks whose hidden states were matched
    /// (the output was not).
    pub hidden_pairs: Vec<(String, String)>,
    /// Number of trainable student parameter elements.
    pub trainable_parameters: u64,
    /// The hard-label baseline, when asked for.
    pub baseline: Option<BaselineOutput>,
}

/// The loss without the teacher: cross-entropy against the labels, or a language model's
/// next-token loss on its text.
fn hard_loss(model: &dyn Network, out: &Tensor, batch: &Batch) -> Result<Tensor> {
    match model.objective() {
        Objective::CausalLm => causal_lm_loss(out, batch),
        Objective::Classification => cross_entropy(out, batch),
    }
}

/// Names the model a dataset mismatch is about.
fn prefixed(who: &str, e: Error) -> Error {
    match e {
        Error::DatasetMismatch(m) => Error::DatasetMismatch(format!("{who}: {m}")),
        other => other,
    }
}

/// The soft-target loss `T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))`, summed over classes
/// and averaged over the batch. `teacher_logits` carry no gradient; the gradient with
/// respect to `student_logits` is `T·(softmax(z_s/T) − softmax(z_t/T)) / batch`.
pub fn kd_loss(
    student_logits: &Tensor,
    teacher_logits: &Tensor,
    temperature: f64,
) -> Result<Tensor> {
    let batch = student_logits.dim(0)?.max(1);
    let inv_t = 1.0 / temperature;
    let log_ps = candle_nn::ops::log_softmax(&student_logits.affine(inv_t, 0.0)?, 1)?;
    let log_pt = candle_nn::ops::log_softmax(&teacher_logits.detach().affine(inv_t, 0.0)?, 1)?;
    let kl = (log_pt.exp()? * (log_pt - log_ps)?)?.sum_all()?;
    Ok(kl.affine(temperature * temperature / batch as f64, 0.0)?)
}

/// Checks the parameters that need both models: the same number of classes, and
/// feature layers that exist.
fn check_models(teacher: &dyn Network, student: &dyn Network, p: &DistillParams<'_>) -> Result<()> {
    let (tc, sc) = (teacher.output_width()?, student.output_width()?);
    // `hidden` does not compare the outputs (an encoder's embeddings may differ in width).
    if tc != sc && p.loss != Some(DistillLoss::Hidden) {
        return Err(Error::ArchitectureMismatch(format!(
            "the student outputs {sc} classes but the teacher outputs {tc}; distillation needs the same classes"
        )));
    }
    for (i, f) in p.features.iter().enumerate() {
        for (role, model, name) in [
            ("teacher", teacher, &f.teacher),
            ("student", student, &f.student),
        ] {
            if !model.has_layer(name) {
                let names = model.layer_names();
                return Err(Error::invalid(
                    format!("features[{i}].{role}"),
                    format!(
                        "the {role} has no top-level layer named {name:?} (it has {})",
                        names.join(", ")
                    ),
                ));
            }
        }
        if !(f.weight.is_finite() && f.weight >= 0.0) {
            return Err(Error::invalid(
                format!("features[{i}].weight"),
                format!(
                    "`weight` must be a finite, non-negative number, got {}",
                    f.weight
                ),
            ));
        }
    }
    Ok(())
}

/// Values per sample of a tappable layer's output.
fn width(model: &dyn Network, layer: &str) -> Result<usize> {
    model.layer_width(layer)
}

/// The teacher's outputs, by dataset row, computed once in evaluation mode.
struct TeacherCacheData {
    classes: usize,
    logits: Vec<f32>,
    /// Per feature pair: `(width, values by row)`; empty when the features run live.
    features: Vec<(usize, Vec<f32>)>,
}

impl TeacherCacheData {
    /// Gathers `rows` (dataset row indices) of a `[samples, width]` host buffer.
    fn gather(buffer: &[f32], width: usize, rows: &[usize]) -> Result<Tensor> {
        let mut out = Vec::with_capacity(rows.len() * width);
        for &r in rows {
            let row = buffer
                .get(r * width..(r + 1) * width)
                .ok_or_else(|| Error::Internal(format!("row {r} is not in the teacher cache")))?;
            out.extend_from_slice(row);
        }
        Ok(Tensor::from_vec(out, (rows.len(), width), &Device::Cpu)?)
    }
}

/// Runs the teacher over the training rows in evaluation mode and keeps its logits (and
/// the tapped features when `with_features`), indexed by dataset row.
fn cache_teacher(
    teacher: &dyn Network,
    train: &Subset<'_>,
    taps: &[&str],
    with_features: bool,
    ctx: &Ctx<'_>,
) -> Result<TeacherCacheData> {
    let classes = teacher.output_width()?;
    let n = train.dataset.samples;
    let widths: Vec<usize> = taps
        .iter()
        .map(|t| width(teacher, t))
        .collect::<Result<_>>()?;
    let mut logits = vec![0f32; n * classes];
    let mut features: Vec<(usize, Vec<f32>)> = if with_features {
        widths.iter().map(|&w| (w, vec![0f32; n * w])).collect()
    } else {
        Vec::new()
    };
    let mut rows = train.indices.clone();
    rows.sort_unstable();
    let view = Subset {
        dataset: train.dataset,
        indices: rows,
    };
    let batches = teacher.batches(&view, EVAL_BATCH);
    let total = batches.batch_count().max(1);
    let used: Vec<&str> = if with_features {
        taps.to_vec()
    } else {
        Vec::new()
    };
    for (b, batch) in batches.enumerate() {
        ctx.check()?;
        let batch = batch?;
        let (out, tapped) = teacher.forward_taps(&batch, Mode::Eval, &used)?;
        scatter(&mut logits, classes, &batch.indices, &out)?;
        for ((w, buf), t) in features.iter_mut().zip(&tapped) {
            scatter(buf, *w, &batch.indices, &t.flatten_from(1)?)?;
        }
        ctx.report(
            (b + 1) as f64 / total as f64,
            "caching the teacher's outputs",
        );
    }
    Ok(TeacherCacheData {
        classes,
        logits,
        features,
    })
}

/// Writes the rows of `values` (`[rows.len(), width]`) into `buffer` at `rows`.
fn scatter(buffer: &mut [f32], width: usize, rows: &[usize], values: &Tensor) -> Result<()> {
    let v = values.flatten_all()?.to_vec1::<f32>()?;
    for (k, &r) in rows.iter().enumerate() {
        let (src, dst) = (
            v.get(k * width..(k + 1) * width),
            buffer.get_mut(r * width..(r + 1) * width),
        );
        match (src, dst) {
            (Some(s), Some(d)) => d.copy_from_slice(s),
            _ => {
                return Err(Error::Internal(
                    "teacher output does not fit its cache".into(),
                ))
            }
        }
    }
    Ok(())
}

/// Running sums of the loss parts over one epoch.
#[derive(Default)]
struct PartSums {
    samples: usize,
    soft: Option<f64>,
    hard: Option<f64>,
    feature: Option<f64>,
}

impl PartSums {
    fn add(slot: &mut Option<f64>, value: f64, n: usize) {
        *slot = Some(slot.unwrap_or(0.0) + value * n as f64);
    }

    fn take(&mut self, epoch: usize) -> KdEpochMetrics {
        let n = self.samples.max(1) as f64;
        let out = KdEpochMetrics {
            epoch,
            soft_loss: self.soft.map(|s| s / n),
            hard_loss: self.hard.map(|s| s / n),
            feature_loss: self.feature.map(|s| s / n),
        };
        *self = PartSums::default();
        out
    }
}

/// A seeded linear projection `width_s → width_t` (PyTorch's default init), as named
/// variables `distill.features.{i}.weight` / `.bias`.
fn projection(
    i: usize,
    width_s: usize,
    width_t: usize,
    seed: u64,
    identity: bool,
) -> Result<Vec<(String, Var)>> {
    if identity {
        let eye = Tensor::eye(width_s, candle_core::DType::F32, &Device::Cpu)?;
        let zero = Tensor::zeros(width_t, candle_core::DType::F32, &Device::Cpu)?;
        return Ok(vec![
            (
                format!("distill.features.{i}.weight"),
                Var::from_tensor(&eye)?,
            ),
            (
                format!("distill.features.{i}.bias"),
                Var::from_tensor(&zero)?,
            ),
        ]);
    }
    let arch = Architecture::from_json(&serde_json::json!({
        "kind": "sequential", "input_shape": [width_s],
        "layers": [{"type": "linear", "name": "p", "in_features": width_s, "out_features": width_t}]
    }))?;
    let seed = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(i as u64 + 1);
    arch.init_weights(seed)
        .into_iter()
        .map(|(spec, values)| {
            let name = format!("distill.features.{i}.{}", spec.kind.suffix());
            Ok((name, Var::from_vec(values, spec.shape, &Device::Cpu)?))
        })
        .collect()
}

/// Runs the `distill` operation: trains `student` to match `teacher` on the transfer set.
/// Every parameter is checked before any training starts. `hooks` applies to the
/// student's run (`on_epoch`, `resume`, `after_step`; `after_step` also applies to the
/// baseline); its `loss` and `forward_loss` must be `None` (distillation sets its own).
pub fn distill(
    teacher: &dyn Network,
    student: Box<dyn Network>,
    params: &DistillParams<'_>,
    ctx: &Ctx<'_>,
    hooks: TrainHooks<'_>,
) -> Result<DistillOutput> {
    distill_with_cache(teacher, student, params, TeacherCache::Auto, ctx, hooks)
}

/// [`distill`] with a choice of teacher caching ([`TeacherCache::Live`] for comparisons:
/// the results agree with the cached run to rounding).
pub fn distill_with_cache(
    teacher: &dyn Network,
    student: Box<dyn Network>,
    params: &DistillParams<'_>,
    teacher_cache: TeacherCache,
    ctx: &Ctx<'_>,
    hooks: TrainHooks<'_>,
) -> Result<DistillOutput> {
    let p = &params.train;
    let config = crate::compress::engine::finetune::train_config(p)?;
    let t = params.temperature;
    if !(t.is_finite() && t > 0.0) {
        return Err(Error::invalid(
            "temperature",
            format!("`temperature` must be a finite number above 0, got {t}"),
        ));
    }
    let mut alpha = params.alpha;
    if !(alpha.is_finite() && (0.0..=1.0).contains(&alpha)) {
        return Err(Error::invalid(
            "alpha",
            format!("`alpha` must lie in [0, 1], got {alpha}"),
        ));
    }
    if p.head.is_some() {
        return Err(Error::invalid(
            "head",
            "`head` is not available for distillation: give the student the architecture it should have",
        ));
    }
    if hooks.loss.is_some() || hooks.forward_loss.is_some() {
        return Err(Error::Internal(
            "distill sets its own loss; pass hooks without `loss` / `forward_loss`".into(),
        ));
    }
    let matched = text::resolve(teacher, student.as_ref(), params.loss)?;
    check_models(teacher, student.as_ref(), params)?;
    let mut student = student;
    // `hidden` matches block outputs instead of the output.
    let hidden = params.loss == Some(DistillLoss::Hidden);
    let hidden_pairs = if hidden {
        text::hidden_pairs(teacher, student.as_ref(), params.kept_blocks.as_deref())?
    } else {
        Vec::new()
    };
    let mut features = params.features.clone();
    features.extend(hidden_pairs.iter().map(|(s, t)| FeaturePair {
        teacher: t.clone(),
        student: s.clone(),
        weight: 1.0,
    }));
    if matches!(matched, Matched::Embeddings(_)) || hidden {
        // Matching embeddings or hidden states has no hard term: `alpha` does not apply.
        alpha = 1.0;
    }
    let output_term = !hidden;
    // A language model's hard loss reads its own text.
    let labelled = p.dataset.y.is_some() || matched == Matched::Tokens;
    if !labelled && alpha < 1.0 {
        return Err(Error::DatasetMismatch(format!(
            "the transfer set has no labels (`y`), but `alpha` = {alpha} < 1 weights a cross-entropy term on labels; use alpha = 1 for unlabelled data"
        )));
    }
    // A sentence encoder's baseline trains contrastively on the text alone (SimCSE).
    if !labelled && params.baseline && !matches!(matched, Matched::Embeddings(_)) {
        return Err(Error::invalid(
            "baseline",
            "the hard-label baseline needs a labelled transfer set",
        ));
    }
    student
        .check_dataset(p.dataset, false)
        .map_err(|e| prefixed("student", e))?;
    teacher
        .check_dataset(p.dataset, false)
        .map_err(|e| prefixed("teacher", e))?;
    if let Validation::Dataset(v) = p.validation {
        student
            .check_dataset(v, false)
            .map_err(|e| prefixed("validation dataset, student", e))?;
        teacher
            .check_dataset(v, false)
            .map_err(|e| prefixed("validation dataset, teacher", e))?;
    }
    for (i, pattern) in p.freeze.iter().enumerate() {
        if student.freeze(pattern) == 0 {
            return Err(Error::invalid(
                format!("freeze[{i}]"),
                format!("pattern {pattern:?} matches no parameter of the student"),
            ));
        }
    }
    for (pattern, _) in &p.layer_lr {
        if !student
            .params()
            .iter()
            .any(|q| glob_match(pattern, q.name()))
        {
            return Err(Error::invalid(
                format!("layer_lr[{pattern}]"),
                format!("pattern {pattern:?} matches no parameter of the student"),
            ));
        }
    }
    let trainable_parameters: u64 = student
        .params()
        .iter()
        .filter(|q| q.is_trainable())
        .map(|q| q.spec().numel() as u64)
        .sum();
    if trainable_parameters == 0 {
        return Err(Error::invalid(
            "freeze",
            "every parameter is frozen: nothing is left to train",
        ));
    }
    student.check_trainable()?;
    let (train_set, val_set) = match p.validation {
        Validation::None => (Subset::all(p.dataset), None),
        Validation::Fraction(f) => {
            let (a, b) = p
                .dataset
                .split(f, p.seed())
                .map_err(|e| Error::invalid("validation.fraction", e.to_string()))?;
            (a, Some(b))
        }
        Validation::Dataset(d) => (Subset::all(p.dataset), Some(Subset::all(d))),
    };
    // The loop validates with labels (a language model: its text); unlabelled validation
    // data only serves agreement.
    let val_labelled = match matched {
        Matched::Classes => val_set.as_ref().is_some_and(|v| v.dataset.y.is_some()),
        Matched::Tokens => val_set.is_some(),
        Matched::Embeddings(_) => false,
    };
    if config.early_stopping.is_some() && !val_labelled {
        return Err(Error::invalid(
            "early_stopping",
            "early stopping needs validation data the loop can score (labelled for a classifier, any text for a language model; not with `embeddings`)",
        ));
    }
    let loop_val = if val_labelled { val_set.as_ref() } else { None };
    let initial = params.baseline.then(|| student.export()).transpose()?;

    // Progress: caching, then the student, then the baseline.
    let student_hi = if params.baseline { 0.55 } else { 1.0 };
    let cancel = AtomicBool::new(false);
    let teacher_names: Vec<&str> = features.iter().map(|f| f.teacher.as_str()).collect();
    let student_names: Vec<&str> = features.iter().map(|f| f.student.as_str()).collect();
    let feature_bytes = features
        .iter()
        .map(|f| width(teacher, &f.teacher))
        .sum::<Result<usize>>()?
        .saturating_mul(p.dataset.samples)
        .saturating_mul(4);
    // Augmented inputs differ at every step: the teacher runs on each batch as seen.
    // A language model's per-token distributions are too large to cache: its teacher runs
    // on every batch.
    let auto = teacher_cache == TeacherCache::Auto
        && config.augment.is_none()
        && matched != Matched::Tokens;
    // A transformer's block outputs are per token: they run live.
    let features_cached = auto
        && !features.is_empty()
        && teacher.family() == Family::Sequential
        && feature_bytes <= FEATURE_CACHE_LIMIT_BYTES;
    let soft_term = output_term && alpha > 0.0;
    let hard_term = output_term && alpha < 1.0;
    // With alpha = 0 and no cached features, training never looks at the teacher.
    let cache = if auto && (soft_term || features_cached) {
        let progress = sub_range(ctx, &cancel, 0.0, 0.02, "");
        let sub = Ctx::new(&progress, &cancel);
        Some(cache_teacher(
            teacher,
            &train_set,
            &teacher_names,
            features_cached,
            &sub,
        )?)
    } else {
        None
    };
    let mut extra = Vec::new();
    let mut projections: Vec<Option<(Var, Var)>> = Vec::with_capacity(features.len());
    for (i, f) in features.iter().enumerate() {
        let (ws, wt) = (
            width(student.as_ref(), &f.student)?,
            width(teacher, &f.teacher)?,
        );
        let project = params
            .projection
            .unwrap_or(ws != wt || teacher.family() == Family::Sequential);
        if !project {
            if ws != wt {
                return Err(Error::invalid(
                    "projection",
                    format!("the student's `{}` is {ws} wide and the teacher's `{}` {wt}: matching them needs a projection", f.student, f.teacher),
                ));
            }
            projections.push(None);
            continue;
        }
        // A transformer student's blocks start as the teacher's (or stand in for them):
        // the projection starts as the identity where the widths agree.
        let identity = ws == wt && teacher.family() != Family::Sequential;
        let vars = projection(i, ws, wt, p.seed(), identity)?;
        projections.push(Some((vars[0].1.clone(), vars[1].1.clone())));
        extra.extend(vars);
    }

    let parts = RefCell::new(PartSums::default());
    let kd_history = RefCell::new(Vec::new());
    let step = |m: &dyn Network, b: &Batch, rng: &mut ChaCha8Rng| -> Result<(Tensor, Tensor)> {
        ctx.check()?;
        let (out, taps) = if student_names.is_empty() {
            (m.forward(b, Mode::Train(rng))?, Vec::new())
        } else {
            m.forward_taps(b, Mode::Train(rng), &student_names)?
        };
        let needs_live =
            (soft_term && cache.is_none()) || (!features.is_empty() && !features_cached);
        let live = if needs_live {
            Some(teacher.forward_taps(b, Mode::Eval, &teacher_names)?)
        } else {
            None
        };
        let mut sums = parts.borrow_mut();
        sums.samples += b.len;
        let mut total: Option<Tensor> = None;
        let mut add = |term: Tensor| -> Result<()> {
            total = Some(match total.take() {
                Some(acc) => (acc + term)?,
                None => term,
            });
            Ok(())
        };
        if soft_term {
            let t_logits = match (&cache, &live) {
                (Some(c), _) => TeacherCacheData::gather(&c.logits, c.classes, &b.indices)?,
                (None, Some((l, _))) => l.clone(),
                (None, None) => return Err(Error::Internal("no teacher logits".into())),
            };
            let soft = match matched {
                Matched::Classes => kd_loss(&out, &t_logits, t)?,
                Matched::Tokens => text::token_kd_loss(&out, &t_logits, b.mask.as_ref(), t)?,
                Matched::Embeddings(d) => text::embedding_loss(&out, &t_logits, d)?,
            };
            PartSums::add(&mut sums.soft, soft.to_scalar::<f32>()? as f64, b.len);
            add(if alpha == 1.0 {
                soft
            } else {
                soft.affine(alpha, 0.0)?
            })?;
        }
        if hard_term {
            let hard = hard_loss(m, &out, b)?;
            PartSums::add(&mut sums.hard, hard.to_scalar::<f32>()? as f64, b.len);
            add(if alpha == 0.0 {
                hard
            } else {
                hard.affine(1.0 - alpha, 0.0)?
            })?;
        }
        if !features.is_empty() {
            let mut fsum = 0f64;
            for (i, f) in features.iter().enumerate() {
                // Per token `[b, s, h]` (transformer blocks) or per sample.
                let per_token = teacher.family() != Family::Sequential;
                let flat = |t: &Tensor| -> Result<Tensor> {
                    Ok(if per_token {
                        t.clone()
                    } else {
                        t.flatten_from(1)?
                    })
                };
                let f_t = match (&cache, &live) {
                    (Some(c), _) if features_cached => {
                        let (w, buf) = &c.features[i];
                        TeacherCacheData::gather(buf, *w, &b.indices)?
                    }
                    (_, Some((_, feats))) => flat(&feats[i])?.detach(),
                    _ => return Err(Error::Internal("no teacher features".into())),
                };
                let f_s = flat(&taps[i])?;
                let projected = match &projections[i] {
                    Some((w, bias)) => f_s
                        .broadcast_matmul(&w.as_tensor().t()?)?
                        .broadcast_add(bias.as_tensor())?,
                    None => f_s,
                };
                let mse = if per_token {
                    text::hidden_mse(&projected, &f_t, b.mask.as_ref())?
                } else {
                    (projected - f_t)?.sqr()?.mean_all()?
                }
                .affine(f.weight, 0.0)?;
                fsum += mse.to_scalar::<f32>()? as f64;
                add(mse)?;
            }
            PartSums::add(&mut sums.feature, fsum, b.len);
        }
        let loss = total.ok_or_else(|| Error::Internal("empty distillation loss".into()))?;
        Ok((out, loss))
    };
    let mut outer_on_epoch = hooks.on_epoch;
    let mut on_epoch = |m: &EpochMetrics, c: &train::Checkpoint| -> Result<()> {
        kd_history
            .borrow_mut()
            .push(parts.borrow_mut().take(m.epoch));
        match outer_on_epoch.as_deref_mut() {
            Some(f) => f(m, c),
            None => Ok(()),
        }
    };
    let mut all_extra = extra;
    all_extra.extend(hooks.extra_params);
    let progress = sub_range(ctx, &cancel, 0.02, student_hi, "");
    let sub = Ctx::new(&progress, &cancel);
    let outcome = train::train(
        student.as_mut(),
        &train_set,
        loop_val,
        &config,
        &sub,
        TrainHooks {
            forward_loss: Some(&step),
            on_epoch: Some(&mut on_epoch),
            resume: hooks.resume,
            after_step: hooks.after_step,
            extra_params: all_extra,
            loss: None,
        },
    )?;
    let weights = student.export()?;
    let comparable = teacher.output_width()? == student.output_width()?;
    let (teacher_val_accuracy, val_agreement) = match &val_set {
        Some(_) if !comparable => (None, None),
        Some(v) if matched != Matched::Classes => {
            // Silent, but cancellable by the job.
            let c = text::closeness(
                student.as_ref(),
                teacher,
                v,
                matched,
                p.batch_size,
                &ctx.silent(),
            )?;
            (None, c)
        }
        Some(v) => {
            ctx.check()?;
            let quiet = |_: f64, _: &str| {};
            let eval_ctx = Ctx::new(&quiet, &cancel);
            let e = evaluate(student.as_ref(), v, Some(teacher), EVAL_BATCH, &eval_ctx)?;
            let te = if val_labelled {
                evaluate(teacher, v, None, EVAL_BATCH, &eval_ctx)?.accuracy
            } else {
                None
            };
            (te, e.agreement)
        }
        None => (None, None),
    };
    let baseline = match initial {
        Some(w) => Some(run_baseline(
            teacher,
            student.with_weights(w)?,
            params,
            BaselineRun {
                matched,
                config: &config,
                train_set: &train_set,
                loop_val,
                val_set: val_set.as_ref(),
                after_step: hooks.after_step,
                lo: student_hi,
            },
            ctx,
        )?),
        None => None,
    };
    Ok(DistillOutput {
        weights,
        architecture: student.describe(),
        history: outcome.history,
        kd_history: kd_history.into_inner(),
        best_epoch: outcome.best_epoch,
        stopped_early: outcome.stopped_early,
        restored_best: outcome.restored_best,
        teacher_cached: cache.is_some(),
        features_cached: cache.is_some() && features_cached,
        teacher_val_accuracy,
        val_agreement: val_agreement.filter(|_| !matches!(matched, Matched::Embeddings(_))),
        val_embedding_cosine: val_agreement.filter(|_| matches!(matched, Matched::Embeddings(_))),
        matched,
        hidden_pairs,
        trainable_parameters,
        baseline,
    })
}

/// How the baseline trains: the distillation's loop settings and data, so it sees the same
/// shuffles and dropout masks.
struct BaselineRun<'a> {
    matched: Matched,
    config: &'a TrainConfig,
    train_set: &'a Subset<'a>,
    /// Validation inside the loop (early stopping).
    loop_val: Option<&'a Subset<'a>>,
    /// Validation for the agreement figure.
    val_set: Option<&'a Subset<'a>>,
    after_step: Option<&'a train::AfterStepFn<'a>>,
    /// Where its progress starts (it runs after the student).
    lo: f64,
}

/// The temperature of the SimCSE baseline's similarities (the paper's 0.05).
const SIMCSE_TEMPERATURE: f64 = 0.05;

/// Trains the student architecture from its initial weights (`model`) without the teacher,
/// under the distillation's config and seed: cross-entropy on the labels, a language
/// model's next-token loss, or a sentence encoder's unsupervised SimCSE loss.
fn run_baseline(
    teacher: &dyn Network,
    mut model: Box<dyn Network>,
    params: &DistillParams<'_>,
    run: BaselineRun<'_>,
    ctx: &Ctx<'_>,
) -> Result<BaselineOutput> {
    let BaselineRun {
        matched,
        config,
        train_set,
        loop_val,
        val_set,
        after_step,
        lo,
    } = run;
    for pattern in &params.train.freeze {
        model.freeze(pattern);
    }
    let cancel = AtomicBool::new(false);
    let progress = sub_range(ctx, &cancel, lo, 1.0, "baseline: ");
    let sub = Ctx::new(&progress, &cancel);
    let step = |m: &dyn Network, b: &Batch, rng: &mut ChaCha8Rng| -> Result<(Tensor, Tensor)> {
        ctx.check()?;
        let out = m.forward(b, Mode::Train(rng))?;
        let loss = match matched {
            // Two dropout views of each sentence, the rest of the batch as negatives.
            Matched::Embeddings(_) => {
                let again = m.forward(b, Mode::Train(rng))?;
                text::simcse_loss(&out, &again, SIMCSE_TEMPERATURE)?
            }
            _ => hard_loss(m, &out, b)?,
        };
        Ok((out, loss))
    };
    let step: &StepLossFn<'_> = &step;
    let outcome = train::train(
        model.as_mut(),
        train_set,
        loop_val,
        config,
        &sub,
        TrainHooks {
            forward_loss: Some(step),
            after_step,
            ..Default::default()
        },
    )?;
    let comparable = teacher.output_width()? == model.output_width()?;
    let val_agreement = match val_set {
        Some(_) if !comparable => None,
        Some(v) if matched != Matched::Classes => {
            text::closeness(model.as_ref(), teacher, v, matched, config.batch_size, &sub)?
        }
        Some(v) => evaluate(model.as_ref(), v, Some(teacher), EVAL_BATCH, &sub)?.agreement,
        None => None,
    };
    Ok(BaselineOutput {
        weights: model.export()?,
        history: outcome.history,
        best_epoch: outcome.best_epoch,
        stopped_early: outcome.stopped_early,
        val_agreement,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::engine::data::DatasetX;
    use crate::compress::engine::finetune::{finetune, HeadParams};
    use crate::compress::engine::sequential::model::Model;
    use crate::compress::engine::train::{Checkpoint, EarlyStopping, ScheduleKind, StopMetric};
    use rand::{Rng, SeedableRng};
    use serde_json::json;

    /// Four Gaussian clusters in 16 dimensions.
    fn clusters(samples: usize, seed: u64, labelled: bool) -> Dataset {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let y: Vec<i64> = (0..samples).map(|i| (i % 4) as i64).collect();
        let x = (0..samples * 16)
            .map(|i| {
                let (s, f) = (i / 16, i % 16);
                let centre = if f % 4 == y[s] as usize { 1.5 } else { 0.0 };
                centre + rng.gen_range(-1.0f32..1.0)
            })
            .collect();
        Dataset {
            x: DatasetX::F32(x),
            feature_shape: vec![16],
            samples,
            y: labelled.then_some(y),
            num_classes: labelled.then_some(4),
        }
    }

    /// A teacher with batch norm and dropout (eval mode matters), 16-48-4.
    fn teacher_arch() -> Architecture {
        Architecture::from_json(&json!({"kind":"sequential","input_shape":[16],"layers":[
            {"type":"linear","name":"fc1","in_features":16,"out_features":48},
            {"type":"batch_norm1d","name":"bn","num_features":48},
            {"type":"relu"},
            {"type":"dropout","p":0.2},
            {"type":"linear","name":"fc2","in_features":48,"out_features":4}]}))
        .unwrap()
    }

    /// A student 16-12-4 with dropout.
    fn student_arch(classes: usize) -> Architecture {
        Architecture::from_json(&json!({"kind":"sequential","input_shape":[16],"layers":[
            {"type":"linear","name":"fc1","in_features":16,"out_features":12},
            {"type":"relu"},
            {"type":"dropout","p":0.1},
            {"type":"linear","name":"fc2","in_features":12,"out_features":classes}]}))
        .unwrap()
    }

    fn quiet() -> AtomicBool {
        AtomicBool::new(false)
    }

    /// A teacher trained briefly on labelled clusters (~100% accuracy).
    fn trained_teacher() -> Model {
        let data = clusters(200, 1, true);
        let mut p = FinetuneParams::new(&data);
        p.validation = Validation::None;
        p.epochs = 8;
        p.batch_size = 16;
        p.lr = 1e-2;
        let cancel = quiet();
        let ctx = Ctx::new(&|_, _| {}, &cancel);
        let model = Model::init(&teacher_arch(), 7).unwrap();
        let out = finetune(Box::new(model), &p, &ctx, TrainHooks::default()).unwrap();
        Model::described(&out.architecture, out.weights).unwrap()
    }

    fn params(data: &Dataset) -> DistillParams<'_> {
        let mut p = DistillParams::new(data);
        p.train.validation = Validation::Fraction(0.25);
        p.train.epochs = 3;
        p.train.batch_size = 16;
        p.train.lr = 1e-2;
        p.train.seed = Some(3);
        p.temperature = 2.0;
        p.alpha = 0.5;
        p
    }

    fn run(teacher: &Model, p: &DistillParams<'_>, hooks: TrainHooks<'_>) -> Result<DistillOutput> {
        run_with(teacher, p, TeacherCache::Auto, hooks)
    }

    fn run_with(
        teacher: &Model,
        p: &DistillParams<'_>,
        cache: TeacherCache,
        hooks: TrainHooks<'_>,
    ) -> Result<DistillOutput> {
        let cancel = quiet();
        let ctx = Ctx::new(&|_, _| {}, &cancel);
        let student = Model::init(&student_arch(4), 5)?;
        distill_with_cache(teacher, Box::new(student), p, cache, &ctx, hooks)
    }

    /// `T²·KL/B` and its gradient in f64, by hand.
    fn kd_by_hand(zs: &[[f64; 3]], zt: &[[f64; 3]], t: f64) -> (f64, Vec<[f64; 3]>) {
        let softmax = |z: &[f64; 3]| {
            let m = z.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
            let e: Vec<f64> = z.iter().map(|v| ((v - m) / t).exp()).collect();
            let s: f64 = e.iter().sum();
            [e[0] / s, e[1] / s, e[2] / s]
        };
        let b = zs.len() as f64;
        let (mut loss, mut grad) = (0.0, Vec::new());
        for (s, tt) in zs.iter().zip(zt) {
            let (ps, pt) = (softmax(s), softmax(tt));
            loss += (0..3)
                .map(|c| pt[c] * (pt[c].ln() - ps[c].ln()))
                .sum::<f64>();
            grad.push([0usize, 1, 2].map(|c| t * (ps[c] - pt[c]) / b));
        }
        (loss * t * t / b, grad)
    }

    #[test]
    fn kd_loss_matches_hand_and_finite_differences() {
        let zs = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]];
        let zt = [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]];
        let flat = |z: &[[f64; 3]]| -> Vec<f32> { z.iter().flatten().map(|&v| v as f32).collect() };
        for t in [1.0, 4.0] {
            let s = Var::from_vec(flat(&zs), (2, 3), &Device::Cpu).unwrap();
            let tl = Tensor::from_vec(flat(&zt), (2, 3), &Device::Cpu).unwrap();
            let loss = kd_loss(s.as_tensor(), &tl, t).unwrap();
            let (want, want_grad) = kd_by_hand(&zs, &zt, t);
            let got = loss.to_scalar::<f32>().unwrap() as f64;
            assert!(
                (got - want).abs() < 1e-6 * want.max(1.0),
                "T={t}: {got} vs {want}"
            );
            let g = loss.backward().unwrap();
            let g = g.get(s.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
            for r in 0..2 {
                for c in 0..3 {
                    assert!(
                        (g[r][c] as f64 - want_grad[r][c]).abs() < 1e-6,
                        "T={t} {g:?}"
                    );
                    // Central finite difference of the hand formula.
                    let h = 1e-5;
                    let (mut up, mut down) = (zs, zs);
                    up[r][c] += h;
                    down[r][c] -= h;
                    let fd = (kd_by_hand(&up, &zt, t).0 - kd_by_hand(&down, &zt, t).0) / (2.0 * h);
                    assert!(
                        (g[r][c] as f64 - fd).abs() < 1e-5,
                        "T={t}: {} vs {fd}",
                        g[r][c]
                    );
                }
            }
            assert!(g.iter().flatten().any(|v| v.abs() > 1e-3));
        }
        // Identical logits: zero loss.
        let z = Tensor::from_vec(flat(&zs), (2, 3), &Device::Cpu).unwrap();
        assert!(
            kd_loss(&z, &z, 3.0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .abs()
                < 1e-6
        );
    }

    #[test]
    fn alpha_zero_is_plain_cross_entropy_bit_for_bit_and_baseline_is_finetune() {
        let teacher = trained_teacher();
        let data = clusters(120, 2, true);
        let mut p = params(&data);
        p.alpha = 0.0;
        let cancel = quiet();
        let ctx = Ctx::new(&|_, _| {}, &cancel);
        let plain = finetune(
            Box::new(Model::init(&student_arch(4), 5).unwrap()),
            &p.train,
            &ctx,
            TrainHooks::default(),
        )
        .unwrap();
        let out = run(&teacher, &p, TrainHooks::default()).unwrap();
        assert_eq!(out.weights, plain.weights);
        let losses = |h: &[EpochMetrics]| -> Vec<(f64, Option<f64>)> {
            h.iter().map(|m| (m.train_loss, m.val_loss)).collect()
        };
        assert_eq!(losses(&out.history), losses(&plain.history));
        assert!(!out.teacher_cached);
        assert_eq!(out.kd_history.len(), 3);
        assert_eq!(out.kd_history[0].soft_loss, None);
        let hard = out.kd_history[0].hard_loss.unwrap();
        assert!((hard - out.history[0].train_loss).abs() < 1e-6);

        // Distilling with alpha = 0.5 and a baseline: the baseline is plain training.
        p.alpha = 0.5;
        p.baseline = true;
        let out = run(&teacher, &p, TrainHooks::default()).unwrap();
        let base = out.baseline.unwrap();
        assert_eq!(base.weights, plain.weights);
        assert_eq!(losses(&base.history), losses(&plain.history));
        assert_ne!(out.weights, plain.weights);
        assert!(out.teacher_cached);
        assert!(
            out.teacher_val_accuracy.unwrap() > 0.9,
            "{:?}",
            out.teacher_val_accuracy
        );
        assert!(out.val_agreement.is_some() && base.val_agreement.is_some());
        let kd = &out.kd_history[2];
        let total = 0.5 * kd.soft_loss.unwrap() + 0.5 * kd.hard_loss.unwrap();
        assert!((total - out.history[2].train_loss).abs() < 1e-5, "{kd:?}");
    }

    #[test]
    fn alpha_one_learns_the_teacher_from_unlabelled_data() {
        let teacher = trained_teacher();
        let data = clusters(240, 3, false);
        let mut p = params(&data);
        p.alpha = 1.0;
        p.train.epochs = 6;
        p.train.validation = Validation::Fraction(0.25);
        let cancel = quiet();
        let ctx = Ctx::new(&|_, _| {}, &cancel);
        let (_, val) = data.split(0.25, 3).unwrap();
        let untrained = Model::init(&student_arch(4), 5).unwrap();
        let before = evaluate(&untrained, &val, Some(&teacher), 64, &ctx)
            .unwrap()
            .agreement
            .unwrap();
        let out = run(&teacher, &p, TrainHooks::default()).unwrap();
        let after = out.val_agreement.unwrap();
        assert!(after > 0.9 && after > before + 0.2, "{before} -> {after}");
        assert!(out.history.last().unwrap().train_loss < out.history[0].train_loss);
        for m in &out.history {
            assert_eq!(
                (m.train_accuracy, m.val_loss, m.val_accuracy),
                (None, None, None)
            );
        }
        assert_eq!(out.teacher_val_accuracy, None);
        assert_eq!(out.kd_history[0].hard_loss, None);
        // The exported weights reproduce the agreement.
        let student = Model::described(&out.architecture, out.weights).unwrap();
        let e = evaluate(&student, &val, Some(&teacher), 64, &ctx).unwrap();
        assert_eq!(e.agreement, Some(after));
    }

    #[test]
    fn cached_and_live_teacher_agree_and_the_teacher_is_untouched() {
        let teacher = trained_teacher();
        let before = teacher.export().unwrap();
        let data = clusters(100, 4, true);
        let mut p = params(&data);
        p.features = vec![
            FeaturePair {
                teacher: "2".into(),
                student: "fc1".into(),
                weight: 0.5,
            },
            FeaturePair {
                teacher: "fc2".into(),
                student: "1".into(),
                weight: 0.1,
            },
        ];
        let cached = run(&teacher, &p, TrainHooks::default()).unwrap();
        assert!(cached.teacher_cached && cached.features_cached);
        let live = run_with(&teacher, &p, TeacherCache::Live, TrainHooks::default()).unwrap();
        assert!(!live.teacher_cached && !live.features_cached);
        // Not bit-identical: the teacher's matmul rounds a row differently in a batch of
        // 256 (the cache) than in a batch of 16 (live), by ~1 ulp.
        let x = Subset::all(&data).batches(100).next().unwrap().unwrap().x;
        let all = teacher.forward_eval(&x).unwrap().to_vec2::<f32>().unwrap();
        let few = teacher
            .forward_eval(&x.narrow(0, 0, 16).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (a, b) in all.iter().zip(&few).flat_map(|(a, b)| a.iter().zip(b)) {
            assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {b}");
        }
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * a.abs().max(1.0);
        for (a, b) in cached.history.iter().zip(&live.history) {
            assert!(close(a.train_loss, b.train_loss), "{a:?} vs {b:?}");
            assert!(
                close(a.val_loss.unwrap(), b.val_loss.unwrap()),
                "{a:?} vs {b:?}"
            );
        }
        for (a, b) in cached.kd_history.iter().zip(&live.kd_history) {
            assert!(
                close(a.soft_loss.unwrap(), b.soft_loss.unwrap()),
                "{a:?} vs {b:?}"
            );
            assert!(
                close(a.feature_loss.unwrap(), b.feature_loss.unwrap()),
                "{a:?} vs {b:?}"
            );
        }
        for (a, b) in cached.weights.iter().zip(&live.weights) {
            for (u, v) in a.values.iter().zip(&b.values) {
                assert!((u - v).abs() <= 1e-4, "{}: {u} vs {v}", a.name);
            }
        }
        assert!(cached.kd_history[0].feature_loss.unwrap() > 0.0);
        // No projection is exported with the student.
        let names: Vec<&str> = cached.weights.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]);
        assert_eq!(teacher.export().unwrap(), before);
    }

    #[test]
    fn resume_matches_the_uninterrupted_run() {
        let teacher = trained_teacher();
        let data = clusters(100, 5, true);
        let mut p = params(&data);
        p.train.epochs = 4;
        p.train.lr_schedule.kind = ScheduleKind::Cosine;
        p.train.early_stopping = Some(EarlyStopping {
            patience: 5,
            metric: StopMetric::ValLoss,
        });
        p.features = vec![FeaturePair {
            teacher: "fc1".into(),
            student: "fc1".into(),
            weight: 0.2,
        }];
        let full = run(&teacher, &p, TrainHooks::default()).unwrap();

        let cancel = quiet();
        let ctx = Ctx::new(&|_, _| {}, &cancel);
        let mut saved = Vec::new();
        let mut on_epoch = |m: &EpochMetrics, c: &Checkpoint| -> Result<()> {
            saved.push(c.to_safetensors_bytes()?);
            if m.epoch == 2 {
                cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(())
        };
        let student = Model::init(&student_arch(4), 5).unwrap();
        let hooks = TrainHooks {
            on_epoch: Some(&mut on_epoch),
            ..Default::default()
        };
        let killed = distill(&teacher, Box::new(student), &p, &ctx, hooks);
        assert!(matches!(killed, Err(Error::Cancelled)), "{killed:?}");
        let cp = Checkpoint::from_safetensors_bytes(&saved[1]).unwrap();
        assert!(cp
            .weights
            .iter()
            .any(|t| t.name == "distill.features.0.weight"));
        let resumed = run(
            &teacher,
            &p,
            TrainHooks {
                resume: Some(cp),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(resumed.weights, full.weights);
        assert_eq!(resumed.history.len(), 4);
        for (a, b) in resumed.history.iter().zip(&full.history) {
            assert_eq!((a.train_loss, a.val_loss), (b.train_loss, b.val_loss));
        }
        assert_eq!(resumed.kd_history[..], full.kd_history[2..]);
        assert_eq!(resumed.val_agreement, full.val_agreement);
    }

    #[test]
    fn refusals_are_precise() {
        let teacher = Model::init(&teacher_arch(), 1).unwrap();
        let data = clusters(40, 6, true);
        let base = params(&data);
        let check = |p: &DistillParams<'_>, student: &Architecture| -> Error {
            let cancel = quiet();
            let ctx = Ctx::new(&|_, _| {}, &cancel);
            let s = Model::init(student, 0).unwrap();
            distill(&teacher, Box::new(s), p, &ctx, TrainHooks::default()).unwrap_err()
        };
        let ptr = |e: &Error| (e.code().as_str(), e.field().unwrap_or_default().to_string());
        let arch = student_arch(4);

        let e = check(&base, &student_arch(3));
        assert_eq!(e.code().as_str(), "architecture_mismatch");
        assert!(
            e.to_string().contains("3 classes") && e.to_string().contains("outputs 4"),
            "{e}"
        );
        for t in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let mut p = base.clone();
            p.temperature = t;
            assert_eq!(
                ptr(&check(&p, &arch)),
                ("validation_failed", "temperature".into())
            );
        }
        for a in [-0.1, 1.5, f64::NAN] {
            let mut p = base.clone();
            p.alpha = a;
            assert_eq!(
                ptr(&check(&p, &arch)),
                ("validation_failed", "alpha".into())
            );
        }
        let mut p = base.clone();
        p.features = vec![
            FeaturePair {
                teacher: "fc1".into(),
                student: "fc1".into(),
                weight: 1.0,
            },
            FeaturePair {
                teacher: "fc9".into(),
                student: "fc1".into(),
                weight: 1.0,
            },
        ];
        let e = check(&p, &arch);
        assert_eq!(ptr(&e).1, "features[1].teacher");
        assert!(
            e.to_string().contains("\"fc9\"") && e.to_string().contains("bn"),
            "{e}"
        );
        p.features[1] = FeaturePair {
            teacher: "fc2".into(),
            student: "7".into(),
            weight: 1.0,
        };
        assert_eq!(ptr(&check(&p, &arch)).1, "features[1].student");
        p.features[1].student = "1".into();
        p.features[1].weight = -1.0;
        assert_eq!(ptr(&check(&p, &arch)).1, "features[1].weight");

        let mut p = base.clone();
        p.train.head = Some(HeadParams {
            layer: "fc2".into(),
            num_classes: 4,
        });
        assert_eq!(ptr(&check(&p, &arch)).1, "head");
        let mut p = base.clone();
        p.train.epochs = 0;
        assert_eq!(ptr(&check(&p, &arch)).1, "epochs");

        // Unlabelled data: alpha < 1 and the baseline need labels.
        let unlabelled = clusters(40, 6, false);
        let mut p = params(&unlabelled);
        let e = check(&p, &arch);
        assert_eq!(e.code().as_str(), "dataset_mismatch");
        assert!(e.to_string().contains("alpha"), "{e}");
        p.alpha = 1.0;
        p.baseline = true;
        assert_eq!(ptr(&check(&p, &arch)).1, "baseline");
        p.baseline = false;
        p.train.early_stopping = Some(EarlyStopping {
            patience: 2,
            metric: StopMetric::ValLoss,
        });
        assert_eq!(ptr(&check(&p, &arch)).1, "early_stopping");

        // Features that fit the student but not the teacher.
        let wide =
            Architecture::from_json(&json!({"kind":"sequential","input_shape":[17],"layers":[
            {"type":"linear","in_features":17,"out_features":4}]}))
            .unwrap();
        let cancel = quiet();
        let ctx = Ctx::new(&|_, _| {}, &cancel);
        let e = distill(
            &Model::init(&wide, 0).unwrap(),
            Box::new(Model::init(&arch, 0).unwrap()),
            &base,
            &ctx,
            TrainHooks::default(),
        )
        .unwrap_err();
        assert_eq!(e.code().as_str(), "dataset_mismatch");
        assert!(
            e.to_string()
                .starts_with("dataset does not match the model: teacher:"),
            "{e}"
        );
    }
}
