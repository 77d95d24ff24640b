//! Specs of the operations that run the network: `finetune`, `evaluate`, and the job-level
//! `eval`. Checked against the model's architecture and the datasets' shapes when known.

use serde_json::{json, Map, Value};

use super::fields::{bool_or, choice, deny_unknown, escape, f64_in, object, usize_in};
use super::{patterns, Facts, FieldError, TransformerFacts};
use crate::codes::Code;
use crate::compress::engine::augment::Augment;
use crate::compress::engine::finetune::{FinetuneParams, HeadParams, Validation};
use crate::compress::engine::text_eval::TextEvalParams;
use crate::compress::engine::train::{
    EarlyStopping, LrSchedule, Optimizer, ScheduleKind, StopMetric,
};
use crate::compress::select::glob_match;
use crate::ids::DatasetId;

/// `{"dataset_id", "batch_size", "max_tokens", "context", "stride", "save_outputs"}`:
/// evaluation on a labelled dataset (sequential models) or on text (transformers).
#[derive(Debug, Clone, PartialEq)]
pub struct EvalSpec {
    /// The dataset.
    pub dataset_id: DatasetId,
    /// Samples (documents) per forward pass.
    pub batch_size: usize,
    /// Transformers: how text is read (`None` for sequential models).
    pub text: Option<TextEvalParams>,
}

/// Defaults of a text evaluation (API.md "Evaluation of transformers").
pub mod text_defaults {
    /// Tokens scored at most.
    pub const MAX_TOKENS: usize = 65_536;
    /// Window length (capped at the model's `max_position_embeddings`).
    pub const CONTEXT: usize = 512;
    /// Largest `max_tokens` accepted.
    pub const MAX_TOKENS_LIMIT: usize = 1 << 24;
}

impl EvalSpec {
    /// Normalised JSON.
    pub fn to_json(&self) -> Value {
        let mut v =
            json!({"dataset_id": self.dataset_id.to_string(), "batch_size": self.batch_size});
        if let Some(t) = &self.text {
            v["max_tokens"] = json!(t.max_tokens);
            v["context"] = json!(t.context);
            v["stride"] = json!(t.stride);
            v["save_outputs"] = json!(t.save_outputs);
        }
        v
    }
}

/// `finetune`: train (all or part of) the network on a labelled dataset. The engine's own
/// parameters, with datasets named by id.
pub type FinetuneSpec = FinetuneParams<DatasetId>;

impl FinetuneParams<DatasetId> {
    /// Normalised JSON (defaults filled in).
    pub fn to_json(&self) -> Value {
        let optimizer = match self.optimizer {
            Optimizer::AdamW { .. } => {
                json!({"name": "adamw", "lr": self.lr, "weight_decay": self.weight_decay})
            }
            Optimizer::Sgd { momentum, nesterov } => json!({
                "name": "sgd", "lr": self.lr, "momentum": momentum,
                "weight_decay": self.weight_decay, "nesterov": nesterov}),
        };
        let mut schedule = match self.lr_schedule.kind {
            ScheduleKind::Constant => json!({"kind": "constant"}),
            ScheduleKind::Cosine => json!({"kind": "cosine"}),
            ScheduleKind::Step { step_size, gamma } => {
                json!({"kind": "step", "step_size": step_size, "gamma": gamma})
            }
        };
        schedule["warmup_epochs"] = json!(self.lr_schedule.warmup_epochs);
        let mut v = json!({
            "op": "finetune",
            "dataset_id": self.dataset.to_string(),
            "validation": match &self.validation {
                Validation::None => Value::Null,
                Validation::Fraction(f) => json!({"fraction": f}),
                Validation::Dataset(d) => json!({"dataset_id": d.to_string()}),
            },
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "optimizer": optimizer,
            "lr_schedule": schedule,
            "freeze": self.freeze,
            "head": self.head.as_ref().map(|h| json!({"layer": h.layer, "num_classes": h.num_classes})),
            "layer_lr": self.layer_lr.iter().map(|(p, m)| (p.clone(), json!(m))).collect::<Map<String, Value>>(),
            "early_stopping": self.early_stopping.as_ref().map(|e| json!({"patience": e.patience, "metric": e.metric.as_str()})),
            "grad_clip": self.grad_clip,
            "seed": self.seed,
        });
        if let Some(a) = &self.augment {
            v["augment"] = json!({"translate": a.translate});
        }
        // Written only when set, so that specs without it normalise as before.
        if self.accumulate > 1 {
            v["accumulate"] = json!(self.accumulate);
        }
        v
    }
}

/// Parse an evaluation (`dataset_id`, `batch_size`, and for transformers `max_tokens`,
/// `context`, `stride`, `save_outputs`) at `pointer` (the job's `eval` or an `evaluate` step).
pub fn parse_eval(
    obj: &Map<String, Value>,
    pointer: &str,
    allowed_extra: &[&str],
    facts: Option<&Facts>,
    errors: &mut Vec<FieldError>,
) -> Option<EvalSpec> {
    const TEXT_FIELDS: [&str; 4] = ["max_tokens", "context", "stride", "save_outputs"];
    let mut allowed = vec!["dataset_id", "batch_size"];
    allowed.extend_from_slice(&TEXT_FIELDS);
    allowed.extend_from_slice(allowed_extra);
    deny_unknown(obj, &allowed, pointer, errors);
    let transformer = facts.and_then(|f| f.transformer.as_ref());
    let default_batch = if transformer.is_some() { 8 } else { 256 };
    let batch_size =
        usize_in(obj, "batch_size", (1, 65_536), pointer, errors).unwrap_or(default_batch);
    let dataset_id = dataset_ref(obj, pointer, facts, errors)?;
    let dataset_pointer = format!("{pointer}/dataset_id");
    // Without facts (a stored, normalised spec read back) the text fields say it.
    let reads_text = match facts {
        Some(f) => f.transformer.is_some(),
        None => TEXT_FIELDS.iter().any(|k| obj.contains_key(*k)),
    };
    let text = if reads_text {
        if let (Some(f), Some(t)) = (facts, transformer) {
            check_text_dataset(f, t, &dataset_id, false, &dataset_pointer, errors);
        }
        let max_positions = transformer.map_or(usize::MAX, |t| t.max_positions.max(2));
        let max_tokens = usize_in(
            obj,
            "max_tokens",
            (1, text_defaults::MAX_TOKENS_LIMIT),
            pointer,
            errors,
        )
        .unwrap_or(text_defaults::MAX_TOKENS);
        let context = match usize_in(obj, "context", (2, 1 << 20), pointer, errors) {
            Some(c) if c > max_positions => {
                errors.push(FieldError::new(
                    format!("{pointer}/context"),
                    format!(
                        "{c} tokens is more than the model's max_position_embeddings ({max_positions})"
                    ),
                ));
                c
            }
            Some(c) => c,
            None => text_defaults::CONTEXT.min(max_positions),
        };
        let stride = match usize_in(obj, "stride", (1, 1 << 20), pointer, errors) {
            Some(s) if s > context => {
                errors.push(FieldError::new(
                    format!("{pointer}/stride"),
                    format!("{s} is more than the context ({context}): tokens between windows would never be scored"),
                ));
                s
            }
            Some(s) => s,
            None => context,
        };
        let save_outputs = bool_or(obj, "save_outputs", false, pointer, errors);
        Some(TextEvalParams {
            max_tokens,
            context,
            stride,
            save_outputs,
        })
    } else {
        if let Some(f) = facts {
            for field in TEXT_FIELDS {
                if obj.contains_key(field) {
                    errors.push(FieldError::new(
                        format!("{pointer}/{field}"),
                        "applies to transformer (bert, llama) models reading text; this model is a sequential network",
                    ));
                }
            }
            check_dataset_fits(f, &dataset_id, None, true, &dataset_pointer, errors);
        }
        None
    };
    Some(EvalSpec {
        dataset_id,
        batch_size,
        text,
    })
}

/// A transformer reads a text dataset with its tokenizer; labels, when `labels_required`,
/// fit its classification head.
pub(super) fn check_text_dataset(
    f: &Facts,
    t: &TransformerFacts,
    id: &DatasetId,
    labels_required: bool,
    pointer: &str,
    errors: &mut Vec<FieldError>,
) {
    let Some(d) = f.datasets.get(id) else {
        return;
    };
    let family = t.family.as_str();
    if !d.text {
        errors.push(FieldError {
            code: Code::DatasetShapeMismatch,
            ..FieldError::new(
                pointer,
                format!(
                    "a {family} model reads text: upload the dataset with format `text` or `jsonl`"
                ),
            )
        });
        return;
    }
    if !t.has_tokenizer {
        errors.push(FieldError {
            code: Code::TokenizerRequired,
            ..FieldError::new(
                pointer,
                "the model folder has no tokenizer.json to read text with: upload the folder with it",
            )
        });
    }
    if labels_required && d.num_classes.is_none() {
        errors.push(FieldError {
            code: Code::DatasetUnlabeled,
            ..FieldError::new(
                pointer,
                "this dataset has no labels; this operation needs them",
            )
        });
    }
    if let (Some(n), Some(c)) = (d.num_classes, t.classes) {
        if n > c {
            errors.push(FieldError {
                code: Code::LabelsOutOfRange,
                ..FieldError::new(
                    pointer,
                    format!(
                        "labels go up to {} but the classifier has {c} classes",
                        n - 1
                    ),
                )
            });
        }
    }
}

/// What a training spec may hold where it is embedded (a `finetune` step, a pruning
/// schedule's retraining, distillation, QAT).
#[derive(Debug, Clone, Copy)]
pub struct TrainingRules<'a> {
    /// Fields of the enclosing object that are not training parameters.
    pub extra_fields: &'a [&'a str],
    /// Whether the dataset must be labelled.
    pub labels_required: bool,
    /// Whether `freeze`, `head` and `layer_lr` apply.
    pub layer_options: bool,
    /// Whether transformers (bert, llama folder models) may be trained here.
    pub transformers: bool,
}

impl TrainingRules<'_> {
    /// A `finetune` step.
    pub const FINETUNE: TrainingRules<'static> = TrainingRules {
        extra_fields: &["op"],
        labels_required: true,
        layer_options: true,
        transformers: true,
    };
}

/// Parse a `finetune` step at `pointer`; `job_seed` is the default seed.
pub fn parse_finetune(
    obj: &Map<String, Value>,
    pointer: &str,
    facts: Option<&Facts>,
    errors: &mut Vec<FieldError>,
) -> Option<FinetuneSpec> {
    parse_training(obj, pointer, facts, TrainingRules::FINETUNE, errors)
}

/// Parse training parameters at `pointer` under `rules`.
pub fn parse_training(
    obj: &Map<String, Value>,
    pointer: &str,
    facts: Option<&Facts>,
    rules: TrainingRules<'_>,
    errors: &mut Vec<FieldError>,
) -> Option<FinetuneSpec> {
    let before = errors.len();
    let mut allowed = vec![
        "dataset_id",
        "validation",
        "epochs",
        "batch_size",
        "optimizer",
        "lr_schedule",
        "early_stopping",
        "grad_clip",
        "seed",
        "augment",
        "accumulate",
    ];
    if rules.layer_options {
        allowed.extend(["freeze", "head", "layer_lr"]);
    }
    allowed.extend_from_slice(rules.extra_fields);
    deny_unknown(obj, &allowed, pointer, errors);
    let dataset_id = dataset_ref(obj, pointer, facts, errors);
    let epochs = usize_in(obj, "epochs", (1, 10_000), pointer, errors).unwrap_or(5);
    let batch_size = usize_in(obj, "batch_size", (1, 65_536), pointer, errors).unwrap_or(64);
    let validation = match object(obj, "validation", pointer, errors) {
        None => Validation::None,
        Some(v) => {
            let vp = format!("{pointer}/validation");
            deny_unknown(v, &["fraction", "dataset_id"], &vp, errors);
            match (v.get("fraction"), v.get("dataset_id")) {
                (Some(_), None) => f64_in(v, "fraction", (1e-6, 0.9), &vp, errors)
                    .map_or(Validation::None, Validation::Fraction),
                (None, Some(_)) => {
                    dataset_ref(v, &vp, facts, errors).map_or(Validation::None, Validation::Dataset)
                }
                _ => {
                    errors.push(FieldError::new(
                        vp,
                        "give exactly one of `fraction` or `dataset_id`",
                    ));
                    Validation::None
                }
            }
        }
    };
    let (optimizer, lr, weight_decay) = match object(obj, "optimizer", pointer, errors) {
        None => (Optimizer::ADAMW, 1e-3, 0.01),
        Some(o) => {
            let op = format!("{pointer}/optimizer");
            deny_unknown(
                o,
                &["name", "lr", "weight_decay", "momentum", "nesterov"],
                &op,
                errors,
            );
            let name = choice(o, "name", &["adamw", "sgd"], &op, errors).unwrap_or("adamw");
            let lr = f64_in(o, "lr", (0.0, 10.0), &op, errors);
            if lr == Some(0.0) {
                errors.push(FieldError::new(format!("{op}/lr"), "must be positive"));
            }
            let weight_decay = f64_in(o, "weight_decay", (0.0, 1.0), &op, errors);
            match name {
                "sgd" => {
                    let momentum = f64_in(o, "momentum", (0.0, 0.999), &op, errors).unwrap_or(0.9);
                    let nesterov = bool_or(o, "nesterov", false, &op, errors);
                    (
                        Optimizer::Sgd { momentum, nesterov },
                        lr.unwrap_or(0.01),
                        weight_decay.unwrap_or(0.0),
                    )
                }
                _ => {
                    if o.contains_key("momentum") || o.contains_key("nesterov") {
                        errors.push(FieldError::new(
                            format!("{op}/momentum"),
                            "momentum applies to `sgd` only",
                        ));
                    }
                    (
                        Optimizer::ADAMW,
                        lr.unwrap_or(1e-3),
                        weight_decay.unwrap_or(0.01),
                    )
                }
            }
        }
    };
    let mut warmup_epochs = 0;
    let kind = match object(obj, "lr_schedule", pointer, errors) {
        None => ScheduleKind::Constant,
        Some(s) => {
            let sp = format!("{pointer}/lr_schedule");
            deny_unknown(
                s,
                &["kind", "step_size", "gamma", "warmup_epochs"],
                &sp,
                errors,
            );
            warmup_epochs = usize_in(s, "warmup_epochs", (0, 10_000), &sp, errors).unwrap_or(0);
            if warmup_epochs >= epochs {
                errors.push(FieldError::new(
                    format!("{sp}/warmup_epochs"),
                    "must be smaller than `epochs`",
                ));
            }
            match choice(s, "kind", &["constant", "cosine", "step"], &sp, errors)
                .unwrap_or("constant")
            {
                "cosine" => ScheduleKind::Cosine,
                "step" => ScheduleKind::Step {
                    step_size: usize_in(s, "step_size", (1, 10_000), &sp, errors).unwrap_or(1),
                    gamma: f64_in(s, "gamma", (1e-6, 1.0), &sp, errors).unwrap_or(0.1),
                },
                _ => ScheduleKind::Constant,
            }
        }
    };
    let lr_schedule = LrSchedule {
        kind,
        warmup_epochs,
    };
    let freeze = patterns(obj.get("freeze"), &format!("{pointer}/freeze"), errors);
    let head = object(obj, "head", pointer, errors).and_then(|h| {
        let hp = format!("{pointer}/head");
        deny_unknown(h, &["layer", "num_classes"], &hp, errors);
        let transformer = facts.is_some_and(|f| f.transformer.is_some());
        let layer = match h.get("layer").and_then(Value::as_str) {
            Some(l) if !l.is_empty() => Some(l.to_string()),
            // A bert classifier's head has one place.
            None if transformer => Some("classifier".to_string()),
            _ => {
                errors.push(FieldError::new(
                    format!("{hp}/layer"),
                    "is required: the name of the linear layer to replace",
                ));
                None
            }
        };
        let num_classes = usize_in(h, "num_classes", (1, 1_000_000), &hp, errors);
        if num_classes.is_none() && !h.contains_key("num_classes") {
            errors.push(FieldError::new(format!("{hp}/num_classes"), "is required"));
        }
        Some(HeadParams {
            layer: layer?,
            num_classes: num_classes?,
        })
    });
    let layer_lr = match object(obj, "layer_lr", pointer, errors) {
        None => Vec::new(),
        Some(m) => m
            .iter()
            .filter_map(|(k, v)| match v.as_f64() {
                Some(x) if x.is_finite() && (0.0..=1000.0).contains(&x) => Some((k.clone(), x)),
                _ => {
                    errors.push(FieldError::new(
                        format!("{pointer}/layer_lr/{}", escape(k)),
                        "must be a multiplier in [0, 1000]",
                    ));
                    None
                }
            })
            .collect(),
    };
    let early_stopping = object(obj, "early_stopping", pointer, errors).map(|e| {
        let ep = format!("{pointer}/early_stopping");
        deny_unknown(e, &["patience", "metric"], &ep, errors);
        EarlyStopping {
            patience: usize_in(e, "patience", (1, 10_000), &ep, errors).unwrap_or(3),
            metric: match choice(e, "metric", &["val_loss", "val_accuracy"], &ep, errors) {
                Some("val_accuracy") => StopMetric::ValAccuracy,
                _ => StopMetric::ValLoss,
            },
        }
    });
    if early_stopping.is_some() && validation == Validation::None {
        errors.push(FieldError::new(
            format!("{pointer}/early_stopping"),
            "needs `validation` (a fraction or a dataset)",
        ));
    }
    let grad_clip = f64_in(obj, "grad_clip", (1e-9, 1e9), pointer, errors);
    let accumulate = usize_in(obj, "accumulate", (1, 4096), pointer, errors).unwrap_or(1);
    let seed = super::fields::seed(obj, pointer, errors);
    let augment = object(obj, "augment", pointer, errors).map(|a| {
        let ap = format!("{pointer}/augment");
        deny_unknown(a, &["translate"], &ap, errors);
        let augment = Augment {
            translate: usize_in(a, "translate", (0, 64), &ap, errors).unwrap_or(0),
        };
        let shape = facts.and_then(|f| {
            let d = dataset_id.as_ref()?;
            f.datasets.get(d)
        });
        if let Some(d) = shape {
            let refused = if d.text {
                Some("augmentation applies to image datasets, not text".to_string())
            } else {
                augment.check(&d.feature_shape).err().map(|e| e.to_string())
            };
            if let Some(why) = refused {
                errors.push(FieldError::new(format!("{ap}/translate"), why));
            }
        }
        augment
    });

    if let (Some(f), Some(d), Some(t)) = (
        facts,
        &dataset_id,
        facts
            .and_then(|f| f.transformer.as_ref())
            .filter(|_| rules.transformers),
    ) {
        if rules.layer_options {
            check_transformer_training(
                f,
                t,
                &TransformerTraining {
                    dataset: d,
                    validation: &validation,
                    head: head.as_ref(),
                    freeze: &freeze,
                    layer_lr: &layer_lr,
                },
                pointer,
                errors,
            );
        } else {
            // Distillation: text the teacher reads; labels only for a classifier's hard loss.
            let labels = rules.labels_required
                && t.family == crate::compress::engine::Family::Bert
                && t.classes.is_some();
            check_text_dataset(f, t, d, labels, &format!("{pointer}/dataset_id"), errors);
            if let Validation::Dataset(v) = &validation {
                check_text_dataset(
                    f,
                    t,
                    v,
                    labels,
                    &format!("{pointer}/validation/dataset_id"),
                    errors,
                );
            }
        }
    } else if let (Some(f), Some(d)) = (facts, &dataset_id) {
        let arch_ok = require_architecture(f, pointer, errors);
        if arch_ok {
            let width = head.as_ref().map(|h| h.num_classes);
            let labels = rules.labels_required;
            check_dataset_fits(
                f,
                d,
                width,
                labels,
                &format!("{pointer}/dataset_id"),
                errors,
            );
            if let Validation::Dataset(v) = &validation {
                check_dataset_fits(
                    f,
                    v,
                    width,
                    labels,
                    &format!("{pointer}/validation/dataset_id"),
                    errors,
                );
            }
            check_parameter_patterns(f, &freeze, &format!("{pointer}/freeze"), errors);
            let lr_patterns: Vec<String> = layer_lr.iter().map(|(p, _)| p.clone()).collect();
            for (i, p) in lr_patterns.iter().enumerate() {
                if !f.parameter_names().iter().any(|n| glob_match(p, n)) {
                    errors.push(FieldError::new(
                        format!("{pointer}/layer_lr/{}", escape(p)),
                        format!("pattern `{p}` matches no parameter of the model (#{i})"),
                    ));
                }
            }
            if let Some(h) = &head {
                let weight = format!("{}.weight", h.layer);
                let is_linear = f.architecture.as_ref().is_some_and(|a| {
                    a.parameters()
                        .iter()
                        .any(|p| p.name == weight && p.shape.len() == 2)
                });
                if !is_linear {
                    errors.push(FieldError::new(
                        format!("{pointer}/head/layer"),
                        format!("`{}` is not a linear layer of the model", h.layer),
                    ));
                }
            }
        }
    }
    if errors.len() > before {
        return None;
    }
    Some(FinetuneSpec {
        dataset: dataset_id?,
        validation,
        epochs,
        batch_size,
        optimizer,
        lr,
        weight_decay,
        lr_schedule,
        freeze,
        head,
        layer_lr,
        early_stopping,
        grad_clip,
        seed,
        augment,
        accumulate,
    })
}

/// What [`check_transformer_training`] checks.
struct TransformerTraining<'a> {
    dataset: &'a DatasetId,
    validation: &'a Validation<DatasetId>,
    head: Option<&'a HeadParams>,
    freeze: &'a [String],
    layer_lr: &'a [(String, f64)],
}

/// Training a transformer: a bert model learns a classifier from labelled text (its own, or
/// a new `head`), a llama model its language-model loss on text; patterns name its tensors
/// (a bert model's with or without the `bert.` prefix a new head adds).
fn check_transformer_training(
    f: &Facts,
    t: &TransformerFacts,
    spec: &TransformerTraining<'_>,
    pointer: &str,
    errors: &mut Vec<FieldError>,
) {
    let mut facts = t.clone();
    let labels = t.family == crate::compress::engine::Family::Bert;
    match (t.family, spec.head) {
        (crate::compress::engine::Family::Llama, Some(_)) => errors.push(FieldError::new(
            format!("{pointer}/head"),
            "a llama model is trained as a language model (next-token loss on its text); `head` adds a classifier to a bert model",
        )),
        (_, Some(h)) => {
            if h.layer != "classifier" {
                errors.push(FieldError::new(
                    format!("{pointer}/head/layer"),
                    format!("a bert model's head is `classifier` (leave `layer` out), not `{}`", h.layer),
                ));
            }
            facts.classes = Some(h.num_classes);
        }
        (_, None) if labels && t.classes.is_none() => errors.push(FieldError::new(
            format!("{pointer}/head"),
            "is required: this bert model has no classifier; give `head: {\"num_classes\": N}` to add one",
        )),
        (_, None) => {}
    }
    check_text_dataset(
        f,
        &facts,
        spec.dataset,
        labels,
        &format!("{pointer}/dataset_id"),
        errors,
    );
    if let Validation::Dataset(v) = spec.validation {
        check_text_dataset(
            f,
            &facts,
            v,
            labels,
            &format!("{pointer}/validation/dataset_id"),
            errors,
        );
    }
    let mut names = f.parameter_names();
    if spec.head.is_some() {
        // The new head (and a pooler drawn where the weights have none) can be named too.
        for n in [
            "classifier.weight",
            "classifier.bias",
            "pooler.dense.weight",
            "pooler.dense.bias",
        ] {
            names.push(n.to_string());
        }
    }
    let named = |p: &str| {
        names.iter().any(|n| {
            glob_match(p, n)
                || n.strip_prefix("bert.")
                    .is_some_and(|bare| glob_match(p, bare))
                || glob_match(p, &format!("bert.{n}"))
        })
    };
    for (i, p) in spec.freeze.iter().enumerate() {
        if !named(p) {
            errors.push(FieldError::new(
                format!("{pointer}/freeze/{i}"),
                format!("pattern `{p}` matches no tensor of the model"),
            ));
        }
    }
    for (p, _) in spec.layer_lr {
        if !named(p) {
            errors.push(FieldError::new(
                format!("{pointer}/layer_lr/{}", escape(p)),
                format!("pattern `{p}` matches no tensor of the model"),
            ));
        }
    }
}

/// The `dataset_id` field: present, a UUID, and (with facts) an existing dataset.
pub(super) fn dataset_ref(
    obj: &Map<String, Value>,
    pointer: &str,
    facts: Option<&Facts>,
    errors: &mut Vec<FieldError>,
) -> Option<DatasetId> {
    let p = format!("{pointer}/dataset_id");
    let id: DatasetId = match obj
        .get("dataset_id")
        .and_then(Value::as_str)
        .map(str::parse)
    {
        Some(Ok(id)) => id,
        Some(Err(_)) => {
            errors.push(FieldError::new(p, "must be a dataset id (a UUID string)"));
            return None;
        }
        None => {
            errors.push(FieldError::new(p, "is required"));
            return None;
        }
    };
    if let Some(f) = facts {
        if !f.datasets.contains_key(&id) {
            errors.push(FieldError {
                code: Code::DatasetNotFound,
                ..FieldError::new(p, "no dataset with this id")
            });
            return None;
        }
    }
    Some(id)
}

/// An operation that runs the network needs the model's architecture.
pub(super) fn require_architecture(f: &Facts, pointer: &str, errors: &mut Vec<FieldError>) -> bool {
    if let Some(t) = &f.transformer {
        errors.push(FieldError {
            code: Code::UnsupportedFamily,
            ..FieldError::new(
                format!("{pointer}/op"),
                format!(
                    "with these options this operation trains or calibrates the network in a way the engine builds for `sequential` models only so far (pruning schedules, activation calibration, accuracy budgets); a {} model supports `finetune`, `distill`, `qat`, the calibration-based methods, evaluation and the weight-only operations",
                    t.family.as_str()
                ),
            )
        });
        return false;
    }
    if require_runnable(f, pointer, errors) {
        return true;
    }
    false
}

/// The model is a network the engine runs: a sequential architecture or a transformer of a
/// supported family. Refuses other families (`unsupported_family`) and plain tensor files
/// (`architecture_required`).
pub(super) fn require_runnable(f: &Facts, pointer: &str, errors: &mut Vec<FieldError>) -> bool {
    if f.architecture.is_some() || f.transformer.is_some() {
        return true;
    }
    if let Some(other) = &f.other_family {
        errors.push(FieldError {
            code: Code::UnsupportedFamily,
            ..FieldError::new(
                format!("{pointer}/op"),
                format!(
                    "this operation runs the network, and the engine does not run `{other}` models: supported families are sequential, bert and llama (weight-only operations work on any model)"
                ),
            )
        });
        return false;
    }
    errors.push(FieldError {
        code: Code::ArchitectureRequired,
        ..FieldError::new(
            format!("{pointer}/op"),
            "this operation runs the network: upload the model with an architecture \
             (multipart part `architecture` or metadata `whittle.architecture`), or as a \
             Hugging Face folder with its config.json",
        )
    });
    false
}

/// The dataset is labelled (when `labels_required`), its samples fit the model input and its
/// labels fit the output.
pub(super) fn check_dataset_fits(
    f: &Facts,
    id: &DatasetId,
    head_width: Option<usize>,
    labels_required: bool,
    pointer: &str,
    errors: &mut Vec<FieldError>,
) {
    let (Some(arch), Some(d)) = (&f.architecture, f.datasets.get(id)) else {
        return;
    };
    if d.text {
        errors.push(FieldError {
            code: Code::DatasetShapeMismatch,
            ..FieldError::new(
                pointer,
                "a text dataset is read by a transformer (bert or llama) model; this model is a sequential network",
            )
        });
        return;
    }
    let input: usize = arch.input_shape().iter().product();
    let features: usize = d.feature_shape.iter().product();
    if input != features {
        errors.push(FieldError {
            code: Code::DatasetShapeMismatch,
            ..FieldError::new(
                pointer,
                format!(
                    "samples have shape {:?} ({features} values) but the model takes {:?} ({input} values)",
                    d.feature_shape,
                    arch.input_shape()
                ),
            )
        });
    }
    match d.num_classes {
        None if !labels_required => {}
        None => errors.push(FieldError {
            code: Code::DatasetUnlabeled,
            ..FieldError::new(
                pointer,
                "this dataset has no labels (`y`); this operation needs them",
            )
        }),
        Some(classes) => {
            let width = head_width.unwrap_or_else(|| arch.output_shape().iter().product());
            if classes > width {
                errors.push(FieldError {
                    code: Code::LabelsOutOfRange,
                    ..FieldError::new(
                        pointer,
                        format!("labels go up to {} but the model has {width} outputs (use `head` to change it)", classes - 1),
                    )
                });
            }
        }
    }
}

fn check_parameter_patterns(
    f: &Facts,
    pats: &[String],
    pointer: &str,
    errors: &mut Vec<FieldError>,
) {
    let names = f.parameter_names();
    for (i, p) in pats.iter().enumerate() {
        if !names.iter().any(|n| glob_match(p, n)) {
            errors.push(FieldError::new(
                format!("{pointer}/{i}"),
                format!("pattern `{p}` matches no parameter of the model"),
            ));
        }
    }
}
