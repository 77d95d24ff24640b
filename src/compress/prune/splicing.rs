//! Splicing (Guo et al. 2016, *Dynamic Network Surgery*): while a gradual-pruning round
//! retrains, the pruned weights keep learning in a dense shadow copy and come back when
//! their magnitude grows past the round's threshold; kept weights whose magnitude falls
//! below it leave. Magnitude pruning only.
//!
//! Each optimizer step sees the network with the pruned weights at zero, so the gradient
//! of a pruned weight is the one it would have at zero (the straight-through update of the
//! paper): after the step the shadow `D` takes the step's update everywhere — kept
//! positions take the new value, pruned positions add it to the value they had — and the
//! mask is updated with hysteresis around the threshold `τ` of each tensor (the smallest
//! kept |w| of an exact magnitude cut of `D` to the round's targets, recomputed every
//! [`THRESHOLD_EVERY`] steps): a kept weight leaves when `|D| < τ·(1 − margin)`, a pruned
//! one comes back when `|D| > τ·(1 + margin)`. The network then holds `D ⊙ mask`.
//!
//! After the first `⌈until · epochs⌉` epochs of the round (or at its end) the mask is
//! frozen as an exact cut of `D` — so every round ends exactly at its sparsity — and the
//! rest of the round retrains with the pruned weights held at zero. That cut ranks each
//! weight by its distance to its side of the band (`|D|/(1 − margin)` if kept,
//! `|D|/(1 + margin)` if pruned), so it moves as few weights as the targets allow: weights
//! swapped in at a small learning rate late in a round would not be retrained.
//!
//! Each round cuts the network's weights as gradual pruning does without splicing; the
//! shadow carries the pruned weights' values from one round to the next.

use candle_core::{Tensor, Var};

use super::{prune_tensors_with_masks, Method, PruneTargets};
use crate::compress::engine::Network;
use crate::compress::formats::safetensors::NamedTensor;
use crate::compress::{Error, Result};

/// How often (optimizer steps) the thresholds are recomputed from the shadow weights.
pub const THRESHOLD_EVERY: usize = 32;

/// The settings of splicing (`schedule.splicing`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Splicing {
    /// The share of each round's epochs during which the mask moves (0, 1].
    pub until: f64,
    /// The hysteresis band around the threshold, as a fraction of it, [0, 1).
    pub margin: f64,
}

impl Default for Splicing {
    fn default() -> Self {
        Splicing {
            until: 0.25,
            margin: 0.1,
        }
    }
}

impl Splicing {
    /// The epochs of a round of `epochs` during which the mask moves (at least 1).
    pub fn epochs(&self, epochs: usize) -> usize {
        ((self.until * epochs as f64).ceil() as usize).clamp(1, epochs.max(1))
    }
}

/// One masked tensor during a round.
struct Slot {
    name: String,
    shape: Vec<usize>,
    var: Var,
    dense: Vec<f32>,
    keep: Vec<bool>,
    threshold: f32,
    /// The mask at the start of the round (to count the weights that came back).
    initial: Vec<bool>,
}

/// The state of one round's splicing, shared by the step and epoch hooks.
pub struct Surgery {
    slots: Vec<Slot>,
    targets: PruneTargets,
    margin: f32,
    splice_epochs: usize,
    epochs_done: usize,
    steps: usize,
    frozen: Option<Vec<Tensor>>,
}

/// What splicing did in one round.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct SplicingReport {
    /// Weights kept at the end of the round that the round's first cut had pruned.
    pub recovered: usize,
    /// Epochs during which the mask moved.
    pub epochs: usize,
}

impl Surgery {
    /// Starts a round: `dense` holds the selected tensors before the round's cut, `model` the
    /// network after it (its selected parameters are shared with the round's training).
    pub fn new(
        model: &dyn Network,
        dense: Vec<NamedTensor>,
        targets: PruneTargets,
        settings: Splicing,
        epochs: usize,
    ) -> Result<Surgery> {
        let params = model.params();
        let mut slots = Vec::with_capacity(dense.len());
        for d in dense {
            let Some(p) = params.iter().find(|p| p.name() == d.name) else {
                return Err(Error::Internal(format!(
                    "splicing: {} is not a parameter of the network",
                    d.name
                )));
            };
            let var = p.var().clone();
            let now = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            if now.len() != d.values.len() {
                return Err(Error::Internal(format!(
                    "splicing: {} has {} values, its shadow {}",
                    d.name,
                    now.len(),
                    d.values.len()
                )));
            }
            let keep: Vec<bool> = now.iter().map(|v| *v != 0.0).collect();
            slots.push(Slot {
                name: d.name,
                shape: d.shape,
                var,
                dense: d.values,
                initial: keep.clone(),
                keep,
                threshold: 0.0,
            });
        }
        let mut s = Surgery {
            slots,
            targets,
            margin: settings.margin as f32,
            splice_epochs: settings.epochs(epochs),
            epochs_done: 0,
            steps: 0,
            frozen: None,
        };
        // The cut the round started with sets the first thresholds.
        s.thresholds()?;
        Ok(s)
    }

    /// The exact magnitude cut of the shadow weights: keep-masks per slot. With `sticky`,
    /// each weight is ranked by its distance to its own side of the hysteresis band
    /// (`|D| / (1 − margin)` kept, `|D| / (1 + margin)` pruned), so the cut changes the
    /// current mask as little as the targets allow.
    fn cut(&self, sticky: bool) -> Result<Vec<Vec<bool>>> {
        let (stay, enter) = (1.0 / (1.0 - self.margin), 1.0 / (1.0 + self.margin));
        let mut tensors: Vec<NamedTensor> = self
            .slots
            .iter()
            .map(|s| NamedTensor {
                name: s.name.clone(),
                shape: s.shape.clone(),
                values: if sticky {
                    s.dense
                        .iter()
                        .zip(&s.keep)
                        .map(|(d, &k)| d.abs() * if k { stay } else { enter })
                        .collect()
                } else {
                    s.dense.clone()
                },
            })
            .collect();
        let names: Vec<String> = self.slots.iter().map(|s| s.name.clone()).collect();
        let (_, masks) =
            prune_tensors_with_masks(&mut tensors, &names, &Method::Magnitude, &self.targets, 0)?;
        Ok(self
            .slots
            .iter()
            .map(|s| {
                let m = masks.iter().find(|m| m.name == s.name);
                (0..s.dense.len())
                    .map(|i| m.is_some_and(|m| m.bits[i / 8] >> (i % 8) & 1 == 1))
                    .collect()
            })
            .collect())
    }

    /// Recomputes each slot's threshold: the smallest kept |w| of an exact cut.
    fn thresholds(&mut self) -> Result<()> {
        let cut = self.cut(false)?;
        for (slot, keep) in self.slots.iter_mut().zip(cut) {
            slot.threshold = slot
                .dense
                .iter()
                .zip(&keep)
                .filter(|(_, k)| **k)
                .map(|(v, _)| v.abs())
                .fold(f32::INFINITY, f32::min);
            if !slot.threshold.is_finite() {
                slot.threshold = 0.0;
            }
        }
        Ok(())
    }

    /// After every optimizer step.
    pub fn step(&mut self) -> Result<()> {
        self.steps += 1;
        if let Some(masks) = &self.frozen {
            for (slot, mask) in self.slots.iter().zip(masks) {
                slot.var.set(&slot.var.as_tensor().mul(mask)?)?;
            }
            return Ok(());
        }
        for slot in &mut self.slots {
            let now = slot.var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            for ((d, &v), &k) in slot.dense.iter_mut().zip(&now).zip(&slot.keep) {
                *d = if k { v } else { *d + v };
            }
        }
        if self.steps.is_multiple_of(THRESHOLD_EVERY) {
            self.thresholds()?;
        }
        let margin = self.margin;
        for slot in &mut self.slots {
            let (low, high) = (
                slot.threshold * (1.0 - margin),
                slot.threshold * (1.0 + margin),
            );
            for (k, d) in slot.keep.iter_mut().zip(&slot.dense) {
                let a = d.abs();
                *k = if *k { a >= low } else { a > high };
            }
            write(slot, &slot.keep)?;
        }
        Ok(())
    }

    /// After every epoch: freezes the mask once the splicing epochs are over.
    pub fn epoch_done(&mut self) -> Result<()> {
        self.epochs_done += 1;
        if self.frozen.is_none() && self.epochs_done >= self.splice_epochs {
            self.freeze()?;
        }
        Ok(())
    }

    /// Fixes the mask as an exact cut of the shadow weights, the current mask favoured, and
    /// puts them in the network.
    fn freeze(&mut self) -> Result<()> {
        let cut = self.cut(true)?;
        let mut masks = Vec::with_capacity(self.slots.len());
        for (slot, keep) in self.slots.iter_mut().zip(cut) {
            slot.keep = keep;
            write(slot, &slot.keep)?;
            let ones: Vec<f32> = slot.keep.iter().map(|k| f32::from(u8::from(*k))).collect();
            masks.push(Tensor::from_vec(
                ones,
                slot.shape.as_slice(),
                slot.var.device(),
            )?);
        }
        self.frozen = Some(masks);
        Ok(())
    }

    /// Ends the round: the weights the network ends with (`weights`, from training) get the
    /// exact cut when the mask never froze; returns the shadow for the next round (trained
    /// values where kept, the shadow's where pruned) and the report.
    pub fn finish(
        mut self,
        weights: &mut [NamedTensor],
    ) -> Result<(Vec<NamedTensor>, SplicingReport)> {
        if self.frozen.is_none() {
            self.freeze()?;
            for slot in &self.slots {
                if let Some(w) = weights.iter_mut().find(|w| w.name == slot.name) {
                    w.values = masked(&slot.dense, &slot.keep);
                }
            }
        }
        let mut recovered = 0;
        let mut shadow = Vec::with_capacity(self.slots.len());
        for slot in self.slots {
            let Some(w) = weights.iter_mut().find(|w| w.name == slot.name) else {
                continue;
            };
            // Weights restored from an earlier epoch (early stopping) keep the exact cut too.
            for (v, &k) in w.values.iter_mut().zip(&slot.keep) {
                if !k {
                    *v = 0.0;
                }
            }
            recovered += slot
                .keep
                .iter()
                .zip(&slot.initial)
                .filter(|(k, i)| **k && !**i)
                .count();
            let values = w
                .values
                .iter()
                .zip(&slot.dense)
                .zip(&slot.keep)
                .map(|((&v, &d), &k)| if k { v } else { d })
                .collect();
            shadow.push(NamedTensor {
                name: slot.name,
                shape: slot.shape,
                values,
            });
        }
        Ok((
            shadow,
            SplicingReport {
                recovered,
                epochs: self.splice_epochs.min(self.epochs_done.max(1)),
            },
        ))
    }
}

fn masked(dense: &[f32], keep: &[bool]) -> Vec<f32> {
    dense
        .iter()
        .zip(keep)
        .map(|(&d, &k)| if k { d } else { 0.0 })
        .collect()
}

/// Puts `dense ⊙ keep` into the slot's variable.
fn write(slot: &Slot, keep: &[bool]) -> Result<()> {
    let t = Tensor::from_vec(
        masked(&slot.dense, keep),
        slot.shape.as_slice(),
        slot.var.device(),
    )?;
    slot.var.set(&t)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::engine::sequential::arch::Architecture;
    use crate::compress::engine::sequential::model::Model;
    use crate::compress::prune::{prune_tensors, Scope};
    use serde_json::json;

    fn tensor(name: &str, shape: &[usize], values: Vec<f32>) -> NamedTensor {
        NamedTensor {
            name: name.into(),
            shape: shape.to_vec(),
            values,
        }
    }

    fn values(var: &Var) -> Vec<f32> {
        var.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    }

    /// A 4 → 2 linear layer whose 8 weights are cut to 4, and the round's surgery.
    fn round(settings: Splicing, epochs: usize) -> (Model, Surgery, PruneTargets) {
        let arch =
            Architecture::from_json(&json!({"kind":"sequential","input_shape":[4],"layers":[
            {"type":"linear","name":"fc","in_features":4,"out_features":2}]}))
            .unwrap();
        let dense = tensor(
            "fc.weight",
            &[2, 4],
            vec![0.8, -0.1, 0.5, 0.2, -0.6, 0.3, 0.05, -0.9],
        );
        let targets = PruneTargets {
            sparsity: 0.5,
            scope: Scope::Layer,
            overrides: vec![],
        };
        let mut weights = vec![dense.clone(), tensor("fc.bias", &[2], vec![0.0, 0.0])];
        let names = vec!["fc.weight".to_string()];
        prune_tensors(&mut weights, &names, &Method::Magnitude, &targets, 0).unwrap();
        assert_eq!(
            weights[0].values,
            vec![0.8, 0.0, 0.5, 0.0, -0.6, 0.0, 0.0, -0.9]
        );
        let model = Model::new(&arch, weights).unwrap();
        let surgery = Surgery::new(&model, vec![dense], targets.clone(), settings, epochs).unwrap();
        (model, surgery, targets)
    }

    fn fc(model: &Model) -> Var {
        model.params()[0].var().clone()
    }

    /// An optimizer step that adds `delta` to the weights the network holds.
    fn step(var: &Var, delta: &[f32]) {
        let now: Vec<f32> = values(var).iter().zip(delta).map(|(a, b)| a + b).collect();
        var.set(&Tensor::from_vec(now, (2, 4), var.device()).unwrap())
            .unwrap();
    }

    #[test]
    fn pruned_weights_learn_in_the_shadow_and_come_back_past_the_threshold() {
        let settings = Splicing {
            until: 1.0,
            margin: 0.1,
        };
        let (model, mut s, _) = round(settings, 2);
        let var = fc(&model);
        assert_eq!(model.params()[0].name(), "fc.weight");
        // Threshold 0.5 (the smallest kept |w|): band [0.45, 0.55].
        // Pruned 0.2 (index 3) gets +0.3 → 0.5: inside the band, stays out; the network
        // still holds 0 there. Kept 0.5 (index 2) gets −0.04 → 0.46: stays in.
        step(&var, &[0.0, 0.0, -0.04, 0.3, 0.0, 0.0, 0.0, 0.0]);
        s.step().unwrap();
        let w = values(&var);
        assert_eq!(w[3], 0.0);
        assert!((w[2] - 0.46).abs() < 1e-6);
        // Another +0.1 on index 3 (shadow 0.6 > 0.55): it comes back with its shadow value;
        // index 2 falls to 0.40 < 0.45 and leaves.
        step(&var, &[0.0, 0.0, -0.06, 0.1, 0.0, 0.0, 0.0, 0.0]);
        s.step().unwrap();
        let w = values(&var);
        assert!((w[3] - 0.6).abs() < 1e-6, "{w:?}");
        assert_eq!(w[2], 0.0);
        // The round ends without freezing: the exact cut of the shadow.
        let mut weights = model.export().unwrap();
        let (shadow, report) = s.finish(&mut weights).unwrap();
        let kept = weights[0].values.iter().filter(|v| **v != 0.0).count();
        assert_eq!(kept, 4);
        assert!((weights[0].values[3] - 0.6).abs() < 1e-6);
        assert_eq!(report.recovered, 1);
        // The shadow keeps the pruned weights' values for the next round.
        assert!((shadow[0].values[2] - 0.4).abs() < 1e-6);
        assert!((shadow[0].values[1] + 0.1).abs() < 1e-6);
    }

    #[test]
    fn the_mask_freezes_as_an_exact_cut_after_the_splicing_epochs() {
        let settings = Splicing {
            until: 0.5,
            margin: 0.0,
        };
        let (model, mut s, _) = round(settings, 4);
        let var = fc(&model);
        // Pruned −0.1 (index 1) learns to −0.7 and comes back (five kept for now); the
        // exact cut when the mask freezes drops the smallest, 0.5 (index 2).
        step(&var, &[0.0, -0.6, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        s.step().unwrap();
        s.epoch_done().unwrap();
        assert!(s.frozen.is_none());
        s.epoch_done().unwrap();
        let w = values(&var);
        assert_eq!(w.iter().filter(|v| **v != 0.0).count(), 4, "{w:?}");
        assert!((w[1] + 0.7).abs() < 1e-6);
        assert_eq!(w[2], 0.0);
        // Frozen: updates to pruned weights are dropped, kept ones train.
        step(&var, &[0.1, 0.0, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0]);
        s.step().unwrap();
        let w = values(&var);
        assert_eq!(w[2], 0.0);
        assert!((w[0] - 0.9).abs() < 1e-6);
        let mut weights = model.export().unwrap();
        let (_, report) = s.finish(&mut weights).unwrap();
        assert_eq!(report.recovered, 1);
        assert_eq!(report.epochs, 2);
    }

    #[test]
    fn splicing_epochs_round_up_and_stay_in_the_round() {
        let s = |until| Splicing { until, margin: 0.1 };
        assert_eq!(s(0.75).epochs(20), 15);
        assert_eq!(s(0.7).epochs(3), 3);
        assert_eq!(s(0.01).epochs(3), 1);
        assert_eq!(s(1.0).epochs(5), 5);
    }
}
