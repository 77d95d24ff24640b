//! Fixed level sets: `log2` (signed powers of two) and `nf4` (QLoRA NormalFloat-4).

#[allow(unused_imports)]
use super::*;

/// Index of the nearest entry of the sorted `levels` for each value (ties go up), by
/// binary search over the midpoints.
pub(super) fn assign_nearest(values: &[f32], levels: &[f32], codes: &mut [u8]) {
    let mids: Vec<f32> = levels.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
    for (c, &v) in codes.iter_mut().zip(values) {
        *c = mids.partition_point(|&m| m <= v) as u8;
    }
}

/// Power-of-two quantization with a per-row (`block_len`) amax scale.
pub(super) fn log2(values: &[f32], block_len: usize, bits: u8, codes: &mut [u8]) -> Params {
    let half = 1usize << (bits - 1);
    // Magnitude table by m: m = 0 → 0, m ≥ 1 → 2^−(m−1).
    let mag = |m: usize| {
        if m == 0 {
            0.0
        } else {
            (0.5f32).powi(m as i32 - 1)
        }
    };
    let codebook: Vec<f32> = (0..2 * half)
        .map(|c| {
            let m = c & (half - 1);
            if c >= half {
                -mag(m)
            } else {
                mag(m)
            }
        })
        .collect();
    // Magnitudes ascending (0, smallest power, …, 1) and the m of each.
    let mut asc: Vec<(f32, usize)> = (0..half).map(|m| (mag(m), m)).collect();
    asc.sort_by(|a, b| a.0.total_cmp(&b.0));
    let levels: Vec<f32> = asc.iter().map(|a| a.0).collect();
    let ms: Vec<u8> = asc.iter().map(|a| a.1 as u8).collect();
    let mids: Vec<f32> = levels.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
    let scales = par_blocks(values, block_len, codes, threads(), |_, v, c, p| {
        for ((row, cr), s) in v.chunks(block_len).zip(c.chunks_mut(block_len)).zip(p) {
            let scale = f32::from_bits(amax_bits(row));
            *s = scale;
            for (c, &x) in cr.iter_mut().zip(row) {
                let r = if scale > 0.0 { x.abs() / scale } else { 0.0 };
                let m = ms[mids.partition_point(|&b| b <= r)];
                let sign = if x < 0.0 && m != 0 { half as u8 } else { 0 };
                *c = sign | m;
            }
        }
    });
    Params {
        bits,
        scheme: Scheme::ScaledCodebook,
        block_len,
        scales,
        zero_points: vec![],
        codebook,
    }
}

/// NF4 with an absmax scale per block of `group_size`.
pub(super) fn nf4(values: &[f32], group_size: usize, codes: &mut [u8]) -> Params {
    let mids: Vec<f32> = NF4_LEVELS.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
    let scales = par_blocks(values, group_size, codes, threads(), |_, v, c, p| {
        for ((block, cb), s) in v.chunks(group_size).zip(c.chunks_mut(group_size)).zip(p) {
            let scale = f32::from_bits(amax_bits(block));
            *s = scale;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            for (c, &x) in cb.iter_mut().zip(block) {
                *c = mids.partition_point(|&m| m <= x * inv) as u8;
            }
        }
    });
    Params {
        bits: 4,
        scheme: Scheme::ScaledCodebook,
        block_len: group_size,
        scales,
        zero_points: vec![],
        codebook: NF4_LEVELS.to_vec(),
    }
}
