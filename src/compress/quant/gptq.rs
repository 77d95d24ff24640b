//! GPTQ (Frantar et al. 2022): round one column of a weight matrix at a time onto the
//! integer grid and spread each column's rounding error over the columns not yet rounded,
//! weighted by the inverse Hessian of the layer's squared output error on calibration
//! inputs (`H = 2·XᵀX/n`), so that the layer's *output* moves as little as possible.
//!
//! As the reference: damping `λ = damp · mean(diag H)`, the upper Cholesky factor of
//! `H⁻¹`, lazy batch updates of `block_size` columns, optional `act_order` (columns by
//! decreasing `diag H`). Scales come from the same symmetric / affine grid as `uniform`
//! (round half to even): per output row, or per group of `group_size` consecutive columns,
//! found from the partly updated weights when the sweep reaches the group's first column.
//! With `act_order` and groups, the groups' scales are fixed before the sweep from the
//! original weights (the reference's `static_groups`), so groups stay contiguous columns and
//! the result keeps the plain per-group layout. With `clip`, each grid's range is the one of
//! 21 shrinkings of the values' range (1, 0.975, …, 0.5) that rounds the values with the
//! least `Σ H_jj (w_j − q(w_j))²` (the reference's `mse` search, weighted by the Hessian's
//! diagonal instead of an unweighted power): at 3 bits the full range wastes most levels on
//! a group's few largest weights.

use super::uniform::affine_params;
use super::{Params, Quantized, Scheme};
use crate::compress::calib::damped_inverse;
use crate::compress::formats::gguf::GgufType;
use crate::compress::{Error, Result};

/// GPTQ's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqParams {
    /// Bits per weight, 2..=8.
    pub bits: u8,
    /// Columns per scale; `None`: one scale per output row.
    pub group_size: Option<usize>,
    /// Symmetric (codes ±(2^(b−1)−1), no zero-point) or affine (codes 0..2^b−1).
    pub symmetric: bool,
    /// Process columns by decreasing Hessian diagonal.
    pub act_order: bool,
    /// Damping as a fraction of the mean diagonal.
    pub damp: f64,
    /// Columns per lazy update.
    pub block_size: usize,
    /// Grids a GGUF block type stores exactly: scales (and minimums) rounded to f16, and an
    /// affine grid as `d·q + m` (q4_1 / q5_1) instead of `(q − zero)·scale`.
    pub gguf_grid: bool,
    /// Search each grid's range (see the module's documentation); `false`: the values'
    /// full range, as the paper.
    pub clip: bool,
}

/// Shrinkings of a group's range the clipping search tries: 1, 0.975, …, 0.5.
const CLIP_STEPS: usize = 21;

/// One layer's result.
#[derive(Debug, Clone)]
pub struct GptqLayer {
    /// The dequantized weights, row-major `[rows, cols]`, every value on its row's (group's)
    /// grid.
    pub weights: Vec<f32>,
    /// The same as integer codes with their scales (and zero-points), in the layout of
    /// `uniform` with groups of `group_size` (or per row): `params.dequantize(codes)` gives
    /// `weights` exactly, so the packed encoding can store them.
    pub quantized: Quantized,
    /// The damping fraction finally used (raised when `H` was not positive definite).
    pub damp: f64,
    /// Input columns that were always 0 on the calibration data: nothing measures them, so
    /// they are rounded to nearest and pass no error on (the reference zeroes them instead,
    /// which would be wrong on inputs the calibration data never showed).
    pub dead_columns: usize,
    /// With `gguf_grid` and an affine grid: each group's minimum `m` (value = `q·scale + m`,
    /// codes 0..2^b−1); empty otherwise.
    pub mins: Vec<f32>,
}

/// The GGUF block type that stores GPTQ's codes at `bits` exactly (groups of 32, f16 scales):
/// q4_0 / q5_0 / q8_0 for the symmetric grids (levels ±(2^(b−1)−1) within the type's range),
/// q4_1 / q5_1 for the affine ones; `None` for other widths (and affine 8 bits).
pub fn gguf_type(bits: u8, symmetric: bool) -> Option<GgufType> {
    match (bits, symmetric) {
        (4, true) => Some(GgufType::Q4_0),
        (5, true) => Some(GgufType::Q5_0),
        (8, true) => Some(GgufType::Q8_0),
        (4, false) => Some(GgufType::Q4_1),
        (5, false) => Some(GgufType::Q5_1),
        _ => None,
    }
}

/// The GGUF blocks of one GPTQ layer with [`GptqParams::gguf_grid`] and groups of 32, in
/// row-major block order (the type from [`gguf_type`]).
pub fn gguf_blocks(layer: &GptqLayer, ty: GgufType) -> Result<Vec<u8>> {
    let params = &layer.quantized.params;
    if params.block_len != 32 {
        return Err(Error::Internal(format!(
            "GGUF blocks need groups of 32, not {}",
            params.block_len
        )));
    }
    let offset = match params.scheme {
        Scheme::Symmetric => 1i32 << (params.bits - 1),
        _ => 0,
    };
    let levels: Vec<i32> = layer
        .quantized
        .codes
        .iter()
        .map(|&c| i32::from(c) - offset)
        .collect();
    crate::compress::formats::gguf::encode_blocks(ty, &levels, &params.scales, &layer.mins)
}

/// A row's (group's) grid: `q(x) = (clamp(round((x − min)/scale) + zero, lo, hi) − zero) ·
/// scale + min` (`min` is 0 except on GGUF's affine grids, where `zero` is 0).
#[derive(Debug, Clone, Copy)]
struct Grid {
    scale: f32,
    inv: f32,
    zero: f32,
    min: f32,
    lo: f32,
    hi: f32,
}

/// `x` rounded to the nearest f16 (what a GGUF block stores).
fn f16_round(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

impl Grid {
    fn of(
        values: impl Iterator<Item = f32> + Clone,
        bits: u8,
        symmetric: bool,
        gguf: bool,
    ) -> Grid {
        if symmetric {
            let qmax = ((1i32 << (bits - 1)) - 1) as f32;
            let amax = values.fold(0f32, |m, x| m.max(x.abs()));
            let scale = amax / qmax;
            let scale = if gguf { f16_round(scale) } else { scale };
            Grid::with(scale, 0.0, -qmax, qmax)
        } else if gguf {
            // llama.cpp's q4_1 / q5_1: the group's minimum and (max − min)/levels, in f16.
            let levels = ((1i32 << bits) - 1) as f32;
            let (lo, hi) = values.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), x| {
                (lo.min(x), hi.max(x))
            });
            let mut grid = Grid::with(f16_round((hi - lo) / levels), 0.0, 0.0, levels);
            grid.min = f16_round(lo);
            grid
        } else {
            let levels = (1i32 << bits) - 1;
            let (lo, hi) = values.fold((0f32, 0f32), |(lo, hi), x| (lo.min(x), hi.max(x)));
            let (scale, zero) = affine_params(lo, hi, levels);
            Grid::with(scale, f32::from(zero), 0.0, levels as f32)
        }
    }

    /// The grid of `values` (whose columns' Hessian diagonal is `diag`): [`Grid::of`], or
    /// with `clip` the shrinking of its range with the least diagonal-weighted error (the
    /// full range on ties).
    fn fit(values: &[f32], diag: &[f64], p: &GptqParams) -> Grid {
        let plain = Grid::of(values.iter().copied(), p.bits, p.symmetric, p.gguf_grid);
        if !p.clip {
            return plain;
        }
        let error = |g: &Grid| -> f64 {
            values
                .iter()
                .zip(diag)
                .map(|(&x, &h)| {
                    let d = f64::from(x - g.quantize(x));
                    h * d * d
                })
                .sum()
        };
        let mut best = (error(&plain), plain);
        for k in 1..CLIP_STEPS {
            let shrink = 1.0 - 0.5 * k as f32 / (CLIP_STEPS - 1) as f32;
            let g = Grid::of(
                values.iter().map(|x| x * shrink),
                p.bits,
                p.symmetric,
                p.gguf_grid,
            );
            let e = error(&g);
            if e < best.0 {
                best = (e, g);
            }
        }
        best.1
    }

    fn with(scale: f32, zero: f32, lo: f32, hi: f32) -> Grid {
        let inv = if scale > 0.0 && (1.0 / scale).is_finite() {
            1.0 / scale
        } else {
            0.0
        };
        Grid {
            scale,
            inv,
            zero,
            min: 0.0,
            lo,
            hi,
        }
    }

    /// The integer level of `x` (`zero` for an all-zero group).
    #[inline]
    fn level(&self, x: f32) -> f32 {
        if self.inv == 0.0 {
            return self.zero;
        }
        (((x - self.min) * self.inv).round_ties_even() + self.zero).clamp(self.lo, self.hi)
    }

    #[inline]
    fn quantize(&self, x: f32) -> f32 {
        if self.inv == 0.0 {
            return self.min;
        }
        let v = (self.level(x) - self.zero) * self.scale;
        // As llama.cpp decodes q4_1 / q5_1: `q·d + m`, in f32.
        if self.min != 0.0 {
            v + self.min
        } else {
            v
        }
    }
}

/// Round-to-nearest on the grids GPTQ uses without `clip` (the original weights' full range
/// per group): the baseline GPTQ is compared with.
pub fn rtn(w: &[f32], rows: usize, cols: usize, p: &GptqParams) -> Vec<f32> {
    let g = p.group_size.unwrap_or(cols);
    if g == 0 || !cols.is_multiple_of(g) || w.len() != rows * cols {
        return w.to_vec(); // nothing to round (an empty layer); gptq() refuses such shapes
    }
    let mut out = vec![0f32; w.len()];
    for r in 0..rows {
        for start in (0..cols).step_by(g) {
            let chunk = &w[r * cols + start..r * cols + start + g];
            let grid = Grid::of(chunk.iter().copied(), p.bits, p.symmetric, p.gguf_grid);
            for (o, &x) in out[r * cols + start..].iter_mut().zip(chunk) {
                *o = grid.quantize(x);
            }
        }
    }
    out
}

/// Round-to-nearest of each `group`-long run of each row (`cols` per row) on the symmetric
/// or affine grid of `bits`, dequantized: [`rtn`] with plain (full-range, f32) grids, the
/// baseline of AWQ and HQQ.
pub fn rtn_grouped(w: &[f32], cols: usize, group: usize, bits: u8, symmetric: bool) -> Vec<f32> {
    let p = GptqParams {
        bits,
        group_size: Some(group),
        symmetric,
        act_order: false,
        damp: 0.0,
        block_size: 1,
        gguf_grid: false,
        clip: false,
    };
    rtn(w, w.len() / cols.max(1), cols, &p)
}

/// Round-to-nearest of one group `vals` into `out` on the grid of its values shrunk by
/// `clip` (≤ 1: values beyond the shrunk range saturate; 1 is [`rtn`]'s grid exactly), AWQ's
/// clipping search.
pub fn rtn_clipped(vals: &[f32], bits: u8, symmetric: bool, clip: f32, out: &mut [f32]) {
    let grid = Grid::of(vals.iter().map(|x| x * clip), bits, symmetric, false);
    for (o, x) in out.iter_mut().zip(vals) {
        *o = grid.quantize(*x);
    }
}

/// GPTQ of one `[rows, cols]` weight matrix `w` with the Hessian `h` (`cols × cols`,
/// row-major).
pub fn gptq(w: &[f32], rows: usize, cols: usize, h: &[f64], p: &GptqParams) -> Result<GptqLayer> {
    if !(2..=8).contains(&p.bits) || p.block_size == 0 || w.len() != rows * cols {
        return Err(Error::Internal(format!(
            "gptq: bits {}, block size {}, {} weights for [{rows}, {cols}]",
            p.bits,
            p.block_size,
            w.len()
        )));
    }
    let g = p.group_size.unwrap_or(cols);
    if g == 0 || !cols.is_multiple_of(g) {
        return Err(Error::invalid(
            "group_size",
            format!("{cols} columns do not split into groups of {g}"),
        ));
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(Error::Unsupported(format!(
            "weight {i} is {}; GPTQ needs finite weights",
            w[i]
        )));
    }
    // Column order.
    let mut perm: Vec<usize> = (0..cols).collect();
    if p.act_order {
        perm.sort_by(|&a, &b| h[b * cols + b].total_cmp(&h[a * cols + a]));
    }
    // The permuted Hessian, damped, and the upper factor of its inverse.
    let mut hp = vec![0f64; cols * cols];
    for (i, &pi) in perm.iter().enumerate() {
        for (j, &pj) in perm.iter().enumerate() {
            hp[i * cols + j] = h[pi * cols + pj];
        }
    }
    let (u, damp, dead_cols) = damped_inverse(&mut hp, cols, p.damp)?;
    // Work column-major: row i of `wt` is permuted column i of `w` (contiguous over rows).
    let mut wt = vec![0f32; rows * cols];
    for (i, &c) in perm.iter().enumerate() {
        for r in 0..rows {
            wt[i * rows + r] = w[r * cols + c];
        }
    }
    // Static grids (act_order with groups, or per row): from the original weights.
    let static_grids = p.act_order || p.group_size.is_none();
    let groups = cols / g;
    let diag: Vec<f64> = (0..cols).map(|c| h[c * cols + c]).collect();
    let mut grids: Vec<Grid> = vec![Grid::with(0.0, 0.0, 0.0, 0.0); rows * groups];
    if static_grids {
        let work = rows * cols * if p.clip { CLIP_STEPS } else { 1 };
        crate::compress::parallel::par_units_of_work(&mut grids, groups, work, |first, out| {
            for (k, grid) in out.iter_mut().enumerate() {
                let (r, k) = ((first * groups + k) / groups, (first * groups + k) % groups);
                let chunk = &w[r * cols + k * g..r * cols + (k + 1) * g];
                *grid = Grid::fit(chunk, &diag[k * g..(k + 1) * g], p);
            }
        });
    }
    let mut vals = vec![0f32; g];
    let mut q = vec![0f32; rows * cols];
    let b = p.block_size;
    let mut err = vec![0f32; b * rows];
    let mut i1 = 0;
    while i1 < cols {
        let i2 = (i1 + b).min(cols);
        for i in i1..i2 {
            let c = perm[i];
            let group = c / g;
            if !static_grids && c.is_multiple_of(g) {
                // The group's columns are perm[i..i+g] (no act_order: perm is the identity).
                for r in 0..rows {
                    for (v, k) in vals.iter_mut().zip(i..i + g) {
                        *v = wt[k * rows + r];
                    }
                    grids[r * groups + group] = Grid::fit(&vals, &diag[c..c + g], p);
                }
            }
            let d = u[i * cols + i] as f32;
            let (done, rest) = wt.split_at_mut((i + 1) * rows);
            let col = &done[i * rows..];
            let e = &mut err[(i - i1) * rows..(i - i1 + 1) * rows];
            let qi = &mut q[i * rows..(i + 1) * rows];
            for r in 0..rows {
                let v = grids[r * groups + group].quantize(col[r]);
                qi[r] = v;
                e[r] = (col[r] - v) / d;
            }
            // Within the block: columns i+1..i2 absorb this column's error.
            for j in i + 1..i2 {
                let f = u[i * cols + j] as f32;
                if f != 0.0 {
                    let target = &mut rest[(j - i - 1) * rows..(j - i) * rows];
                    for (t, ev) in target.iter_mut().zip(e.iter()) {
                        *t -= f * ev;
                    }
                }
            }
        }
        // Lazy update of the columns after the block (independent columns: split over the
        // worker pool, each updated exactly as on one thread).
        if i2 < cols {
            let (_, rest) = wt.split_at_mut(i2 * rows);
            let err = &err;
            let work = (cols - i2) * rows * (i2 - i1);
            crate::compress::parallel::par_units_of_work(rest, rows, work, |first, targets| {
                for (k, target) in targets.chunks_mut(rows).enumerate() {
                    let j = i2 + first + k;
                    for i in i1..i2 {
                        let f = u[i * cols + j] as f32;
                        if f != 0.0 {
                            let e = &err[(i - i1) * rows..(i - i1 + 1) * rows];
                            for (t, ev) in target.iter_mut().zip(e) {
                                *t -= f * ev;
                            }
                        }
                    }
                }
            });
        }
        i1 = i2;
    }
    let mut weights = vec![0f32; rows * cols];
    for (i, &c) in perm.iter().enumerate() {
        for r in 0..rows {
            weights[r * cols + c] = q[i * rows + r];
        }
    }
    // Codes from the values and their group's grid (every value is `(level − zero)·scale`).
    let offset = if p.symmetric { 1i32 << (p.bits - 1) } else { 0 };
    let mut codes = vec![0u8; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            // Every value is on its grid: its level is exact.
            let level = grids[r * groups + c / g].level(weights[r * cols + c]);
            codes[r * cols + c] = (level as i32 + offset) as u8;
        }
    }
    let params = Params {
        bits: p.bits,
        scheme: if p.symmetric {
            Scheme::Symmetric
        } else {
            Scheme::Affine
        },
        block_len: g,
        scales: grids.iter().map(|g| g.scale).collect(),
        zero_points: if p.symmetric {
            Vec::new()
        } else {
            grids.iter().map(|g| g.zero as u8).collect()
        },
        codebook: Vec::new(),
    };
    Ok(GptqLayer {
        quantized: Quantized {
            codes,
            params,
            dequantized: weights.clone(),
        },
        weights,
        damp,
        dead_columns: dead_cols.len(),
        mins: if p.gguf_grid && !p.symmetric {
            grids.iter().map(|g| g.min).collect()
        } else {
            Vec::new()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::calib::relative_output_error;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Correlated inputs (a few latent factors plus noise, some columns loud): the case GPTQ
    /// is for.
    fn problem(rows: usize, cols: usize, n: usize, seed: u64) -> (Vec<f32>, Vec<f64>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let latent = 4;
        let mix: Vec<f64> = (0..latent * cols)
            .map(|_| rng.gen_range(-1.0..1.0))
            .collect();
        let mut gram = vec![0f64; cols * cols];
        for _ in 0..n {
            let z: Vec<f64> = (0..latent).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let x: Vec<f64> = (0..cols)
                .map(|c| {
                    let loud = if c % 7 == 0 { 5.0 } else { 1.0 };
                    loud * ((0..latent).map(|k| z[k] * mix[k * cols + c]).sum::<f64>()
                        + 0.1 * rng.gen_range(-1.0..1.0))
                })
                .collect();
            for i in 0..cols {
                for j in 0..cols {
                    gram[i * cols + j] += x[i] * x[j];
                }
            }
        }
        (w, gram)
    }

    fn params(bits: u8, group_size: Option<usize>, act_order: bool, symmetric: bool) -> GptqParams {
        GptqParams {
            bits,
            group_size,
            symmetric,
            act_order,
            damp: 0.01,
            block_size: 8,
            gguf_grid: false,
            clip: false,
        }
    }

    #[test]
    fn gptq_beats_round_to_nearest_on_the_output() {
        let (rows, cols) = (16, 32);
        let (w, gram) = problem(rows, cols, 256, 3);
        for p in [
            params(4, None, false, true),
            params(3, Some(16), false, true),
            params(3, Some(16), true, false),
            params(2, Some(8), true, true),
        ] {
            let out = gptq(&w, rows, cols, &gram, &p).unwrap();
            let e_gptq = relative_output_error(&w, &out.weights, &gram, cols);
            let e_rtn = relative_output_error(&w, &rtn(&w, rows, cols, &p), &gram, cols);
            assert!(
                e_gptq < 0.7 * e_rtn,
                "{p:?}: gptq {e_gptq:.5} vs rtn {e_rtn:.5}"
            );
        }
    }

    #[test]
    fn the_clipping_search_lowers_the_error_and_keeps_the_codes_exact() {
        let (rows, cols) = (16, 64);
        let (w, gram) = problem(rows, cols, 256, 5);
        for p in [
            params(3, Some(16), false, true),
            params(3, Some(16), true, false),
            params(4, Some(32), true, true),
            params(2, None, false, false),
        ] {
            let full = gptq(&w, rows, cols, &gram, &p).unwrap();
            let clipped = gptq(&w, rows, cols, &gram, &GptqParams { clip: true, ..p }).unwrap();
            let e_full = relative_output_error(&w, &full.weights, &gram, cols);
            let e_clip = relative_output_error(&w, &clipped.weights, &gram, cols);
            assert!(
                e_clip < e_full,
                "{p:?}: clipped {e_clip:.5} vs full {e_full:.5}"
            );
            // Some grid is narrower than its values' range, and the codes still decode.
            assert!(clipped
                .quantized
                .params
                .scales
                .iter()
                .zip(&full.quantized.params.scales)
                .any(|(c, f)| c < f));
            let mut back = vec![0f32; rows * cols];
            clipped
                .quantized
                .params
                .dequantize(&clipped.quantized.codes, &mut back)
                .unwrap();
            assert!(back == clipped.weights, "{p:?}");
        }
    }

    #[test]
    fn gguf_grids_encode_to_blocks_that_decode_to_the_weights_bit_for_bit() {
        use crate::compress::formats::gguf::decode_blocks;
        let (rows, cols) = (8, 64);
        let (w, gram) = problem(rows, cols, 256, 9);
        for (bits, symmetric) in [(4, true), (5, true), (8, true), (4, false), (5, false)] {
            for (act_order, clip) in [(false, false), (true, false), (true, true)] {
                let mut p = params(bits, Some(32), act_order, symmetric);
                p.gguf_grid = true;
                p.clip = clip;
                let out = gptq(&w, rows, cols, &gram, &p).unwrap();
                let ty = gguf_type(bits, symmetric).unwrap();
                let blocks = gguf_blocks(&out, ty).unwrap();
                assert_eq!(blocks.len(), rows * cols / 32 * ty.block_bytes());
                let back = decode_blocks(ty, &blocks, rows * cols).unwrap();
                for (a, b) in back.iter().zip(&out.weights) {
                    assert_eq!(a.to_bits(), b.to_bits(), "{ty} act_order {act_order}");
                }
                // Still GPTQ: better than rounding to nearest on the full-range f16 grids.
                let e_gptq = relative_output_error(&w, &out.weights, &gram, cols);
                let p = GptqParams { clip: false, ..p };
                let e_rtn = relative_output_error(&w, &rtn(&w, rows, cols, &p), &gram, cols);
                assert!(e_gptq < e_rtn, "{ty}: {e_gptq} vs {e_rtn}");
            }
        }
        assert_eq!(gguf_type(3, true), None);
        assert_eq!(gguf_type(8, false), None);
    }

    #[test]
    fn every_value_lies_on_its_grid() {
        let (rows, cols) = (4, 16);
        let (w, gram) = problem(rows, cols, 64, 5);
        for p in [
            params(3, Some(8), false, true),
            params(4, Some(8), false, false),
        ] {
            let out = gptq(&w, rows, cols, &gram, &p).unwrap();
            for r in 0..rows {
                for k in 0..2 {
                    let chunk = &out.weights[r * cols + k * 8..r * cols + k * 8 + 8];
                    let levels: std::collections::BTreeSet<u32> =
                        chunk.iter().map(|v| v.to_bits()).collect();
                    assert!(
                        levels.len() <= 1 << p.bits,
                        "{p:?} row {r} group {k}: {levels:?}"
                    );
                    // Steps between values are integer multiples of the smallest step.
                    let mut vals: Vec<f32> = chunk.to_vec();
                    vals.sort_by(f32::total_cmp);
                    vals.dedup();
                    if vals.len() > 1 {
                        let step = vals
                            .windows(2)
                            .map(|v| v[1] - v[0])
                            .fold(f32::MAX, f32::min);
                        for v in &vals {
                            let k = (v - vals[0]) / step;
                            assert!((k - k.round()).abs() < 1e-3, "{vals:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn codes_and_scales_decode_to_the_weights() {
        let (rows, cols) = (6, 32);
        let (w, gram) = problem(rows, cols, 64, 9);
        for p in [
            params(3, Some(16), false, true),
            params(4, Some(8), true, false),
            params(2, None, false, false),
            params(8, None, true, true),
        ] {
            let out = gptq(&w, rows, cols, &gram, &p).unwrap();
            let mut back = vec![0f32; rows * cols];
            out.quantized
                .params
                .dequantize(&out.quantized.codes, &mut back)
                .unwrap();
            assert!(back == out.weights, "{p:?}");
        }
    }

    #[test]
    fn identity_hessian_is_round_to_nearest() {
        // With H = I there is nothing to compensate: GPTQ's first column of each group is
        // RTN, and the error feedback is zero (U is diagonal).
        let (rows, cols) = (3, 8);
        let w: Vec<f32> = (0..24)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) / 7.0)
            .collect();
        let mut h = vec![0f64; cols * cols];
        for i in 0..cols {
            h[i * cols + i] = 1.0;
        }
        let p = params(3, Some(4), false, true);
        let out = gptq(&w, rows, cols, &h, &p).unwrap();
        assert_eq!(out.weights, rtn(&w, rows, cols, &p));
    }

    #[test]
    fn dead_columns_are_rounded_to_nearest() {
        let (rows, cols) = (2, 4);
        let w = vec![1.0f32, 2.0, 3.0, 4.0, -1.0, -2.0, -3.0, -4.0];
        let mut h = vec![0f64; 16];
        for i in [0, 1, 3] {
            h[i * 4 + i] = 1.0;
        }
        let out = gptq(&w, rows, cols, &h, &params(8, None, false, true)).unwrap();
        assert_eq!(out.dead_columns, 1);
        let p = params(8, None, false, true);
        let rtn = rtn(&w, rows, cols, &p);
        assert_eq!((out.weights[2], out.weights[6]), (rtn[2], rtn[6]));
    }
}
