//! The `finetune` operation (API.md, "Operations"): transfer learning, or training from
//! scratch on a freshly initialised model.
//!
//! This module owns the training parameters every step that trains shares
//! ([`FinetuneParams`]: the job spec parses straight into them, with datasets named by id),
//! checks every one of them up front (naming the refused parameter), replaces the classifier
//! head through [`Network::with_head`], freezes parameters by pattern, and drives the one
//! training loop in [`crate::compress::engine::train`]. It does not persist checkpoints or
//! results.

use crate::compress::engine::augment::Augment;
use crate::compress::engine::data::{Dataset, Subset};
use crate::compress::engine::train::{
    self, EarlyStopping, EpochMetrics, LrSchedule, Optimizer, ScheduleKind, TrainConfig, TrainHooks,
};
use crate::compress::engine::{Network, Objective};
use crate::compress::formats::safetensors::NamedTensor;
use crate::compress::progress::Ctx;
use crate::compress::{Error, Result};

/// Where validation data comes from; `D` is how a dataset is named (a `&Dataset` when
/// running, an id in a job spec).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Validation<D> {
    /// No validation (no val metrics, no early stopping).
    None,
    /// A seeded random fraction of the training dataset, held out.
    Fraction(f64),
    /// A separate labelled dataset.
    Dataset(D),
}

impl<D> Validation<D> {
    /// The same choice with the dataset named another way.
    pub fn map<E>(&self, f: impl FnOnce(&D) -> E) -> Validation<E> {
        match self {
            Validation::None => Validation::None,
            Validation::Fraction(x) => Validation::Fraction(*x),
            Validation::Dataset(d) => Validation::Dataset(f(d)),
        }
    }
}

/// `head`: replace the named final linear layer with a fresh one of `num_classes` outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadParams {
    /// Name of a top-level linear layer (its `name`, or its index when unnamed).
    pub layer: String,
    /// New number of outputs (at least 1).
    pub num_classes: usize,
}

/// Everything a training step takes: the `finetune` op, and the training inside gradual
/// pruning, QAT and distillation. `D` names the datasets: ids in a job spec (which is parsed
/// straight into this type), `&Dataset` when running ([`FinetuneParams::with_data`]).
#[derive(Debug, Clone, PartialEq)]
pub struct FinetuneParams<D> {
    /// The labelled training dataset.
    pub dataset: D,
    /// Validation data.
    pub validation: Validation<D>,
    /// Epochs (at least 1).
    pub epochs: usize,
    /// Batch size (at least 1).
    pub batch_size: usize,
    /// Update rule.
    pub optimizer: Optimizer,
    /// Base learning rate, finite and non-negative.
    pub lr: f64,
    /// Weight decay (L2 for SGD, decoupled for AdamW), finite and non-negative.
    pub weight_decay: f64,
    /// Learning-rate schedule.
    pub lr_schedule: LrSchedule,
    /// Glob patterns of parameters kept fixed; each must match at least one.
    pub freeze: Vec<String>,
    /// Optional head replacement.
    pub head: Option<HeadParams>,
    /// `(pattern, multiplier)`: per-parameter learning-rate multipliers, first match wins.
    pub layer_lr: Vec<(String, f64)>,
    /// Optional early stopping (needs validation).
    pub early_stopping: Option<EarlyStopping>,
    /// Optional global gradient-norm clip (finite, positive).
    pub grad_clip: Option<f64>,
    /// Seed of the validation split, shuffles, dropout and the new head's initialisation
    /// (`None`: the job's seed, filled in by [`FinetuneParams::with_data`]).
    pub seed: Option<u64>,
    /// Augmentation of the training batches.
    pub augment: Option<Augment>,
    /// Batches per optimizer step (gradient accumulation; at least 1).
    pub accumulate: usize,
}

impl<D> FinetuneParams<D> {
    /// Defaults for everything but the dataset: 10 epochs of AdamW (lr 1e-3, weight
    /// decay 0.01) in batches of 64, constant schedule, 10% validation, the job's seed.
    pub fn new(dataset: D) -> FinetuneParams<D> {
        FinetuneParams {
            dataset,
            validation: Validation::Fraction(0.1),
            epochs: 10,
            batch_size: 64,
            optimizer: Optimizer::ADAMW,
            lr: 1e-3,
            weight_decay: 0.01,
            lr_schedule: LrSchedule {
                kind: ScheduleKind::Constant,
                warmup_epochs: 0,
            },
            freeze: Vec::new(),
            head: None,
            layer_lr: Vec::new(),
            early_stopping: None,
            grad_clip: None,
            seed: None,
            augment: None,
            accumulate: 1,
        }
    }

    /// These parameters over resolved datasets, the seed defaulting to `default_seed`.
    pub fn with_data<E>(
        &self,
        dataset: E,
        validation: Validation<E>,
        default_seed: u64,
    ) -> FinetuneParams<E> {
        FinetuneParams {
            dataset,
            validation,
            epochs: self.epochs,
            batch_size: self.batch_size,
            optimizer: self.optimizer,
            lr: self.lr,
            weight_decay: self.weight_decay,
            lr_schedule: self.lr_schedule,
            freeze: self.freeze.clone(),
            head: self.head.clone(),
            layer_lr: self.layer_lr.clone(),
            early_stopping: self.early_stopping,
            grad_clip: self.grad_clip,
            seed: Some(self.seed.unwrap_or(default_seed)),
            augment: self.augment,
            accumulate: self.accumulate,
        }
    }

    /// The seed in force (0 when none was given).
    pub fn seed(&self) -> u64 {
        self.seed.unwrap_or(0)
    }
}

/// What `finetune` produces.
#[derive(Debug, Clone, PartialEq)]
pub struct FinetuneOutput {
    /// The trained parameters and buffers, in architecture order.
    pub weights: Vec<NamedTensor>,
    /// The architecture document of the trained network (changed when the head was
    /// replaced): [`Network::describe`].
    pub architecture: serde_json::Value,
    /// Per-epoch metrics.
    pub history: Vec<EpochMetrics>,
    /// The epoch with the best validation figure, when validating.
    pub best_epoch: Option<usize>,
    /// Whether early stopping ended training early.
    pub stopped_early: bool,
    /// Whether the weights are the best epoch's (early stopping) rather than the last's.
    pub restored_best: bool,
    /// Number of trainable parameter elements.
    pub trainable_parameters: u64,
}

fn finite_non_negative(field: &str, name: &str, v: f64) -> Result<()> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("`{name}` must be a finite, non-negative number, got {v}"),
        ))
    }
}

/// Checks the parameters that do not depend on the model, and builds the loop's config.
pub(crate) fn train_config(p: &FinetuneParams<&Dataset>) -> Result<TrainConfig> {
    if p.epochs == 0 {
        return Err(Error::invalid("epochs", "`epochs` must be at least 1"));
    }
    if p.batch_size == 0 {
        return Err(Error::invalid(
            "batch_size",
            "`batch_size` must be at least 1",
        ));
    }
    finite_non_negative("optimizer.lr", "lr", p.lr)?;
    finite_non_negative("optimizer.weight_decay", "weight_decay", p.weight_decay)?;
    if let Optimizer::Sgd { momentum, nesterov } = p.optimizer {
        if !(momentum.is_finite() && (0.0..1.0).contains(&momentum)) {
            return Err(Error::invalid(
                "optimizer.momentum",
                format!("`momentum` must be in [0, 1), got {momentum}"),
            ));
        }
        if nesterov && momentum == 0.0 {
            return Err(Error::invalid(
                "optimizer.nesterov",
                "Nesterov momentum needs `momentum` > 0",
            ));
        }
    }
    let s = &p.lr_schedule;
    if let ScheduleKind::Step { step_size, gamma } = s.kind {
        if step_size == 0 {
            return Err(Error::invalid(
                "lr_schedule.step_size",
                "`step_size` must be at least 1 epoch",
            ));
        }
        if !(gamma.is_finite() && gamma > 0.0) {
            return Err(Error::invalid(
                "lr_schedule.gamma",
                format!("`gamma` must be a finite, positive number, got {gamma}"),
            ));
        }
    }
    if s.warmup_epochs > p.epochs {
        return Err(Error::invalid(
            "lr_schedule.warmup_epochs",
            format!(
                "`warmup_epochs` ({}) must not exceed `epochs` ({})",
                s.warmup_epochs, p.epochs
            ),
        ));
    }
    if let Some(c) = p.grad_clip {
        if !(c.is_finite() && c > 0.0) {
            return Err(Error::invalid(
                "grad_clip",
                format!("`grad_clip` must be a finite, positive number, got {c}"),
            ));
        }
    }
    for (pattern, m) in &p.layer_lr {
        if !(m.is_finite() && *m >= 0.0) {
            return Err(Error::invalid(
                format!("layer_lr[{pattern}]"),
                format!("the learning-rate multiplier must be finite and non-negative, got {m}"),
            ));
        }
    }
    let early_stopping = match p.early_stopping {
        None => None,
        Some(e) => {
            if e.patience == 0 {
                return Err(Error::invalid(
                    "early_stopping.patience",
                    "`patience` must be at least 1 epoch",
                ));
            }
            if matches!(p.validation, Validation::None) {
                return Err(Error::invalid(
                    "early_stopping",
                    "early stopping needs validation data (`validation`: a fraction or a dataset)",
                ));
            }
            Some(e)
        }
    };
    if let Some(a) = &p.augment {
        if p.dataset.is_text() {
            return Err(Error::invalid(
                "augment",
                "augmentation applies to image datasets, not text",
            ));
        }
        a.check(&p.dataset.feature_shape)?;
    }
    if p.accumulate == 0 {
        return Err(Error::invalid(
            "accumulate",
            "`accumulate` must be at least 1 batch",
        ));
    }
    Ok(TrainConfig {
        accumulate: p.accumulate,
        augment: p.augment,
        epochs: p.epochs,
        batch_size: p.batch_size,
        optimizer: p.optimizer,
        lr: p.lr,
        weight_decay: p.weight_decay,
        schedule: p.lr_schedule,
        grad_clip: p.grad_clip,
        early_stopping,
        lr_multipliers: p.layer_lr.clone(),
        seed: p.seed(),
    })
}

/// Runs the `finetune` operation on `model`. Every parameter is checked before any
/// training starts. `hooks` carries the per-epoch callback and an optional checkpoint
/// to resume from (its `loss` is normally left `None`: cross-entropy).
pub fn finetune(
    model: Box<dyn Network>,
    params: &FinetuneParams<&Dataset>,
    ctx: &Ctx<'_>,
    hooks: TrainHooks<'_>,
) -> Result<FinetuneOutput> {
    let config = train_config(params)?;
    let mut model = match &params.head {
        Some(head) => model.with_head(&head.layer, head.num_classes, params.seed())?,
        None => model,
    };
    model.output_width()?;
    // A classifier learns from labels; a language model from its text.
    let labels = model.objective() == Objective::Classification;
    model.check_dataset(params.dataset, labels)?;
    if let Validation::Dataset(v) = params.validation {
        model
            .check_dataset(v, labels)
            .map_err(|e| Error::DatasetMismatch(format!("validation dataset: {e}")))?;
    }
    for (i, pattern) in params.freeze.iter().enumerate() {
        if model.freeze(pattern) == 0 {
            return Err(Error::invalid(
                format!("freeze[{i}]"),
                format!(
                    "pattern {pattern:?} matches no parameter (the model has {})",
                    names_hint(model.as_ref())
                ),
            ));
        }
    }
    for (pattern, _) in &params.layer_lr {
        if !model
            .params()
            .iter()
            .any(|p| model.matches(pattern, p.name()))
        {
            return Err(Error::invalid(
                format!("layer_lr[{pattern}]"),
                format!(
                    "pattern {pattern:?} matches no parameter (the model has {})",
                    names_hint(model.as_ref())
                ),
            ));
        }
    }
    let trainable_parameters: u64 = model
        .params()
        .iter()
        .filter(|p| p.is_trainable())
        .map(|p| p.spec().numel() as u64)
        .sum();
    if trainable_parameters == 0 {
        return Err(Error::invalid(
            "freeze",
            "every parameter is frozen: nothing is left to train",
        ));
    }
    model.check_trainable()?;
    let (train_set, val_set) = match params.validation {
        Validation::None => (Subset::all(params.dataset), None),
        Validation::Fraction(f) => {
            let (t, v) = params
                .dataset
                .split(f, params.seed())
                .map_err(|e| Error::invalid("validation.fraction", e.to_string()))?;
            (t, Some(v))
        }
        Validation::Dataset(d) => (Subset::all(params.dataset), Some(Subset::all(d))),
    };
    let outcome = train::train(
        model.as_mut(),
        &train_set,
        val_set.as_ref(),
        &config,
        ctx,
        hooks,
    )?;
    Ok(FinetuneOutput {
        weights: model.export()?,
        architecture: model.describe(),
        history: outcome.history,
        best_epoch: outcome.best_epoch,
        stopped_early: outcome.stopped_early,
        restored_best: outcome.restored_best,
        trainable_parameters,
    })
}

/// "fc1.weight, fc1.bias, ... (6 tensors)" for error messages.
fn names_hint(model: &dyn Network) -> String {
    let names: Vec<&str> = model.params().iter().map(|p| p.name()).collect();
    let shown: Vec<&str> = names.iter().take(8).copied().collect();
    let more = if names.len() > 8 { ", ..." } else { "" };
    format!("{}{more}", shown.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::engine::data::DatasetX;
    use crate::compress::engine::evaluate::evaluate;
    use crate::compress::engine::sequential::arch::Architecture;
    use crate::compress::engine::sequential::model::Model;
    use crate::compress::engine::train::StopMetric;
    use serde_json::json;
    use std::sync::atomic::AtomicBool;

    /// The real sklearn digits set (1797 samples of 8×8, 0..16), scaled to [0, 1].
    fn digits() -> Dataset {
        let d = smartcore::dataset::digits::load_dataset();
        Dataset {
            x: DatasetX::F32(d.data.iter().map(|v| v / 16.0).collect()),
            feature_shape: vec![1, 8, 8],
            samples: d.num_samples,
            y: Some(d.target.iter().map(|&t| t as i64).collect()),
            num_classes: Some(10),
        }
    }

    fn mlp(classes: usize) -> Architecture {
        Architecture::from_json(&json!({"kind":"sequential","input_shape":[1,8,8],"layers":[
            {"type":"flatten"},
            {"type":"linear","name":"fc1","in_features":64,"out_features":64},
            {"type":"relu"},
            {"type":"linear","name":"fc2","in_features":64,"out_features":classes}]}))
        .unwrap()
    }

    fn quiet() -> AtomicBool {
        AtomicBool::new(false)
    }

    #[test]
    fn mlp_learns_real_digits() {
        let data = digits();
        assert_eq!(data.samples, 1797);
        let mut p = FinetuneParams::new(&data);
        p.validation = Validation::Fraction(0.2);
        p.epochs = 10;
        p.batch_size = 32;
        p.lr = 1e-2;
        p.lr_schedule.kind = ScheduleKind::Cosine;
        p.seed = Some(1);
        let cancel = quiet();
        let ctx = Ctx::new(&|_, _| {}, &cancel);
        let model = Model::init(&mlp(10), 1).unwrap();
        let out = finetune(Box::new(model), &p, &ctx, TrainHooks::default()).unwrap();
        let last = out.history.last().unwrap();
        assert!(last.val_accuracy.unwrap() >= 0.95, "{:?}", out.history);
        assert!(last.train_loss < out.history[0].train_loss);
        assert_eq!(out.history.len(), 10);
        assert!(out.best_epoch.is_some());
        // The exported weights reproduce the reported validation accuracy.
        let trained = Model::described(&out.architecture, out.weights).unwrap();
        let (_, val) = data.split(0.2, 1).unwrap();
        let e = evaluate(&trained, &val, None, 100, &ctx).unwrap();
        assert!((e.accuracy.unwrap() - last.val_accuracy.unwrap()).abs() < 1e-12);
        assert!(e.top5_accuracy.unwrap() >= e.accuracy.unwrap());
    }

    #[test]
    fn transfer_trains_only_the_new_head() {
        // Pre-train on digits 0-4, then move to 5-9 with frozen features and a new head.
        let all = digits();
        let pick = |lo: i64| {
            let y = all.y.as_ref().unwrap();
            let idx: Vec<usize> = (0..all.samples)
                .filter(|&i| (lo..lo + 5).contains(&y[i]))
                .collect();
            let DatasetX::F32(x) = &all.x else {
                unreachable!()
            };
            Dataset {
                x: DatasetX::F32(
                    idx.iter()
                        .flat_map(|&i| x[i * 64..(i + 1) * 64].to_vec())
                        .collect(),
                ),
                feature_shape: vec![1, 8, 8],
                samples: idx.len(),
                y: Some(idx.iter().map(|&i| y[i] - lo).collect()),
                num_classes: Some(5),
            }
        };
        let (low, high) = (pick(0), pick(5));
        let cancel = quiet();
        let ctx = Ctx::new(&|_, _| {}, &cancel);
        let mut p = FinetuneParams::new(&low);
        p.epochs = 10;
        p.lr = 1e-2;
        let pre = finetune(
            Box::new(Model::init(&mlp(5), 2).unwrap()),
            &p,
            &ctx,
            TrainHooks::default(),
        )
        .unwrap();
        let base = Model::described(&pre.architecture, pre.weights.clone()).unwrap();

        let mut p = FinetuneParams::new(&high);
        p.epochs = 15;
        p.lr = 2e-2;
        p.freeze = vec!["fc1.*".into()];
        p.head = Some(HeadParams {
            layer: "fc2".into(),
            num_classes: 7,
        });
        let out = finetune(Box::new(base), &p, &ctx, TrainHooks::default()).unwrap();
        assert_eq!(
            Architecture::from_json(&out.architecture)
                .unwrap()
                .output_shape(),
            &[7]
        );
        assert_eq!(out.trainable_parameters, 64 * 7 + 7);
        for t in &out.weights {
            let before = pre.weights.iter().find(|w| w.name == t.name).unwrap();
            if t.name.starts_with("fc1.") {
                assert_eq!(t, before, "{} changed", t.name);
            } else {
                assert_eq!(t.shape[0], 7);
            }
        }
        let last = out.history.last().unwrap();
        assert!(last.val_accuracy.unwrap() > 0.8, "{:?}", out.history);
    }

    fn tiny() -> Dataset {
        Dataset {
            x: DatasetX::F32((0..40 * 64).map(|i| (i % 7) as f32 / 7.0).collect()),
            feature_shape: vec![64],
            samples: 40,
            y: Some((0..40).map(|i| i % 3).collect()),
            num_classes: Some(3),
        }
    }

    fn refusal(p: &FinetuneParams<&Dataset>, arch: &Architecture) -> Error {
        let cancel = quiet();
        let ctx = Ctx::new(&|_, _| {}, &cancel);
        finetune(
            Box::new(Model::init(arch, 0).unwrap()),
            p,
            &ctx,
            TrainHooks::default(),
        )
        .unwrap_err()
    }

    #[test]
    fn refusals_are_precise() {
        let data = tiny();
        let arch = mlp(10);
        let base = FinetuneParams::new(&data);
        let pointer = |e: Error| {
            (
                e.code().as_str(),
                e.field().unwrap_or_default().to_string(),
                e.to_string(),
            )
        };

        for lr in [-1.0, f64::NAN, f64::INFINITY] {
            let mut p = base.clone();
            p.lr = lr;
            let (code, ptr, msg) = pointer(refusal(&p, &arch));
            assert_eq!(
                (code, ptr.as_str()),
                ("validation_failed", "optimizer.lr"),
                "{msg}"
            );
        }
        let mut p = base.clone();
        p.freeze = vec!["fc1.*".into(), "conv*".into()];
        let (_, ptr, msg) = pointer(refusal(&p, &arch));
        assert_eq!(ptr, "freeze[1]");
        assert!(
            msg.contains("\"conv*\" matches no parameter") && msg.contains("fc1.weight"),
            "{msg}"
        );
        let mut p = base.clone();
        p.freeze = vec!["*".into()];
        assert_eq!(pointer(refusal(&p, &arch)).1, "freeze");
        let mut p = base.clone();
        p.layer_lr = vec![("fc9.*".into(), 0.1)];
        assert_eq!(pointer(refusal(&p, &arch)).1, "layer_lr[fc9.*]");
        let mut p = base.clone();
        p.early_stopping = Some(EarlyStopping {
            patience: 2,
            metric: StopMetric::ValLoss,
        });
        p.validation = Validation::None;
        assert_eq!(pointer(refusal(&p, &arch)).1, "early_stopping");
        let mut p = base.clone();
        p.epochs = 0;
        assert_eq!(pointer(refusal(&p, &arch)).1, "epochs");
        let mut p = base.clone();
        p.lr_schedule.kind = ScheduleKind::Step {
            step_size: 0,
            gamma: 0.1,
        };
        assert_eq!(pointer(refusal(&p, &arch)).1, "lr_schedule.step_size");
        let mut p = base.clone();
        p.validation = Validation::Fraction(1.5);
        assert_eq!(pointer(refusal(&p, &arch)).1, "validation.fraction");

        // Head: unknown layer, not linear, not final.
        let mut p = base.clone();
        p.head = Some(HeadParams {
            layer: "fc3".into(),
            num_classes: 3,
        });
        assert_eq!(pointer(refusal(&p, &arch)).1, "head.layer");
        p.head = Some(HeadParams {
            layer: "2".into(),
            num_classes: 3,
        });
        assert!(pointer(refusal(&p, &arch)).2.contains("is a relu"));
        p.head = Some(HeadParams {
            layer: "fc1".into(),
            num_classes: 3,
        });
        assert!(pointer(refusal(&p, &arch))
            .2
            .contains("not the final classifier"));

        // Labels beyond the (new) head; features that do not fit the input.
        let mut p = base.clone();
        p.head = Some(HeadParams {
            layer: "fc2".into(),
            num_classes: 2,
        });
        let e = refusal(&p, &arch);
        assert_eq!(e.code().as_str(), "dataset_mismatch");
        assert!(e.to_string().contains("labels up to 2"), "{e}");
        let wide = Dataset {
            x: DatasetX::F32(vec![0.0; 40 * 65]),
            feature_shape: vec![65],
            ..tiny()
        };
        let e = refusal(&FinetuneParams::new(&wide), &arch);
        assert_eq!(e.code().as_str(), "dataset_mismatch");
        assert!(e.to_string().contains("[1, 8, 8]"), "{e}");

        // Overlapping pooling cannot be trained.
        let pooled =
            Architecture::from_json(&json!({"kind":"sequential","input_shape":[1,8,8],"layers":[
            {"type":"max_pool2d","kernel_size":3,"stride":1},{"type":"flatten"},
            {"type":"linear","in_features":36,"out_features":3}]}))
            .unwrap();
        assert_eq!(
            refusal(&base, &pooled).code().as_str(),
            "unsupported_operation"
        );
    }

    #[test]
    fn divergence_is_a_clear_error() {
        let data = Dataset {
            x: DatasetX::F32(vec![1e30; 40 * 64]),
            ..tiny()
        };
        let mut p = FinetuneParams::new(&data);
        p.optimizer = Optimizer::Sgd {
            momentum: 0.0,
            nesterov: false,
        };
        p.lr = 1e30;
        let e = refusal(&p, &mlp(3));
        assert_eq!(e.code().as_str(), "non_finite_loss");
        assert!(matches!(e, Error::NonFiniteLoss { .. }), "{e}");
    }

    /// Labelled sentences: three classes a tiny encoder can tell apart by their words.
    fn labelled_text() -> Dataset {
        let mut lines = String::new();
        let topics = [
            [
                "the cat sat on the mat",
                "a dog ran to the door",
                "the cat and the dog",
            ],
            [
                "tea with milk and sugar",
                "bread and milk for tea",
                "sugar in the tea",
            ],
            [
                "rain fell all night",
                "the wind and the rain",
                "a cold night of rain",
            ],
        ];
        for (label, docs) in topics.iter().enumerate() {
            for d in docs {
                lines.push_str(&format!("{{\"text\": \"{d}\", \"label\": {label}}}\n"));
            }
        }
        Dataset::from_jsonl(lines.as_bytes()).unwrap()
    }

    #[test]
    fn a_bert_encoder_learns_a_new_classifier_end_to_end() {
        use crate::compress::engine::transformer::fixtures::network;
        let data = labelled_text();
        let mut p = FinetuneParams::new(&data);
        p.validation = Validation::None;
        p.epochs = 20;
        p.batch_size = 3;
        p.lr = 3e-3;
        p.head = Some(HeadParams {
            layer: "classifier".into(),
            num_classes: 3,
        });
        // Patterns name the tensors as uploaded, before the head adds `bert.`.
        p.freeze = vec!["embeddings.word_embeddings.*".into()];
        p.grad_clip = Some(1.0);
        p.seed = Some(3);
        let cancel = quiet();
        let ctx = Ctx::new(&|_, _| {}, &cancel);
        let base = network("tiny-bert");
        let before = base.export().unwrap();
        let out = finetune(base, &p, &ctx, TrainHooks::default()).unwrap();
        let first = &out.history[0];
        let last = out.history.last().unwrap();
        assert!(
            last.train_loss < 0.5 * first.train_loss,
            "{:?}",
            out.history
        );
        assert_eq!(
            out.architecture["architectures"][0],
            "BertForSequenceClassification"
        );
        let value =
            |w: &[NamedTensor], n: &str| w.iter().find(|t| t.name == n).map(|t| t.values.clone());
        // The frozen embeddings keep their bits; the others moved.
        assert_eq!(
            value(&out.weights, "bert.embeddings.word_embeddings.weight"),
            value(&before, "embeddings.word_embeddings.weight")
        );
        assert_ne!(
            value(
                &out.weights,
                "bert.encoder.layer.0.attention.self.query.weight"
            ),
            value(&before, "encoder.layer.0.attention.self.query.weight")
        );
        // The trained classifier, reloaded, classifies every sentence right.
        let trained = network("tiny-bert")
            .with_head("classifier", 3, 0)
            .unwrap()
            .with_weights(out.weights)
            .unwrap();
        let e = evaluate(trained.as_ref(), &Subset::all(&data), None, 4, &ctx).unwrap();
        assert_eq!(e.accuracy, Some(1.0));
    }

    /// A bert classifier with a new head, killed after its first epoch and resumed from the
    /// checkpoint (through the serialised bytes a job stores), ends bit for bit where an
    /// uninterrupted run ends: the head drawn again on resume is overwritten by the saved one.
    #[test]
    fn a_killed_transformer_run_resumes_to_the_same_bits() {
        use crate::compress::engine::train::Checkpoint;
        use crate::compress::engine::transformer::fixtures::network;
        use std::sync::atomic::Ordering;
        let data = labelled_text();
        let mut p = FinetuneParams::new(&data);
        p.validation = Validation::Dataset(&data);
        p.epochs = 3;
        p.batch_size = 4;
        p.lr = 3e-3;
        p.head = Some(HeadParams {
            layer: "classifier".into(),
            num_classes: 3,
        });
        p.seed = Some(9);
        let run = |resume: Option<Checkpoint>, kill_after: Option<usize>| {
            let cancel = quiet();
            let ctx = Ctx::new(&|_, _| {}, &cancel);
            let mut saved = Vec::new();
            let mut on_epoch = |m: &EpochMetrics, cp: &Checkpoint| -> Result<()> {
                saved.push(cp.to_safetensors_bytes()?);
                if Some(m.epoch) == kill_after {
                    cancel.store(true, Ordering::Relaxed);
                }
                Ok(())
            };
            let hooks = TrainHooks {
                on_epoch: Some(&mut on_epoch),
                resume,
                ..Default::default()
            };
            let out = finetune(network("tiny-bert"), &p, &ctx, hooks);
            (out, saved)
        };
        let (full, _) = run(None, None);
        let full = full.unwrap();
        let (killed, saved) = run(None, Some(1));
        assert!(matches!(killed, Err(Error::Cancelled)), "{killed:?}");
        let cp = Checkpoint::from_safetensors_bytes(&saved[0]).unwrap();
        assert_eq!(cp.epoch, 1);
        let (resumed, _) = run(Some(cp), None);
        let resumed = resumed.unwrap();
        assert_eq!(resumed.weights, full.weights);
        assert_eq!(resumed.history.len(), 3);
        assert_eq!(resumed.history[2].val_loss, full.history[2].val_loss);
    }

    #[test]
    fn a_llama_model_learns_its_text_with_the_language_model_loss() {
        use crate::compress::engine::lm::lm_loss_and_accuracy;
        use crate::compress::engine::transformer::fixtures::network;
        let data = Dataset::from_text(
            b"the cat sat on the mat.\n\nthe cat sat on the mat again.\n\nthe mat sat on the cat.",
        )
        .unwrap();
        let mut p = FinetuneParams::new(&data);
        p.validation = Validation::Dataset(&data);
        p.epochs = 8;
        p.batch_size = 2;
        p.lr = 1e-2;
        p.seed = Some(1);
        let cancel = quiet();
        let ctx = Ctx::new(&|_, _| {}, &cancel);
        let base = network("tiny-llama");
        let (loss0, _) = lm_loss_and_accuracy(base.as_ref(), &Subset::all(&data), 8, &ctx).unwrap();
        let out = finetune(base, &p, &ctx, TrainHooks::default()).unwrap();
        let last = out.history.last().unwrap();
        assert!(
            last.val_loss.unwrap() < 0.5 * loss0,
            "{loss0} {:?}",
            out.history
        );
        assert!(last.val_accuracy.unwrap() > 0.5, "{:?}", out.history);
        assert_eq!(last.train_accuracy, None);
        // Labels are not needed, and a head is refused.
        p.head = Some(HeadParams {
            layer: "lm_head".into(),
            num_classes: 2,
        });
        let e = finetune(network("tiny-llama"), &p, &ctx, TrainHooks::default()).unwrap_err();
        assert_eq!(e.code().as_str(), "unsupported_operation", "{e}");
    }
}
