//! GGUF's q4_0 block quantizer: the same bytes as candle's / ggml's `quantize_row_q4_0`, with
//! the error statistics taken from the codes in the same pass.

use half::f16;

/// q4_0 blocks of `values` into `out` (whole blocks); returns Σx², Σ(x − x̂)², max |x − x̂|.
/// (An AVX2 build of this loop ran no faster: the time goes to reading and writing memory.)
pub(super) fn q4_0_blocks(values: &[f32], out: &mut [u8]) -> (f64, f64, f32) {
    let (mut signal, mut noise, mut max) = (0f64, 0f64, 0f32);
    let blocks = out.chunks_exact_mut(Q4_0_BYTES);
    for (xs, block) in values.chunks_exact(Q4_0_BLOCK).zip(blocks) {
        let (s, n, m) = q4_0_block(xs.try_into().unwrap(), block.try_into().unwrap());
        signal += f64::from(s);
        noise += f64::from(n);
        max = max.max(m);
    }
    (signal, noise, max)
}

pub(super) const Q4_0_BLOCK: usize = 32;
pub(super) const Q4_0_BYTES: usize = 18;

/// One q4_0 block (f16 scale `d`, then 16 bytes of 4-bit codes, value j in the low nibble of
/// byte j and value j + 16 in its high nibble); returns Σx², Σ(x − x̂)² and max |x − x̂| of the
/// block, x̂ being candle's decoding `(q − 8)·d`. Per-block sums of 32 squares in f32 are off by
/// at most a few parts in 10⁷, which a diagnostic can bear; |x − x̂| itself is exact (x̂ is
/// within a factor of two of x or zero, so the subtraction is exact).
#[inline(always)]
pub(super) fn q4_0_block(xs: &[f32; Q4_0_BLOCK], out: &mut [u8; Q4_0_BYTES]) -> (f32, f32, f32) {
    const LANES: usize = 8;
    let mut lanes = [0f32; LANES];
    for chunk in xs.chunks_exact(LANES) {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            let a = x.abs();
            *m = if a > *m { a } else { *m };
        }
    }
    let amax = lanes.iter().fold(0f32, |m, &a| if a > m { a } else { m });
    // candle (and ggml) keep the first value of the largest magnitude, with its sign, and 0.0
    // when there is none above zero.
    let max = if amax > 0.0 {
        xs.iter().copied().find(|x| x.abs() == amax).unwrap_or(0.0)
    } else {
        0.0
    };
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let d16 = f16::from_f32(d);
    out[..2].copy_from_slice(&d16.to_le_bytes());
    let mut codes = [0u8; Q4_0_BLOCK];
    for (q, &x) in codes.iter_mut().zip(xs) {
        *q = u8::min(15, (x * id + 8.5) as u8);
    }
    let (lo, hi) = codes.split_at(Q4_0_BLOCK / 2);
    for ((b, &l), &h) in out[2..].iter_mut().zip(lo).zip(hi) {
        *b = l | (h << 4);
    }
    let dd = d16.to_f32();
    let (mut signal, mut noise, mut max_err) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
    for (xc, qc) in xs.chunks_exact(LANES).zip(codes.chunks_exact(LANES)) {
        for i in 0..LANES {
            let e = xc[i] - (f32::from(qc[i]) - 8.0) * dd;
            signal[i] += xc[i] * xc[i];
            noise[i] += e * e;
            let a = e.abs();
            max_err[i] = if a > max_err[i] { a } else { max_err[i] };
        }
    }
    (
        signal.iter().sum(),
        noise.iter().sum(),
        max_err.iter().fold(0f32, |m, &a| m.max(a)),
    )
}
