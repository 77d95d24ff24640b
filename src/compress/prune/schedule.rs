//! Gradual pruning (`schedule`): `iterations` rounds of pruning to the schedule's sparsity,
//! each followed by retraining with the pruned weights held at exactly zero (Han et al.
//! 2015's iterative pruning; Zhu & Gupta 2017's polynomial curve). Structured pruning
//! removes units round by round, counting them per layer so the last round lands exactly
//! on `round(original units · (1 − sparsity))`.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

use serde::Serialize;

use super::splicing::{Splicing, SplicingReport, Surgery};
use super::structured::{prune_structured, StructuredReport};
use super::{prune_tensors, Method, PruneTargets, Scope};
use crate::compress::engine::data::Dataset;
use crate::compress::engine::evaluate::EvalData;
use crate::compress::engine::finetune::{finetune, FinetuneParams};
use crate::compress::engine::masks::ZeroMasks;
use crate::compress::engine::sequential::arch::Architecture;
use crate::compress::engine::sequential::evaluate_weights;
use crate::compress::engine::sequential::model::Model;
use crate::compress::engine::train::{Checkpoint, EpochMetrics, TrainHooks};
use crate::compress::engine::Network;
use crate::compress::formats::safetensors::NamedTensor;
use crate::compress::progress::{sub_range, Ctx};
use crate::compress::Result;
use std::sync::atomic::AtomicBool;

/// How sparsity grows over the rounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScheduleKind {
    /// Zhu & Gupta 2017: `s_i = s_f · (1 − (1 − i/n)^power)`.
    Polynomial {
        /// The exponent (3 in the paper).
        power: f64,
    },
    /// The final sparsity at every round (prune, retrain, repeat).
    Constant,
}

impl ScheduleKind {
    /// API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Polynomial { .. } => "polynomial",
            Self::Constant => "constant",
        }
    }
}

/// The sparsity curve of gradual pruning.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Shape of the curve.
    pub kind: ScheduleKind,
    /// Prune + retrain rounds (at least 1).
    pub iterations: usize,
}

impl Schedule {
    /// Target sparsity after round `i` (1-based), for a final `target`.
    pub fn sparsity_at(&self, i: usize, target: f64) -> f64 {
        match self.kind {
            ScheduleKind::Constant => target,
            ScheduleKind::Polynomial { power } => {
                let frac = 1.0 - i as f64 / self.iterations.max(1) as f64;
                target * (1.0 - frac.max(0.0).powf(power))
            }
        }
    }
}

/// What one gradual pruning run takes besides the network.
pub struct GradualParams<'a> {
    /// How weights (or units, for `structured`) are chosen.
    pub method: Method,
    /// The final targets.
    pub targets: &'a PruneTargets,
    /// The curve.
    pub schedule: Schedule,
    /// Retraining after each round.
    pub retrain: &'a FinetuneParams<&'a Dataset>,
    /// Accuracy before and after each retraining is measured here, when given.
    pub eval: Option<EvalData<'a>>,
    /// Seed of `random` pruning (round `i` uses `seed + i`).
    pub seed: u64,
    /// Magnitude pruning: let pruned weights come back during retraining
    /// ([`super::splicing`]).
    pub splicing: Option<Splicing>,
}

/// The figures of one round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Round {
    /// 1-based round.
    pub iteration: usize,
    /// The round's target sparsity.
    pub target_sparsity: f64,
    /// Accuracy on the eval set right after pruning.
    pub accuracy_after_pruning: Option<f64>,
    /// Accuracy on the eval set after retraining.
    pub accuracy_after_retraining: Option<f64>,
    /// Validation accuracy of the retraining's last epoch.
    pub final_val_accuracy: Option<f64>,
    /// Training loss of the retraining's last epoch.
    pub final_train_loss: Option<f64>,
    /// Unstructured: the fraction of the selected weights that are zero after retraining.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sparsity: Option<f64>,
    /// Structured: the parameters left.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<u64>,
    /// Splicing: the weights that came back during the round's retraining.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub splicing: Option<SplicingReport>,
}

/// What gradual pruning produced.
#[derive(Debug)]
pub struct GradualOutput {
    /// The architecture after the last round (smaller for `structured`).
    pub architecture: Architecture,
    /// The pruned, retrained weights.
    pub weights: Vec<NamedTensor>,
    /// One entry per round.
    pub rounds: Vec<Round>,
    /// Every retraining epoch, numbered across rounds.
    pub epochs: Vec<EpochMetrics>,
    /// Structured: the last round's per-layer report.
    pub structured_layers: Vec<StructuredReport>,
}

/// Runs the schedule on `weights` of `arch`, pruning the `selected` tensors; `on_epoch` sees
/// every retraining epoch as it ends.
pub fn prune_gradually(
    arch: &Architecture,
    weights: Vec<NamedTensor>,
    selected: &[String],
    params: &GradualParams<'_>,
    ctx: &Ctx<'_>,
    on_epoch: &mut dyn FnMut(&EpochMetrics),
) -> Result<GradualOutput> {
    let mut arch = arch.clone();
    let mut weights = weights;
    let mut rounds = Vec::new();
    let mut epochs_all: Vec<EpochMetrics> = Vec::new();
    let mut structured_layers = Vec::new();
    let mut previous = 0.0;
    let targets = params.targets;
    // Output units of each layer before pruning (structured schedules count from them).
    let original_units = units(&arch);
    // Splicing: the selected tensors with their pruned weights' values still in (the
    // previous round's shadow), so weights pruned in one round can come back in the next.
    let mut shadow: Option<Vec<NamedTensor>> = None;
    let accuracy = |arch: &Architecture, weights: &[NamedTensor]| -> Result<Option<f64>> {
        match params.eval {
            // Silent: the evaluation's own 0→1 is not the schedule's progress.
            Some(data) => {
                Ok(evaluate_weights(arch, weights.to_vec(), data, None, &ctx.silent())?.accuracy)
            }
            None => Ok(None),
        }
    };
    for round in 1..=params.schedule.iterations {
        ctx.check()?;
        // The share of each final sparsity reached after this round (1 for `constant`).
        let fraction = params.schedule.sparsity_at(round, 1.0);
        let target = targets.sparsity * fraction;
        let round_targets = targets.scaled(fraction);
        let mut dense_before = Vec::new();
        let after_pruning = match params.method {
            Method::Structured { norm } => {
                let round_targets = structured_round(
                    targets,
                    &arch,
                    selected,
                    &original_units,
                    fraction,
                    previous,
                );
                let out = prune_structured(
                    &arch,
                    weights,
                    &selected_in(&arch, selected),
                    &round_targets,
                    norm,
                )?;
                arch = out.architecture;
                weights = out.weights;
                structured_layers = out.layers;
                accuracy(&arch, &weights)?
            }
            method => {
                if params.splicing.is_some() {
                    // The round cuts the network's weights; its shadow starts from the
                    // previous round's (the values the pruned weights had learned).
                    dense_before = match shadow.take() {
                        Some(s) => s,
                        None => weights
                            .iter()
                            .filter(|w| selected.contains(&w.name))
                            .cloned()
                            .collect(),
                    };
                }
                prune_tensors(
                    &mut weights,
                    selected,
                    &method,
                    &round_targets,
                    params.seed.wrapping_add(round as u64),
                )?;
                accuracy(&arch, &weights)?
            }
        };
        previous = fraction;
        // Retrain with the pruned weights held at zero.
        let model = Model::new(&arch, weights)?;
        // Pruned weights held at zero, or (splicing) moving in and out of the mask.
        let surgery = match params.splicing {
            Some(settings) if matches!(params.method, Method::Magnitude) => {
                Some(RefCell::new(Surgery::new(
                    &model,
                    std::mem::take(&mut dense_before),
                    round_targets.clone(),
                    settings,
                    params.retrain.epochs,
                )?))
            }
            _ => None,
        };
        // The surgery keeps its own masks; without it the zeros are held by these.
        let masks = match surgery {
            Some(_) => ZeroMasks::default(),
            None => ZeroMasks::of(&model, selected)?,
        };
        let keep_zero = |m: &dyn Network| match &surgery {
            Some(s) => s.borrow_mut().step(),
            None => masks.apply(m),
        };
        let mut epoch_done = |m: &EpochMetrics, _: &Checkpoint| -> Result<()> {
            on_epoch(m);
            match &surgery {
                Some(s) => s.borrow_mut().epoch_done(),
                None => Ok(()),
            }
        };
        // Round r of R is the (r−1)/R … r/R share of the step's progress.
        let rounds_total = params.schedule.iterations.max(1) as f64;
        let prefix = format!("round {round}/{}: ", params.schedule.iterations);
        let cancel = AtomicBool::new(false);
        let progress = sub_range(
            ctx,
            &cancel,
            (round - 1) as f64 / rounds_total,
            round as f64 / rounds_total,
            &prefix,
        );
        let round_ctx = Ctx::new(&progress, &cancel);
        let out = finetune(
            Box::new(model),
            params.retrain,
            &round_ctx,
            TrainHooks {
                on_epoch: Some(&mut epoch_done),
                after_step: Some(&keep_zero),
                ..Default::default()
            },
        )?;
        weights = out.weights;
        let splicing = match surgery {
            Some(s) => {
                let (next, report) = s.into_inner().finish(&mut weights)?;
                shadow = Some(next);
                Some(report)
            }
            None => None,
        };
        let structured = matches!(params.method, Method::Structured { .. });
        rounds.push(Round {
            iteration: round,
            target_sparsity: target,
            accuracy_after_pruning: after_pruning,
            accuracy_after_retraining: accuracy(&arch, &weights)?,
            final_val_accuracy: out.history.last().and_then(|h| h.val_accuracy),
            final_train_loss: out.history.last().map(|h| h.train_loss),
            sparsity: (!structured).then(|| zero_fraction(&weights, selected)),
            parameters: structured.then(|| arch.parameter_count()),
            splicing,
        });
        for mut e in out.history {
            e.epoch += epochs_all.len();
            epochs_all.push(e);
        }
    }
    Ok(GradualOutput {
        architecture: arch,
        weights,
        rounds,
        epochs: epochs_all,
        structured_layers,
    })
}

/// Output units (dim 0) of every parameter.
fn units(arch: &Architecture) -> HashMap<String, usize> {
    arch.parameters()
        .into_iter()
        .map(|p| (p.name, p.shape.first().copied().unwrap_or(0)))
        .collect()
}

/// The targets of one structured round. Units removed earlier are gone: remove, of the units
/// still there, the share that brings the original count down to this round's target.
fn structured_round(
    targets: &PruneTargets,
    arch: &Architecture,
    selected: &[String],
    original_units: &HashMap<String, usize>,
    fraction: f64,
    previous: f64,
) -> PruneTargets {
    let step = |final_sparsity: f64| {
        let (now, before) = (final_sparsity * fraction, final_sparsity * previous);
        if before >= 1.0 {
            0.0
        } else {
            (1.0 - (1.0 - now) / (1.0 - before)).max(0.0)
        }
    };
    match targets.scope {
        Scope::Global => PruneTargets {
            sparsity: step(targets.sparsity),
            scope: Scope::Global,
            overrides: targets
                .overrides
                .iter()
                .map(|(p, s)| (p.clone(), step(*s)))
                .collect(),
        },
        // Per layer, count units rather than compound fractions, so the last round lands
        // exactly on round(original · (1 − sparsity)).
        Scope::Layer => {
            let current = units(arch);
            let overrides = selected_in(arch, selected)
                .into_iter()
                .filter_map(|name| {
                    let (&now, &orig) = (current.get(&name)?, original_units.get(&name)?);
                    let s = targets.override_for(&name).unwrap_or(targets.sparsity);
                    let keep = ((orig as f64) * (1.0 - s * fraction)).round().max(1.0) as usize;
                    let remove = now.saturating_sub(keep);
                    Some((
                        name,
                        if now == 0 {
                            0.0
                        } else {
                            remove as f64 / now as f64
                        },
                    ))
                })
                .collect();
            PruneTargets {
                sparsity: 0.0,
                scope: Scope::Layer,
                overrides,
            }
        }
    }
}

/// The selected names that still exist in `arch` (structured pruning keeps names).
fn selected_in(arch: &Architecture, selected: &[String]) -> Vec<String> {
    let names: HashSet<String> = arch.parameters().into_iter().map(|p| p.name).collect();
    selected
        .iter()
        .filter(|s| names.contains(*s))
        .cloned()
        .collect()
}

/// The fraction of zeros among the selected weights.
fn zero_fraction(weights: &[NamedTensor], selected: &[String]) -> f64 {
    let chosen = weights.iter().filter(|w| selected.contains(&w.name));
    let (numel, nonzero) = chosen.fold((0usize, 0usize), |(n, nz), w| {
        (
            n + w.values.len(),
            nz + w.values.iter().filter(|v| **v != 0.0).count(),
        )
    });
    1.0 - nonzero as f64 / numel.max(1) as f64
}
