//! A convolution's kernel gradient from its im2col matrix, the one product of the layer
//! that a general matrix product does badly:
//!
//! ```text
//! dW[o, t] = Σ_s Σ_q dY[s, o, q] · cols[t, s·l + q]
//! ```
//!
//! with `dY` `[n, o, l]` (the output gradient in NCHW, as it comes), `cols` `[r, n·l]` (r
//! rows: one per kernel tap, and the bias's row of ones), `l` output positions per
//! sample. Both operands run along the long inner dimension (every position of every
//! sample), so a gemm call first copies ("packs") the whole im2col matrix transposed into
//! blocks — for LeNet-5's first layer (`o` = 6, `r` = 27, 10 MB of `cols`) that copy
//! cost more than the arithmetic and ran on one thread — and `dY` had to be transposed
//! into `[o, n·l]` before it. Here `cols` and `dY` are read in place, blocks of 3 × 4
//! sums held in registers (16 lanes under AVX-512F, 8 under AVX2), and the two threads
//! take half the im2col rows each.
//!
//! Each value is summed in the same order whatever the number of threads (the threads
//! split rows, never a sum), so training stays reproducible run to run. The order is not
//! gemm's, so values differ from candle's matmul in the last bits (the unit test bounds
//! the difference against f64 sums).

use crate::compress::parallel::par_units_of_work;

/// Convolutions with at most this many output channels use these products; wider ones
/// have enough rows for gemm's packing to pay for itself.
pub(crate) const MAX_OUT_CHANNELS: usize = 32;

/// Output rows (`o`) each register block covers.
const BO: usize = 3;
/// Im2col rows (`t`) each register block of the kernel gradient covers.
const BT: usize = 4;
/// Output positions per block of the kernel gradient's sum, so a block of `dY` (all `o`
/// rows) and of `BT` rows of `cols` stay in the L1/L2 caches while every pair is summed.
const BLOCK: usize = 2048;

/// `dW[o, t] = Σ_s Σ_q dY[s, o, q] · cols[t, s·l + q]` for `dy` `[n, o, l]` and `cols`
/// `[r, n·l]`: `[o, r]`.
pub(crate) fn weight_gradient(
    dy: &[f32],
    cols: &[f32],
    n: usize,
    o: usize,
    l: usize,
    r: usize,
) -> Vec<f32> {
    assert_eq!(dy.len(), n * o * l, "weight_gradient: dY");
    assert_eq!(cols.len(), r * n * l, "weight_gradient: cols");
    if o * r == 0 {
        return Vec::new();
    }
    // The sums by im2col row, `o` per row (transposed back below), in one part of the rows
    // per thread, so each thread reads `dY` once.
    let mut dwt = vec![0f32; r * o];
    let threads = candle_core::utils::barrier_pool().n_workers() + 1;
    let per = r.div_ceil(threads).max(1);
    let mut halves: Vec<&mut [f32]> = dwt.chunks_mut(per * o).collect();
    par_units_of_work(&mut halves, 1, o * r * n * l, |first, part| {
        for (k, rows) in part.iter_mut().enumerate() {
            let t0 = (first + k) * per;
            dispatch_weight_gradient(dy, cols, n, o, l, t0, rows);
        }
    });
    let mut dw = vec![0f32; o * r];
    for (t, row) in dwt.chunks_exact(o).enumerate() {
        for (i, v) in row.iter().enumerate() {
            dw[i * r + t] = *v;
        }
    }
    dw
}

/// Runs the kernel gradient's rows `t0..` (`rows` holds `o` values per im2col row) with
/// the widest vectors the CPU has.
fn dispatch_weight_gradient(
    dy: &[f32],
    cols: &[f32],
    n: usize,
    o: usize,
    l: usize,
    t0: usize,
    rows: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX-512F and FMA, checked just above.
            return unsafe { weight_gradient_avx512(dy, cols, n, o, l, t0, rows) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { weight_gradient_avx2(dy, cols, n, o, l, t0, rows) };
        }
    }
    weight_gradient_rows::<8, false, false>(dy, cols, n, o, l, t0, rows)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn weight_gradient_avx512(
    dy: &[f32],
    cols: &[f32],
    n: usize,
    o: usize,
    l: usize,
    t0: usize,
    rows: &mut [f32],
) {
    weight_gradient_rows::<16, true, true>(dy, cols, n, o, l, t0, rows)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn weight_gradient_avx2(
    dy: &[f32],
    cols: &[f32],
    n: usize,
    o: usize,
    l: usize,
    t0: usize,
    rows: &mut [f32],
) {
    weight_gradient_rows::<8, true, false>(dy, cols, n, o, l, t0, rows)
}

/// `a · b + c`, fused where the build has FMA (a separate multiply and add otherwise:
/// `mul_add` without the instruction is a slow library call).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// The kernel gradient for im2col rows `t0 .. t0 + rows.len() / o` into `rows` (`[t, o]`).
/// Per `(o, t)` pair the sum runs in `L` lanes over blocks of [`BLOCK`] positions (the
/// positions past a multiple of `L` in each sample in a scalar), and the lanes are added
/// in order at the end.
#[inline(always)]
fn weight_gradient_rows<const L: usize, const FMA: bool, const AVX512: bool>(
    dy: &[f32],
    cols: &[f32],
    n: usize,
    o: usize,
    l: usize,
    t0: usize,
    rows: &mut [f32],
) {
    if o == 0 || rows.len() < o {
        return;
    }
    let nt = rows.len() / o;
    let total = n * l;
    let whole = l / L * L;
    // Running sums per (t, o): L lanes and the scalar remainder.
    let mut lanes = vec![[0f32; L]; nt * o];
    let mut rest = vec![0f32; nt * o];
    let samples_per_block = (BLOCK / l.max(1)).max(1);
    let mut s0 = 0;
    while s0 < n {
        let s1 = (s0 + samples_per_block).min(n);
        for tb in (0..nt).step_by(BT) {
            // Rows past the end repeat the last one; their sums are dropped.
            let ts: [usize; BT] = std::array::from_fn(|j| t0 + (tb + j).min(nt - 1));
            for ob in (0..o).step_by(BO) {
                let os: [usize; BO] = std::array::from_fn(|i| (ob + i).min(o - 1));
                let at = Rows {
                    dy,
                    cols,
                    o,
                    l,
                    total,
                    os,
                    ts,
                };
                let mut acc = [[[0f32; L]; BT]; BO];
                #[cfg(target_arch = "x86_64")]
                if AVX512 && L == 16 {
                    // SAFETY: `AVX512` is set only by `weight_gradient_avx512`, which runs
                    // where the CPU has AVX-512F and FMA; `acc` is 16 lanes wide (checked).
                    unsafe { vectors_avx512(&at, s0..s1, whole, acc.as_mut_ptr().cast()) };
                } else {
                    vectors::<L, FMA>(&at, s0..s1, whole, &mut acc);
                }
                #[cfg(not(target_arch = "x86_64"))]
                vectors::<L, FMA>(&at, s0..s1, whole, &mut acc);
                let mut tail = [[0f32; BT]; BO];
                for s in s0..s1 {
                    let (d, c) = (at.dy(s), at.cols(s));
                    for q in whole..l {
                        for i in 0..BO {
                            for j in 0..BT {
                                tail[i][j] = madd::<FMA>(d[i][q], c[j][q], tail[i][j]);
                            }
                        }
                    }
                }
                for i in 0..BO.min(o - ob) {
                    for j in 0..BT.min(nt - tb) {
                        let at = (tb + j) * o + ob + i;
                        for k in 0..L {
                            lanes[at][k] += acc[i][j][k];
                        }
                        rest[at] += tail[i][j];
                    }
                }
            }
        }
        s0 = s1;
    }
    for ((out, lanes), rest) in rows.iter_mut().zip(&lanes).zip(&rest) {
        *out = lanes.iter().sum::<f32>() + rest;
    }
}

/// The rows one register block reads: `BO` rows of `dY` and `BT` rows of `cols`, sample
/// by sample.
struct Rows<'a> {
    dy: &'a [f32],
    cols: &'a [f32],
    o: usize,
    l: usize,
    total: usize,
    os: [usize; BO],
    ts: [usize; BT],
}

impl<'a> Rows<'a> {
    /// Sample `s`'s `l` values of each `dY` row.
    #[inline(always)]
    fn dy(&self, s: usize) -> [&'a [f32]; BO] {
        std::array::from_fn(|i| &self.dy[(s * self.o + self.os[i]) * self.l..][..self.l])
    }

    /// Sample `s`'s `l` values of each `cols` row.
    #[inline(always)]
    fn cols(&self, s: usize) -> [&'a [f32]; BT] {
        std::array::from_fn(|j| &self.cols[self.ts[j] * self.total + s * self.l..][..self.l])
    }
}

/// Adds, for samples `samples`, positions `0..whole` (a multiple of `L`) of every
/// (`dY` row, `cols` row) pair's products into `acc`'s `L` lanes.
#[inline(always)]
fn vectors<const L: usize, const FMA: bool>(
    rows: &Rows<'_>,
    samples: std::ops::Range<usize>,
    whole: usize,
    acc: &mut [[[f32; L]; BT]; BO],
) {
    for s in samples {
        let (d, c) = (rows.dy(s), rows.cols(s));
        for q in (0..whole).step_by(L) {
            let dv: [[f32; L]; BO] =
                std::array::from_fn(|i| d[i][q..q + L].try_into().unwrap_or([0.0; L]));
            let cv: [[f32; L]; BT] =
                std::array::from_fn(|j| c[j][q..q + L].try_into().unwrap_or([0.0; L]));
            for i in 0..BO {
                for j in 0..BT {
                    for k in 0..L {
                        acc[i][j][k] = madd::<FMA>(dv[i][k], cv[j][k], acc[i][j][k]);
                    }
                }
            }
        }
    }
}

/// [`vectors`] for 16 lanes in AVX-512 registers: the twelve sums stay in registers for
/// the whole block (the generic version, as compiled, stores them back every step).
///
/// # Safety
/// The CPU must have AVX-512F and FMA; `acc` points to `BO · BT · 16` f32 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn vectors_avx512(
    rows: &Rows<'_>,
    samples: std::ops::Range<usize>,
    whole: usize,
    acc: *mut f32,
) {
    use std::arch::x86_64::*;
    let mut a: [[__m512; BT]; BO] = std::array::from_fn(|i| {
        std::array::from_fn(|j| _mm512_loadu_ps(acc.add((i * BT + j) * 16)))
    });
    for s in samples {
        let (d, c) = (rows.dy(s), rows.cols(s));
        let dp: [*const f32; BO] = std::array::from_fn(|i| d[i].as_ptr());
        let cp: [*const f32; BT] = std::array::from_fn(|j| c[j].as_ptr());
        let mut q = 0;
        while q < whole {
            // q + 16 <= whole <= l, the length of every row read.
            let dv: [__m512; BO] = std::array::from_fn(|i| _mm512_loadu_ps(dp[i].add(q)));
            let cv: [__m512; BT] = std::array::from_fn(|j| _mm512_loadu_ps(cp[j].add(q)));
            for i in 0..BO {
                for j in 0..BT {
                    a[i][j] = _mm512_fmadd_ps(dv[i], cv[j], a[i][j]);
                }
            }
            q += 16;
        }
    }
    for (i, row) in a.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            _mm512_storeu_ps(acc.add((i * BT + j) * 16), *v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(len: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
        (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
    }

    /// The kernel gradient against f64 sums, over shapes with and without vector tails,
    /// rows that do not fill a register block, and more samples than one block holds.
    #[test]
    fn weight_gradient_matches_f64_sums() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for &(n, o, l, r) in &[
            (3, 6, 784, 27),
            (5, 16, 100, 151),
            (40, 2, 100, 5),
            (2, 7, 13, 9),
            (1, 1, 1, 1),
            (3, 4, 16, 3),
            (0, 3, 5, 4),
            (2, 0, 5, 4),
        ] {
            let dy = random(n * o * l, &mut rng);
            let cols = random(r * n * l, &mut rng);
            let dw = weight_gradient(&dy, &cols, n, o, l, r);
            for i in 0..o {
                for t in 0..r {
                    let mut want = 0f64;
                    for s in 0..n {
                        for q in 0..l {
                            want +=
                                dy[(s * o + i) * l + q] as f64 * cols[t * n * l + s * l + q] as f64;
                        }
                    }
                    let got = dw[i * r + t] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "dW {n} {o} {l} {r}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
