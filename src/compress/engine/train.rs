//! The one training loop, reused by `finetune`, pruning schedules, QAT and distillation.
//!
//! This module owns mini-batch training of a network ([`crate::compress::engine::Network`]): seeded shuffles and dropout
//! masks (one ChaCha8 stream whose state is checkpointed), a pluggable loss (by default the
//! network's own objective: cross-entropy for classifiers, next-token cross-entropy for
//! language models), gradient accumulation, SGD (momentum, Nesterov, weight decay) and AdamW
//! as fused in-place updates
//! over the parameters' storage, constant / step / cosine schedules with linear warm-up,
//! global-norm gradient clipping, per-parameter learning-rate multipliers, frozen
//! parameters, early stopping, cancellation between batches, progress, per-epoch metrics
//! and a [`Checkpoint`] after every epoch from which a run resumes bit-identically.
//!
//! It does not parse user input (callers such as [`crate::compress::engine::finetune`] validate and build
//! a [`TrainConfig`]) and does not persist anything: checkpoints go to the caller.

use std::collections::BTreeMap;
use std::f64::consts::PI;
use std::time::Instant;

use candle_core::{Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::compress::engine::augment::Augment;
use crate::compress::engine::data::{shuffle_indices, Batch, Subset};
use crate::compress::engine::evaluate::loss_and_accuracy;
use crate::compress::engine::lm::{causal_lm_loss, lm_loss_and_accuracy};
pub use crate::compress::engine::optim::Optimizer;
use crate::compress::engine::optim::{bad_checkpoint, Accumulated, OptimizerState};
use crate::compress::engine::{Mode, Network, Objective};
use crate::compress::formats::safetensors::NamedTensor;
use crate::compress::formats::safetensors::{self, Dtype, TensorSpec};
use crate::compress::progress::Ctx;
use crate::compress::{Error, Result};

/// The safetensors metadata key holding a checkpoint's scalars (JSON).
pub const CHECKPOINT_METADATA_KEY: &str = "whittle.checkpoint";

/// How the learning rate evolves after warm-up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScheduleKind {
    /// The base rate throughout.
    Constant,
    /// Multiplied by `gamma` every `step_size` epochs.
    Step {
        /// Epochs between decays (at least 1).
        step_size: usize,
        /// Decay factor.
        gamma: f64,
    },
    /// Cosine annealing from the base rate to 0 over the remaining steps (per batch).
    Cosine,
}

/// A learning-rate schedule: linear warm-up over `warmup_epochs` (per batch, from
/// base/steps up to the base rate), then `kind`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// The shape after warm-up.
    pub kind: ScheduleKind,
    /// Epochs of linear warm-up (0 for none).
    pub warmup_epochs: usize,
}

/// The metric early stopping watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopMetric {
    /// Validation loss (lower is better).
    ValLoss,
    /// Validation accuracy (higher is better).
    ValAccuracy,
}

impl StopMetric {
    /// API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ValLoss => "val_loss",
            Self::ValAccuracy => "val_accuracy",
        }
    }
}

/// Stop after `patience` epochs without improvement of `metric`, and restore the best
/// epoch's weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EarlyStopping {
    /// Epochs without improvement tolerated.
    pub patience: usize,
    /// What counts as improvement.
    pub metric: StopMetric,
}

/// Everything the loop needs besides the model and the data. Validated by the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Epochs to run (at least 1).
    pub epochs: usize,
    /// Samples per batch (at least 1). A final batch of a single sample is skipped
    /// (batch statistics of one sample are undefined).
    pub batch_size: usize,
    /// Update rule.
    pub optimizer: Optimizer,
    /// Base learning rate (finite, non-negative).
    pub lr: f64,
    /// Weight decay (L2 for SGD, decoupled for AdamW); applies to every trainable tensor.
    pub weight_decay: f64,
    /// Learning-rate schedule.
    pub schedule: LrSchedule,
    /// Clip the global gradient norm to this value.
    pub grad_clip: Option<f64>,
    /// Early stopping (needs validation data).
    pub early_stopping: Option<EarlyStopping>,
    /// `(glob pattern, multiplier)` pairs over parameter names; the first match wins,
    /// unmatched parameters use 1.
    pub lr_multipliers: Vec<(String, f64)>,
    /// Seed of shuffles and dropout masks.
    pub seed: u64,
    /// Augmentation of every training batch (validation data is never augmented).
    pub augment: Option<Augment>,
    /// Batches whose gradients are summed before each optimizer step (at least 1): an
    /// effective batch of `batch_size × accumulate` in the memory of one batch. Each
    /// batch's loss counts `1/accumulate` (the last group of an epoch: `1/its size`).
    pub accumulate: usize,
}

/// The figures of one finished epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean training loss over the epoch's batches (train mode).
    pub train_loss: f64,
    /// Training top-1 accuracy (train mode), when the data is labelled.
    pub train_accuracy: Option<f64>,
    /// Validation cross-entropy, when there is validation data.
    pub val_loss: Option<f64>,
    /// Validation top-1 accuracy, when there is validation data.
    pub val_accuracy: Option<f64>,
    /// Learning rate of the epoch's last step.
    pub lr: f64,
    /// Wall-clock seconds of the epoch (training and validation).
    pub seconds: f64,
}

/// The state of a ChaCha8 random stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RngState {
    /// The 32-byte key.
    pub seed: [u8; 32],
    /// Stream number.
    pub stream: u64,
    /// Position in the stream, in 32-bit words.
    pub word_pos: u128,
}

impl RngState {
    fn of(rng: &ChaCha8Rng) -> RngState {
        RngState {
            seed: rng.get_seed(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos(),
        }
    }

    fn restore(&self) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::from_seed(self.seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(self.word_pos);
        rng
    }
}

/// The best validation figure seen so far (early stopping and `best_epoch`).
#[derive(Debug, Clone, PartialEq)]
pub struct BestSoFar {
    /// 1-based epoch that reached it.
    pub epoch: usize,
    /// The metric's value.
    pub value: f64,
    /// Epochs since then without improvement.
    pub bad_epochs: usize,
    /// That epoch's weights, kept when early stopping is on (restored at the end).
    pub weights: Option<Vec<NamedTensor>>,
}

/// Everything needed to continue a run after `epoch` completed epochs, bit-identically.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Completed epochs.
    pub epoch: usize,
    /// Optimizer steps taken.
    pub step: u64,
    /// Every parameter and buffer of the model, then the run's extra variables
    /// ([`TrainHooks::extra_params`]).
    pub weights: Vec<NamedTensor>,
    /// Optimizer state, named `{slot}.{parameter}` (`exp_avg.fc1.weight`).
    pub optimizer: Vec<NamedTensor>,
    /// The random stream after the last completed epoch.
    pub rng: RngState,
    /// Best validation figure so far.
    pub best: Option<BestSoFar>,
    /// Metrics of the completed epochs.
    pub history: Vec<EpochMetrics>,
}

#[derive(Serialize, Deserialize)]
struct CheckpointMeta {
    version: u32,
    epoch: usize,
    step: u64,
    rng_seed: String,
    rng_stream: u64,
    rng_word_pos: String,
    best: Option<BestMeta>,
    history: Vec<EpochMetrics>,
}

#[derive(Serialize, Deserialize)]
struct BestMeta {
    epoch: usize,
    value: f64,
    bad_epochs: usize,
}

impl Checkpoint {
    /// Serialises to a safetensors file: tensors `weights.{name}`, `optimizer.{slot}.{name}`
    /// and `best.{name}` (f32), scalars as JSON under [`CHECKPOINT_METADATA_KEY`].
    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>> {
        let meta = CheckpointMeta {
            version: 1,
            epoch: self.epoch,
            step: self.step,
            rng_seed: hex::encode(self.rng.seed),
            rng_stream: self.rng.stream,
            rng_word_pos: self.rng.word_pos.to_string(),
            best: self.best.as_ref().map(|b| BestMeta {
                epoch: b.epoch,
                value: b.value,
                bad_epochs: b.bad_epochs,
            }),
            history: self.history.clone(),
        };
        let mut metadata = BTreeMap::new();
        metadata.insert(
            CHECKPOINT_METADATA_KEY.to_owned(),
            serde_json::to_string(&meta).map_err(|e| Error::Internal(e.to_string()))?,
        );
        let best = self.best.as_ref().and_then(|b| b.weights.as_deref());
        let groups = [
            ("weights", self.weights.as_slice()),
            ("optimizer", self.optimizer.as_slice()),
            ("best", best.unwrap_or(&[])),
        ];
        let encoded: Vec<(TensorSpec, Vec<u8>)> = groups
            .iter()
            .flat_map(|(prefix, ts)| {
                ts.iter().map(move |t| {
                    (
                        TensorSpec::new(
                            format!("{prefix}.{}", t.name),
                            Dtype::F32,
                            t.shape.clone(),
                        ),
                        safetensors::encode_f32(&t.values),
                    )
                })
            })
            .collect();
        let parts: Vec<(TensorSpec, &[u8])> = encoded
            .iter()
            .map(|(s, b)| (s.clone(), b.as_slice()))
            .collect();
        safetensors::serialize(&metadata, &parts)
    }

    /// Parses what [`Checkpoint::to_safetensors_bytes`] wrote.
    pub fn from_safetensors_bytes(bytes: &[u8]) -> Result<Checkpoint> {
        let header = safetensors::parse_header(bytes, bytes.len() as u64)?;
        let text = header
            .metadata
            .get(CHECKPOINT_METADATA_KEY)
            .ok_or_else(|| bad_checkpoint(format!("no {CHECKPOINT_METADATA_KEY} metadata")))?;
        let meta: CheckpointMeta = serde_json::from_str(text).map_err(bad_checkpoint)?;
        if meta.version != 1 {
            return Err(bad_checkpoint(format!("unknown version {}", meta.version)));
        }
        let mut seed = [0u8; 32];
        hex::decode_to_slice(&meta.rng_seed, &mut seed).map_err(bad_checkpoint)?;
        let word_pos: u128 = meta.rng_word_pos.parse().map_err(bad_checkpoint)?;
        let (mut weights, mut optimizer, mut best_weights) = (Vec::new(), Vec::new(), Vec::new());
        for t in &header.tensors {
            let begin = header.data_start + t.data_offsets.0;
            let end = header.data_start + t.data_offsets.1;
            let data = bytes.get(begin..end).unwrap_or(&[]);
            let (group, name) = t
                .name
                .split_once('.')
                .ok_or_else(|| bad_checkpoint(format!("unexpected tensor {:?}", t.name)))?;
            let nt = NamedTensor {
                name: name.to_owned(),
                shape: t.shape.clone(),
                values: safetensors::decode_f32(&t.name, t.dtype, data)?,
            };
            match group {
                "weights" => weights.push(nt),
                "optimizer" => optimizer.push(nt),
                "best" => best_weights.push(nt),
                _ => return Err(bad_checkpoint(format!("unexpected tensor {:?}", t.name))),
            }
        }
        Ok(Checkpoint {
            epoch: meta.epoch,
            step: meta.step,
            weights,
            optimizer,
            rng: RngState {
                seed,
                stream: meta.rng_stream,
                word_pos,
            },
            best: meta.best.map(|b| BestSoFar {
                epoch: b.epoch,
                value: b.value,
                bad_epochs: b.bad_epochs,
                weights: (!best_weights.is_empty()).then_some(best_weights),
            }),
            history: meta.history,
        })
    }
}

/// A loss: `(model outputs, batch) → scalar tensor` to minimise.
pub type LossFn<'a> = dyn Fn(&Tensor, &Batch) -> Result<Tensor> + 'a;

/// Mean cross-entropy of logits `[batch, classes]` against the batch labels, built from
/// differentiable ops (`log_softmax` + `gather`).
pub fn cross_entropy(logits: &Tensor, batch: &Batch) -> Result<Tensor> {
    let y = batch.y.as_ref().ok_or_else(|| {
        Error::DatasetMismatch("cross-entropy training needs class labels (`y`)".into())
    })?;
    let logp = candle_nn::ops::log_softmax(logits, 1)?;
    let picked = logp.gather(&y.unsqueeze(1)?, 1)?;
    Ok(picked.sum_all()?.affine(-1.0 / batch.len as f64, 0.0)?)
}

/// A whole training forward pass: `(model, batch, rng) → (model outputs, loss)`. Lets a
/// caller run the model its own way (e.g. with intermediate outputs, or with a teacher)
/// while the loop keeps shuffling, optimizing, validating and checkpointing. The outputs
/// are used for training accuracy; `rng` is the loop's stream (dropout masks).
pub type StepLossFn<'a> =
    dyn Fn(&dyn Network, &Batch, &mut ChaCha8Rng) -> Result<(Tensor, Tensor)> + 'a;

/// Called after every optimizer step with the updated model (e.g. to put pruned weights
/// back to zero). An error stops training.
pub type AfterStepFn<'a> = dyn Fn(&dyn Network) -> Result<()> + 'a;

/// Called after every epoch with its metrics and a checkpoint of the state after it.
pub type EpochFn<'a> = dyn FnMut(&EpochMetrics, &Checkpoint) -> Result<()> + 'a;

/// The caller's hooks into a run.
#[derive(Default)]
pub struct TrainHooks<'a> {
    /// The loss; [`cross_entropy`] when `None`.
    pub loss: Option<&'a LossFn<'a>>,
    /// Replaces the forward pass and `loss` together when set.
    pub forward_loss: Option<&'a StepLossFn<'a>>,
    /// Called after every optimizer step.
    pub after_step: Option<&'a AfterStepFn<'a>>,
    /// Trainable f32 variables besides the model's (e.g. a distillation projection),
    /// named uniquely (no clash with the model's parameter names). The optimizer updates
    /// them with the model's settings (learning-rate multipliers match their names), and
    /// checkpoints carry them in `weights` and their state in `optimizer`.
    pub extra_params: Vec<(String, Var)>,
    /// Called after every epoch with its metrics and a checkpoint of the state after it
    /// (persist the checkpoint to survive a crash). An error stops training.
    pub on_epoch: Option<&'a mut EpochFn<'a>>,
    /// Continue from this checkpoint instead of starting afresh.
    pub resume: Option<Checkpoint>,
}

/// What a finished run reports (the trained weights are in the model).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOutcome {
    /// Metrics of every epoch run, resumed ones included.
    pub history: Vec<EpochMetrics>,
    /// The epoch with the best validation figure (early-stopping metric, else val loss).
    pub best_epoch: Option<usize>,
    /// Whether early stopping ended the run before `epochs`.
    pub stopped_early: bool,
    /// Whether the model holds the best epoch's weights rather than the last epoch's.
    pub restored_best: bool,
}

/// The learning rate at optimizer step `step` (0-based).
pub fn lr_at(
    base: f64,
    schedule: &LrSchedule,
    step: u64,
    steps_per_epoch: u64,
    epochs: usize,
) -> f64 {
    let spe = steps_per_epoch.max(1);
    let warm = schedule.warmup_epochs as u64 * spe;
    if step < warm {
        return base * (step + 1) as f64 / warm as f64;
    }
    match schedule.kind {
        ScheduleKind::Constant => base,
        ScheduleKind::Step { step_size, gamma } => {
            let decays = step / spe / step_size.max(1) as u64;
            base * gamma.powi(decays.min(i32::MAX as u64) as i32)
        }
        ScheduleKind::Cosine => {
            let total = (epochs as u64 * spe).saturating_sub(warm).max(1);
            let t = ((step - warm) as f64 / total as f64).min(1.0);
            base * 0.5 * (1.0 + (PI * t).cos())
        }
    }
}

/// The caller's extra variables as named tensors (for checkpoints).
fn export_extra(extra: &[(String, Var)]) -> Result<Vec<NamedTensor>> {
    extra
        .iter()
        .map(|(name, var)| {
            Ok(NamedTensor {
                name: name.clone(),
                shape: var.dims().to_vec(),
                values: var.as_tensor().flatten_all()?.to_vec1::<f32>()?,
            })
        })
        .collect()
}

/// Overwrites the caller's extra variables from a checkpoint's `weights`.
fn load_extra(extra: &[(String, Var)], weights: &[NamedTensor]) -> Result<()> {
    for (name, var) in extra {
        match weights.iter().find(|t| &t.name == name) {
            Some(t) if t.shape == var.dims() => var.set(&Tensor::from_slice(
                &t.values,
                t.shape.clone(),
                var.device(),
            )?)?,
            _ => return Err(bad_checkpoint(format!("missing or misshapen {name}"))),
        }
    }
    Ok(())
}

/// Whether `value` improves on `best` for `metric`.
fn improves(metric: StopMetric, value: f64, best: f64) -> bool {
    match metric {
        StopMetric::ValLoss => value < best,
        StopMetric::ValAccuracy => value > best,
    }
}

/// Trains `model` in place on `train`, validating on `validation` after every epoch.
///
/// Deterministic for a seed: the same model, data, config and seed give bit-identical
/// weights on the same build and machine, and resuming from any epoch's [`Checkpoint`]
/// gives the same final weights as the uninterrupted run.
pub fn train(
    model: &mut dyn Network,
    train: &Subset<'_>,
    validation: Option<&Subset<'_>>,
    config: &TrainConfig,
    ctx: &Ctx<'_>,
    mut hooks: TrainHooks<'_>,
) -> Result<TrainOutcome> {
    model.check_trainable()?;
    if config.early_stopping.is_some() && validation.is_none() {
        return Err(Error::InvalidParameter {
            field: "early_stopping".into(),
            detail: "early stopping needs validation data".into(),
        });
    }
    let objective = model.objective();
    let default_loss = match objective {
        Objective::Classification => cross_entropy,
        Objective::CausalLm => causal_lm_loss,
    };
    let loss_fn: &LossFn<'_> = match hooks.loss {
        Some(f) => f,
        None => &default_loss,
    };
    let bs = config.batch_size.max(1);
    let n = train.len();
    // A trailing batch of one sample is skipped (see TrainConfig::batch_size).
    let usable = if n > 1 && n % bs == 1 { n - 1 } else { n };
    let batches_per_epoch = usable.div_ceil(bs);
    let accumulate = config.accumulate.max(1);
    // Optimizer steps (what the schedule counts): one per group of `accumulate` batches.
    let steps_per_epoch = batches_per_epoch.div_ceil(accumulate) as u64;
    let metric = config
        .early_stopping
        .map_or(StopMetric::ValLoss, |e| e.metric);

    let forward_loss = hooks.forward_loss;
    let after_step = hooks.after_step;
    let extra = std::mem::take(&mut hooks.extra_params);
    if let Some((name, _)) = extra
        .iter()
        .find(|(name, _)| model.params().iter().any(|p| p.name() == name))
    {
        return Err(Error::Internal(format!(
            "extra training variable {name:?} clashes with a model parameter"
        )));
    }
    let mut opt = OptimizerState::new(
        model,
        &extra,
        config.optimizer,
        config.weight_decay,
        &config.lr_multipliers,
    );
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut best: Option<BestSoFar> = None;
    let mut history = Vec::new();
    let mut start = 0;
    if let Some(cp) = hooks.resume.take() {
        model.load(&cp.weights)?;
        load_extra(&extra, &cp.weights)?;
        opt.restore(&cp.optimizer, cp.step)?;
        rng = cp.rng.restore();
        best = cp.best;
        history = cp.history;
        start = cp.epoch;
    }
    let val_bs = bs.max(256);
    let patience_spent = |best: &Option<BestSoFar>| {
        best.as_ref()
            .zip(config.early_stopping)
            .is_some_and(|(b, e)| b.bad_epochs >= e.patience.max(1))
    };
    let mut stopped_early = start < config.epochs && patience_spent(&best);

    let mut epoch = start;
    while epoch < config.epochs && !stopped_early {
        ctx.check()?;
        let started = Instant::now();
        let mut order = train.indices.clone();
        shuffle_indices(&mut order, &mut rng);
        order.truncate(usable);
        let view = Subset {
            dataset: train.dataset,
            indices: order,
        };
        let (mut loss_sum, mut seen, mut correct) = (0f64, 0usize, 0usize);
        let mut labelled = true;
        let mut lr = config.lr;
        let report_every = (batches_per_epoch / 100).max(1);
        let mut pending = Accumulated::default();
        let model: &dyn Network = &*model;
        for (b, batch) in model.batches(&view, bs).enumerate() {
            ctx.check()?;
            let batch = match &config.augment {
                Some(a) => a.apply(batch?, &mut rng)?,
                None => batch?,
            };
            lr = lr_at(
                config.lr,
                &config.schedule,
                opt.step,
                steps_per_epoch,
                config.epochs,
            );
            let (out, loss) = match forward_loss {
                Some(f) => f(model, &batch, &mut rng)?,
                None => {
                    let out = model.forward(&batch, Mode::Train(&mut rng))?;
                    let loss = loss_fn(&out, &batch)?;
                    (out, loss)
                }
            };
            let value = loss.to_scalar::<f32>()?;
            if !value.is_finite() {
                return Err(Error::NonFiniteLoss {
                    epoch: epoch + 1,
                    batch: b,
                });
            }
            let grads = loss.backward()?;
            let group_end = (b + 1) % accumulate == 0 || b + 1 == batches_per_epoch;
            if accumulate == 1 {
                opt.apply(&opt.gradients(&grads), lr, config.grad_clip)?;
            } else {
                pending.add(opt.gradients(&grads))?;
                if group_end {
                    let grads = pending.take_mean()?;
                    opt.apply(&grads, lr, config.grad_clip)?;
                }
            }
            if group_end {
                if let Some(f) = after_step {
                    f(model)?;
                }
            }
            loss_sum += value as f64 * batch.len as f64;
            seen += batch.len;
            match (&batch.labels, out.rank()) {
                (Some(labels), 2) => {
                    let pred = out.argmax(1)?.to_vec1::<u32>()?;
                    correct += pred.iter().zip(labels).filter(|(p, y)| p == y).count();
                }
                _ => labelled = false,
            }
            if b % report_every == 0 || b + 1 == batches_per_epoch {
                let done = (epoch * batches_per_epoch + b + 1) as f64
                    / (config.epochs * batches_per_epoch).max(1) as f64;
                ctx.report(
                    done,
                    &format!(
                        "epoch {}/{}, batch {}/{}",
                        epoch + 1,
                        config.epochs,
                        b + 1,
                        batches_per_epoch
                    ),
                );
            }
        }
        let (val_loss, val_accuracy) = match validation {
            Some(v) => {
                // Silent: the validation pass's own progress is not the step's.
                let (l, a) = match objective {
                    Objective::Classification => {
                        loss_and_accuracy(model, v, val_bs, &ctx.silent())?
                    }
                    Objective::CausalLm => lm_loss_and_accuracy(model, v, bs, &ctx.silent())?,
                };
                (Some(l), Some(a))
            }
            None => (None, None),
        };
        epoch += 1;
        let metrics = EpochMetrics {
            epoch,
            train_loss: loss_sum / seen.max(1) as f64,
            train_accuracy: (labelled && seen > 0).then(|| correct as f64 / seen as f64),
            val_loss,
            val_accuracy,
            lr,
            seconds: started.elapsed().as_secs_f64(),
        };
        let watched = match metric {
            StopMetric::ValLoss => val_loss,
            StopMetric::ValAccuracy => val_accuracy,
        };
        if let Some(value) = watched {
            match &mut best {
                Some(b) if !improves(metric, value, b.value) => b.bad_epochs += 1,
                _ => {
                    best = Some(BestSoFar {
                        epoch,
                        value,
                        bad_epochs: 0,
                        weights: match config.early_stopping {
                            Some(_) => Some(model.export()?),
                            None => None,
                        },
                    })
                }
            }
        }
        stopped_early = epoch < config.epochs && patience_spent(&best);
        history.push(metrics.clone());
        if let Some(cb) = hooks.on_epoch.as_deref_mut() {
            let mut weights = model.export()?;
            weights.extend(export_extra(&extra)?);
            let checkpoint = Checkpoint {
                epoch,
                step: opt.step,
                weights,
                optimizer: opt.export(),
                rng: RngState::of(&rng),
                best: best.clone(),
                history: history.clone(),
            };
            cb(&metrics, &checkpoint)?;
        }
    }
    let mut restored_best = false;
    if config.early_stopping.is_some() {
        if let Some(w) = best.as_ref().and_then(|b| b.weights.as_ref()) {
            if best.as_ref().map(|b| b.epoch) != Some(epoch) {
                model.load(w)?;
                restored_best = true;
            }
        }
    }
    Ok(TrainOutcome {
        history,
        best_epoch: best.map(|b| b.epoch),
        stopped_early,
        restored_best,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::compress::engine::data::{Dataset, DatasetX};
    use crate::compress::engine::sequential::model::tests::every_layer;
    use crate::compress::engine::sequential::model::Model;
    use rand::Rng;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn noisy_data(samples: usize, seed: u64) -> Dataset {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let y: Vec<i64> = (0..samples).map(|i| (i % 3) as i64).collect();
        let x = (0..samples * 64)
            .map(|i| y[i / 64] as f32 * 0.3 + rng.gen_range(-1.0f32..1.0))
            .collect();
        Dataset {
            x: DatasetX::F32(x),
            feature_shape: vec![1, 8, 8],
            samples,
            y: Some(y),
            num_classes: Some(3),
        }
    }

    fn config(optimizer: Optimizer) -> TrainConfig {
        TrainConfig {
            epochs: 4,
            batch_size: 8,
            optimizer,
            lr: 0.05,
            weight_decay: 1e-3,
            schedule: LrSchedule {
                kind: ScheduleKind::Cosine,
                warmup_epochs: 1,
            },
            grad_clip: Some(1.0),
            augment: None,
            accumulate: 1,
            early_stopping: Some(EarlyStopping {
                patience: 10,
                metric: StopMetric::ValAccuracy,
            }),
            lr_multipliers: vec![("head.*".into(), 0.5)],
            seed: 11,
        }
    }

    /// Trains the every-layer network (dropout, batch norm, residual) and returns its weights.
    fn run(
        config: &TrainConfig,
        data: &Dataset,
        resume: Option<Checkpoint>,
        stop_after: Option<usize>,
    ) -> (Result<TrainOutcome>, Vec<NamedTensor>, Vec<Vec<u8>>) {
        let mut model = Model::init(&every_layer(), 5).unwrap();
        let (train_set, val_set) = data.split(0.25, 3).unwrap();
        let cancel = AtomicBool::new(false);
        let ctx = Ctx::new(&|_, _| {}, &cancel);
        let mut saved = Vec::new();
        let mut on_epoch = |m: &EpochMetrics, cp: &Checkpoint| -> Result<()> {
            saved.push(cp.to_safetensors_bytes()?);
            if Some(m.epoch) == stop_after {
                cancel.store(true, Ordering::Relaxed);
            }
            Ok(())
        };
        let hooks = TrainHooks {
            on_epoch: Some(&mut on_epoch),
            resume,
            ..Default::default()
        };
        let out = train(&mut model, &train_set, Some(&val_set), config, &ctx, hooks);
        (out, model.export().unwrap(), saved)
    }

    /// Two accumulated batches of 8 make the same steps as batches of 16: the same
    /// weights up to float summation order, and half as many optimizer steps as batches.
    #[test]
    fn accumulated_batches_step_like_one_larger_batch() {
        use crate::compress::engine::sequential::arch::Architecture;
        let arch = Architecture::from_json(&serde_json::json!({"kind": "sequential",
            "input_shape": [1, 8, 8], "layers": [{"type": "flatten"},
            {"type": "linear", "name": "fc1", "in_features": 64, "out_features": 16},
            {"type": "relu"},
            {"type": "linear", "name": "fc2", "in_features": 16, "out_features": 3}]}))
        .unwrap();
        let data = noisy_data(64, 2);
        let cancel = AtomicBool::new(false);
        let ctx = Ctx::new(&|_, _| {}, &cancel);
        let trained = |batch_size: usize, accumulate: usize| {
            let mut cfg = config(Optimizer::Sgd {
                momentum: 0.9,
                nesterov: false,
            });
            cfg.early_stopping = None;
            cfg.batch_size = batch_size;
            cfg.accumulate = accumulate;
            let mut model = Model::init(&arch, 5).unwrap();
            let mut steps = 0;
            let mut on_epoch = |_: &EpochMetrics, cp: &Checkpoint| -> Result<()> {
                steps = cp.step;
                Ok(())
            };
            let hooks = TrainHooks {
                on_epoch: Some(&mut on_epoch),
                ..Default::default()
            };
            train(&mut model, &Subset::all(&data), None, &cfg, &ctx, hooks).unwrap();
            (model.export().unwrap(), steps)
        };
        let (big, big_steps) = trained(16, 1);
        let (acc, acc_steps) = trained(8, 2);
        let (small, small_steps) = trained(8, 1);
        assert_eq!((big_steps, acc_steps, small_steps), (16, 16, 32));
        let diff = |a: &[NamedTensor], b: &[NamedTensor]| {
            a.iter()
                .zip(b)
                .flat_map(|(x, y)| x.values.iter().zip(&y.values).map(|(p, q)| (p - q).abs()))
                .fold(0f32, f32::max)
        };
        assert!(diff(&big, &acc) < 1e-4, "{}", diff(&big, &acc));
        assert!(diff(&big, &small) > 1e-2, "{}", diff(&big, &small));
    }

    /// The progress a step reports only moves forward: the validation pass between epochs
    /// does not report its own 0→1 as the step's (the bar used to jump to 100% and back).
    #[test]
    fn progress_only_moves_forward_through_validation_passes() {
        let data = noisy_data(41, 1);
        let cfg = config(Optimizer::ADAMW);
        let mut model = Model::init(&every_layer(), 5).unwrap();
        let (train_set, val_set) = data.split(0.25, 3).unwrap();
        let cancel = AtomicBool::new(false);
        let seen = std::sync::Mutex::new(Vec::new());
        let record = |f: f64, _: &str| seen.lock().unwrap().push(f);
        let ctx = Ctx::new(&record, &cancel);
        train(
            &mut model,
            &train_set,
            Some(&val_set),
            &cfg,
            &ctx,
            TrainHooks::default(),
        )
        .unwrap();
        let seen = seen.into_inner().unwrap();
        assert!(seen.len() >= 4, "{seen:?}");
        assert!(seen.windows(2).all(|w| w[1] >= w[0]), "{seen:?}");
    }

    #[test]
    fn resume_after_a_kill_matches_the_uninterrupted_run() {
        let data = noisy_data(41, 1);
        for optimizer in [
            Optimizer::ADAMW,
            Optimizer::Sgd {
                momentum: 0.9,
                nesterov: true,
            },
        ] {
            let cfg = config(optimizer);
            let (full, full_weights, _) = run(&cfg, &data, None, None);
            let full = full.unwrap();
            assert_eq!(full.history.len(), 4);

            // Killed after epoch 2: the job fails with Cancelled, the checkpoint survives.
            let (killed, _, saved) = run(&cfg, &data, None, Some(2));
            assert!(matches!(killed, Err(Error::Cancelled)));
            let cp = Checkpoint::from_safetensors_bytes(&saved[1]).unwrap();
            assert_eq!(cp.epoch, 2);
            assert_eq!(cp.to_safetensors_bytes().unwrap(), saved[1]);

            let (resumed, resumed_weights, _) = run(&cfg, &data, Some(cp), None);
            let resumed = resumed.unwrap();
            assert_eq!(resumed_weights, full_weights, "{optimizer:?}");
            assert_eq!(resumed.best_epoch, full.best_epoch);
            assert_eq!(resumed.history.len(), 4);
            for (a, b) in resumed.history.iter().zip(&full.history) {
                assert_eq!(
                    (a.epoch, a.train_loss, a.val_loss),
                    (b.epoch, b.train_loss, b.val_loss)
                );
            }
        }
    }

    #[test]
    fn same_seed_same_bits_other_seed_other_bits() {
        let data = noisy_data(41, 2);
        let cfg = config(Optimizer::ADAMW);
        let (_, a, _) = run(&cfg, &data, None, None);
        let (_, b, _) = run(&cfg, &data, None, None);
        assert_eq!(a, b);
        let mut other = cfg.clone();
        other.seed = 12;
        let (_, c, _) = run(&other, &data, None, None);
        assert_ne!(a, c);
    }

    #[test]
    fn early_stopping_restores_the_best_epoch() {
        let data = noisy_data(41, 3);
        let mut cfg = config(Optimizer::ADAMW);
        cfg.epochs = 30;
        cfg.lr = 0.5;
        cfg.early_stopping = Some(EarlyStopping {
            patience: 2,
            metric: StopMetric::ValLoss,
        });
        let (out, weights, saved) = run(&cfg, &data, None, None);
        let out = out.unwrap();
        assert!(out.stopped_early, "{:?}", out.history);
        let best = out.best_epoch.unwrap();
        assert_eq!(out.history.len(), best + 2);
        assert!(out.restored_best);
        let cp = Checkpoint::from_safetensors_bytes(&saved[best - 1]).unwrap();
        assert_eq!(cp.weights, weights);
    }

    #[test]
    fn schedules_follow_their_formulas() {
        let warm = |kind| LrSchedule {
            kind,
            warmup_epochs: 1,
        };
        let lr = |kind, step| lr_at(1.0, &warm(kind), step, 4, 3);
        assert_eq!(lr(ScheduleKind::Constant, 0), 0.25);
        assert_eq!(lr(ScheduleKind::Constant, 3), 1.0);
        assert_eq!(lr(ScheduleKind::Constant, 11), 1.0);
        assert!((lr(ScheduleKind::Cosine, 4) - 1.0).abs() < 1e-12);
        assert!((lr(ScheduleKind::Cosine, 8) - 0.5).abs() < 1e-12);
        let step = ScheduleKind::Step {
            step_size: 1,
            gamma: 0.1,
        };
        assert!((lr(step, 4) - 0.1).abs() < 1e-12);
        assert!((lr(step, 8) - 0.01).abs() < 1e-12);
    }

    #[test]
    fn after_step_keeps_masked_weights_at_zero() {
        let data = noisy_data(41, 5);
        for optimizer in [
            Optimizer::ADAMW,
            Optimizer::Sgd {
                momentum: 0.9,
                nesterov: false,
            },
        ] {
            let model = Model::init(&every_layer(), 5).unwrap();
            let before = model.export().unwrap();
            let fc1 = model
                .params()
                .iter()
                .position(|p| p.name() == "fc1.weight")
                .unwrap();
            // Keep every other element of fc1.weight at zero, as a pruning mask would.
            let mask: Vec<f32> = (0..48).map(|i| (i % 2) as f32).collect();
            let mask = Tensor::from_vec(mask, (8, 6), &candle_core::Device::Cpu).unwrap();
            let calls = std::cell::Cell::new(0usize);
            let zero_masked = |m: &dyn Network| -> Result<()> {
                calls.set(calls.get() + 1);
                let var = m.params()[fc1].var();
                var.set(&var.as_tensor().mul(&mask)?)?;
                Ok(())
            };
            zero_masked(&model).unwrap();
            calls.set(0);
            let cancel = AtomicBool::new(false);
            let ctx = Ctx::new(&|_, _| {}, &cancel);
            let mut cfg = config(optimizer);
            cfg.early_stopping = None;
            cfg.epochs = 2;
            let mut model = model;
            let hooks = TrainHooks {
                after_step: Some(&zero_masked),
                ..Default::default()
            };
            train(&mut model, &Subset::all(&data), None, &cfg, &ctx, hooks).unwrap();
            // 41 samples in batches of 8: 5 full batches + a skipped single, per epoch.
            assert_eq!(calls.get(), 10);
            let after = model.export().unwrap();
            let w = &after
                .iter()
                .find(|t| t.name == "fc1.weight")
                .unwrap()
                .values;
            let w0 = &before
                .iter()
                .find(|t| t.name == "fc1.weight")
                .unwrap()
                .values;
            for (i, (a, b)) in w.iter().zip(w0).enumerate() {
                if i % 2 == 0 {
                    assert_eq!(*a, 0.0, "{optimizer:?} element {i}");
                } else {
                    assert_ne!(a, b, "{optimizer:?} element {i} did not train");
                }
            }
            for (a, b) in after.iter().zip(&before) {
                if a.name.ends_with("weight") {
                    assert_ne!(a.values, b.values, "{} did not train", a.name);
                }
            }
        }
    }

    #[test]
    fn frozen_parameters_keep_their_bits_and_cancel_stops() {
        let data = noisy_data(20, 4);
        let mut model = Model::init(&every_layer(), 5).unwrap();
        model.freeze("c1.*");
        model.freeze("bn1.*");
        let before = model.export().unwrap();
        let cancel = AtomicBool::new(false);
        let ctx = Ctx::new(&|_, _| {}, &cancel);
        let mut cfg = config(Optimizer::Sgd {
            momentum: 0.0,
            nesterov: false,
        });
        cfg.early_stopping = None;
        cfg.epochs = 1;
        train(
            &mut model,
            &Subset::all(&data),
            None,
            &cfg,
            &ctx,
            TrainHooks::default(),
        )
        .unwrap();
        let after = model.export().unwrap();
        for (a, b) in after.iter().zip(&before) {
            let frozen = a.name.starts_with("c1.") || a.name.starts_with("bn1.");
            assert_eq!(a == b, frozen, "{}", a.name);
        }
        cancel.store(true, Ordering::Relaxed);
        let r = train(
            &mut model,
            &Subset::all(&data),
            None,
            &cfg,
            &ctx,
            TrainHooks::default(),
        );
        assert!(matches!(r, Err(Error::Cancelled)));
    }
}
