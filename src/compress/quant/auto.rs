//! `quantize` with `method: "auto"`: a GGUF type per tensor under a size budget, chosen from
//! measured sensitivities.
//!
//! Each selected tensor's sensitivity to each candidate type is measured on the calibration
//! set with *only that tensor* stored as that type (written and decoded as the file would
//! hold it): the mean KL divergence of the network's output distribution from the float
//! network's (per token for a language model, per row for a classifier), or, for an encoder
//! without a head, the mean `1 − cosine` of its embeddings. Networks that run block by block
//! start each measurement at the tensor's block from kept hidden states, so a late tensor
//! costs a few blocks, not the whole network. The choice minimises the summed sensitivity
//! within the budget: a multiple-choice knapsack solved exactly by dynamic programming over
//! sizes rounded up to a grid of [`GRID`] cells (rounding up keeps every solution within
//! the true budget). The summed sensitivity of the choice is its *predicted* divergence; the
//! step also measures the mixed network's, which differs where errors interact.

use std::collections::HashMap;

use candle_core::{Tensor, D};

use crate::compress::calib::{self, CalibrationSet};
use crate::compress::engine::bert::unit_rows;
use crate::compress::engine::data::Batch;
use crate::compress::engine::{BlockState, Family, LayerInput, Network};
use crate::compress::formats::gguf::{self, GgufType};
use crate::compress::progress::Ctx;
use crate::compress::quant::Importance;
use crate::compress::{Error, Result};

/// Cells of the size grid the knapsack is solved on.
pub const GRID: u64 = 1 << 15;

/// One type a tensor can be stored as, and its size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    /// The type the tensor is stored as (a k-quant's fallback where its blocks do not divide
    /// the rows).
    pub ty: GgufType,
    /// Bytes of the tensor's data in that type.
    pub bytes: u64,
    /// Measured divergence with only this tensor stored as `ty` (0 before measuring).
    pub divergence: f64,
}

/// The distinct types `candidates` store a tensor of `shape` as (each candidate or its
/// fallback), smallest first; empty when none fits its rows.
pub fn choices(shape: &[usize], candidates: &[GgufType]) -> Vec<Choice> {
    let row = shape.last().copied().unwrap_or(0);
    let numel: u64 = shape.iter().map(|&d| d as u64).product();
    let mut out: Vec<Choice> = Vec::new();
    for c in candidates {
        let Some(ty) = c.for_row(row) else { continue };
        if out.iter().any(|o| o.ty == ty) {
            continue;
        }
        out.push(Choice {
            ty,
            bytes: numel / ty.block_size() as u64 * ty.block_bytes() as u64,
            divergence: 0.0,
        });
    }
    out.sort_by(|a, b| {
        a.bytes
            .cmp(&b.bytes)
            .then(a.ty.bits_per_weight().total_cmp(&b.ty.bits_per_weight()))
    });
    out
}

/// What the output is compared by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Divergence {
    /// Mean KL(float ‖ quantized) of the softmax over the last dimension, per position.
    Kl,
    /// Mean `1 − cosine` of the output rows (an encoder's sentence embeddings).
    Cosine,
}

impl Divergence {
    /// The measure for `net`'s output: cosine for a bert encoder without a head, KL otherwise.
    pub fn of(net: &dyn Network) -> Divergence {
        if net.family() == Family::Bert && !net.has_head() {
            Divergence::Cosine
        } else {
            Divergence::Kl
        }
    }

    /// API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Divergence::Kl => "kl_divergence",
            Divergence::Cosine => "one_minus_cosine",
        }
    }
}

/// The float network's outputs on the calibration set, and (for networks that run block by
/// block) its hidden states at every block's input, from which perturbed runs restart.
pub struct Reference {
    measure: Divergence,
    /// Per batch: the reference probabilities (KL) or unit rows (cosine).
    targets: Vec<Tensor>,
    /// Per batch: Σ p·log p per position (KL only).
    neg_entropy: Vec<Option<Tensor>>,
    /// `states[b][i]`: batch `i`'s input of block `b` (`b` = blocks: after the last).
    states: Vec<Vec<BlockState>>,
    /// The block that first reads each layer's weight (`{layer}.weight`).
    block_of: HashMap<String, usize>,
}

impl Reference {
    /// Runs the float network over `set` once.
    pub fn new(net: &dyn Network, set: &CalibrationSet, ctx: &Ctx) -> Result<Reference> {
        let measure = Divergence::of(net);
        let mut states = Vec::new();
        let mut block_of = HashMap::new();
        let outputs: Vec<Tensor> = match net.block_runner() {
            Some(runner) => {
                let mut current: Vec<BlockState> = set
                    .batches
                    .iter()
                    .map(|b| runner.embed(b))
                    .collect::<Result<_>>()?;
                for block in 0..runner.num_blocks() {
                    ctx.check()?;
                    let mut next = Vec::with_capacity(current.len());
                    for (i, s) in current.iter().enumerate() {
                        next.push(runner.run_block(block, s, &mut |input: LayerInput<'_>| {
                            if i == 0 {
                                block_of
                                    .entry(format!("{}.weight", input.layer))
                                    .or_insert(block);
                            }
                            Ok(())
                        })?);
                    }
                    states.push(std::mem::replace(&mut current, next));
                }
                let out = set
                    .batches
                    .iter()
                    .zip(&current)
                    .map(|(b, s)| runner.finish(b, s))
                    .collect::<Result<_>>()?;
                states.push(current);
                out
            }
            None => set
                .batches
                .iter()
                .map(|b| net.forward(b, crate::compress::engine::Mode::Eval))
                .collect::<Result<_>>()?,
        };
        let mut targets = Vec::with_capacity(outputs.len());
        let mut neg_entropy = Vec::with_capacity(outputs.len());
        for out in outputs {
            match measure {
                Divergence::Kl => {
                    let logp = candle_nn::ops::log_softmax(&out, D::Minus1)?;
                    let p = logp.exp()?;
                    neg_entropy.push(Some((&p * &logp)?.sum(D::Minus1)?));
                    targets.push(p);
                }
                Divergence::Cosine => {
                    targets.push(unit_rows(&out)?);
                    neg_entropy.push(None);
                }
            }
        }
        Ok(Reference {
            measure,
            targets,
            neg_entropy,
            states,
            block_of,
        })
    }

    /// The measure used.
    pub fn measure(&self) -> Divergence {
        self.measure
    }

    /// The mean divergence of `net`'s current output from the reference over `set`, with
    /// `net` equal to the reference before block `start` (0: run it whole).
    pub fn divergence(
        &self,
        net: &dyn Network,
        set: &CalibrationSet,
        start: usize,
        ctx: &Ctx,
    ) -> Result<f64> {
        let (mut sum, mut count) = (0f64, 0usize);
        for (i, batch) in set.batches.iter().enumerate() {
            ctx.check()?;
            let out = self.output(net, batch, i, start)?;
            let per_row = match self.measure {
                Divergence::Kl => {
                    let logq = candle_nn::ops::log_softmax(&out, D::Minus1)?;
                    let cross = (&self.targets[i] * &logq)?.sum(D::Minus1)?;
                    let neg = self.neg_entropy[i]
                        .as_ref()
                        .ok_or_else(|| Error::Internal("KL reference without entropy".into()))?;
                    (neg - cross)?
                }
                Divergence::Cosine => {
                    let cos = (&self.targets[i] * unit_rows(&out)?)?.sum(D::Minus1)?;
                    cos.affine(-1.0, 1.0)?
                }
            };
            let v = per_row.flatten_all()?.to_vec1::<f32>()?;
            count += v.len();
            sum += v.iter().map(|&x| f64::from(x.max(0.0))).sum::<f64>();
        }
        Ok(if count == 0 { 0.0 } else { sum / count as f64 })
    }

    /// `net`'s output on batch `i`, starting at block `start` where the network runs by
    /// blocks.
    fn output(&self, net: &dyn Network, batch: &Batch, i: usize, start: usize) -> Result<Tensor> {
        match net.block_runner() {
            Some(runner) if !self.states.is_empty() => {
                let mut s = self.states[start][i].clone();
                for block in start..runner.num_blocks() {
                    s = runner.run_block(block, &s, &mut |_| Ok(()))?;
                }
                runner.finish(batch, &s)
            }
            _ => net.forward(batch, crate::compress::engine::Mode::Eval),
        }
    }

    /// The block a change of `tensor` first affects (0 when unknown: a whole run).
    pub fn start_of(&self, tensor: &str) -> usize {
        self.block_of.get(tensor).copied().unwrap_or(0)
    }
}

/// One selected tensor and its choices.
#[derive(Debug, Clone)]
pub struct Candidates {
    /// Tensor name.
    pub tensor: String,
    /// Elements.
    pub numel: u64,
    /// Types it can be stored as, smallest first (divergences filled by [`measure`]).
    pub choices: Vec<Choice>,
}

/// Measures every choice of every tensor: the tensor alone stored as the choice's type (with
/// its importance weights for k-quants, as the file is written), the rest of the network
/// float. The network is left as it was.
pub fn measure(
    net: &dyn Network,
    set: &CalibrationSet,
    reference: &Reference,
    tensors: &mut [Candidates],
    importance: &Importance,
    ctx: &Ctx,
) -> Result<()> {
    let total: usize = tensors.iter().map(|t| t.choices.len()).sum();
    let mut done = 0;
    for t in tensors.iter_mut() {
        let (shape, original) = calib::weight(net, &t.tensor)?;
        let row = shape.last().copied().unwrap_or(0);
        let start = reference.start_of(&t.tensor);
        let imatrix = importance.get(&t.tensor).map(Vec::as_slice);
        for c in &mut t.choices {
            ctx.report(
                done as f64 / total.max(1) as f64,
                &format!("sensitivity of {} as {}", t.tensor, c.ty),
            );
            let stored = gguf::roundtrip(&original, row, c.ty, imatrix)?;
            calib::set_weight(net, &t.tensor, stored)?;
            let d = reference.divergence(net, set, start, ctx);
            calib::set_weight(net, &t.tensor, original.clone())?;
            c.divergence = d?;
            done += 1;
        }
    }
    Ok(())
}

/// The choice per tensor (an index into its `choices`) that minimises the summed divergence
/// with the tensors' bytes at most `budget`; `None` when even the smallest choices exceed it.
pub fn solve(tensors: &[Candidates], budget: u64) -> Option<Vec<usize>> {
    let smallest: u64 = tensors
        .iter()
        .map(|t| t.choices.first().map_or(0, |c| c.bytes))
        .sum();
    if smallest > budget || tensors.iter().any(|t| t.choices.is_empty()) {
        return None;
    }
    let largest: u64 = tensors
        .iter()
        .map(|t| t.choices.last().map_or(0, |c| c.bytes))
        .sum();
    if largest <= budget {
        return Some(tensors.iter().map(|t| best_unbounded(&t.choices)).collect());
    }
    let cell = budget.div_ceil(GRID).max(1);
    let cap = (budget / cell) as usize;
    let weight = |c: &Choice| c.bytes.div_ceil(cell) as usize;
    // best[c]: least divergence of the tensors so far within c cells; pick[i][c] the choice.
    let mut best = vec![0f64; cap + 1];
    let mut pick: Vec<Vec<u8>> = Vec::with_capacity(tensors.len());
    for t in tensors {
        let mut next = vec![f64::INFINITY; cap + 1];
        let mut chosen = vec![u8::MAX; cap + 1];
        for (j, c) in t.choices.iter().enumerate() {
            let w = weight(c);
            for room in w..=cap {
                let v = best[room - w] + c.divergence;
                if v < next[room] {
                    next[room] = v;
                    chosen[room] = j as u8;
                }
            }
        }
        best = next;
        pick.push(chosen);
    }
    if best[cap].is_infinite() {
        // Rounding up to the grid lost the room the true sizes have: the smallest choices
        // fit (checked above).
        return Some(vec![0; tensors.len()]);
    }
    let mut room = cap;
    let mut out = vec![0; tensors.len()];
    for (i, t) in tensors.iter().enumerate().rev() {
        let j = pick[i][room] as usize;
        out[i] = j;
        room -= weight(&t.choices[j]);
    }
    Some(out)
}

/// The least-divergence choice when size does not bind (the smaller on ties).
fn best_unbounded(choices: &[Choice]) -> usize {
    let mut best = 0;
    for (j, c) in choices.iter().enumerate() {
        if c.divergence < choices[best].divergence {
            best = j;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(name: &str, opts: &[(u64, f64)]) -> Candidates {
        Candidates {
            tensor: name.into(),
            numel: 0,
            choices: opts
                .iter()
                .map(|&(bytes, divergence)| Choice {
                    ty: GgufType::Q8_0,
                    bytes,
                    divergence,
                })
                .collect(),
        }
    }

    /// Every assignment, for checking the solver on small cases.
    fn brute(tensors: &[Candidates], budget: u64) -> Option<f64> {
        let mut best: Option<f64> = None;
        let n = tensors.len();
        let mut idx = vec![0usize; n];
        loop {
            let bytes: u64 = (0..n).map(|i| tensors[i].choices[idx[i]].bytes).sum();
            let div: f64 = (0..n).map(|i| tensors[i].choices[idx[i]].divergence).sum();
            if bytes <= budget && best.is_none_or(|b| div < b) {
                best = Some(div);
            }
            let mut k = 0;
            loop {
                if k == n {
                    return best;
                }
                idx[k] += 1;
                if idx[k] < tensors[k].choices.len() {
                    break;
                }
                idx[k] = 0;
                k += 1;
            }
        }
    }

    #[test]
    fn solver_matches_brute_force_and_keeps_the_budget() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for case in 0..200 {
            let n = rng.gen_range(1..6);
            let tensors: Vec<Candidates> = (0..n)
                .map(|i| {
                    let k = rng.gen_range(1..5);
                    let mut bytes = rng.gen_range(10..100u64);
                    let mut div = rng.gen_range(1.0..10.0f64);
                    let opts: Vec<(u64, f64)> = (0..k)
                        .map(|_| {
                            bytes += rng.gen_range(1..60);
                            div *= rng.gen_range(0.1..1.0);
                            (bytes, div)
                        })
                        .collect();
                    cands(&format!("t{i}"), &opts)
                })
                .collect();
            let min: u64 = tensors.iter().map(|t| t.choices[0].bytes).sum();
            let max: u64 = tensors
                .iter()
                .map(|t| t.choices.last().unwrap().bytes)
                .sum();
            let budget = rng.gen_range(min.saturating_sub(5)..=max + 5);
            let got = solve(&tensors, budget);
            let want = brute(&tensors, budget);
            match (got, want) {
                (None, None) => {}
                (Some(pick), Some(w)) => {
                    let bytes: u64 = pick
                        .iter()
                        .zip(&tensors)
                        .map(|(&j, t)| t.choices[j].bytes)
                        .sum();
                    let div: f64 = pick
                        .iter()
                        .zip(&tensors)
                        .map(|(&j, t)| t.choices[j].divergence)
                        .sum();
                    assert!(bytes <= budget, "case {case}: {bytes} > {budget}");
                    // Sizes this small sit on a grid of one byte: the optimum exactly.
                    assert!((div - w).abs() < 1e-9, "case {case}: {div} vs {w}");
                }
                (g, w) => panic!("case {case}: {g:?} vs {w:?}"),
            }
        }
    }

    #[test]
    fn a_budget_below_the_smallest_choices_has_no_solution() {
        let t = [cands("a", &[(10, 1.0), (20, 0.5)]), cands("b", &[(5, 1.0)])];
        assert_eq!(solve(&t, 14), None);
        assert_eq!(solve(&t, 15), Some(vec![0, 0]));
        assert_eq!(solve(&t, 25), Some(vec![1, 0]));
    }

    #[test]
    fn choices_collapse_fallbacks_and_sort_by_size() {
        // Rows of 576: q4_k → q5_0, q5_k → q5_1, q6_k and q8_0 → q8_0.
        let c = choices(
            &[64, 576],
            &[GgufType::Q8_0, GgufType::Q6K, GgufType::Q5K, GgufType::Q4K],
        );
        let tys: Vec<GgufType> = c.iter().map(|c| c.ty).collect();
        assert_eq!(tys, vec![GgufType::Q5_0, GgufType::Q5_1, GgufType::Q8_0]);
        assert_eq!(c[0].bytes, 64 * 576 / 32 * 22);
        // Rows of 256 keep the k-quants.
        let c = choices(&[4, 256], &[GgufType::Q4K, GgufType::Q6K]);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].ty, GgufType::Q4K);
        // Nothing fits rows of 48.
        assert!(choices(&[4, 48], &[GgufType::Q4K]).is_empty());
    }

    #[test]
    fn roundtrip_is_what_the_file_decodes_to() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let values: Vec<f32> = (0..4 * 256).map(|_| rng.gen_range(-1.0..1.0)).collect();
        for ty in GgufType::ALL {
            let back = gguf::roundtrip(&values, 256, ty, None).unwrap();
            let t = Tensor::from_vec(values.clone(), (4, 256), &candle_core::Device::Cpu).unwrap();
            let q = candle_core::quantized::QTensor::quantize(&t, ty.ggml_dtype()).unwrap();
            let want = q
                .dequantize(&candle_core::Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(back, want, "{ty}");
        }
    }
}
