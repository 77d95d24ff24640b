//! Magnitude selection: sources of
//! w
//!  (f32 slices in memory or raw bytes of a mapped
//! file), split in blocks over the thread budget, and the exact k-th smallest by radix histograms.

#[allow(unused_imports)]
use super::*;

// Sources of magnitudes: f32 slices in memory or raw bytes of a mapped file.

#[derive(Clone, Copy)]
pub(super) enum Src<'a> {
    F32(&'a [f32]),
    Raw {
        name: &'a str,
        dtype: Dtype,
        bytes: &'a [u8],
    },
}

impl Src<'_> {
    pub(super) fn len(&self) -> usize {
        match self {
            Src::F32(v) => v.len(),
            Src::Raw { dtype, bytes, .. } => bytes.len() / dtype.size_in_bytes(),
        }
    }

    /// Calls `f(offset, values)` for `[start, end)` in pieces, decoding raw bytes into `buf`.
    pub(super) fn visit(
        &self,
        start: usize,
        end: usize,
        buf: &mut Vec<f32>,
        mut f: impl FnMut(usize, &[f32]),
    ) -> Result<()> {
        match *self {
            Src::F32(v) => f(start, &v[start..end]),
            Src::Raw { name, dtype, bytes } => {
                let es = dtype.size_in_bytes();
                let mut s = start;
                while s < end {
                    let e = (s + PIECE).min(end);
                    decode_into(name, dtype, &bytes[s * es..e * es], buf)?;
                    f(s, buf);
                    s = e;
                }
            }
        }
        Ok(())
    }
}

/// Decodes float bytes into `out` without allocating for the common dtypes.
pub(super) fn decode_into(
    name: &str,
    dtype: Dtype,
    bytes: &[u8],
    out: &mut Vec<f32>,
) -> Result<()> {
    out.clear();
    match dtype {
        Dtype::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        Dtype::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        Dtype::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        _ => out.extend(decode_f32(name, dtype, bytes)?),
    }
    Ok(())
}

/// A contiguous run of one source's elements.
#[derive(Debug, Clone, Copy)]
pub(super) struct Block {
    src: usize,
    start: usize,
    end: usize,
}

pub(super) fn blocks(lens: &[usize]) -> Vec<Block> {
    let mut out = Vec::new();
    for (src, &n) in lens.iter().enumerate() {
        let mut s = 0;
        while s < n {
            let e = (s + BLOCK).min(n);
            out.push(Block {
                src,
                start: s,
                end: e,
            });
            s = e;
        }
    }
    out
}

/// Splits `blocks` into at most `parts` contiguous runs of about equal element counts.
pub(super) fn split_parts(blocks: &[Block], parts: usize) -> Vec<Range<usize>> {
    let total: usize = blocks.iter().map(|b| b.end - b.start).sum();
    let parts = if total < PARALLEL_MIN {
        1
    } else {
        parts.max(1)
    };
    let mut out = Vec::with_capacity(parts);
    let (mut begin, mut acc) = (0, 0usize);
    for (i, b) in blocks.iter().enumerate() {
        acc += b.end - b.start;
        if out.len() + 1 < parts && acc * parts >= total * (out.len() + 1) {
            out.push(begin..i + 1);
            begin = i + 1;
        }
    }
    out.push(begin..blocks.len());
    out
}

// Radix selection.

pub(super) const HI: usize = 1 << 15;
pub(super) const LO: usize = 1 << 16;

/// Histogram of the high 15 bits of the keys.
pub(super) fn hist_hi(vals: &[f32], h: &mut [u32; LO]) {
    for &v in vals {
        h[(key(v) >> 16) as usize] += 1;
    }
}

/// Histogram of the low 16 bits of the keys whose high bits are `hi`. Few keys fall in
/// that bucket, so each run of 16 is first tested with a vectorised compare and only runs
/// holding a match take the scalar path (a branch-free scatter into the 256 KiB table for
/// every element was slower than the whole first pass).
pub(super) fn hist_lo(vals: &[f32], hi: u32, h: &mut [u32; LO]) {
    let mut chunks = vals.chunks_exact(16);
    for chunk in &mut chunks {
        let any = chunk.iter().fold(false, |a, &v| a | (key(v) >> 16 == hi));
        if any {
            hist_lo_scalar(chunk, hi, h);
        }
    }
    hist_lo_scalar(chunks.remainder(), hi, h);
}

pub(super) fn hist_lo_scalar(vals: &[f32], hi: u32, h: &mut [u32; LO]) {
    for &v in vals {
        let k = key(v);
        if k >> 16 == hi {
            h[(k & 0xffff) as usize] += 1;
        }
    }
}

/// One part's histogram (pass 1 when `hi` is `None`, pass 2 inside bucket `hi` otherwise),
/// counted in `u32` and flushed to `u64` before it could overflow.
pub(super) fn part_hist(srcs: &[Src], blocks: &[Block], hi: Option<u32>) -> Result<Vec<u64>> {
    let mut h: Box<[u32; LO]> = vec![0u32; LO]
        .into_boxed_slice()
        .try_into()
        .map_err(|_| Error::Internal("histogram allocation".into()))?;
    let mut total = vec![0u64; if hi.is_some() { LO } else { HI }];
    let mut pending = 0u64;
    let mut buf = Vec::new();
    let flush = |h: &mut [u32; LO], total: &mut [u64]| {
        for (t, c) in total.iter_mut().zip(h.iter_mut()) {
            *t += u64::from(*c);
            *c = 0;
        }
    };
    for b in blocks {
        let len = (b.end - b.start) as u64;
        if pending + len > u64::from(u32::MAX) {
            flush(&mut h, &mut total);
            pending = 0;
        }
        pending += len;
        srcs[b.src].visit(b.start, b.end, &mut buf, |_, vals| match hi {
            None => hist_hi(vals, &mut h),
            Some(hi) => hist_lo(vals, hi, &mut h),
        })?;
    }
    flush(&mut h, &mut total);
    Ok(total)
}

/// The bucket holding the element of 0-based `rank`, and the count below that bucket.
pub(super) fn find_bucket(h: &[u64], rank: u64) -> Result<(usize, u64)> {
    let mut below = 0u64;
    for (i, &c) in h.iter().enumerate() {
        if below + c > rank {
            return Ok((i, below));
        }
        below += c;
    }
    Err(Error::Internal(format!(
        "rank {rank} beyond the {below} counted elements"
    )))
}

/// The exact magnitude threshold pruning `k` elements of the concatenated sources:
/// element `i` of source `j` is pruned iff `key < t || (key == t && i < cuts[j])`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Threshold {
    pub(super) t: u32,
    pub(super) cuts: Vec<usize>,
}

/// Radix selection of the `k`-th smallest |w| over `srcs` (in order); `None` when `k = 0`.
pub(super) fn select_threshold(srcs: &[Src], k: u64) -> Result<Option<Threshold>> {
    let lens: Vec<usize> = srcs.iter().map(Src::len).collect();
    let n: u64 = lens.iter().map(|&l| l as u64).sum();
    if k == 0 {
        return Ok(None);
    }
    if k > n {
        return Err(Error::Internal(format!("cannot prune {k} of {n} elements")));
    }
    let blocks = blocks(&lens);
    let parts = split_parts(&blocks, threads());
    let rank = k - 1;

    let h1s = par_map(parts.clone(), |r| part_hist(srcs, &blocks[r], None));
    let h1 = merge(h1s)?;
    let (hi, below_hi) = find_bucket(&h1, rank)?;
    let hi = hi as u32;

    let h2s: Vec<Vec<u64>> = par_map(parts.clone(), |r| part_hist(srcs, &blocks[r], Some(hi)))
        .into_iter()
        .collect::<Result<_>>()?;
    let h2 = merge(h2s.iter().cloned().map(Ok).collect())?;
    let (lo, below_lo) = find_bucket(&h2, rank - below_hi)?;
    let t = hi << 16 | lo as u32;
    let less = below_hi + below_lo;
    let equal = h2[lo];
    let need = k - less;

    let mut cuts = lens;
    if need < equal {
        // Only the first `need` ties (in source order, then index order) are pruned: find
        // the part holding the last of them, then its position by a scan of that part.
        let mut before = 0u64;
        for (p, range) in parts.iter().enumerate() {
            let here = h2s[p][lo];
            if before + here >= need {
                let (j, i) = nth_equal(srcs, &blocks[range.clone()], t, need - before)?;
                for (jj, c) in cuts.iter_mut().enumerate() {
                    if jj == j {
                        *c = i + 1;
                    } else if jj > j {
                        *c = 0;
                    }
                }
                break;
            }
            before += here;
        }
    }
    Ok(Some(Threshold { t, cuts }))
}

pub(super) fn merge(hs: Vec<Result<Vec<u64>>>) -> Result<Vec<u64>> {
    let mut it = hs.into_iter();
    let mut acc = it
        .next()
        .ok_or_else(|| Error::Internal("no histogram".into()))??;
    for h in it {
        for (a, c) in acc.iter_mut().zip(h?) {
            *a += c;
        }
    }
    Ok(acc)
}

/// Position (source, index) of the `nth` (1-based) element with key `t` in `blocks`.
pub(super) fn nth_equal(
    srcs: &[Src],
    blocks: &[Block],
    t: u32,
    nth: u64,
) -> Result<(usize, usize)> {
    let mut seen = 0u64;
    let mut buf = Vec::new();
    for b in blocks {
        let mut found = None;
        srcs[b.src].visit(b.start, b.end, &mut buf, |offset, vals| {
            if found.is_some() {
                return;
            }
            for (i, &v) in vals.iter().enumerate() {
                if key(v) == t {
                    seen += 1;
                    if seen == nth {
                        found = Some(offset + i);
                        return;
                    }
                }
            }
        })?;
        if let Some(i) = found {
            return Ok((b.src, i));
        }
    }
    Err(Error::Internal(format!("tie {nth} at threshold not found")))
}
