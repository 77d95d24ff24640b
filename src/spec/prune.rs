//! The `prune` step: which weights to remove, how many, and whether to retrain in between.

use serde_json::{json, Map, Value};

use super::fields::{choice, deny_unknown, embedded_training, escape, f64_in, object, usize_in};
use super::train::{require_architecture, FinetuneSpec};
use super::{check_patterns, patterns, Facts, FieldError, Selection};
use crate::compress::prune::schedule::{Schedule, ScheduleKind};
use crate::compress::prune::splicing::Splicing;
use crate::compress::prune::{prune_count, Method, Output, PruneTargets, Scope};
use crate::compress::select::glob_match;

/// Gradual / iterative pruning: prune a little, retrain, repeat.
#[derive(Debug, Clone, PartialEq)]
pub struct PruneSchedule {
    /// The sparsity curve and the number of rounds.
    pub curve: Schedule,
    /// Retraining after each pruning round (pruned weights stay zero).
    pub finetune: FinetuneSpec,
    /// Let pruned weights come back during retraining (magnitude pruning).
    pub splicing: Option<Splicing>,
}

/// A validated `prune` step.
#[derive(Debug, Clone, PartialEq)]
pub struct PruneSpec {
    /// Method.
    pub method: Method,
    /// Target sparsity (fraction of selected weights removed; units for `structured`).
    pub sparsity: f64,
    /// Scope of the threshold.
    pub scope: Scope,
    /// Per-pattern sparsity overrides (layer-wise pruning).
    pub layers: Vec<(String, f64)>,
    /// Which tensors.
    pub selection: Selection,
    /// Gradual pruning with retraining.
    pub schedule: Option<PruneSchedule>,
    /// Output encoding.
    pub output: Output,
    /// Seed for `random` (defaults to the job's).
    pub seed: Option<u64>,
}

impl PruneSpec {
    /// The engine's targets: the sparsity, its scope and the per-pattern overrides.
    pub fn targets(&self) -> PruneTargets {
        PruneTargets {
            sparsity: self.sparsity,
            scope: self.scope,
            overrides: self.layers.clone(),
        }
    }

    /// Normalised JSON.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "op": "prune",
            "method": self.method.as_str(),
            "sparsity": self.sparsity,
            "scope": match self.scope { Scope::Global => "global", Scope::Layer => "layer" },
            "layers": self.layers.iter().map(|(p, s)| (p.clone(), json!(s))).collect::<Map<String, Value>>(),
            "include": self.selection.include,
            "exclude": self.selection.exclude,
            "output": match self.output { Output::Dense => "dense", Output::Sparse => "sparse" },
            "seed": self.seed,
        });
        match self.method {
            Method::Structured { norm } => v["norm"] = json!(norm),
            Method::NM { n, m } => {
                // Its sparsity follows from n and m; the stored form must parse again.
                if let Some(o) = v.as_object_mut() {
                    o.remove("sparsity");
                }
                v["n"] = json!(n);
                v["m"] = json!(m);
            }
            _ => {}
        }
        v["schedule"] = match &self.schedule {
            None => Value::Null,
            Some(s) => {
                let mut f = s.finetune.to_json();
                if let Some(o) = f.as_object_mut() {
                    o.remove("op");
                    o.remove("freeze");
                    o.remove("head");
                    o.remove("layer_lr");
                }
                let mut sj = json!({"iterations": s.curve.iterations, "finetune": f,
                                    "kind": s.curve.kind.as_str()});
                if let ScheduleKind::Polynomial { power } = s.curve.kind {
                    sj["power"] = json!(power);
                }
                if let Some(sp) = s.splicing {
                    sj["splicing"] = json!(sp);
                }
                sj
            }
        };
        v
    }
}

const METHODS: &[&str] = &[
    "magnitude",
    "random",
    "structured",
    "n_m",
    "wanda",
    "sparsegpt",
];

/// Parse a `prune` step at `pointer`.
pub fn parse(
    obj: &Map<String, Value>,
    pointer: &str,
    facts: Option<&Facts>,
) -> Result<PruneSpec, Vec<FieldError>> {
    let mut errors = Vec::new();
    deny_unknown(
        obj,
        &[
            "op", "method", "sparsity", "scope", "layers", "include", "exclude", "schedule",
            "output", "norm", "n", "m", "seed",
        ],
        pointer,
        &mut errors,
    );
    let method_name = choice(obj, "method", METHODS, pointer, &mut errors).unwrap_or("magnitude");
    let sparsity_field = |key: &str, v: &Value, errors: &mut Vec<FieldError>| match v.as_f64() {
        Some(x) if x.is_finite() && (0.0..1.0).contains(&x) => Some(x),
        _ => {
            errors.push(FieldError::new(
                format!("{pointer}/{key}"),
                "must be a fraction in [0, 1): the share of weights removed (1 would remove them all)",
            ));
            None
        }
    };
    let method = match method_name {
        "random" => Method::Random,
        "structured" => {
            let norm = match obj.get("norm") {
                None | Some(Value::Null) => 1,
                Some(v) if v.as_u64() == Some(1) || v.as_u64() == Some(2) => {
                    v.as_u64().unwrap_or(1) as u8
                }
                Some(_) => {
                    errors.push(FieldError::new(
                        format!("{pointer}/norm"),
                        "must be 1 (L1) or 2 (L2)",
                    ));
                    1
                }
            };
            Method::Structured { norm }
        }
        "n_m" => {
            let n = usize_in(obj, "n", (1, 256), pointer, &mut errors);
            let m = usize_in(obj, "m", (2, 256), pointer, &mut errors);
            for key in ["n", "m"] {
                if !obj.contains_key(key) {
                    errors.push(FieldError::new(
                        format!("{pointer}/{key}"),
                        "is required for `n_m` (e.g. n = 2, m = 4)",
                    ));
                }
            }
            match (n, m) {
                (Some(n), Some(m)) if n >= m => {
                    errors.push(FieldError::new(
                        format!("{pointer}/n"),
                        format!("N:M keeps n of every m weights, so n must be smaller than m (got {n}:{m})"),
                    ));
                    Method::NM { n: 2, m: 4 }
                }
                (Some(n), Some(m)) => Method::NM { n, m },
                _ => Method::NM { n: 2, m: 4 },
            }
        }
        _ => Method::Magnitude,
    };
    if !matches!(method, Method::Structured { .. }) && obj.get("norm").is_some_and(|v| !v.is_null())
    {
        errors.push(FieldError::new(
            format!("{pointer}/norm"),
            "applies to `structured` only",
        ));
    }
    if !matches!(method, Method::NM { .. }) {
        for key in ["n", "m"] {
            if obj.get(key).is_some_and(|v| !v.is_null()) {
                errors.push(FieldError::new(
                    format!("{pointer}/{key}"),
                    "applies to `n_m` only",
                ));
            }
        }
    }
    let sparsity = match (method, obj.get("sparsity")) {
        (Method::NM { n, m }, None | Some(Value::Null)) => 1.0 - n as f64 / m as f64,
        (Method::NM { .. }, Some(_)) => {
            errors.push(FieldError::new(
                format!("{pointer}/sparsity"),
                "N:M sparsity is fixed by n and m (1 − n/m); leave `sparsity` out",
            ));
            0.0
        }
        (_, Some(v)) if !v.is_null() => sparsity_field("sparsity", v, &mut errors).unwrap_or(0.0),
        _ => {
            if obj.get("layers").is_none() {
                errors.push(FieldError::new(
                    format!("{pointer}/sparsity"),
                    "is required (a fraction in [0, 1))",
                ));
            }
            0.0
        }
    };
    let scope = match choice(obj, "scope", &["global", "layer"], pointer, &mut errors) {
        Some("global") => Scope::Global,
        _ => Scope::Layer,
    };
    let layers: Vec<(String, f64)> = match object(obj, "layers", pointer, &mut errors) {
        None => Vec::new(),
        Some(m) => m
            .iter()
            .filter_map(|(k, v)| {
                sparsity_field(&format!("layers/{}", escape(k)), v, &mut errors)
                    .map(|s| (k.clone(), s))
            })
            .collect(),
    };
    if matches!(method, Method::NM { .. }) && !layers.is_empty() {
        errors.push(FieldError::new(
            format!("{pointer}/layers"),
            "does not apply to `n_m` (its sparsity is n/m everywhere)",
        ));
    }
    let output = match choice(obj, "output", &["dense", "sparse"], pointer, &mut errors) {
        Some("sparse") => Output::Sparse,
        _ => Output::Dense,
    };
    if output == Output::Sparse && matches!(method, Method::Structured { .. }) {
        errors.push(FieldError::new(
            format!("{pointer}/output"),
            "structured pruning removes whole units and writes a smaller dense file; `sparse` does not apply",
        ));
    }
    let seed = super::fields::seed(obj, pointer, &mut errors);
    let include = patterns(
        obj.get("include"),
        &format!("{pointer}/include"),
        &mut errors,
    );
    let exclude = patterns(
        obj.get("exclude"),
        &format!("{pointer}/exclude"),
        &mut errors,
    );
    let selection = Selection::of(include, exclude, facts);

    let schedule = object(obj, "schedule", pointer, &mut errors).and_then(|s| {
        let sp = format!("{pointer}/schedule");
        deny_unknown(
            s,
            &["kind", "iterations", "power", "finetune", "splicing"],
            &sp,
            &mut errors,
        );
        let splicing = object(s, "splicing", &sp, &mut errors).map(|o| {
            let pp = format!("{sp}/splicing");
            deny_unknown(o, &["until", "margin"], &pp, &mut errors);
            let d = Splicing::default();
            Splicing {
                until: f64_in(o, "until", (0.01, 1.0), &pp, &mut errors).unwrap_or(d.until),
                margin: f64_in(o, "margin", (0.0, 0.9), &pp, &mut errors).unwrap_or(d.margin),
            }
        });
        if splicing.is_some() && method != Method::Magnitude {
            errors.push(FieldError::new(
                format!("{sp}/splicing"),
                "splicing lets weights pruned by magnitude come back when they regain it; it needs `method: magnitude`",
            ));
        }
        let kind = match choice(s, "kind", &["polynomial", "constant"], &sp, &mut errors) {
            Some("constant") => {
                if s.get("power").is_some_and(|v| !v.is_null()) {
                    errors.push(FieldError::new(format!("{sp}/power"), "applies to `polynomial` only"));
                }
                ScheduleKind::Constant
            }
            _ => ScheduleKind::Polynomial {
                power: f64_in(s, "power", (0.1, 10.0), &sp, &mut errors).unwrap_or(3.0),
            },
        };
        let iterations = usize_in(s, "iterations", (1, 100), &sp, &mut errors).unwrap_or(5);
        let finetune = match object(s, "finetune", &sp, &mut errors) {
            Some(f) => embedded_training(f, &format!("{sp}/finetune"), facts, false, &mut errors),
            None => {
                if !s.contains_key("finetune") {
                    errors.push(FieldError::new(
                        format!("{sp}/finetune"),
                        "is required: the retraining between pruning rounds (at least `dataset_id`)",
                    ));
                }
                None
            }
        };
        Some(PruneSchedule {
            curve: Schedule { kind, iterations },
            finetune: finetune?,
            splicing,
        })
    });

    if method == Method::Random && schedule.is_some() {
        errors.push(FieldError::new(
            format!("{pointer}/schedule"),
            "`random` is the one-shot baseline; gradual pruning ranks weights by magnitude (use `magnitude`, `n_m` or `structured`)",
        ));
    }
    let spec = PruneSpec {
        method,
        sparsity,
        scope,
        layers,
        selection,
        schedule,
        output,
        seed,
    };
    if let Some(f) = facts {
        check_against_model(f, pointer, &spec, &mut errors);
    }
    if errors.is_empty() {
        Ok(spec)
    } else {
        Err(errors)
    }
}

/// Checks that need the model: patterns match, the selection holds float tensors, shapes fit
/// N:M groups, structured pruning has an architecture and leaves every layer a unit.
fn check_against_model(f: &Facts, pointer: &str, spec: &PruneSpec, errors: &mut Vec<FieldError>) {
    let PruneSpec {
        method,
        sparsity,
        ref layers,
        ref selection,
        ..
    } = *spec;
    let has_schedule = spec.schedule.is_some();
    if (matches!(method, Method::Structured { .. }) || has_schedule)
        && !require_architecture(f, pointer, errors)
    {
        return;
    }
    let before = errors.len();
    check_patterns(
        &f.tensors,
        &selection.include,
        &format!("{pointer}/include"),
        errors,
    );
    check_patterns(
        &f.tensors,
        &selection.exclude,
        &format!("{pointer}/exclude"),
        errors,
    );
    if errors.len() > before {
        return;
    }
    let chosen = selection.resolve(&f.tensors);
    if chosen.is_empty() {
        errors.push(FieldError::new(
            pointer,
            "the selection matches no tensor (default: float tensors with ndim ≥ 2; use `include` to choose)",
        ));
        return;
    }
    if let Some(bad) = chosen.iter().find(|t| !t.dtype.is_float()) {
        errors.push(FieldError::new(
            format!("{pointer}/include"),
            format!(
                "tensor `{}` has dtype {} and cannot be pruned",
                bad.name,
                bad.dtype.as_str()
            ),
        ));
        return;
    }
    for (p, _) in layers {
        if !chosen.iter().any(|t| glob_match(p, &t.name)) {
            errors.push(FieldError::new(
                format!("{pointer}/layers/{}", escape(p)),
                format!("pattern `{p}` matches no selected tensor"),
            ));
        }
    }
    let sparsity_of = |name: &str| {
        layers
            .iter()
            .find(|(p, _)| glob_match(p, name))
            .map_or(sparsity, |(_, s)| *s)
    };
    match method {
        Method::NM { m, .. } => {
            for t in &chosen {
                let inputs = t.shape.get(1).copied().unwrap_or(0);
                if t.shape.len() < 2 || inputs % m != 0 {
                    errors.push(FieldError::new(
                        format!("{pointer}/m"),
                        format!(
                            "tensor `{}` has shape {:?}: its input dimension ({inputs}) must be a multiple of m = {m}; exclude it or pick another m",
                            t.name, t.shape
                        ),
                    ));
                }
            }
        }
        Method::Structured { .. } => {
            for t in &chosen {
                let units = t.shape.first().copied().unwrap_or(0);
                let removed = prune_count(sparsity_of(&t.name), units as u64) as usize;
                if removed >= units && units > 0 {
                    errors.push(FieldError::new(
                        if layers.iter().any(|(p, _)| glob_match(p, &t.name)) {
                            format!("{pointer}/layers")
                        } else {
                            format!("{pointer}/sparsity")
                        },
                        format!(
                            "this would remove all {units} units of `{}`; lower the sparsity or exclude the layer",
                            t.name
                        ),
                    ));
                }
            }
        }
        _ => {}
    }
}
