//! AWQ and HQQ: two ways past round-to-nearest on the same per-group integer grid.
//!
//! - **AWQ** (Lin et al. 2023), activation-aware: the input channels that carry large
//!   activations matter most, so each layer group's weights are scaled per input channel by
//!   `s_j = mean|x_j|^α` before rounding and divided back after (`Ŵ = Q(W·diag s)·diag s⁻¹`),
//!   which gives the salient channels a finer effective step. `α` is searched on a grid of
//!   `grid` values in [0, 1) for the lowest output error of the whole group (every layer that
//!   reads the input, as the reference does with a block's projections), measured exactly
//!   through the group's input Gram matrix: `Σ tr(ΔW·XᵀX·ΔWᵀ)`. The dequantized weights carry
//!   the scales, so nothing has to be folded into the previous op (that is only needed when the
//!   integer codes are stored).
//! - **HQQ** (Badri & Shaji 2023), calibration-free: for each group the affine zero-point is
//!   optimised by half-quadratic splitting of an ℓp (p = 0.7) reconstruction error —
//!   alternating a generalised soft-threshold of the residual with a closed-form zero-point
//!   update, as the reference `optimize_weights_proximal` does (β₀ = 10, κ = 1.01, 20 steps,
//!   stopping when the mean error rises).

use candle_core::Tensor;

use super::gptq::rtn_grouped;
use crate::compress::Result;

/// `Σ_layers tr(ΔW·G·ΔWᵀ)` for row-major differences.
fn gram_error(deltas: &[Vec<f32>], gram: &Tensor, cols: usize) -> Result<f64> {
    deltas
        .iter()
        .map(|d| crate::compress::calib::output_energy(d, gram, cols))
        .sum()
}

/// AWQ's result for one layer group.
#[derive(Debug, Clone)]
pub struct AwqGroup {
    /// The dequantized weights of each layer, in the order given.
    pub weights: Vec<Vec<f32>>,
    /// The exponent chosen.
    pub alpha: f64,
    /// The group's output error (Σ over layers of tr(ΔW·XᵀX·ΔWᵀ)) with the chosen scales
    /// and with α = 0 (plain round-to-nearest), for the report.
    pub error: f64,
    /// Plain round-to-nearest's error.
    pub error_rtn: f64,
    /// Mean clipping ratio chosen (1 without the clipping search).
    pub clip: f64,
    /// The error with the chosen scales before the clipping search.
    pub error_unclipped: f64,
}

/// AWQ's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AwqParams {
    /// Columns per scale.
    pub group: usize,
    /// Bits per weight.
    pub bits: u8,
    /// Symmetric or affine grid.
    pub symmetric: bool,
    /// Exponents tried: 0, 1/grid, …, (grid−1)/grid.
    pub grid: usize,
    /// Then search each row group's clipping range (the reference's `auto_clip`).
    pub clip: bool,
}

/// Clipping ratios tried: 1, 1 − 0.5/20, …, down to 0.525 (the reference's grid).
const CLIP_GRID: usize = 20;
/// The most a range is shrunk.
const MAX_SHRINK: f32 = 0.5;

/// AWQ's clipping search for one layer whose weights `w` (`[rows, cols]`) are scaled by `s`
/// per column: for each row's group of `group` columns, the shrink of the grid's range with
/// the lowest output error `δ·H_gg·δᵀ` through the group's diagonal block of the Gram matrix
/// (the reference measures the same per group on sampled inputs). Ratio 1 is plain
/// round-to-nearest, so no group gets worse. Returns the dequantized weights and the mean
/// ratio chosen.
#[allow(clippy::too_many_arguments)]
fn clip_search(
    w: &[f32],
    s: &[f64],
    cols: usize,
    group: usize,
    bits: u8,
    symmetric: bool,
    gram: &[f64],
) -> Result<(Vec<f32>, f64)> {
    let rows = w.len() / cols.max(1);
    let groups = cols / group.max(1);
    let scaled: Vec<f32> = w
        .iter()
        .enumerate()
        .map(|(i, x)| (f64::from(*x) * s[i % cols]) as f32)
        .collect();
    let mut out = vec![0f32; w.len()];
    let mut chosen = 0f64;
    let (mut q, mut delta) = (vec![0f32; rows * group], vec![0f32; rows * group]);
    for k in 0..groups {
        let c0 = k * group;
        let block: Vec<f32> = (0..group * group)
            .map(|i| gram[(c0 + i / group) * cols + c0 + i % group] as f32)
            .collect();
        let h = Tensor::from_vec(block, (group, group), &candle_core::Device::Cpu)?;
        let mut best = vec![(f32::INFINITY, 1f32); rows];
        for i in 0..CLIP_GRID {
            let clip = 1.0 - i as f32 * MAX_SHRINK / CLIP_GRID as f32;
            for r in 0..rows {
                let at = r * cols + c0;
                let dst = &mut q[r * group..(r + 1) * group];
                super::gptq::rtn_clipped(&scaled[at..at + group], bits, symmetric, clip, dst);
                for j in 0..group {
                    dst[j] = (f64::from(dst[j]) / s[c0 + j]) as f32;
                    delta[r * group + j] = dst[j] - w[at + j];
                }
            }
            let d = Tensor::from_slice(&delta, (rows, group), &candle_core::Device::Cpu)?;
            let errors = d.matmul(&h)?.mul(&d)?.sum(1)?.to_vec1::<f32>()?;
            for (r, e) in errors.into_iter().enumerate() {
                // Ratio 1 (round-to-nearest) is always taken first.
                if i == 0 || e < best[r].0 {
                    best[r] = (e, clip);
                    let at = r * cols + c0;
                    out[at..at + group].copy_from_slice(&q[r * group..(r + 1) * group]);
                }
            }
        }
        chosen += best.iter().map(|b| f64::from(b.1)).sum::<f64>();
    }
    Ok((out, chosen / (rows * groups).max(1) as f64))
}

/// AWQ on the layers `weights` (each `[rows_i, cols]`, row-major) that read one input with
/// per-column mean absolute value `mean_abs` and Gram matrix `gram` (`cols × cols`).
pub fn awq(
    weights: &[(&[f32], usize)],
    cols: usize,
    mean_abs: &[f64],
    gram: &[f64],
    p: &AwqParams,
) -> Result<AwqGroup> {
    let AwqParams {
        group,
        bits,
        symmetric,
        grid,
        clip,
    } = *p;
    let gram_t = crate::compress::calib::gram_tensor(gram, cols)?;
    let scales = |alpha: f64| -> Vec<f64> {
        // s_j = mean|x_j|^α, normalised so that √(max·min) = 1 (the reference's).
        let mut s: Vec<f64> = mean_abs.iter().map(|m| m.max(1e-8).powf(alpha)).collect();
        let (lo, hi) = s
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        let norm = (lo * hi).sqrt().max(1e-12);
        for v in &mut s {
            *v /= norm;
        }
        s
    };
    let candidate = |alpha: f64| -> Result<(Vec<Vec<f32>>, f64)> {
        let s = scales(alpha);
        let mut outs = Vec::with_capacity(weights.len());
        let mut deltas = Vec::with_capacity(weights.len());
        for (w, _) in weights {
            let scaled: Vec<f32> = w
                .iter()
                .enumerate()
                .map(|(i, x)| (f64::from(*x) * s[i % cols]) as f32)
                .collect();
            let q = rtn_grouped(&scaled, cols, group, bits, symmetric);
            let out: Vec<f32> = q
                .iter()
                .enumerate()
                .map(|(i, x)| (f64::from(*x) / s[i % cols]) as f32)
                .collect();
            deltas.push(out.iter().zip(w.iter()).map(|(a, b)| a - b).collect());
            outs.push(out);
        }
        Ok((outs, gram_error(&deltas, &gram_t, cols)?))
    };
    let (mut best, error_rtn) = candidate(0.0)?;
    let (mut best_alpha, mut best_err) = (0.0, error_rtn);
    for k in 1..grid.max(1) {
        let alpha = k as f64 / grid as f64;
        let (outs, err) = candidate(alpha)?;
        if err < best_err {
            (best, best_alpha, best_err) = (outs, alpha, err);
        }
    }
    let error_unclipped = best_err;
    let mut mean_clip = 1.0;
    if clip {
        let s = scales(best_alpha);
        let mut outs = Vec::with_capacity(weights.len());
        let mut deltas = Vec::with_capacity(weights.len());
        let mut ratios = 0.0;
        for (w, _) in weights {
            let (out, ratio) = clip_search(w, &s, cols, group, bits, symmetric, gram)?;
            deltas.push(out.iter().zip(w.iter()).map(|(a, b)| a - b).collect());
            outs.push(out);
            ratios += ratio;
        }
        let err = gram_error(&deltas, &gram_t, cols)?;
        // Per-group choices ignore the error's cross-group terms: keep them only when the
        // whole group's error fell.
        if err < best_err {
            (best, best_err) = (outs, err);
            mean_clip = ratios / weights.len().max(1) as f64;
        }
    }
    Ok(AwqGroup {
        weights: best,
        alpha: best_alpha,
        error: best_err,
        error_rtn,
        clip: mean_clip,
        error_unclipped,
    })
}

/// HQQ's dequantized weights for row-major `[rows, cols]` `w`, affine `bits`, groups of
/// `group` columns.
pub fn hqq(w: &[f32], group: usize, bits: u8) -> Vec<f32> {
    if group == 0 {
        return w.to_vec();
    }
    let levels = ((1u32 << bits) - 1) as f32;
    let mut out = vec![0f32; w.len()];
    for (chunk, dst) in w.chunks(group).zip(out.chunks_mut(group)) {
        let (lo, hi) = chunk
            .iter()
            .fold((f32::MAX, f32::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        let scale = (hi - lo) / levels;
        if !(scale > 0.0 && scale.is_finite()) {
            dst.copy_from_slice(chunk);
            continue;
        }
        let inv = 1.0 / scale;
        // Start from round-to-nearest's grid (integer zero-point: 0 stays exact), so the
        // result is never worse than it in mean absolute error.
        let mut zero = (-lo * inv).round_ties_even();
        let deq = |zero: f32, dst: &mut [f32]| {
            for (d, x) in dst.iter_mut().zip(chunk) {
                let q = (x * inv + zero).round_ties_even().clamp(0.0, levels);
                *d = (q - zero) * scale;
            }
        };
        deq(zero, dst);
        let err = |dst: &[f32]| -> f32 {
            dst.iter()
                .zip(chunk)
                .map(|(a, b)| (a - b).abs())
                .sum::<f32>()
                / chunk.len() as f32
        };
        let mut best_err = err(dst);
        let mut best_zero = zero;
        let (p, mut beta, kappa) = (0.7f32, 10f32, 1.01f32);
        let mut rec = vec![0f32; chunk.len()];
        for _ in 0..20 {
            // W_q and its reconstruction with the current zero.
            let qs: Vec<f32> = chunk
                .iter()
                .map(|x| (x * inv + zero).round_ties_even().clamp(0.0, levels))
                .collect();
            for (r, q) in rec.iter_mut().zip(&qs) {
                *r = (q - zero) * scale;
            }
            // W_e = shrink_p(W − W_r): sign · relu(|e| − |e|^(p−1)/β).
            let mut sum = 0f32;
            for ((x, r), q) in chunk.iter().zip(&rec).zip(&qs) {
                let e = x - r;
                let a = e.abs();
                let shrunk = if a > 0.0 {
                    e.signum() * (a - a.powf(p - 1.0) / beta).max(0.0)
                } else {
                    0.0
                };
                sum += q - (x - shrunk) * inv;
            }
            zero = sum / chunk.len() as f32;
            beta *= kappa;
            deq(zero, dst);
            let e = err(dst);
            if e < best_err {
                (best_err, best_zero) = (e, zero);
            } else {
                break;
            }
        }
        deq(best_zero, dst);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::calib::relative_output_error;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn awq_protects_the_loud_channels() {
        // Inputs whose channels 0..4 are 20× louder than the rest: scaling them up before
        // rounding lowers the output error; α = 0 is round-to-nearest exactly.
        let (rows, cols, n) = (16, 32, 400);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut gram = vec![0f64; cols * cols];
        let mut mean_abs = vec![0f64; cols];
        for _ in 0..n {
            let x: Vec<f64> = (0..cols)
                .map(|c| rng.gen_range(-1.0..1.0) * if c < 4 { 20.0 } else { 1.0 })
                .collect();
            for i in 0..cols {
                mean_abs[i] += x[i].abs() / n as f64;
                for j in 0..cols {
                    gram[i * cols + j] += x[i] * x[j];
                }
            }
        }
        let p = AwqParams {
            group: 16,
            bits: 3,
            symmetric: true,
            grid: 20,
            clip: false,
        };
        let out = awq(&[(&w, rows)], cols, &mean_abs, &gram, &p).unwrap();
        // The clipping search lowers the error further, from the same exponent.
        let clipped = awq(
            &[(&w, rows)],
            cols,
            &mean_abs,
            &gram,
            &AwqParams { clip: true, ..p },
        )
        .unwrap();
        assert_eq!(clipped.alpha, out.alpha);
        assert!(
            clipped.error < out.error,
            "{} vs {}",
            clipped.error,
            out.error
        );
        assert!(clipped.clip < 1.0 && clipped.clip > 0.5, "{}", clipped.clip);
        assert_eq!(clipped.error_unclipped, out.error);
        assert!(out.alpha > 0.0, "{}", out.alpha);
        assert!(
            out.error < 0.8 * out.error_rtn,
            "{} vs {}",
            out.error,
            out.error_rtn
        );
        let rel = relative_output_error(&w, &out.weights[0], &gram, cols);
        let rtn = rtn_grouped(&w, cols, 16, 3, true);
        assert!(rel < relative_output_error(&w, &rtn, &gram, cols));
    }

    #[test]
    fn hqq_lowers_the_weight_error_of_round_to_nearest() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        // Heavy-tailed weights, where the min–max grid wastes levels.
        let w: Vec<f32> = (0..64 * 64)
            .map(|_| {
                let u: f32 = rng.gen_range(-1.0..1.0);
                u * u * u
            })
            .collect();
        let rtn = rtn_grouped(&w, 64, 64, 3, false);
        let h = hqq(&w, 64, 3);
        let l1 = |q: &[f32]| q.iter().zip(&w).map(|(a, b)| (a - b).abs()).sum::<f32>();
        assert!(l1(&h) < l1(&rtn), "{} vs {}", l1(&h), l1(&rtn));
        // Every group still holds at most 2^bits values.
        for g in h.chunks(64) {
            let levels: std::collections::BTreeSet<u32> = g.iter().map(|v| v.to_bits()).collect();
            assert!(levels.len() <= 8);
        }
    }
}
