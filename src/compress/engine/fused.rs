//! Fused transformer ops with their backward passes, for training: layer normalisation, the
//! softmax of attention scores and the exact (erf) GELU.
//!
//! candle's fused kernels for these have no backward pass (CANDLE.md), and written out in
//! candle's element-wise ops each takes about ten full-size temporaries forward and twice as
//! many backward, which is most of a transformer training step that is not a matrix product.
//! Here each direction is one pass over the rows on candle's worker pool, computing what
//! PyTorch computes: the same formulas, f32 throughout. The softmax also serves evaluation;
//! llama evaluation adds two ops without a backward pass (the rotary embedding of split heads,
//! the gated MLP's `silu(gate)·up`); the rest of evaluation keeps candle's own kernels.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::sequential::conv::{contiguous_f32, par_map, par_map2, par_units};
use crate::compress::parallel::output_buffer;

/// `(rows, width)` of a tensor normalised over its last dimension.
fn rows(layout: &Layout) -> candle_core::Result<(usize, usize)> {
    let dims = layout.shape().dims();
    let h = *dims.last().unwrap_or(&1);
    if h == 0 {
        bail!("an empty last dimension")
    }
    Ok((layout.shape().elem_count() / h, h))
}

/// Mean and 1/√(var + eps) of a row (biased variance, as `torch.nn.LayerNorm`).
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Layer normalisation over the last dimension, `(x − μ)/√(σ² + ε) · w + b`.
#[derive(Debug, Clone, Copy)]
pub struct LayerNorm {
    /// ε.
    pub eps: f32,
}

/// Its backward pass: `(x, w, dy) → [rows + 2, width]` holding dx, then dw, then db.
#[derive(Debug, Clone, Copy)]
struct LayerNormGrad {
    eps: f32,
}

impl LayerNorm {
    /// `x` normalised with `w`, `b` (`[width]`), with a backward pass.
    pub fn forward(&self, x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?
            .apply_op3(&w.contiguous()?, &b.contiguous()?, *self)
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer_norm_train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, h) = rows(l1)?;
        let x = contiguous_f32("layer_norm", s1, l1)?;
        let w = contiguous_f32("layer_norm", s2, l2)?;
        let b = contiguous_f32("layer_norm", s3, l3)?;
        if w.len() != h || b.len() != h {
            bail!("layer_norm: weight and bias must have {h} values")
        }
        // Every row is written below.
        let mut y = output_buffer(x.len());
        par_units(&mut y, h, |first, out| {
            for (r, out) in out.chunks_exact_mut(h).enumerate() {
                let row = &x[(first + r) * h..][..h];
                let (mean, rstd) = row_stats(row, self.eps);
                for (((o, v), w), b) in out.iter_mut().zip(row).zip(w).zip(b) {
                    *o = (v - mean) * rstd * w + b;
                }
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = w.elem_count();
        let n = x.elem_count() / h;
        let packed =
            x.apply_op3_no_bwd(w, &grad.contiguous()?, &LayerNormGrad { eps: self.eps })?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, 1)?.reshape(w.shape())?;
        let db = packed.narrow(0, n + 1, 1)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "layer_norm_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, h) = rows(l1)?;
        let x = contiguous_f32("layer_norm backward", s1, l1)?;
        let w = contiguous_f32("layer_norm backward", s2, l2)?;
        let g = contiguous_f32("layer_norm backward", s3, l3)?;
        if g.len() != x.len() || w.len() != h {
            bail!("layer_norm backward: shapes do not fit")
        }
        // Row statistics, then dx row by row, then dw and db column by column.
        let mut stats = vec![0f32; 2 * n];
        par_units(&mut stats, 2, |first, out| {
            for (r, s) in out.chunks_exact_mut(2).enumerate() {
                let (mean, rstd) = row_stats(&x[(first + r) * h..][..h], self.eps);
                s[0] = mean;
                s[1] = rstd;
            }
        });
        let mut out = vec![0f32; (n + 2) * h];
        let (dx, dwb) = out.split_at_mut(n * h);
        par_units(dx, h, |first, dx| {
            for (r, dx) in dx.chunks_exact_mut(h).enumerate() {
                let i = first + r;
                let (mean, rstd) = (stats[2 * i], stats[2 * i + 1]);
                let (row, gr) = (&x[i * h..][..h], &g[i * h..][..h]);
                // dx = rstd · (ĝ − mean(ĝ) − x̂ · mean(ĝ · x̂)), ĝ = g · w.
                let (mut sum_g, mut sum_gx) = (0f32, 0f32);
                for ((v, gv), wv) in row.iter().zip(gr).zip(w) {
                    let gh = gv * wv;
                    sum_g += gh;
                    sum_gx += gh * (v - mean) * rstd;
                }
                let (mg, mgx) = (sum_g / h as f32, sum_gx / h as f32);
                for (((d, v), gv), wv) in dx.iter_mut().zip(row).zip(gr).zip(w) {
                    let xhat = (v - mean) * rstd;
                    *d = rstd * (gv * wv - mg - xhat * mgx);
                }
            }
        });
        let (dw, db) = dwb.split_at_mut(h);
        // Column sums over the rows: dw = Σ g · x̂, db = Σ g.
        par_units(dw, 1, |first, dw| {
            for (c, d) in dw.iter_mut().enumerate() {
                let j = first + c;
                *d = (0..n)
                    .map(|i| g[i * h + j] * (x[i * h + j] - stats[2 * i]) * stats[2 * i + 1])
                    .sum();
            }
        });
        par_units(db, 1, |first, db| {
            for (c, d) in db.iter_mut().enumerate() {
                let j = first + c;
                *d = (0..n).map(|i| g[i * h + j]).sum();
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n + 2, h))))
    }
}

/// Attention's softmax over the last dimension of `x · scale + bias`, with a backward pass
/// `scale · y ⊙ (g − Σ g ⊙ y)` for `x` (the bias, a padding or causal mask, takes no
/// gradient). For scores `[b, heads, q, s]` the bias is `[b or 1, 1, q or 1, s]`, broadcast
/// as candle's `broadcast_add` would.
#[derive(Debug, Clone, Copy)]
pub struct Softmax {
    /// The factor of the scores (attention's `1/√d`).
    pub scale: f32,
}

/// Its backward pass: `(y, dy) → dx`.
#[derive(Debug, Clone, Copy)]
struct SoftmaxGrad {
    scale: f32,
}

impl Softmax {
    /// The softmax of the rows of `x · scale (+ bias)`, with a backward pass for `x`.
    pub fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
        match bias {
            None => x.contiguous()?.apply_op1(*self),
            Some(b) => x.contiguous()?.apply_op2(&b.contiguous()?, *self),
        }
    }

    /// The softmax of `x` (rows of `h`) into a new buffer, row `r` adding `bias(r)`.
    fn run<'b>(
        &self,
        x: &[f32],
        h: usize,
        bias: impl Fn(usize) -> Option<&'b [f32]> + Sync,
    ) -> Vec<f32> {
        // Every row is written below.
        let mut y = output_buffer(x.len());
        let scale = self.scale;
        par_units(&mut y, h, |first, out| {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F, checked just above.
                    return unsafe { softmax_rows_avx512(out, x, first, h, &bias, scale) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2, checked just above.
                    return unsafe { softmax_rows_avx2(out, x, first, h, &bias, scale) };
                }
            }
            softmax_rows(out, x, first, h, &bias, scale);
        });
        y
    }
}

/// One row of the softmax: `out = softmax(row · scale + bias)`.
#[inline(always)]
fn softmax_row(out: &mut [f32], row: &[f32], bias: Option<&[f32]>, scale: f32) {
    match bias {
        Some(b) => {
            for ((o, v), b) in out.iter_mut().zip(row).zip(b) {
                *o = v * scale + b;
            }
        }
        None => {
            for (o, v) in out.iter_mut().zip(row) {
                *o = v * scale;
            }
        }
    }
    let max = lanes_max(out);
    // The exponentials in one vectorised pass, then their sum in 16 lanes.
    for o in out.iter_mut() {
        *o = exp(*o - max);
    }
    let inv = 1.0 / lanes_sum(out);
    out.iter_mut().for_each(|o| *o *= inv);
}

/// Rows `first..` of the softmax of `x` (`h` wide) into `out`.
#[inline(always)]
fn softmax_rows<'b>(
    out: &mut [f32],
    x: &[f32],
    first: usize,
    h: usize,
    bias: &impl Fn(usize) -> Option<&'b [f32]>,
    scale: f32,
) {
    for (r, out) in out.chunks_exact_mut(h).enumerate() {
        softmax_row(out, &x[(first + r) * h..][..h], bias(first + r), scale);
    }
}

/// [`softmax_rows`] compiled for AVX-512F: the same operations 16 lanes wide, so the same
/// bits as the baseline build (no FMA contraction, no reordering).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn softmax_rows_avx512<'b>(
    out: &mut [f32],
    x: &[f32],
    first: usize,
    h: usize,
    bias: &impl Fn(usize) -> Option<&'b [f32]>,
    scale: f32,
) {
    softmax_rows(out, x, first, h, bias, scale)
}

/// [`softmax_rows`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn softmax_rows_avx2<'b>(
    out: &mut [f32],
    x: &[f32],
    first: usize,
    h: usize,
    bias: &impl Fn(usize) -> Option<&'b [f32]>,
    scale: f32,
) {
    softmax_rows(out, x, first, h, bias, scale)
}

/// Evaluation only (no backward pass): the rotary position embedding of one projection,
/// `[b, s, heads·d] → [b, heads, s, d]`, as `split_heads` then `(x·cos + rotate_half(x)·sin)
/// · scale` — the same products and sums per value, so the same bits — in one pass instead
/// of a copy and six element-wise ops.
#[derive(Debug, Clone, Copy)]
pub struct RopeHeads {
    /// The number of heads the projection splits into.
    pub heads: usize,
    /// A factor applied to the result (attention's `1/√d` on the queries; 1 for keys).
    pub scale: f32,
}

impl RopeHeads {
    /// `x` `[b, s, heads·d]` with `cos`, `sin` of `[s, d]`.
    pub fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?
            .apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, self)
    }
}

impl CustomOp3 for RopeHeads {
    fn name(&self) -> &'static str {
        "rope_heads_eval"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, s, hd) = l1.shape().dims3()?;
        let heads = self.heads;
        if heads == 0 || !hd.is_multiple_of(heads) || !(hd / heads).is_multiple_of(2) {
            bail!("rope: {hd} values do not split into {heads} heads of even width")
        }
        let d = hd / heads;
        if l2.shape().dims() != [s, d] || l3.shape().dims() != [s, d] {
            bail!(
                "rope: tables {:?} / {:?} are not [{s}, {d}]",
                l2.shape(),
                l3.shape()
            )
        }
        let x = contiguous_f32("rope", s1, l1)?;
        let (cos, sin) = (
            contiguous_f32("rope", s2, l2)?,
            contiguous_f32("rope", s3, l3)?,
        );
        let half = d / 2;
        let mut y = output_buffer(x.len());
        // Output rows (one position of one head) in [b, heads, s] order.
        par_units(&mut y, d, |first, out| {
            for (r, out) in out.chunks_exact_mut(d).enumerate() {
                let row = first + r;
                let (bi, h, p) = (row / (heads * s), row / s % heads, row % s);
                let xr = &x[(bi * s + p) * hd + h * d..][..d];
                let (c, sn) = (&cos[p * d..][..d], &sin[p * d..][..d]);
                let (x1, x2) = xr.split_at(half);
                let (o1, o2) = out.split_at_mut(half);
                let k = self.scale;
                for i in 0..half {
                    o1[i] = (x1[i] * c[i] + -x2[i] * sn[i]) * k;
                    o2[i] = (x2[i] * c[half + i] + x1[i] * sn[half + i]) * k;
                }
            }
        });
        Ok((CpuStorage::F32(y), Shape::from((b, heads, s, d))))
    }
}

/// Evaluation only (no backward pass): the gated MLP's `silu(gate) · up` in one pass, with
/// the vectorised exp (candle's `silu` calls libm's `expf` per value, then a second op
/// multiplies).
#[derive(Debug, Clone, Copy)]
pub struct SiluMul;

impl SiluMul {
    /// `silu(gate) · up` for tensors of one shape.
    pub fn forward(&self, gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
        gate.contiguous()?.apply_op2_no_bwd(&up.contiguous()?, self)
    }
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu_mul_eval"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            bail!("silu_mul: {:?} and {:?} differ", l1.shape(), l2.shape())
        }
        let (g, u) = (
            contiguous_f32("silu_mul", s1, l1)?,
            contiguous_f32("silu_mul", s2, l2)?,
        );
        let y = par_map2(g, u, |g, u| g / (1.0 + exp(-g)) * u);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
}

/// The largest value of `x` (NaNs ignored, as `f32::max`), in 16 lanes that vectorise: a
/// fold with `f32::max` runs one element at a time.
#[inline(always)]
fn lanes_max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = if v > *l { v } else { *l };
        }
    }
    let rest = chunks.remainder().iter().copied();
    lanes
        .into_iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, f32::max)
}

/// The sum of `x` in 16 interleaved partial sums (vectorised; an in-order sum is not).
#[inline(always)]
fn lanes_sum(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax_train"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, h) = rows(layout)?;
        let x = contiguous_f32("softmax", storage, layout)?;
        Ok((
            CpuStorage::F32(self.run(x, h, |_| None)),
            layout.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad_op = SoftmaxGrad { scale: self.scale };
        Ok(Some(res.apply_op2_no_bwd(&grad.contiguous()?, &grad_op)?))
    }
}

impl CustomOp2 for Softmax {
    fn name(&self) -> &'static str {
        "masked_softmax_train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (h, bias_dims) = (rows(l1)?.1, l2.shape().dims());
        let x = contiguous_f32("softmax", s1, l1)?;
        let bias = contiguous_f32("softmax", s2, l2)?;
        let (b, heads, q) = match l1.shape().dims() {
            [b, heads, q, _] => (*b, *heads, *q),
            _ => bail!("softmax: scores {:?} are not [b, heads, q, s]", l1.shape()),
        };
        // The bias's query rows repeat when the scores stack groups of queries (grouped-
        // query attention: `rep` query heads per key head as `rep·s` rows).
        let fits = |d: usize, n: usize| d == 1 || d == n;
        let (bb, bq) = match bias_dims {
            [bb, 1, bq, bs] if *bs == h && fits(*bb, b) && q.is_multiple_of(*bq) => (*bb, *bq),
            _ => bail!(
                "softmax: bias {:?} does not broadcast to scores {:?}",
                l2.shape(),
                l1.shape()
            ),
        };
        let row_of = |r: usize| {
            let (bi, qi) = (r / (heads * q), r % q);
            let bi = if bb == 1 { 0 } else { bi };
            (bi * bq + qi % bq) * h
        };
        let y = self.run(x, h, |r| Some(&bias[row_of(r)..][..h]));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_op = SoftmaxGrad { scale: self.scale };
        Ok((
            Some(res.apply_op2_no_bwd(&grad.contiguous()?, &grad_op)?),
            None,
        ))
    }
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, h) = rows(l1)?;
        let y = contiguous_f32("softmax backward", s1, l1)?;
        let g = contiguous_f32("softmax backward", s2, l2)?;
        if y.len() != g.len() {
            bail!("softmax backward: gradient does not fit")
        }
        let mut dx = vec![0f32; y.len()];
        par_units(&mut dx, h, |first, out| {
            for (r, out) in out.chunks_exact_mut(h).enumerate() {
                let (yr, gr) = (&y[(first + r) * h..][..h], &g[(first + r) * h..][..h]);
                let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
                for ((o, yv), gv) in out.iter_mut().zip(yr).zip(gr) {
                    *o = self.scale * yv * (gv - dot);
                }
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// The exact GELU, `x · Φ(x) = ½x(1 + erf(x/√2))`, with a backward pass
/// `Φ(x) + x · φ(x)`.
#[derive(Debug, Clone, Copy)]
pub struct GeluErf;

/// Its backward pass: `(x, dy) → dx`.
#[derive(Debug, Clone, Copy)]
struct GeluErfGrad;

impl GeluErf {
    /// GELU of `x`, with a backward pass.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(*self)
    }
}

/// eˣ in f32 within 2 ulp of the correctly rounded value, inlined so that loops over
/// slices vectorise (libm's `expf` is a call per element: 4% of a MiniLM training step).
/// Cephes' `expf`: x = n·ln 2 + r with |r| ≤ ln 2 / 2 (n rounded by the 1.5·2²³ shift, ln 2
/// in two parts), eʳ by a degree-7 polynomial, then 2ⁿ built in the exponent bits (as two
/// factors, so n = 128 does not overflow them). Results below f32's smallest normal
/// (x < −87.34) are 0, above its largest (x > 88.72) +∞; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LO: f32 = -87.336_55;
    const HI: f32 = 88.722_83;
    const SHIFT: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4; // 355/512 exactly
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(LO, HI);
    let shifted = xc * std::f32::consts::LOG2_E + SHIFT;
    let n = shifted - SHIFT;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5; // Cephes' 5.0000001201e-1, which rounds to 0.5 in f32
    let y = p * (r * r) + r + 1.0;
    // n as an integer, read off the shifted value's low mantissa bits (`as i32` would
    // convert one lane at a time, with NaN checks).
    let n = (shifted.to_bits() as i32).wrapping_sub(SHIFT.to_bits() as i32);
    let half = n >> 1;
    let scale = |k: i32| f32::from_bits((k.wrapping_add(127) as u32) << 23);
    let e = y * scale(half) * scale(n - half);
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        e
    }
}

/// erf(x) to within 1.5·10⁻⁷ (Abramowitz & Stegun 7.1.26): one exp and a short polynomial,
/// where libm's correctly rounded erff branches and takes two.
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_72 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    (1.0 - poly * exp(-a * a)).copysign(x)
}

/// Φ(x), the standard normal CDF.
fn cdf(x: f32) -> f32 {
    0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu_erf_train"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32("gelu", storage, layout)?;
        let y = par_map(x, |_, v| v * cdf(v));
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluErfGrad)?,
        ))
    }
}

impl CustomOp2 for GeluErfGrad {
    fn name(&self) -> &'static str {
        "gelu_erf_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32("gelu backward", s1, l1)?;
        let g = contiguous_f32("gelu backward", s2, l2)?;
        if x.len() != g.len() {
            bail!("gelu backward: gradient does not fit")
        }
        // φ(x) = exp(−x²/2) / √(2π).
        let inv_sqrt_2pi = 0.5 * std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2;
        let dx = par_map2(x, g, |v, gv| {
            let pdf = exp(-0.5 * v * v) * inv_sqrt_2pi;
            gv * (cdf(v) + v * pdf)
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Inverted dropout: each element is zeroed with probability `p`, the others scaled by
/// `1/(1 − p)`. The mask is a function of `seed` and the element's index (splitmix64), so the
/// forward pass draws it in parallel without a mask tensor and the backward pass draws the
/// same one again.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    /// Probability of zeroing an element, in (0, 1).
    pub p: f32,
    /// The mask's seed (one draw of the training stream per call).
    pub seed: u64,
}

/// Its backward pass: the same mask applied to the output gradient.
#[derive(Debug, Clone, Copy)]
struct DropoutGrad(Dropout);

impl Dropout {
    /// `x` with the mask applied, with a backward pass.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(*self)
    }

    /// Whether element `i` is kept.
    fn keeps(&self, i: usize) -> bool {
        let mut z = self
            .seed
            .wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // 24 random bits as a uniform draw in [0, 1).
        ((z >> 40) as f32) * (1.0 / (1u32 << 24) as f32) >= self.p
    }

    /// `x` with the mask applied.
    fn apply(&self, x: &[f32]) -> Vec<f32> {
        let scale = 1.0 / (1.0 - self.p);
        par_map(x, |i, v| if self.keeps(i) { v * scale } else { 0.0 })
    }
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32("dropout", storage, layout)?;
        Ok((CpuStorage::F32(self.apply(x)), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            grad.contiguous()?.apply_op1_no_bwd(&DropoutGrad(*self))?,
        ))
    }
}

impl CustomOp1 for DropoutGrad {
    fn name(&self) -> &'static str {
        "dropout_grad"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = contiguous_f32("dropout backward", storage, layout)?;
        Ok((CpuStorage::F32(self.0.apply(g)), layout.shape().clone()))
    }
}

/// A lookup of rows of an embedding table `[vocab, h]` by token ids `[n]` (u32): `[n, h]`.
/// candle's `index_select` does the same forward; its backward pass copies a zeroed
/// table-sized tensor and adds into the copy (`index_add`). Here the backward pass writes
/// the gradient rows into one zeroed table, as `torch.nn.Embedding` does.
#[derive(Debug, Clone, Copy)]
pub struct Embedding;

impl Embedding {
    /// The rows of `table` at `ids`, with a backward pass to `table`.
    pub fn forward(&self, table: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
        table.apply_op2(&ids.contiguous()?, *self)
    }
}

/// The ids of an id tensor.
fn ids_of(storage: &CpuStorage, layout: &Layout) -> candle_core::Result<Vec<usize>> {
    let Some((a, b)) = layout.contiguous_offsets() else {
        bail!("embedding: ids must be contiguous")
    };
    Ok(match storage {
        CpuStorage::U32(v) => v[a..b].iter().map(|&i| i as usize).collect(),
        CpuStorage::I64(v) => v[a..b].iter().map(|&i| i.max(0) as usize).collect(),
        _ => bail!("embedding: ids must be u32 or i64"),
    })
}

impl CustomOp2 for Embedding {
    fn name(&self) -> &'static str {
        "embedding"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let table = contiguous_f32("embedding", s1, l1)?;
        let (vocab, h) = l1.shape().dims2()?;
        let ids = ids_of(s2, l2)?;
        let mut out = Vec::with_capacity(ids.len() * h);
        for &id in &ids {
            if id >= vocab {
                bail!("embedding: token id {id} is outside the vocabulary of {vocab}")
            }
            out.extend_from_slice(&table[id * h..(id + 1) * h]);
        }
        Ok((CpuStorage::F32(out), Shape::from((ids.len(), h))))
    }

    fn bwd(
        &self,
        table: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if !table.track_op() {
            return Ok((None, None));
        }
        let (vocab, h) = table.dims2()?;
        let grad = grad.contiguous()?;
        let ids = {
            let (s, l) = ids.storage_and_layout();
            match &*s {
                candle_core::Storage::Cpu(c) => ids_of(c, l)?,
                _ => bail!("embedding: CPU tensors only"),
            }
        };
        let (gs, gl) = grad.storage_and_layout();
        let g = match &*gs {
            candle_core::Storage::Cpu(c) => contiguous_f32("embedding", c, gl)?,
            _ => bail!("embedding: CPU tensors only"),
        };
        let mut dw = vec![0f32; vocab * h];
        // In order of the tokens: a repeated id sums its rows as index_add does.
        for (&id, row) in ids.iter().zip(g.chunks_exact(h)) {
            for (d, v) in dw[id * h..(id + 1) * h].iter_mut().zip(row) {
                *d += v;
            }
        }
        drop(gs);
        Ok((
            Some(Tensor::from_vec(dw, (vocab, h), table.device())?),
            None,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::engine::transformer::fixtures::max_diff;
    use candle_core::{Device, Var, D};

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed)) % 1000) as f32 / 250.0
                    - 2.0
            })
            .collect()
    }

    /// Each fused op gives the values and the gradients of the same formula written out in
    /// candle's differentiable element-wise ops, on rows large enough to run in parallel.
    #[test]
    fn fused_ops_match_the_written_out_formulas_forward_and_backward() {
        let dev = Device::Cpu;
        let (n, h) = (300, 256);
        let x = Var::from_vec(values(n * h, 1), (3, n / 3, h), &dev).unwrap();
        let w = Var::from_vec(values(h, 2), h, &dev).unwrap();
        let b = Var::from_vec(values(h, 3), h, &dev).unwrap();
        let g = Tensor::from_vec(values(n * h, 4), (3, n / 3, h), &dev).unwrap();
        let weighted = |y: &Tensor| (y * &g).unwrap().sum_all().unwrap();
        let grads = |loss: Tensor, vars: &[&Var]| {
            let gs = loss.backward().unwrap();
            vars.iter()
                .map(|v| gs.get(v.as_tensor()).unwrap().clone())
                .collect::<Vec<_>>()
        };
        // Layer norm.
        let fused = LayerNorm { eps: 1e-5 }
            .forward(x.as_tensor(), w.as_tensor(), b.as_tensor())
            .unwrap();
        let plain = crate::compress::engine::transformer::layer_norm(
            x.as_tensor(),
            w.as_tensor(),
            b.as_tensor(),
            1e-5,
        )
        .unwrap();
        assert!(max_diff(&fused, &plain) < 1e-5);
        let a = grads(weighted(&fused), &[&x, &w, &b]);
        let e = grads(weighted(&plain), &[&x, &w, &b]);
        for (a, e) in a.iter().zip(&e) {
            assert!(
                max_diff(a, e) < 1e-3,
                "layer norm gradient differs by {}",
                max_diff(a, e)
            );
        }
        // Softmax of scaled scores, with and without a bias row per batch entry.
        // Scores [3, 4, 25, h]: a padding bias per batch entry, a causal one per query row
        // shared by the batch, and one per entry and row.
        let x4 = Var::from_vec(values(n * h, 1), (3, 4, n / 12, h), &dev).unwrap();
        let g = g.reshape((3, 4, n / 12, h)).unwrap();
        let weighted = |y: &Tensor| (y * &g).unwrap().sum_all().unwrap();
        let x = &x4;
        let padding = Tensor::from_vec(values(3 * h, 5), (3, 1, 1, h), &dev).unwrap();
        let causal = Tensor::from_vec(values(25 * h, 6), (1, 1, 25, h), &dev).unwrap();
        let both = Tensor::from_vec(values(75 * h, 7), (3, 1, 25, h), &dev).unwrap();
        let scale = 0.125;
        for bias in [None, Some(&padding), Some(&causal), Some(&both)] {
            let fused = Softmax { scale }.forward(x.as_tensor(), bias).unwrap();
            let scaled = (x.as_tensor() * scale as f64).unwrap();
            let scaled = match bias {
                Some(b) => scaled.broadcast_add(b).unwrap(),
                None => scaled,
            };
            let plain = candle_nn::ops::softmax(&scaled, D::Minus1).unwrap();
            assert!(max_diff(&fused, &plain) < 1e-6);
            let (a, e) = (grads(weighted(&fused), &[x]), grads(weighted(&plain), &[x]));
            let d = max_diff(&a[0], &e[0]);
            assert!(d < 1e-5, "softmax gradient differs by {d}");
        }
        // Dropout: the share dropped is p, the kept values scaled, the same seed the same
        // mask, and the gradient the mask (scaled) again.
        let drop = Dropout { p: 0.25, seed: 7 };
        let ones = Var::from_vec(vec![1f32; 40_000], (200, 200), &dev).unwrap();
        let y = drop.forward(ones.as_tensor()).unwrap();
        let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let dropped = v.iter().filter(|&&x| x == 0.0).count() as f64 / v.len() as f64;
        assert!((dropped - 0.25).abs() < 0.01, "{dropped}");
        assert!(v.iter().all(|&x| x == 0.0 || (x - 4.0 / 3.0).abs() < 1e-6));
        assert_eq!(
            drop.forward(ones.as_tensor())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
            y.to_vec2::<f32>().unwrap()
        );
        let other = Dropout { p: 0.25, seed: 8 }
            .forward(ones.as_tensor())
            .unwrap();
        assert!(max_diff(&other, &y) > 1.0);
        let grad = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(max_diff(grad.get(ones.as_tensor()).unwrap(), &y), 0.0);
        for v in [-4.0f32, -1.3, -0.2, 0.0, 0.4, 1.0, 2.5, 6.0] {
            assert!((erf(v) - libm::erff(v)).abs() < 3e-7, "erf({v})");
        }
        // exp: within 2 ulp of the correctly rounded value over f32's normal range.
        let mut worst = 0u32;
        for i in 0..=2_000_000 {
            let v = -87.3f32 + 176.0 * (i as f32 / 2_000_000.0);
            let v = v.min(88.72);
            let want = (v as f64).exp() as f32;
            worst = worst.max(exp(v).to_bits().abs_diff(want.to_bits()));
        }
        assert!(worst <= 2, "exp off by {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1e30), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        // GELU.
        let fused = GeluErf.forward(x.as_tensor()).unwrap();
        let plain = x.as_tensor().gelu_erf().unwrap();
        assert!(max_diff(&fused, &plain) < 2e-6);
        let (a, e) = (grads(weighted(&fused), &[x]), grads(weighted(&plain), &[x]));
        assert!(
            max_diff(&a[0], &e[0]) < 1e-5,
            "gelu gradient differs by {}",
            max_diff(&a[0], &e[0])
        );
    }

    /// The embedding lookup and its table gradient are bit for bit `index_select`'s (repeated
    /// ids included), and the bias gradient of a linear layer is bit for bit `sum(0)`.
    #[test]
    fn embedding_and_column_sums_equal_candles_own_ops_bit_for_bit() {
        let dev = Device::Cpu;
        let (vocab, h) = (500, 384);
        let table = Var::from_vec(values(vocab * h, 5), (vocab, h), &dev).unwrap();
        let ids = Tensor::from_vec(
            (0..300u32).map(|i| (i * 7919) % 97 + 3).collect::<Vec<_>>(),
            300,
            &dev,
        )
        .unwrap();
        let g = Tensor::from_vec(values(300 * h, 6), (300, h), &dev).unwrap();
        let run = |ours: bool| {
            let rows = if ours {
                Embedding.forward(table.as_tensor(), &ids).unwrap()
            } else {
                table.as_tensor().index_select(&ids, 0).unwrap()
            };
            let grads = (&rows * &g).unwrap().sum_all().unwrap().backward().unwrap();
            (rows, grads.get(table.as_tensor()).unwrap().clone())
        };
        let ((r1, g1), (r2, g2)) = (run(true), run(false));
        assert_eq!(max_diff(&r1, &r2), 0.0);
        assert_eq!(max_diff(&g1, &g2), 0.0);
        let bad = Tensor::from_vec(vec![vocab as u32], 1, &dev).unwrap();
        assert!(Embedding.forward(table.as_tensor(), &bad).is_err());

        for (m, n) in [(1024, 1536), (7, 5), (300, 1000)] {
            let t = Tensor::from_vec(values(m * n, 7), (m, n), &dev).unwrap();
            let ours = crate::compress::engine::sequential::conv::column_sums(&t).unwrap();
            assert_eq!(max_diff(&ours, &t.sum(0).unwrap()), 0.0, "{m}x{n}");
        }
    }
}
