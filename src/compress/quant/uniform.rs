//! `uniform`: integer codes with symmetric or affine scales per tensor, channel or group,
//! with the optional clipping search (importance-weighted) and its least-squares refit.

#[allow(unused_imports)]
use super::*;

/// 1.5 · 2^23: adding it rounds an f32 of magnitude < 2^22 to an integer, half to even
/// (the default rounding mode), and leaves that integer in the low mantissa bits. Unlike
/// `round_ties_even`, it vectorises on baseline x86-64 (SSE2 has no `roundps`).
pub(super) const MAGIC: f32 = 12_582_912.0;

/// `round_half_even(x)` for |x| < 2^22, as an integer.
#[inline(always)]
pub(super) fn round_i32(x: f32) -> i32 {
    (x + MAGIC).to_bits() as i32 - MAGIC.to_bits() as i32
}

/// Largest |x| of a slice as raw f32 bits (order-preserving for non-negative floats):
/// integer max reductions vectorise without fast-math, and NaN / ∞ show up as bits
/// ≥ 0x7f80_0000.
#[inline(always)]
pub(super) fn amax_bits(xs: &[f32]) -> u32 {
    // A plain fold: LLVM's loop vectoriser recognises the unsigned-max reduction (a
    // hand-unrolled [u32; 16] accumulator was built lane by lane with vpinsrd instead).
    xs.iter()
        .fold(0u32, |m, x| m.max(x.to_bits() & 0x7fff_ffff))
}

/// Symmetric scale for a block with largest magnitude `amax`, and its inverse (0 when the
/// scale is 0 or its inverse overflows, so all-zero blocks encode to code 0 without NaN).
#[inline]
pub(super) fn symmetric_scale(amax: f32, qmax: f32) -> (f32, f32) {
    let scale = amax / qmax;
    let inv = 1.0 / scale;
    if scale > 0.0 && inv.is_finite() {
        (scale, inv)
    } else {
        (scale, 0.0)
    }
}

/// Symmetric codes of `xs` with inverse scale `inv`: `round(clamp(x·inv)) + offset`.
#[inline(always)]
pub(super) fn encode_symmetric(xs: &[f32], inv: f32, qmax: f32, offset: i32, codes: &mut [u8]) {
    for (c, &x) in codes.iter_mut().zip(xs) {
        let q = (x * inv).clamp(-qmax, qmax);
        *c = (round_i32(q) + offset) as u8;
    }
}

/// The fast path: symmetric per-row quantization (int8 when `bits == 8`) of a row-major
/// `[rows, cols]` buffer into `codes` (stored codes, offset by 2^(bits−1)) and `scales`
/// (one per row), rows split over `threads` threads. Values must be finite (an infinite
/// or NaN value is refused with [`Error::Unsupported`]).
pub fn quantize_symmetric_rows(
    values: &[f32],
    cols: usize,
    bits: u8,
    codes: &mut [u8],
    scales: &mut [f32],
    threads: usize,
) -> Result<()> {
    check_bits(bits)?;
    let cols = cols.max(1);
    if !values.len().is_multiple_of(cols)
        || codes.len() != values.len()
        || scales.len() != values.len() / cols
    {
        return Err(Error::Internal(format!(
            "quantize_symmetric_rows: {} values, {} codes, {} scales for {cols} columns",
            values.len(),
            codes.len(),
            scales.len()
        )));
    }
    let qmax = ((1i32 << (bits - 1)) - 1) as f32;
    let offset = 1i32 << (bits - 1);
    let bad = std::sync::atomic::AtomicBool::new(false);
    let work = |v: &[f32], c: &mut [u8], s: &mut [f32]| {
        if !symmetric_rows(v, cols, qmax, offset, c, s) {
            bad.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    };
    let rows = scales.len();
    let t = if values.len() < PARALLEL_MIN {
        1
    } else {
        threads.clamp(1, rows.max(1))
    };
    if t <= 1 {
        work(values, codes, scales);
    } else {
        let per = rows.div_ceil(t);
        std::thread::scope(|sc| {
            for ((v, c), s) in values
                .chunks(per * cols)
                .zip(codes.chunks_mut(per * cols))
                .zip(scales.chunks_mut(per))
            {
                let work = &work;
                sc.spawn(move || work(v, c, s));
            }
        });
    }
    if bad.into_inner() {
        return Err(Error::Unsupported(
            "a row holds a NaN or infinite value; quantization needs finite weights".into(),
        ));
    }
    Ok(())
}

/// Symmetric per-row kernel: scale and codes of each `cols`-long row; false when a row
/// holds a non-finite value. Runs the AVX2 build of the same code when the CPU has it.
pub(super) fn symmetric_rows(
    values: &[f32],
    cols: usize,
    qmax: f32,
    offset: i32,
    codes: &mut [u8],
    scales: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return unsafe { symmetric_rows_avx512(values, cols, qmax, offset, codes, scales) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { symmetric_rows_avx2(values, cols, qmax, offset, codes, scales) };
        }
    }
    symmetric_rows_generic(values, cols, qmax, offset, codes, scales)
}

/// [`symmetric_rows_generic`] written for AVX-512F: 16 values per instruction, the row's
/// largest magnitude as an unsigned max of the sign-cleared bits, codes rounded half to even
/// by `vcvtps2dq` (the default rounding mode, as [`round_i32`]) and narrowed with `vpmovdb`.
/// The same codes and scales as the generic loop, bit for bit (unit test).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) fn symmetric_rows_avx512(
    values: &[f32],
    cols: usize,
    qmax: f32,
    offset: i32,
    codes: &mut [u8],
    scales: &mut [f32],
) -> bool {
    use std::arch::x86_64::*;
    let abs = _mm512_set1_epi32(0x7fff_ffff);
    let off = _mm512_set1_epi32(offset);
    let (hi, lo) = (_mm512_set1_ps(qmax), _mm512_set1_ps(-qmax));
    for ((row, crow), scale) in values
        .chunks(cols)
        .zip(codes.chunks_mut(cols))
        .zip(scales.iter_mut())
    {
        let body = row.len() / 16 * 16;
        let mut m = _mm512_setzero_si512();
        for c in row[..body].chunks_exact(16) {
            // SAFETY: `c` holds 16 f32 (64 bytes); unaligned loads are allowed.
            let v = unsafe { _mm512_loadu_si512(c.as_ptr().cast()) };
            m = _mm512_max_epu32(m, _mm512_and_si512(v, abs));
        }
        let bits = _mm512_reduce_max_epu32(m).max(amax_bits(&row[body..]));
        if bits >= 0x7f80_0000 {
            return false;
        }
        let (sc, inv) = symmetric_scale(f32::from_bits(bits), qmax);
        *scale = sc;
        let vinv = _mm512_set1_ps(inv);
        for (c, out) in row[..body]
            .chunks_exact(16)
            .zip(crow[..body].chunks_exact_mut(16))
        {
            // SAFETY: `c` holds 16 f32 and `out` 16 bytes; unaligned accesses are allowed.
            unsafe {
                let v = _mm512_loadu_ps(c.as_ptr());
                let q = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, vinv), lo), hi);
                let i = _mm512_add_epi32(_mm512_cvtps_epi32(q), off);
                _mm_storeu_si128(out.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(i));
            }
        }
        encode_symmetric(&row[body..], inv, qmax, offset, &mut crow[body..]);
    }
    true
}

/// [`symmetric_rows_generic`] compiled for AVX2 (8-wide max, round, pack).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) fn symmetric_rows_avx2(
    values: &[f32],
    cols: usize,
    qmax: f32,
    offset: i32,
    codes: &mut [u8],
    scales: &mut [f32],
) -> bool {
    symmetric_rows_generic(values, cols, qmax, offset, codes, scales)
}

#[inline(always)]
pub(super) fn symmetric_rows_generic(
    values: &[f32],
    cols: usize,
    qmax: f32,
    offset: i32,
    codes: &mut [u8],
    scales: &mut [f32],
) -> bool {
    for ((row, crow), scale) in values
        .chunks(cols)
        .zip(codes.chunks_mut(cols))
        .zip(scales.iter_mut())
    {
        let bits = amax_bits(row);
        if bits >= 0x7f80_0000 {
            return false;
        }
        let (sc, inv) = symmetric_scale(f32::from_bits(bits), qmax);
        *scale = sc;
        encode_symmetric(row, inv, qmax, offset, crow);
    }
    true
}

/// Whether every value is finite (one vectorised pass; AVX2 when available).
pub(super) fn all_finite(values: &[f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { amax_bits_avx2(values) } < 0x7f80_0000;
    }
    amax_bits(values) < 0x7f80_0000
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) fn amax_bits_avx2(values: &[f32]) -> u32 {
    amax_bits(values)
}

#[derive(Debug, Clone, Copy)]
pub(super) struct UniformCfg {
    pub(super) bits: u8,
    pub(super) symmetric: bool,
    pub(super) search: bool,
}

/// `uniform` over blocks of `block_len`. `importance` (one weight per column, `cols` long)
/// weights each element's squared error in the search.
pub(super) fn uniform(
    values: &[f32],
    block_len: usize,
    cfg: UniformCfg,
    codes: &mut [u8],
    importance: Option<&[f32]>,
) -> Params {
    let levels = (1i32 << cfg.bits) - 1;
    let params: Vec<(f32, u8)> = if cfg.symmetric && !cfg.search {
        let mut scales = vec![0f32; values.len().div_ceil(block_len)];
        // Values were checked finite by the caller, so this cannot fail.
        let _ = quantize_symmetric_rows(values, block_len, cfg.bits, codes, &mut scales, threads());
        scales.into_iter().map(|s| (s, 0)).collect()
    } else {
        // A block is a row or a group within one (`per_channel`, `per_group`), or the whole
        // tensor (`per_tensor`), whose weights repeat the columns' once per row.
        let repeated: Option<Vec<f32>> = importance
            .filter(|w| block_len > w.len())
            .map(|w| w.iter().copied().cycle().take(block_len).collect());
        let weights_of = |block: usize, len: usize| -> Option<&[f32]> {
            match (&repeated, importance) {
                (Some(r), _) => Some(&r[..len]),
                (None, Some(w)) => {
                    let start = (block * block_len) % w.len();
                    Some(&w[start..start + len])
                }
                (None, None) => None,
            }
        };
        par_blocks(values, block_len, codes, threads(), |first, v, c, p| {
            let blocks = v.chunks(block_len).zip(c.chunks_mut(block_len)).zip(p);
            for (k, ((block, cb), out)) in blocks.enumerate() {
                let ws = weights_of(first + k, block.len());
                *out = match (cfg.symmetric, cfg.search) {
                    (true, _) => (search_symmetric(block, ws, cfg.bits, cb), 0),
                    (false, false) => {
                        let (lo, hi) = min_max(block);
                        let (s, z) = affine_params(lo, hi, levels);
                        encode_affine(block, s, z, levels, cb);
                        (s, z)
                    }
                    (false, true) => search_affine(block, ws, levels, cb),
                };
            }
        })
    };
    let (scales, zeros): (Vec<f32>, Vec<u8>) = params.into_iter().unzip();
    Params {
        bits: cfg.bits,
        scheme: if cfg.symmetric {
            Scheme::Symmetric
        } else {
            Scheme::Affine
        },
        block_len,
        scales,
        zero_points: if cfg.symmetric { vec![] } else { zeros },
        codebook: vec![],
    }
}

pub(super) fn min_max(xs: &[f32]) -> (f32, f32) {
    xs.iter()
        .fold((0f32, 0f32), |(lo, hi), &x| (lo.min(x), hi.max(x)))
}

/// Affine scale and zero-point for the range `[lo, hi]` (widened to include 0).
pub(super) fn affine_params(lo: f32, hi: f32, levels: i32) -> (f32, u8) {
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    let scale = (hi - lo) / levels as f32;
    if !(scale > 0.0 && (1.0 / scale).is_finite()) {
        return (0.0, 0);
    }
    let z = (-lo / scale).round_ties_even().clamp(0.0, levels as f32) as u8;
    (scale, z)
}

pub(super) fn encode_affine(xs: &[f32], scale: f32, zero: u8, levels: i32, codes: &mut [u8]) {
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let inv = if inv.is_finite() { inv } else { 0.0 };
    let z = i32::from(zero);
    for (c, &x) in codes.iter_mut().zip(xs) {
        // Clamp in float first so round_i32 stays within its ±2^22 range.
        let q = (x * inv).clamp(-(levels as f32) - 1.0, levels as f32 + 1.0);
        *c = (round_i32(q) + z).clamp(0, levels) as u8;
    }
}

/// Σ (x − decoded)² of a symmetric encoding with `scale`, each term weighted by `ws`.
pub(super) fn sq_err_symmetric(xs: &[f32], ws: Option<&[f32]>, scale: f32, qmax: f32) -> f64 {
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    weighted_sum(xs, ws, |x| {
        let q = ((x * inv).clamp(-qmax, qmax) + MAGIC) - MAGIC;
        let d = x - q * scale;
        d * d
    })
}

/// Σ w·f(x), or Σ f(x) without weights; both vectorise.
#[inline(always)]
pub(super) fn weighted_sum(xs: &[f32], ws: Option<&[f32]>, f: impl Fn(f32) -> f32) -> f64 {
    let Some(ws) = ws else {
        return sum_lanes(xs, f);
    };
    let mut acc = [0f32; 8];
    let (xc, wc) = (xs.chunks_exact(8), ws.chunks_exact(8));
    let tail: f32 = xc
        .remainder()
        .iter()
        .zip(wc.remainder())
        .map(|(&x, &w)| w * f(x))
        .sum();
    for (x, w) in xc.zip(wc) {
        for i in 0..8 {
            acc[i] += w[i] * f(x[i]);
        }
    }
    acc.iter().map(|&a| f64::from(a)).sum::<f64>() + f64::from(tail)
}

/// Σ f(x) with eight independent f32 accumulators, so the loop vectorises (a single
/// running f32 sum is a serial dependency chain without fast-math).
#[inline(always)]
pub(super) fn sum_lanes(xs: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut acc = [0f32; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f(x);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
    acc.iter().map(|&a| f64::from(a)).sum::<f64>() + f64::from(tail)
}

/// Symmetric codes for one block, choosing the clipping ratio (and then the least-squares
/// scale for the chosen codes) with the lowest squared error, weighted by `ws` when given.
/// Returns the scale.
pub(super) fn search_symmetric(xs: &[f32], ws: Option<&[f32]>, bits: u8, codes: &mut [u8]) -> f32 {
    let qmax = ((1i32 << (bits - 1)) - 1) as f32;
    let offset = 1i32 << (bits - 1);
    let amax = f32::from_bits(amax_bits(xs));
    let (mut best_s, _) = symmetric_scale(amax, qmax);
    let mut best_e = sq_err_symmetric(xs, ws, best_s, qmax);
    for i in 1..SEARCH_CANDIDATES {
        let r = 1.0 - 0.005 * i as f32;
        let (s, _) = symmetric_scale(amax * r, qmax);
        let e = sq_err_symmetric(xs, ws, s, qmax);
        if e < best_e {
            (best_s, best_e) = (s, e);
        }
    }
    // Least-squares refinement: for fixed codes q, the best scale is Σwxq / Σwq².
    let (_, inv) = symmetric_scale(best_s * qmax, qmax);
    let (mut xq, mut qq) = (0f64, 0f64);
    for (i, &x) in xs.iter().enumerate() {
        let w = ws.map_or(1.0, |ws| f64::from(ws[i]));
        let q = f64::from(round_i32((x * inv).clamp(-qmax, qmax)));
        xq += w * f64::from(x) * q;
        qq += w * q * q;
    }
    if qq > 0.0 {
        let s = (xq / qq) as f32;
        if s > 0.0 && sq_err_symmetric(xs, ws, s, qmax) < best_e {
            best_s = s;
        }
    }
    let (s, inv) = symmetric_scale(best_s * qmax, qmax);
    encode_symmetric(xs, inv, qmax, offset, codes);
    s
}

pub(super) fn sq_err_affine(
    xs: &[f32],
    ws: Option<&[f32]>,
    scale: f32,
    zero: u8,
    levels: i32,
) -> f64 {
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let (z, top) = (f32::from(zero), levels as f32);
    weighted_sum(xs, ws, |x| {
        let q = (x * inv).clamp(-top - 1.0, top + 1.0);
        let c = (((q + MAGIC) - MAGIC) + z).clamp(0.0, top);
        let d = x - (c - z) * scale;
        d * d
    })
}

/// Affine codes for one block: tries shrinking the low and high ends independently
/// (10 × 10 ratios in 1.0..0.55), then a least-squares (scale, offset) fit for the chosen
/// codes; keeps whatever has the lowest squared error (weighted by `ws` when given).
/// Returns (scale, zero-point).
pub(super) fn search_affine(
    xs: &[f32],
    ws: Option<&[f32]>,
    levels: i32,
    codes: &mut [u8],
) -> (f32, u8) {
    let (lo, hi) = min_max(xs);
    let mut best = affine_params(lo, hi, levels);
    let mut best_e = sq_err_affine(xs, ws, best.0, best.1, levels);
    for i in 0..10 {
        for j in 0..10 {
            if i == 0 && j == 0 {
                continue;
            }
            let (rl, rh) = (1.0 - 0.05 * i as f32, 1.0 - 0.05 * j as f32);
            let (s, z) = affine_params(lo * rl, hi * rh, levels);
            let e = sq_err_affine(xs, ws, s, z, levels);
            if e < best_e {
                (best, best_e) = ((s, z), e);
            }
        }
    }
    // Alternating refinement: for the current codes c, fit x ≈ s·(c − z) by least squares,
    // once with a free offset (z = round(−b/s)) and once with z kept; re-encode with the
    // better one and repeat while the error drops.
    for _ in 0..4 {
        encode_affine(xs, best.0, best.1, levels, codes);
        let mut improved = false;
        for cand in affine_least_squares(xs, ws, codes, best.1, levels) {
            let e = sq_err_affine(xs, ws, cand.0, cand.1, levels);
            if e < best_e {
                (best, best_e, improved) = (cand, e, true);
            }
        }
        if !improved {
            break;
        }
    }
    encode_affine(xs, best.0, best.1, levels, codes);
    best
}

/// Least-squares (scale, zero-point) candidates for fixed codes (weighted by `ws` when
/// given): a free offset rounded to an integer zero-point, and the best scale for the
/// zero-point `zero`.
pub(super) fn affine_least_squares(
    xs: &[f32],
    ws: Option<&[f32]>,
    codes: &[u8],
    zero: u8,
    levels: i32,
) -> Vec<(f32, u8)> {
    let (mut n, mut sc, mut sx, mut scc, mut scx) = (0f64, 0f64, 0f64, 0f64, 0f64);
    let (mut dd, mut xd) = (0f64, 0f64);
    for (i, (&x, &c)) in xs.iter().zip(codes).enumerate() {
        let w = ws.map_or(1.0, |ws| f64::from(ws[i]));
        let (x, c) = (f64::from(x), f64::from(c));
        let d = c - f64::from(zero);
        n += w;
        sc += w * c;
        sx += w * x;
        scc += w * c * c;
        scx += w * c * x;
        dd += w * d * d;
        xd += w * x * d;
    }
    let mut out = Vec::with_capacity(2);
    let det = n * scc - sc * sc;
    if det > 0.0 {
        let s = (n * scx - sc * sx) / det;
        let b = (sx - s * sc) / n;
        if s > 0.0 && (s as f32).is_finite() {
            let z = (-b / s).round().clamp(0.0, f64::from(levels)) as u8;
            out.push((s as f32, z));
        }
    }
    if dd > 0.0 && xd > 0.0 {
        out.push(((xd / dd) as f32, zero));
    }
    out
}
