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

use crate::compress::Result;

/// Round-to-nearest of each `group`-long run of each row on the affine (or symmetric) grid
/// of `bits`, dequantized.
fn rtn_groups(w: &[f32], cols: usize, group: usize, bits: u8, symmetric: bool) -> Vec<f32> {
    let p = super::gptq::GptqParams {
        bits,
        group_size: Some(group),
        symmetric,
        act_order: false,
        damp: 0.0,
        block_size: 1,
    };
    super::gptq::rtn(w, w.len() / cols.max(1), cols, &p)
}

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
    } = *p;
    let gram_t = crate::compress::calib::gram_tensor(gram, cols)?;
    let candidate = |alpha: f64| -> Result<(Vec<Vec<f32>>, f64)> {
        // s_j = mean|x_j|^α, normalised so that √(max·min) = 1 (the reference's).
        let mut s: Vec<f64> = mean_abs.iter().map(|m| m.max(1e-8).powf(alpha)).collect();
        let (lo, hi) = s
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        let norm = (lo * hi).sqrt().max(1e-12);
        for v in &mut s {
            *v /= norm;
        }
        let mut outs = Vec::with_capacity(weights.len());
        let mut deltas = Vec::with_capacity(weights.len());
        for (w, _) in weights {
            let scaled: Vec<f32> = w
                .iter()
                .enumerate()
                .map(|(i, x)| (f64::from(*x) * s[i % cols]) as f32)
                .collect();
            let q = rtn_groups(&scaled, cols, group, bits, symmetric);
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
    Ok(AwqGroup {
        weights: best,
        alpha: best_alpha,
        error: best_err,
        error_rtn,
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
        };
        let out = awq(&[(&w, rows)], cols, &mean_abs, &gram, &p).unwrap();
        assert!(out.alpha > 0.0, "{}", out.alpha);
        assert!(
            out.error < 0.8 * out.error_rtn,
            "{} vs {}",
            out.error,
            out.error_rtn
        );
        let rel = relative_output_error(&w, &out.weights[0], &gram, cols);
        let rtn = rtn_groups(&w, cols, 16, 3, true);
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
        let rtn = rtn_groups(&w, 64, 64, 3, false);
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
