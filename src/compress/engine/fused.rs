//! Fused kernels for evaluation forward passes (no backward pass: never used in training).
//!
//! candle runs `softmax(scores + bias)` as a broadcast add, then its softmax, each a pass over
//! the `[b, heads, s, s]` scores, and computes `exp` with the C library's scalar `expf`; SwiGLU's
//! `silu(gate) · up` is two more passes. These kernels do each in one pass, with an `exp` that
//! the compiler vectorises (Cody–Waite range reduction and a degree-6 polynomial on
//! [−ln2/2, ln2/2]: relative error below 3e-7 over the range used, about 4 ulp), split over the thread
//! budget.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Shape};

use crate::compress::parallel::{par_map, threads};

/// Below this many values a kernel stays on the calling thread.
const PARALLEL_MIN: usize = 1 << 15;

/// `e^x` for finite `x`, vectorisable (no branches, no table); 0 below −87.3, `f32::MAX`-ish
/// saturation above 88.7.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let underflow = x < -87.3; // masked scores: exactly 0, as expf gives
    let x = x.clamp(-87.3, 88.7);
    let n = (x * LOG2E).round_ties_even();
    let r = x - n * LN2_HI - n * LN2_LO;
    // e^r on |r| ≤ ln2/2: Taylor to r⁶ (truncation error below 1e-7 relative).
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2^n through the exponent bits (n in [−126, 128]; 2^128 does not occur after the clamp).
    let scale = f32::from_bits(((n as i32 + 127).clamp(0, 254) as u32) << 23);
    if underflow {
        0.0
    } else {
        p * scale
    }
}

/// Rows of `out` from rows of `f(i, row_in, row_out)`, split over the thread budget when large.
fn rows_par(out: &mut [f32], cols: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = out.len() / cols.max(1);
    let t = threads().min(rows).max(1);
    if t == 1 || out.len() < PARALLEL_MIN {
        for (i, row) in out.chunks_mut(cols).enumerate() {
            f(i, row);
        }
        return;
    }
    let per = rows.div_ceil(t);
    let parts: Vec<(usize, &mut [f32])> = out
        .chunks_mut(per * cols)
        .enumerate()
        .map(|(k, c)| (k * per, c))
        .collect();
    par_map(parts, |(first, part)| {
        for (i, row) in part.chunks_mut(cols).enumerate() {
            f(first + i, row);
        }
    });
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("{what}: f32 only")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("{what}: contiguous input only"),
    }
}

/// `softmax(scores + bias)` over the last dimension, for `scores` `[b, h, r, c]` and an
/// additive `bias` `[1 | b, 1, 1 | r, c]` (causal and padding masks), both contiguous.
#[derive(Debug, Clone, Copy)]
pub struct MaskedSoftmax;

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let scores = f32_slice(s1, l1, "masked-softmax scores")?;
        let bias = f32_slice(s2, l2, "masked-softmax bias")?;
        let (b, h, r, c) = l1.shape().dims4()?;
        let (bb, bh, br, bc) = l2.shape().dims4()?;
        if bh != 1 || (br != r && br != 1) || bc != c || (bb != 1 && bb != b) {
            bail!(
                "masked-softmax: bias {:?} does not fit scores {:?}",
                l2.shape(),
                l1.shape()
            )
        }
        let mut out = vec![0f32; scores.len()];
        rows_par(&mut out, c, |i, row| {
            let (batch, rr) = (i / (h * r), i % r);
            let bias_row =
                &bias[((if bb == 1 { 0 } else { batch }) * br + rr.min(br - 1)) * c..][..c];
            let x = &scores[i * c..(i + 1) * c];
            let mut max = f32::MIN;
            for ((o, &s), &m) in row.iter_mut().zip(x).zip(bias_row) {
                *o = s + m;
                max = max.max(*o);
            }
            let mut sum = 0f32;
            for o in row.iter_mut() {
                *o = exp(*o - max);
                sum += *o;
            }
            let inv = 1.0 / sum;
            for o in row.iter_mut() {
                *o *= inv;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `silu(a) · b` elementwise (SwiGLU), both contiguous and of one shape.
#[derive(Debug, Clone, Copy)]
pub struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = f32_slice(s1, l1, "silu-mul")?;
        let b = f32_slice(s2, l2, "silu-mul")?;
        if l1.shape() != l2.shape() {
            bail!("silu-mul: shapes {:?} and {:?}", l1.shape(), l2.shape())
        }
        let cols = l1.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; a.len()];
        rows_par(&mut out, cols, |i, row| {
            let (x, y) = (&a[i * cols..][..cols], &b[i * cols..][..cols]);
            for ((o, &g), &u) in row.iter_mut().zip(x).zip(y) {
                *o = g / (1.0 + exp(-g)) * u;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, D};

    #[test]
    fn exp_is_within_3e7_relative() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "{worst}");
        assert_eq!(exp(f32::MIN), 0.0);
        assert_eq!(exp(-1e30), 0.0);
    }

    #[test]
    fn fused_kernels_match_candle() {
        let dev = Device::Cpu;
        let scores = Tensor::randn(0f32, 3.0, (2, 3, 5, 5), &dev).unwrap();
        let causal: Vec<f32> = (0..25)
            .map(|i| if i % 5 > i / 5 { f32::MIN } else { 0.0 })
            .collect();
        for bias in [
            Tensor::from_vec(vec![0.0, f32::MIN, 0.0, 0.0, f32::MIN], (1, 1, 1, 5), &dev).unwrap(),
            Tensor::from_vec(causal.clone(), (1, 1, 5, 5), &dev).unwrap(),
            Tensor::from_vec([causal.clone(), causal].concat(), (2, 1, 5, 5), &dev).unwrap(),
        ] {
            let want =
                candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&bias).unwrap()).unwrap();
            let got = scores.apply_op2(&bias, MaskedSoftmax).unwrap();
            let d = (want - got)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(D::Minus1)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-6, "{d}");
        }
        let a = Tensor::randn(0f32, 4.0, (7, 9), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (7, 9), &dev).unwrap();
        let want = (candle_nn::ops::silu(&a).unwrap() * &b).unwrap();
        let got = a.apply_op2(&b, SiluMul).unwrap();
        let d = (want - got)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(D::Minus1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "{d}");
    }
}
