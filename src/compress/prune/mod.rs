//! The `prune` operation's unstructured and semi-structured compute: `magnitude`, `random`
//! and `n_m` (N:M) pruning of named tensors, in memory (for gradual pruning between
//! training rounds) and streamed file → file, plus the packed sparse encoding.
//! Structured pruning (whole neurons / channels) lives in [`crate::compress::prune::structured`].
//!
//! # Targets
//! A tensor matching an override pattern ([`PruneTargets::overrides`], first match wins) is
//! pruned to that sparsity on its own. The others: [`Scope::Layer`] prunes each to
//! [`PruneTargets::sparsity`]; [`Scope::Global`] ranks all of them together by |w| and prunes
//! the smallest `k` of the concatenation (one threshold). The number pruned is
//! `k = round_half_even(s · n)` (Python's `round`, as PyTorch's `_compute_nparams_toprune`),
//! with `n` the tensor's (layer) or the group's (global) element count.
//!
//! # Magnitude selection
//! The threshold is the exact `k`-th smallest |w|, found by radix selection on the f32 bit
//! pattern of |w| (non-negative f32 bit patterns order like `u32`): a histogram of the high
//! 15 bits, then of the low 16 bits inside the chosen bucket — two read-only passes, no copy
//! of the magnitudes and no sort, both split over two threads. Then exactly `k` are pruned:
//! every |w| < t, plus the first `k − count(|w| < t)` elements with |w| = t **in tensor order,
//! then index order** (the deterministic tie rule). Tensor order is the order of the
//! `weights` slice (in memory) or of the file (streamed). Already-zero weights have the
//! smallest magnitude, so they are pruned first. NaN sorts above +∞ (kept); −0 equals +0.
//! Non-f32 inputs (F16, BF16, F64, F8) are ranked by their f32 value (exact for all but
//! F64, whose values are ranked after rounding to f32).
//!
//! # Random
//! `round_half_even(s · n)` elements of each tensor, for both scopes (a global random
//! threshold means nothing, so `global` behaves like `layer`): the first `k` indices of a
//! partial Fisher–Yates shuffle of `0..n` (of the `n − k` kept ones when `k > n/2`) drawn
//! from `ChaCha8Rng::seed_from_u64(seed)` on stream `FNV-1a(tensor name)`, so a tensor's
//! mask does not depend on the other tensors selected.
//!
//! # N:M
//! In every group of `M` consecutive weights along the input dimension (dim 1: a linear
//! `[out, in]` row's consecutive inputs; a conv `[out, in, kh, kw]` kernel's `in` for each
//! `(out, kh, kw)`), the `N` largest |w| are kept (ties: the lower input index is kept).
//! `sparsity`, `scope` and overrides are ignored; the result has sparsity `1 − N/M`.
//!
//! # Sparse format `bitmask-v1`
//! A safetensors file in which every pruned tensor `{name}` is replaced, at its position, by
//! two tensors:
//! - `{name}.sparse_mask`: `U8`, shape `[ceil(n / 8)]`; bit `i` of the row-major flattened
//!   tensor is bit `i % 8` (least significant first) of byte `i / 8`; 1 = kept. Padding bits
//!   of the last byte are 0.
//! - `{name}.sparse_values`: the kept elements in index order, 1-D, the tensor's original
//!   dtype (bit-exact).
//!
//! Other tensors are copied unchanged. The metadata key `whittle.sparse` holds
//! `{"format":"bitmask-v1","tensors":{"<name>":{"dtype":"F32","shape":[300,784]}}}`. Decoding
//! puts each kept value at its bit's position and +0 everywhere else ([`decode_sparse`]).
//! A kept element may be zero (an N:M group of zeros, a tie kept at threshold 0).

pub mod structured;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::ops::Range;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::Value;

use crate::compress::engine::sequential::model::NamedTensor;
use crate::compress::formats::safetensors::{
    decode_f32, write_safetensors, Dtype, SafetensorsFile, TensorInfo, TensorSpec,
};
use crate::compress::progress::Ctx;
use crate::compress::select::glob_match;
use crate::compress::{Error, Result};

/// Metadata key describing the packed tensors of a sparse file.
pub const SPARSE_METADATA_KEY: &str = "whittle.sparse";
/// The `format` of [`SPARSE_METADATA_KEY`].
pub const SPARSE_FORMAT: &str = "bitmask-v1";
/// Suffix of a packed tensor's bitmask.
pub const MASK_SUFFIX: &str = ".sparse_mask";
/// Suffix of a packed tensor's kept values.
pub const VALUES_SUFFIX: &str = ".sparse_values";

/// Elements per parallel work unit (a multiple of 8, so blocks never share a mask byte).
const BLOCK: usize = 1 << 16;
/// Elements decoded at a time from non-f32 (or unaligned) bytes.
const PIECE: usize = 4096;
/// Threads for the selection and masking passes (the machine has two cores).
const MAX_THREADS: usize = 2;
/// Below this many elements one thread is faster than two.
const PARALLEL_MIN: usize = 1 << 18;

/// How the targets of tensors without an override are shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One magnitude threshold across all of them.
    Global,
    /// Each tensor pruned to the sparsity on its own.
    Layer,
}

/// What fraction to prune, and where.
#[derive(Debug, Clone, PartialEq)]
pub struct PruneTargets {
    /// Fraction of weights to prune, in [0, 1).
    pub sparsity: f64,
    /// Global or per-layer ranking.
    pub scope: Scope,
    /// `(glob pattern, sparsity)`: a tensor matching a pattern (first match wins) is pruned
    /// to that sparsity on its own, outside the global ranking.
    pub overrides: Vec<(String, f64)>,
}

impl PruneTargets {
    /// Refuses sparsities outside [0, 1). Pointers: `/sparsity`, `/layers/{pattern}`.
    pub fn validate(&self) -> Result<()> {
        check_sparsity("/sparsity", self.sparsity)?;
        for (pattern, s) in &self.overrides {
            check_sparsity(
                &format!(
                    "/layers/{}",
                    crate::compress::engine::sequential::arch::escape(pattern)
                ),
                *s,
            )?;
        }
        Ok(())
    }

    /// The override sparsity for `name` (first matching pattern), if any.
    pub fn override_for(&self, name: &str) -> Option<f64> {
        self.overrides
            .iter()
            .find(|(p, _)| glob_match(p, name))
            .map(|&(_, s)| s)
    }
}

fn check_sparsity(pointer: &str, s: f64) -> Result<()> {
    if (0.0..1.0).contains(&s) {
        Ok(())
    } else {
        Err(Error::InvalidParameter {
            pointer: pointer.to_owned(),
            detail: format!("sparsity must be in [0, 1), got {s}"),
        })
    }
}

/// Which weights to prune.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// The smallest |w|.
    Magnitude,
    /// Uniformly random weights (seeded).
    Random,
    /// N:M semi-structured: keep the `n` largest |w| of every `m` consecutive inputs.
    NM {
        /// Weights kept per group (1 ≤ n < m).
        n: usize,
        /// Group size.
        m: usize,
    },
}

impl Method {
    /// Refuses N:M with `m = 0`, `n = 0` or `n ≥ m` (pointers `/m`, `/n`).
    pub fn validate(&self) -> Result<()> {
        if let Method::NM { n, m } = *self {
            if m == 0 {
                return Err(Error::InvalidParameter {
                    pointer: "/m".into(),
                    detail: "m (the group size) must be at least 1, got 0".into(),
                });
            }
            if n == 0 || n >= m {
                return Err(Error::InvalidParameter {
                    pointer: "/n".into(),
                    detail: format!(
                        "n (weights kept per group of m) must satisfy 1 <= n < m, got n = {n}, m = {m}"
                    ),
                });
            }
        }
        Ok(())
    }
}

/// The encoding of a pruned file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Zeros in place: same names, dtypes and shapes (drop-in).
    Dense,
    /// The `bitmask-v1` packed encoding (module docs).
    Sparse,
}

/// Weight-level figures for one pruned tensor.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerReport {
    /// Tensor name.
    pub tensor: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Dtype (safetensors spelling).
    pub dtype: String,
    /// Number of elements.
    pub numel: u64,
    /// Elements this operation pruned (mask bit 0), already-zero ones included.
    pub pruned: u64,
    /// Non-zero elements after pruning.
    pub nonzero: u64,
    /// Fraction of zero elements after pruning.
    pub sparsity: f64,
    /// Magnitude pruning: the largest pruned |w| (every smaller one is pruned, equal ones by
    /// the tie rule); `null` for other methods or when nothing was pruned.
    pub threshold: Option<f64>,
    /// Bytes of the dense tensor.
    pub dense_bytes: u64,
    /// Bytes of its `bitmask-v1` encoding: mask plus kept values.
    pub packed_bytes: u64,
}

/// Totals over several [`LayerReport`]s.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PruneSummary {
    /// Elements of the pruned tensors.
    pub numel: u64,
    /// Non-zero elements left in them.
    pub nonzero: u64,
    /// Fraction of zeros in them.
    pub sparsity: f64,
    /// Their dense bytes.
    pub dense_bytes: u64,
    /// Their packed bytes.
    pub packed_bytes: u64,
}

/// Adds up reports.
pub fn summarize(reports: &[LayerReport]) -> PruneSummary {
    let numel = reports.iter().map(|r| r.numel).sum();
    let nonzero = reports.iter().map(|r| r.nonzero).sum();
    PruneSummary {
        numel,
        nonzero,
        sparsity: zero_fraction(numel, nonzero),
        dense_bytes: reports.iter().map(|r| r.dense_bytes).sum(),
        packed_bytes: reports.iter().map(|r| r.packed_bytes).sum(),
    }
}

fn zero_fraction(numel: u64, nonzero: u64) -> f64 {
    if numel == 0 {
        0.0
    } else {
        1.0 - nonzero as f64 / numel as f64
    }
}

/// A tensor's keep-mask in the `bitmask-v1` layout (bit `i % 8` of byte `i / 8`, 1 = kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mask {
    /// Tensor name.
    pub name: String,
    /// Number of elements.
    pub numel: usize,
    /// The packed bits, `ceil(numel / 8)` bytes.
    pub bits: Vec<u8>,
}

impl Mask {
    /// Whether element `i` is kept (`false` beyond the tensor).
    pub fn is_kept(&self, i: usize) -> bool {
        i < self.numel && self.bits.get(i / 8).is_some_and(|b| b >> (i % 8) & 1 == 1)
    }

    /// Number of kept elements.
    pub fn kept(&self) -> usize {
        self.bits.iter().map(|b| b.count_ones() as usize).sum()
    }

    /// Zeroes the pruned elements of `values` (keeps pruned weights at zero between
    /// training steps). `values` must have `numel` elements.
    pub fn apply(&self, values: &mut [f32]) -> Result<()> {
        if values.len() != self.numel {
            return Err(Error::Internal(format!(
                "mask of {} has {} elements, the tensor {}",
                self.name,
                self.numel,
                values.len()
            )));
        }
        apply_bits_f32(values, &self.bits);
        Ok(())
    }
}

/// `round_half_even(s · n)`, clamped to `n`: how many of `n` elements sparsity `s` prunes.
pub fn prune_count(sparsity: f64, n: u64) -> u64 {
    let k = (sparsity * n as f64).round_ties_even();
    if k <= 0.0 {
        0
    } else {
        (k as u64).min(n)
    }
}

// ---------------------------------------------------------------------------------------
// Bits and keys.

/// |w| as an order-preserving `u32` (sign cleared; NaN above +∞).
#[inline(always)]
fn key(v: f32) -> u32 {
    v.to_bits() & 0x7fff_ffff
}

#[inline]
fn bit(bits: &[u8], i: usize) -> bool {
    bits[i / 8] >> (i % 8) & 1 == 1
}

fn mask_len(n: usize) -> usize {
    n.div_ceil(8)
}

/// Zeroes elements whose bit is 0; returns the non-zero count after.
fn apply_bits_f32(values: &mut [f32], bits: &[u8]) -> u64 {
    let mut nz = 0u64;
    for (chunk, &b) in values.chunks_mut(8).zip(bits) {
        for (j, v) in chunk.iter_mut().enumerate() {
            let keep = b >> j & 1 == 1;
            *v = if keep { *v } else { 0.0 };
            nz += u64::from(key(*v) != 0);
        }
    }
    nz
}

fn count_ones(bits: &[u8]) -> u64 {
    bits.iter().map(|b| u64::from(b.count_ones())).sum()
}

// ---------------------------------------------------------------------------------------
// Sources of magnitudes: f32 slices in memory or raw bytes of a mapped file.

#[derive(Clone, Copy)]
enum Src<'a> {
    F32(&'a [f32]),
    Raw {
        name: &'a str,
        dtype: Dtype,
        bytes: &'a [u8],
    },
}

impl Src<'_> {
    fn len(&self) -> usize {
        match self {
            Src::F32(v) => v.len(),
            Src::Raw { dtype, bytes, .. } => bytes.len() / dtype.size_in_bytes(),
        }
    }

    /// Calls `f(offset, values)` for `[start, end)` in pieces, decoding raw bytes into `buf`.
    fn visit(
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
fn decode_into(name: &str, dtype: Dtype, bytes: &[u8], out: &mut Vec<f32>) -> Result<()> {
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
struct Block {
    src: usize,
    start: usize,
    end: usize,
}

fn blocks(lens: &[usize]) -> Vec<Block> {
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
fn split_parts(blocks: &[Block], parts: usize) -> Vec<Range<usize>> {
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

fn threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_THREADS)
}

/// Runs `f` on each item, the first on this thread and the rest on scoped threads.
fn par_map<I: Send, T: Send>(items: Vec<I>, f: impl Fn(I) -> T + Sync) -> Vec<T> {
    if items.len() <= 1 {
        return items.into_iter().map(&f).collect();
    }
    let f = &f;
    std::thread::scope(|s| {
        let mut it = items.into_iter();
        let first = it.next();
        let handles: Vec<_> = it.map(|item| s.spawn(move || f(item))).collect();
        let mut out: Vec<T> = first.into_iter().map(f).collect();
        for h in handles {
            out.push(h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)));
        }
        out
    })
}

// ---------------------------------------------------------------------------------------
// Radix selection.

const HI: usize = 1 << 15;
const LO: usize = 1 << 16;

/// Histogram of the high 15 bits of the keys.
fn hist_hi(vals: &[f32], h: &mut [u32; LO]) {
    for &v in vals {
        h[(key(v) >> 16) as usize] += 1;
    }
}

/// Histogram of the low 16 bits of the keys whose high bits are `hi`. Few keys fall in
/// that bucket, so each run of 16 is first tested with a vectorised compare and only runs
/// holding a match take the scalar path (a branch-free scatter into the 256 KiB table for
/// every element was slower than the whole first pass).
fn hist_lo(vals: &[f32], hi: u32, h: &mut [u32; LO]) {
    let mut chunks = vals.chunks_exact(16);
    for chunk in &mut chunks {
        let any = chunk.iter().fold(false, |a, &v| a | (key(v) >> 16 == hi));
        if any {
            hist_lo_scalar(chunk, hi, h);
        }
    }
    hist_lo_scalar(chunks.remainder(), hi, h);
}

fn hist_lo_scalar(vals: &[f32], hi: u32, h: &mut [u32; LO]) {
    for &v in vals {
        let k = key(v);
        if k >> 16 == hi {
            h[(k & 0xffff) as usize] += 1;
        }
    }
}

/// One part's histogram (pass 1 when `hi` is `None`, pass 2 inside bucket `hi` otherwise),
/// counted in `u32` and flushed to `u64` before it could overflow.
fn part_hist(srcs: &[Src], blocks: &[Block], hi: Option<u32>) -> Result<Vec<u64>> {
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
fn find_bucket(h: &[u64], rank: u64) -> Result<(usize, u64)> {
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
struct Threshold {
    t: u32,
    cuts: Vec<usize>,
}

/// Radix selection of the `k`-th smallest |w| over `srcs` (in order); `None` when `k = 0`.
fn select_threshold(srcs: &[Src], k: u64) -> Result<Option<Threshold>> {
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

fn merge(hs: Vec<Result<Vec<u64>>>) -> Result<Vec<u64>> {
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
fn nth_equal(srcs: &[Src], blocks: &[Block], t: u32, nth: u64) -> Result<(usize, usize)> {
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

// ---------------------------------------------------------------------------------------
// Plans: what each selected tensor's mask is.

/// How one tensor's keep-mask is decided.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    /// Nothing pruned.
    Keep,
    /// Magnitude: keep iff `key >= t + (i < cut)`.
    Threshold { t: u32, cut: usize },
    /// `k` random elements.
    Random { k: usize },
    /// N:M groups along dim 1.
    NM { n: usize, m: usize },
    /// Keep the non-zero elements (packing an already-pruned tensor).
    NonZero,
}

impl Rule {
    fn threshold(&self) -> Option<f64> {
        match *self {
            Rule::Threshold { t, .. } => Some(f64::from(f32::from_bits(t))),
            _ => None,
        }
    }
}

/// The magnitude rules of `srcs` (named `names`, in tensor order) under `targets`.
fn magnitude_rules(names: &[&str], srcs: &[Src], targets: &PruneTargets) -> Result<Vec<Rule>> {
    let mut rules = vec![Rule::Keep; srcs.len()];
    let mut global = Vec::new();
    for (j, (name, src)) in names.iter().zip(srcs).enumerate() {
        let own = match targets.override_for(name) {
            Some(s) => Some(s),
            None if targets.scope == Scope::Layer => Some(targets.sparsity),
            None => None,
        };
        match own {
            Some(s) => {
                let k = prune_count(s, src.len() as u64);
                if let Some(th) = select_threshold(std::slice::from_ref(src), k)? {
                    rules[j] = Rule::Threshold {
                        t: th.t,
                        cut: th.cuts[0],
                    };
                }
            }
            None => global.push(j),
        }
    }
    if !global.is_empty() {
        let gsrcs: Vec<Src> = global.iter().map(|&j| srcs[j]).collect();
        let n: u64 = gsrcs.iter().map(|s| s.len() as u64).sum();
        if let Some(th) = select_threshold(&gsrcs, prune_count(targets.sparsity, n))? {
            for (g, &j) in global.iter().enumerate() {
                rules[j] = Rule::Threshold {
                    t: th.t,
                    cut: th.cuts[g],
                };
            }
        }
    }
    Ok(rules)
}

/// The sparsity that applies to `name` on its own (override or the scope-wide value).
fn own_sparsity(targets: &PruneTargets, name: &str) -> f64 {
    targets.override_for(name).unwrap_or(targets.sparsity)
}

/// Checks the N:M shape rules for one tensor.
fn check_nm(name: &str, shape: &[usize], m: usize) -> Result<()> {
    if shape.len() < 2 {
        return Err(Error::InvalidParameter {
            pointer: "/method".into(),
            detail: format!(
                "n_m pruning groups weights along the input dimension (dim 1), but tensor {name} has shape {shape:?}; exclude it"
            ),
        });
    }
    if shape[1] % m != 0 {
        return Err(Error::InvalidParameter {
            pointer: "/m".into(),
            detail: format!(
                "tensor {name} of shape {shape:?}: its input dimension (dim 1) has {} elements, not a multiple of m = {m}",
                shape[1]
            ),
        });
    }
    Ok(())
}

fn nm_kept(numel: usize, n: usize, m: usize) -> usize {
    numel / m * n
}

/// Keep-bits of a magnitude rule.
fn threshold_bits(vals: &[f32], t: u32, cut: usize) -> Vec<u8> {
    let mut bits = vec![0u8; mask_len(vals.len())];
    for (c, (chunk, b)) in vals.chunks(8).zip(bits.iter_mut()).enumerate() {
        let mut byte = 0u8;
        for (j, &v) in chunk.iter().enumerate() {
            let lim = if c * 8 + j < cut { t + 1 } else { t };
            byte |= u8::from(key(v) >= lim) << j;
        }
        *b = byte;
    }
    bits
}

/// A mask with every one of `n` bits set.
fn full_mask(n: usize) -> Vec<u8> {
    let mut bits = vec![0xffu8; mask_len(n)];
    if n % 8 != 0 {
        if let Some(last) = bits.last_mut() {
            *last = (1u8 << (n % 8)) - 1;
        }
    }
    bits
}

/// FNV-1a of a tensor name: the random stream of that tensor.
fn fnv1a(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Keep-bits pruning exactly `k` of `n` elements chosen by a partial Fisher–Yates shuffle.
fn random_bits(name: &str, n: usize, k: usize, seed: u64) -> Result<Vec<u8>> {
    let n32 = u32::try_from(n).map_err(|_| {
        Error::Unsupported(format!(
            "random pruning of tensor {name} with {n} elements (at most {} are supported)",
            u32::MAX
        ))
    })?;
    let k = k.min(n);
    let swaps = k.min(n - k);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(fnv1a(name));
    let mut idx: Vec<u32> = (0..n32).collect();
    for i in 0..swaps {
        let j = rng.gen_range(i as u32..n32) as usize;
        idx.swap(i, j);
    }
    let chosen = &idx[..swaps];
    let mut bits;
    if swaps == k {
        bits = full_mask(n);
        for &i in chosen {
            bits[i as usize / 8] &= !(1 << (i % 8));
        }
    } else {
        bits = vec![0u8; mask_len(n)];
        for &i in chosen {
            bits[i as usize / 8] |= 1 << (i % 8);
        }
    }
    Ok(bits)
}

/// Keep-bits of N:M pruning along dim 1 (shape checked by [`check_nm`]).
fn nm_bits(vals: &[f32], shape: &[usize], n: usize, m: usize) -> Vec<u8> {
    let mut bits = vec![0u8; mask_len(vals.len())];
    let (out, cin) = (shape[0], shape[1]);
    let s: usize = shape[2..].iter().product();
    let mut keys = vec![0u32; m];
    for o in 0..out {
        for g in 0..cin / m {
            for sp in 0..s {
                let at = |j: usize| (o * cin + g * m + j) * s + sp;
                for (j, kk) in keys.iter_mut().enumerate() {
                    *kk = key(vals[at(j)]);
                }
                for j in 0..m {
                    // Rank by |w| descending, then by input index ascending.
                    let ahead = (0..m)
                        .filter(|&q| keys[q] > keys[j] || (keys[q] == keys[j] && q < j))
                        .count();
                    if ahead < n {
                        let i = at(j);
                        bits[i / 8] |= 1 << (i % 8);
                    }
                }
            }
        }
    }
    bits
}

// ---------------------------------------------------------------------------------------
// In memory.

/// Prunes the tensors of `weights` named in `selected` in place and reports on each (in
/// `weights` order). Tensor order for global ties is the order of `weights`.
pub fn prune_tensors(
    weights: &mut [NamedTensor],
    selected: &[String],
    method: &Method,
    targets: &PruneTargets,
    seed: u64,
) -> Result<Vec<LayerReport>> {
    prune_in_memory(weights, selected, method, targets, seed, false).map(|(r, _)| r)
}

/// [`prune_tensors`], also returning each pruned tensor's keep-mask (in report order), so
/// gradual pruning can hold pruned weights at zero during training ([`Mask::apply`]).
pub fn prune_tensors_with_masks(
    weights: &mut [NamedTensor],
    selected: &[String],
    method: &Method,
    targets: &PruneTargets,
    seed: u64,
) -> Result<(Vec<LayerReport>, Vec<Mask>)> {
    prune_in_memory(weights, selected, method, targets, seed, true)
}

/// The keep-masks of already-pruned tensors: 1 where the value is non-zero.
pub fn nonzero_masks(weights: &[NamedTensor], selected: &[String]) -> Vec<Mask> {
    let wanted: HashSet<&str> = selected.iter().map(String::as_str).collect();
    weights
        .iter()
        .filter(|w| wanted.contains(w.name.as_str()))
        .map(|w| {
            let mut bits = vec![0u8; mask_len(w.values.len())];
            for (i, &v) in w.values.iter().enumerate() {
                bits[i / 8] |= u8::from(key(v) != 0) << (i % 8);
            }
            Mask {
                name: w.name.clone(),
                numel: w.values.len(),
                bits,
            }
        })
        .collect()
}

fn prune_in_memory(
    weights: &mut [NamedTensor],
    selected: &[String],
    method: &Method,
    targets: &PruneTargets,
    seed: u64,
    want_masks: bool,
) -> Result<(Vec<LayerReport>, Vec<Mask>)> {
    method.validate()?;
    if !matches!(method, Method::NM { .. }) {
        targets.validate()?;
    }
    let wanted: HashSet<&str> = selected.iter().map(String::as_str).collect();
    let present: HashSet<&str> = weights.iter().map(|w| w.name.as_str()).collect();
    if let Some(name) = selected.iter().find(|n| !present.contains(n.as_str())) {
        return Err(Error::Internal(format!(
            "selected tensor {name} is not among the weights"
        )));
    }
    let chosen: Vec<usize> = (0..weights.len())
        .filter(|&i| wanted.contains(weights[i].name.as_str()))
        .collect();
    for &i in &chosen {
        let w = &weights[i];
        if w.values.len() != w.shape.iter().product::<usize>() {
            return Err(Error::Internal(format!(
                "tensor {} has shape {:?} but {} values",
                w.name,
                w.shape,
                w.values.len()
            )));
        }
        if let Method::NM { m, .. } = method {
            check_nm(&w.name, &w.shape, *m)?;
        }
    }
    let rules: Vec<Rule> = match method {
        Method::Magnitude => {
            let names: Vec<&str> = chosen.iter().map(|&i| weights[i].name.as_str()).collect();
            let srcs: Vec<Src> = chosen
                .iter()
                .map(|&i| Src::F32(&weights[i].values))
                .collect();
            magnitude_rules(&names, &srcs, targets)?
        }
        Method::Random => chosen
            .iter()
            .map(|&i| {
                let w = &weights[i];
                let k = prune_count(own_sparsity(targets, &w.name), w.values.len() as u64);
                Rule::Random { k: k as usize }
            })
            .collect(),
        Method::NM { n, m } => vec![Rule::NM { n: *n, m: *m }; chosen.len()],
    };

    let mut masks = Vec::new();
    let mut pruned = vec![0u64; chosen.len()];
    let mut nonzero = vec![0u64; chosen.len()];
    if *method == Method::Magnitude {
        for (c, &i) in chosen.iter().enumerate() {
            let w = &weights[i];
            if want_masks {
                let bits = match rules[c] {
                    Rule::Threshold { t, cut } => threshold_bits(&w.values, t, cut),
                    _ => full_mask(w.values.len()),
                };
                masks.push(Mask {
                    name: w.name.clone(),
                    numel: w.values.len(),
                    bits,
                });
            }
        }
        let counts = apply_thresholds(weights, &chosen, &rules);
        for (c, &i) in chosen.iter().enumerate() {
            pruned[c] = weights[i].values.len() as u64 - counts[c][0];
            nonzero[c] = counts[c][1];
        }
    } else {
        for (c, &i) in chosen.iter().enumerate() {
            let w = &mut weights[i];
            let bits = match rules[c] {
                Rule::Random { k } => random_bits(&w.name, w.values.len(), k, seed)?,
                Rule::NM { n, m } => nm_bits(&w.values, &w.shape, n, m),
                _ => full_mask(w.values.len()),
            };
            pruned[c] = w.values.len() as u64 - count_ones(&bits);
            nonzero[c] = apply_bits_f32(&mut w.values, &bits);
            if want_masks {
                masks.push(Mask {
                    name: w.name.clone(),
                    numel: w.values.len(),
                    bits,
                });
            }
        }
    }
    let reports = chosen
        .iter()
        .enumerate()
        .map(|(c, &i)| {
            let w = &weights[i];
            report(
                &w.name,
                &w.shape,
                Dtype::F32,
                pruned[c],
                nonzero[c],
                rules[c].threshold(),
            )
        })
        .collect();
    Ok((reports, masks))
}

fn report(
    name: &str,
    shape: &[usize],
    dtype: Dtype,
    pruned: u64,
    nonzero: u64,
    threshold: Option<f64>,
) -> LayerReport {
    let numel: u64 = shape.iter().map(|&d| d as u64).product();
    let es = dtype.size_in_bytes() as u64;
    LayerReport {
        tensor: name.to_owned(),
        shape: shape.to_vec(),
        dtype: dtype.as_str().to_owned(),
        numel,
        pruned,
        nonzero,
        sparsity: zero_fraction(numel, nonzero),
        threshold: if pruned > 0 { threshold } else { None },
        dense_bytes: numel * es,
        packed_bytes: numel.div_ceil(8) + (numel - pruned) * es,
    }
}

/// Zeroes `values[..]` where `key < lim` (`lim` = t, or t + 1 before the tie cut); returns
/// the non-zero count after. Written to vectorise (compare, blend, count).
fn zero_below(values: &mut [f32], lim: u32) -> [u64; 2] {
    let (mut kept, mut nz) = (0u64, 0u64);
    for v in values.iter_mut() {
        let k = key(*v);
        let keep = k >= lim;
        *v = if keep { *v } else { 0.0 };
        kept += u64::from(keep);
        nz += u64::from(keep & (k != 0));
    }
    [kept, nz]
}

/// Applies magnitude rules in place over all chosen tensors, split over two threads by
/// blocks; returns `[kept, non-zero]` per chosen tensor.
fn apply_thresholds(
    weights: &mut [NamedTensor],
    chosen: &[usize],
    rules: &[Rule],
) -> Vec<[u64; 2]> {
    struct Job<'a> {
        c: usize,
        offset: usize,
        vals: &'a mut [f32],
    }
    let mut jobs: Vec<Job> = Vec::new();
    let mut by_index: HashMap<usize, usize> = HashMap::new();
    for (c, &i) in chosen.iter().enumerate() {
        by_index.insert(i, c);
    }
    for (i, w) in weights.iter_mut().enumerate() {
        if let Some(&c) = by_index.get(&i) {
            for (b, vals) in w.values.chunks_mut(BLOCK).enumerate() {
                jobs.push(Job {
                    c,
                    offset: b * BLOCK,
                    vals,
                });
            }
        }
    }
    let total: usize = jobs.iter().map(|j| j.vals.len()).sum();
    let parts = if total < PARALLEL_MIN { 1 } else { threads() };
    let mut groups: Vec<Vec<Job>> = Vec::with_capacity(parts);
    let mut acc = 0usize;
    let mut current = Vec::new();
    for job in jobs {
        acc += job.vals.len();
        current.push(job);
        if groups.len() + 1 < parts && acc * parts >= total * (groups.len() + 1) {
            groups.push(std::mem::take(&mut current));
        }
    }
    groups.push(current);
    let counts = par_map(groups, |group| {
        let mut acc = vec![[0u64; 2]; chosen.len()];
        for job in group {
            let [kept, nz] = match rules[job.c] {
                Rule::Threshold { t, cut } => {
                    let split = cut.saturating_sub(job.offset).min(job.vals.len());
                    let (before, after) = job.vals.split_at_mut(split);
                    let [k1, n1] = zero_below(before, t + 1);
                    let [k2, n2] = zero_below(after, t);
                    [k1 + k2, n1 + n2]
                }
                // Nothing pruned (lim 0 keeps all): count only.
                _ => zero_below(job.vals, 0),
            };
            acc[job.c][0] += kept;
            acc[job.c][1] += nz;
        }
        acc
    });
    let mut total = vec![[0u64; 2]; chosen.len()];
    for part in counts {
        for (a, b) in total.iter_mut().zip(part) {
            a[0] += b[0];
            a[1] += b[1];
        }
    }
    total
}

// ---------------------------------------------------------------------------------------
// Streamed file → file.

/// Prunes the tensors named in `selected` of `input` and streams the result to `out` as
/// `output` (dense zeros in place, or `bitmask-v1`), with `metadata` (plus
/// `whittle.sparse` when sparse). Peak memory is bounded by the largest tensor: the global
/// threshold is found by two histogram passes over the mapped file, then each tensor is
/// decoded, masked and written on its own. Every output tensor keeps its dtype; kept
/// values are bit-exact. Returns one report per selected tensor, in file order.
#[allow(clippy::too_many_arguments)]
pub fn prune_file(
    input: &SafetensorsFile,
    selected: &[String],
    method: &Method,
    targets: &PruneTargets,
    seed: u64,
    output: Output,
    metadata: &BTreeMap<String, String>,
    out: &mut dyn Write,
    ctx: &Ctx,
) -> Result<Vec<LayerReport>> {
    method.validate()?;
    if !matches!(method, Method::NM { .. }) {
        targets.validate()?;
    }
    let infos = selected_infos(input, selected)?;
    if let Method::NM { m, .. } = method {
        for info in &infos {
            check_nm(&info.name, &info.shape, *m)?;
        }
    }
    ctx.report(0.0, "planning");
    let rules: Vec<Rule> = match method {
        Method::Magnitude => {
            let names: Vec<&str> = infos.iter().map(|i| i.name.as_str()).collect();
            let srcs: Vec<Src> = infos.iter().map(|i| raw_src(input, i)).collect();
            magnitude_rules(&names, &srcs, targets)?
        }
        Method::Random => infos
            .iter()
            .map(|i| Rule::Random {
                k: prune_count(own_sparsity(targets, &i.name), i.numel() as u64) as usize,
            })
            .collect(),
        Method::NM { n, m } => vec![Rule::NM { n: *n, m: *m }; infos.len()],
    };
    ctx.check()?;
    let plans: Vec<(&TensorInfo, Rule)> = infos.into_iter().zip(rules).collect();
    write_plans(input, &plans, seed, output, metadata, out, ctx)
}

/// Packs the (already pruned) tensors named in `names` of `input` into the `bitmask-v1`
/// encoding, keeping their non-zero elements (zeros of either sign are dropped), and copies
/// the rest. Used after gradual pruning. Returns one report per packed tensor (`pruned` =
/// its zeros).
pub fn encode_sparse(
    input: &SafetensorsFile,
    names: &[String],
    metadata: &BTreeMap<String, String>,
    out: &mut dyn Write,
    ctx: &Ctx,
) -> Result<Vec<LayerReport>> {
    let infos = selected_infos(input, names)?;
    let plans: Vec<(&TensorInfo, Rule)> = infos.into_iter().map(|i| (i, Rule::NonZero)).collect();
    write_plans(input, &plans, 0, Output::Sparse, metadata, out, ctx)
}

/// The infos of `selected` in file order; unknown names are a caller bug, non-float
/// tensors are refused.
fn selected_infos<'a>(
    input: &'a SafetensorsFile,
    selected: &[String],
) -> Result<Vec<&'a TensorInfo>> {
    let wanted: HashSet<&str> = selected.iter().map(String::as_str).collect();
    let present: HashSet<&str> = input
        .header()
        .tensors
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    if let Some(name) = selected.iter().find(|n| !present.contains(n.as_str())) {
        return Err(Error::Internal(format!(
            "selected tensor {name} is not in the file"
        )));
    }
    let infos: Vec<&TensorInfo> = input
        .header()
        .tensors
        .iter()
        .filter(|t| wanted.contains(t.name.as_str()))
        .collect();
    for info in &infos {
        if !info.dtype.is_float() {
            return Err(Error::UnsupportedDtype {
                tensor: info.name.clone(),
                dtype: info.dtype.as_str().to_owned(),
                expected: "a floating-point dtype (pruning zeroes weights)".to_owned(),
            });
        }
    }
    Ok(infos)
}

fn raw_src<'a>(input: &'a SafetensorsFile, info: &'a TensorInfo) -> Src<'a> {
    Src::Raw {
        name: &info.name,
        dtype: info.dtype,
        bytes: input.bytes(info),
    }
}

/// Whether an element's bytes encode ±0 (every bit but the sign, the top bit of the last
/// little-endian byte, is 0).
fn is_zero_elem(b: &[u8]) -> bool {
    match b.split_last() {
        Some((last, rest)) => last & 0x7f == 0 && rest.iter().all(|&x| x == 0),
        None => true,
    }
}

/// The keep-bits of one tensor under its rule.
fn tensor_bits(
    input: &SafetensorsFile,
    info: &TensorInfo,
    rule: &Rule,
    seed: u64,
) -> Result<Vec<u8>> {
    let n = info.numel();
    Ok(match *rule {
        Rule::Keep => full_mask(n),
        Rule::Threshold { t, cut } => threshold_bits(&input.to_f32(info)?, t, cut),
        Rule::Random { k } => random_bits(&info.name, n, k, seed)?,
        Rule::NM { n: keep, m } => nm_bits(&input.to_f32(info)?, &info.shape, keep, m),
        Rule::NonZero => {
            let es = info.dtype.size_in_bytes();
            let mut bits = vec![0u8; mask_len(n)];
            for (i, e) in input.bytes(info).chunks_exact(es).enumerate() {
                bits[i / 8] |= u8::from(!is_zero_elem(e)) << (i % 8);
            }
            bits
        }
    })
}

/// Kept elements of a tensor under its rule, known before its data is read when possible
/// (the sparse header needs every count up front).
fn kept_count(input: &SafetensorsFile, info: &TensorInfo, rule: &Rule) -> Result<u64> {
    let n = info.numel();
    Ok(match *rule {
        Rule::Keep => n as u64,
        Rule::Random { k } => (n - k.min(n)) as u64,
        Rule::NM { n: keep, m } => nm_kept(n, keep, m) as u64,
        Rule::Threshold { t, cut } => {
            let mut kept = 0u64;
            let mut buf = Vec::new();
            raw_src(input, info).visit(0, n, &mut buf, |offset, vals| {
                for (i, &v) in vals.iter().enumerate() {
                    let lim = if offset + i < cut { t + 1 } else { t };
                    kept += u64::from(key(v) >= lim);
                }
            })?;
            kept
        }
        Rule::NonZero => {
            let es = info.dtype.size_in_bytes();
            input
                .bytes(info)
                .chunks_exact(es)
                .filter(|e| !is_zero_elem(e))
                .count() as u64
        }
    })
}

/// What one output tensor is.
enum Piece {
    Copy(usize),
    Dense(usize),
    Mask(usize),
    Values,
}

fn write_plans(
    input: &SafetensorsFile,
    plans: &[(&TensorInfo, Rule)],
    seed: u64,
    output: Output,
    metadata: &BTreeMap<String, String>,
    out: &mut dyn Write,
    ctx: &Ctx,
) -> Result<Vec<LayerReport>> {
    let tensors = &input.header().tensors;
    let plan_of: HashMap<&str, usize> = plans
        .iter()
        .enumerate()
        .map(|(p, (info, _))| (info.name.as_str(), p))
        .collect();
    let mut specs = Vec::new();
    let mut pieces = Vec::new();
    let mut meta = metadata.clone();
    let mut sparse_doc = serde_json::Map::new();
    for (ti, t) in tensors.iter().enumerate() {
        let Some(&p) = plan_of.get(t.name.as_str()) else {
            specs.push(TensorSpec::new(t.name.clone(), t.dtype, t.shape.clone()));
            pieces.push(Piece::Copy(ti));
            continue;
        };
        match output {
            Output::Dense => {
                specs.push(TensorSpec::new(t.name.clone(), t.dtype, t.shape.clone()));
                pieces.push(Piece::Dense(p));
            }
            Output::Sparse => {
                ctx.check()?;
                let kept = kept_count(input, t, &plans[p].1)?;
                let kept = usize::try_from(kept)
                    .map_err(|_| Error::Internal("kept count overflows".into()))?;
                specs.push(TensorSpec::new(
                    format!("{}{MASK_SUFFIX}", t.name),
                    Dtype::U8,
                    vec![mask_len(t.numel())],
                ));
                pieces.push(Piece::Mask(p));
                specs.push(TensorSpec::new(
                    format!("{}{VALUES_SUFFIX}", t.name),
                    t.dtype,
                    vec![kept],
                ));
                pieces.push(Piece::Values);
                sparse_doc.insert(
                    t.name.clone(),
                    serde_json::json!({"dtype": t.dtype.as_str(), "shape": t.shape}),
                );
            }
        }
    }
    if output == Output::Sparse {
        let doc =
            serde_json::json!({"format": SPARSE_FORMAT, "tensors": Value::Object(sparse_doc)});
        meta.insert(SPARSE_METADATA_KEY.to_owned(), doc.to_string());
    }
    let mut reports: Vec<Option<LayerReport>> = vec![None; plans.len()];
    let mut pending_values: Option<Vec<u8>> = None;
    let total = pieces.len().max(1) as f64;
    write_safetensors(out, &meta, &specs, |i, w| {
        ctx.check()?;
        match pieces[i] {
            Piece::Copy(ti) => w.write_all(input.bytes(&tensors[ti]))?,
            Piece::Dense(p) | Piece::Mask(p) => {
                let (info, rule) = &plans[p];
                let bits = tensor_bits(input, info, rule, seed)?;
                let es = info.dtype.size_in_bytes();
                let bytes = input.bytes(info);
                let mut nonzero = 0u64;
                let kept = count_ones(&bits);
                if matches!(pieces[i], Piece::Dense(_)) {
                    let mut dense = bytes.to_vec();
                    for (e, o) in dense.chunks_exact_mut(es).enumerate() {
                        if bit(&bits, e) {
                            nonzero += u64::from(!is_zero_elem(o));
                        } else {
                            o.fill(0);
                        }
                    }
                    w.write_all(&dense)?;
                } else {
                    let mut values = Vec::with_capacity(kept as usize * es);
                    for (e, v) in bytes.chunks_exact(es).enumerate() {
                        if bit(&bits, e) {
                            values.extend_from_slice(v);
                            nonzero += u64::from(!is_zero_elem(v));
                        }
                    }
                    w.write_all(&bits)?;
                    pending_values = Some(values);
                }
                let n = info.numel() as u64;
                reports[p] = Some(report(
                    &info.name,
                    &info.shape,
                    info.dtype,
                    n - kept,
                    nonzero,
                    rule.threshold(),
                ));
            }
            Piece::Values => {
                let values = pending_values
                    .take()
                    .ok_or_else(|| Error::Internal("values written before their mask".into()))?;
                w.write_all(&values)?;
            }
        }
        ctx.report(
            (i + 1) as f64 / total,
            &format!("tensor {}/{}", i + 1, pieces.len()),
        );
        Ok(())
    })?;
    reports
        .into_iter()
        .map(|r| r.ok_or_else(|| Error::Internal("a selected tensor was not written".into())))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Reading the sparse format.

/// Reads a file, restoring every `bitmask-v1` packed tensor to a dense f32 tensor (pruned
/// elements +0) at its mask's position; the other tensors are converted to f32 (integers
/// through i64). A file without `whittle.sparse` metadata is read as dense.
pub fn decode_sparse(file: &SafetensorsFile) -> Result<Vec<NamedTensor>> {
    let bad = |m: String| Error::InvalidSafetensors(m);
    let packed: BTreeMap<String, (Dtype, Vec<usize>)> =
        match file.header().metadata.get(SPARSE_METADATA_KEY) {
            None => BTreeMap::new(),
            Some(text) => parse_sparse_metadata(text).map_err(bad)?,
        };
    let mut out = Vec::new();
    for info in &file.header().tensors {
        if let Some(base) = info.name.strip_suffix(MASK_SUFFIX) {
            if let Some((dtype, shape)) = packed.get(base) {
                out.push(unpack(file, info, base, *dtype, shape)?);
                continue;
            }
        }
        if let Some(base) = info.name.strip_suffix(VALUES_SUFFIX) {
            if packed.contains_key(base) {
                continue;
            }
        }
        let values = if info.dtype.is_float() {
            file.to_f32(info)?
        } else {
            file.to_i64(info)?.into_iter().map(|v| v as f32).collect()
        };
        out.push(NamedTensor {
            name: info.name.clone(),
            shape: info.shape.clone(),
            values,
        });
    }
    for base in packed.keys() {
        if file.get(&format!("{base}{MASK_SUFFIX}")).is_none() {
            return Err(bad(format!(
                "{SPARSE_METADATA_KEY} lists {base} but the file has no {base}{MASK_SUFFIX}"
            )));
        }
    }
    Ok(out)
}

fn parse_sparse_metadata(
    text: &str,
) -> std::result::Result<BTreeMap<String, (Dtype, Vec<usize>)>, String> {
    let doc: Value = serde_json::from_str(text)
        .map_err(|e| format!("{SPARSE_METADATA_KEY} is not JSON: {e}"))?;
    if doc.get("format").and_then(Value::as_str) != Some(SPARSE_FORMAT) {
        return Err(format!(
            "{SPARSE_METADATA_KEY} format must be {SPARSE_FORMAT:?}, got {}",
            doc.get("format").unwrap_or(&Value::Null)
        ));
    }
    let Some(Value::Object(tensors)) = doc.get("tensors") else {
        return Err(format!("{SPARSE_METADATA_KEY} has no `tensors` object"));
    };
    let mut out = BTreeMap::new();
    for (name, entry) in tensors {
        let dtype: Dtype = entry
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{SPARSE_METADATA_KEY}: {name} has no dtype"))?
            .parse()
            .map_err(|e| format!("{SPARSE_METADATA_KEY}: {name}: {e}"))?;
        let shape = entry
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| {
                a.iter()
                    .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                    .collect::<Option<Vec<usize>>>()
            })
            .ok_or_else(|| format!("{SPARSE_METADATA_KEY}: {name} has no valid shape"))?;
        out.insert(name.clone(), (dtype, shape));
    }
    Ok(out)
}

fn unpack(
    file: &SafetensorsFile,
    mask: &TensorInfo,
    base: &str,
    dtype: Dtype,
    shape: &[usize],
) -> Result<NamedTensor> {
    let bad = |m: String| Error::InvalidSafetensors(format!("packed tensor {base}: {m}"));
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    let bits = file.bytes(mask);
    if mask.dtype != Dtype::U8 || bits.len() != mask_len(n) {
        return Err(bad(format!(
            "the mask must be U8 with {} bytes for shape {shape:?}, found {} {:?}",
            mask_len(n),
            mask.dtype,
            mask.shape
        )));
    }
    if n % 8 != 0 && bits.last().is_some_and(|&b| b >> (n % 8) != 0) {
        return Err(bad("the mask's padding bits are not zero".into()));
    }
    let vname = format!("{base}{VALUES_SUFFIX}");
    let vinfo = file
        .get(&vname)
        .ok_or_else(|| bad(format!("{vname} is missing")))?;
    let kept = count_ones(bits);
    if vinfo.dtype != dtype || vinfo.numel() as u64 != kept {
        return Err(bad(format!(
            "the mask keeps {kept} elements but {vname} is {} {:?} (expected {dtype})",
            vinfo.dtype, vinfo.shape
        )));
    }
    let kept_values = file.to_f32(vinfo)?;
    let mut values = vec![0f32; n];
    let mut next = kept_values.iter();
    for (i, v) in values.iter_mut().enumerate() {
        if bit(bits, i) {
            *v = *next.next().ok_or_else(|| bad("too few values".into()))?;
        }
    }
    Ok(NamedTensor {
        name: base.to_owned(),
        shape: shape.to_vec(),
        values,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use rand_distr_free::normal;

    use super::*;
    use crate::compress::formats::safetensors::{encode_f32, serialize};

    /// Seeded standard-normal samples (Box–Muller; no extra crate).
    mod rand_distr_free {
        use rand::{Rng, SeedableRng};
        use rand_chacha::ChaCha8Rng;

        pub fn normal(n: usize, seed: u64) -> Vec<f32> {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..n)
                .map(|_| {
                    let u: f64 = rng.gen_range(f64::EPSILON..1.0);
                    let v: f64 = rng.gen();
                    ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
                })
                .collect()
        }
    }

    fn t(name: &str, shape: &[usize], values: Vec<f32>) -> NamedTensor {
        NamedTensor {
            name: name.into(),
            shape: shape.to_vec(),
            values,
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn targets(s: f64, scope: Scope) -> PruneTargets {
        PruneTargets {
            sparsity: s,
            scope,
            overrides: vec![],
        }
    }

    fn zeros(v: &[f32]) -> usize {
        v.iter().filter(|&&x| x == 0.0).count()
    }

    /// Reference order: every element by a full sort of (|w|, tensor, index).
    fn sorted(tensors: &[&[f32]]) -> Vec<(u32, usize, usize)> {
        let mut all: Vec<(u32, usize, usize)> = tensors
            .iter()
            .enumerate()
            .flat_map(|(j, v)| v.iter().enumerate().map(move |(i, &x)| (key(x), j, i)))
            .collect();
        all.sort_unstable();
        all
    }

    /// Reference: the pruned set = the first `k` of [`sorted`].
    fn reference_from(all: &[(u32, usize, usize)], tensors: &[&[f32]], k: usize) -> Vec<Vec<bool>> {
        let mut pruned: Vec<Vec<bool>> = tensors.iter().map(|v| vec![false; v.len()]).collect();
        for &(_, j, i) in &all[..k] {
            pruned[j][i] = true;
        }
        pruned
    }

    fn reference(tensors: &[&[f32]], k: usize) -> Vec<Vec<bool>> {
        reference_from(&sorted(tensors), tensors, k)
    }

    fn ctx_run<T>(f: impl FnOnce(&Ctx) -> T) -> T {
        let cancel = AtomicBool::new(false);
        let progress = |_: f64, _: &str| {};
        let ctx = Ctx::new(&progress, &cancel);
        f(&ctx)
    }

    fn file_of(
        tensors: &[(TensorSpec, Vec<u8>)],
        meta: &BTreeMap<String, String>,
    ) -> (tempfile::NamedTempFile, SafetensorsFile) {
        let pairs: Vec<(TensorSpec, &[u8])> = tensors
            .iter()
            .map(|(s, b)| (s.clone(), b.as_slice()))
            .collect();
        let bytes = serialize(meta, &pairs).unwrap();
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), bytes).unwrap();
        let f = SafetensorsFile::open(tmp.path()).unwrap();
        (tmp, f)
    }

    fn reopen(bytes: Vec<u8>) -> (tempfile::NamedTempFile, SafetensorsFile) {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), bytes).unwrap();
        let f = SafetensorsFile::open(tmp.path()).unwrap();
        (tmp, f)
    }

    #[test]
    fn prune_count_rounds_half_to_even_like_python() {
        assert_eq!(prune_count(0.25, 10), 2); // 2.5 -> 2
        assert_eq!(prune_count(0.15, 10), 2); // 1.5 -> 2
        assert_eq!(prune_count(0.45, 10), 4); // 4.5 -> 4
        assert_eq!(prune_count(0.9, 1000), 900);
        assert_eq!(prune_count(0.0, 7), 0);
        assert_eq!(prune_count(0.9999, 100), 100);
    }

    #[test]
    fn layer_magnitude_prunes_exactly_k_smallest() {
        let v = normal(1003, 1);
        let orig = v.clone();
        let mut w = vec![t("a", &[17, 59], v)];
        let r = prune_tensors(
            &mut w,
            &names(&["a"]),
            &Method::Magnitude,
            &targets(0.37, Scope::Layer),
            0,
        )
        .unwrap();
        let k = prune_count(0.37, 1003) as usize;
        assert_eq!(k, 371);
        assert_eq!(zeros(&w[0].values), k);
        let expect = reference(&[&orig], k);
        for (i, &p) in expect[0].iter().enumerate() {
            assert_eq!(w[0].values[i] == 0.0, p, "index {i}");
            if !p {
                assert_eq!(w[0].values[i].to_bits(), orig[i].to_bits());
            }
        }
        assert_eq!(r[0].pruned, k as u64);
        assert_eq!(r[0].nonzero, 1003 - k as u64);
        assert!((r[0].sparsity - k as f64 / 1003.0).abs() < 1e-12);
        let largest_pruned = orig
            .iter()
            .zip(&expect[0])
            .filter(|(_, &p)| p)
            .map(|(x, _)| x.abs())
            .fold(0f32, f32::max);
        assert_eq!(r[0].threshold, Some(f64::from(largest_pruned)));
        assert_eq!(r[0].dense_bytes, 1003 * 4);
        assert_eq!(r[0].packed_bytes, 126 + (1003 - k as u64) * 4);
    }

    #[test]
    fn global_radix_select_matches_a_full_sort_with_many_ties() {
        // Quantised values: thousands of ties at every level; > PARALLEL_MIN elements and
        // tensors spanning several blocks, so the two-thread path and the tie cut across
        // blocks and tensors are exercised.
        let sizes = [140_000usize, 7, 130_003, 1];
        let tensors: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(j, &n)| {
                normal(n, 10 + j as u64)
                    .into_iter()
                    .map(|x| (x * 4.0).round() / 4.0)
                    .collect()
            })
            .collect();
        let refs: Vec<&[f32]> = tensors.iter().map(Vec::as_slice).collect();
        let all = sorted(&refs);
        for s in [0.3, 0.77, 0.999] {
            let mut w: Vec<NamedTensor> = tensors
                .iter()
                .enumerate()
                .map(|(j, v)| t(&format!("t{j}"), &[v.len()], v.clone()))
                .collect();
            let sel: Vec<String> = (0..sizes.len()).map(|j| format!("t{j}")).collect();
            prune_tensors(
                &mut w,
                &sel,
                &Method::Magnitude,
                &targets(s, Scope::Global),
                0,
            )
            .unwrap();
            let total: usize = sizes.iter().sum();
            let k = prune_count(s, total as u64) as usize;
            let expect = reference_from(&all, &refs, k);
            for j in 0..sizes.len() {
                for i in 0..sizes[j] {
                    let pruned = w[j].values[i] == 0.0 && tensors[j][i] != 0.0;
                    if tensors[j][i] != 0.0 {
                        assert_eq!(pruned, expect[j][i], "s {s} tensor {j} index {i}");
                    }
                }
            }
            let zeros_now: usize = w.iter().map(|x| zeros(&x.values)).sum();
            let zeros_before: usize = tensors.iter().map(|v| zeros(v)).sum();
            let zero_pruned: usize = expect
                .iter()
                .zip(&tensors)
                .map(|(e, v)| e.iter().zip(v).filter(|(&p, &x)| p && x == 0.0).count())
                .sum();
            assert_eq!(zeros_now, zeros_before + k - zero_pruned);
        }
    }

    #[test]
    fn ties_are_pruned_in_tensor_then_index_order() {
        let mut w = vec![
            t("a", &[2], vec![1.0, 5.0]),
            t("b", &[3], vec![-1.0, 1.0, 1.0]),
        ];
        let r = prune_tensors(
            &mut w,
            &names(&["a", "b"]),
            &Method::Magnitude,
            &targets(0.4, Scope::Global),
            0,
        )
        .unwrap();
        // k = round(0.4 * 5) = 2: the first two of the three |w| = 1.
        assert_eq!(w[0].values, [0.0, 5.0]);
        assert_eq!(w[1].values, [0.0, 1.0, 1.0]);
        assert_eq!(r[0].threshold, Some(1.0));
        let mut w = vec![t("a", &[6], vec![2.0, 2.0, 2.0, 2.0, 3.0, 0.5])];
        prune_tensors(
            &mut w,
            &names(&["a"]),
            &Method::Magnitude,
            &targets(0.5, Scope::Layer),
            0,
        )
        .unwrap();
        assert_eq!(w[0].values, [0.0, 0.0, 2.0, 2.0, 3.0, 0.0]);
    }

    #[test]
    fn global_and_layer_scopes_differ_and_overrides_apply() {
        let small: Vec<f32> = (1..=100).map(|i| i as f32 * 0.001).collect();
        let large: Vec<f32> = (1..=100).map(|i| i as f32).collect();
        let mk = || {
            vec![
                t("fc1.weight", &[10, 10], small.clone()),
                t("fc2.weight", &[10, 10], large.clone()),
            ]
        };
        let sel = names(&["fc1.weight", "fc2.weight"]);
        let mut w = mk();
        prune_tensors(
            &mut w,
            &sel,
            &Method::Magnitude,
            &targets(0.5, Scope::Global),
            0,
        )
        .unwrap();
        assert_eq!((zeros(&w[0].values), zeros(&w[1].values)), (100, 0));
        let mut w = mk();
        prune_tensors(
            &mut w,
            &sel,
            &Method::Magnitude,
            &targets(0.5, Scope::Layer),
            0,
        )
        .unwrap();
        assert_eq!((zeros(&w[0].values), zeros(&w[1].values)), (50, 50));
        let mut w = mk();
        let tg = PruneTargets {
            sparsity: 0.25,
            scope: Scope::Global,
            overrides: vec![("fc2.*".into(), 0.9), ("*".into(), 0.1)],
        };
        let r = prune_tensors(&mut w, &sel, &Method::Magnitude, &tg, 0).unwrap();
        // First match wins: fc2 -> 0.9 on its own; fc1 -> 0.1 on its own.
        assert_eq!((zeros(&w[0].values), zeros(&w[1].values)), (10, 90));
        assert_eq!(r[1].threshold, Some(90.0));
        let tg = PruneTargets {
            sparsity: 0.3,
            scope: Scope::Global,
            overrides: vec![("fc2.weight".into(), 0.9)],
        };
        let mut w = mk();
        w.push(t("fc3.weight", &[100], large.clone()));
        let sel3 = names(&["fc1.weight", "fc2.weight", "fc3.weight"]);
        prune_tensors(&mut w, &sel3, &Method::Magnitude, &tg, 0).unwrap();
        // fc1 + fc3 share one threshold: 60 of their 200, all from fc1.
        assert_eq!(zeros(&w[0].values), 60);
        assert_eq!(zeros(&w[1].values), 90);
        assert_eq!(zeros(&w[2].values), 0);
    }

    #[test]
    fn unselected_tensors_are_untouched_and_zero_sparsity_prunes_nothing() {
        let mut w = vec![
            t("a", &[4], vec![1.0, -2.0, 0.5, 3.0]),
            t("b", &[2], vec![0.1, 0.2]),
        ];
        let r = prune_tensors(
            &mut w,
            &names(&["a"]),
            &Method::Magnitude,
            &targets(0.5, Scope::Global),
            0,
        )
        .unwrap();
        assert_eq!(w[1].values, [0.1, 0.2]);
        assert_eq!(w[0].values, [0.0, -2.0, 0.0, 3.0]);
        assert_eq!(r.len(), 1);
        let r = prune_tensors(
            &mut w,
            &names(&["b"]),
            &Method::Magnitude,
            &targets(0.0, Scope::Layer),
            0,
        )
        .unwrap();
        assert_eq!((r[0].pruned, r[0].threshold), (0, None));
    }

    #[test]
    fn already_zero_weights_are_pruned_first() {
        let mut w = vec![t("a", &[5], vec![0.0, 3.0, 0.0, -0.0, 1.0])];
        let r = prune_tensors(
            &mut w,
            &names(&["a"]),
            &Method::Magnitude,
            &targets(0.6, Scope::Layer),
            0,
        )
        .unwrap();
        assert_eq!(w[0].values, [0.0, 3.0, 0.0, 0.0, 1.0]);
        assert_eq!(
            (r[0].pruned, r[0].nonzero, r[0].threshold),
            (3, 2, Some(0.0))
        );
    }

    #[test]
    fn masks_match_the_zeros_and_reapply() {
        let v = normal(100, 3);
        let mut w = vec![t("a", &[10, 10], v.clone())];
        let (r, masks) = prune_tensors_with_masks(
            &mut w,
            &names(&["a"]),
            &Method::Magnitude,
            &targets(0.7, Scope::Layer),
            0,
        )
        .unwrap();
        assert_eq!(masks.len(), 1);
        assert_eq!(masks[0].kept(), 30);
        assert_eq!(r[0].pruned, 70);
        for i in 0..100 {
            assert_eq!(masks[0].is_kept(i), w[0].values[i] != 0.0);
        }
        let mut trained = v.clone();
        masks[0].apply(&mut trained).unwrap();
        assert_eq!(trained, w[0].values);
        assert!(masks[0].apply(&mut [0.0; 3]).is_err());
        assert_eq!(nonzero_masks(&w, &names(&["a"]))[0], masks[0]);
    }

    #[test]
    fn random_prunes_exact_counts_deterministically() {
        let v = normal(1000, 4);
        let run = |seed: u64, sel: &[&str]| {
            let mut w = vec![
                t("a", &[1000], v.clone()),
                t("b", &[10, 50], normal(500, 5)),
            ];
            prune_tensors(
                &mut w,
                &names(sel),
                &Method::Random,
                &targets(0.3, Scope::Global),
                seed,
            )
            .unwrap();
            w
        };
        let w1 = run(7, &["a", "b"]);
        assert_eq!(zeros(&w1[0].values), 300);
        assert_eq!(zeros(&w1[1].values), 150);
        assert_eq!(run(7, &["a", "b"]), w1);
        assert_eq!(
            run(7, &["a"])[0],
            w1[0],
            "a tensor's mask ignores the other tensors"
        );
        assert_ne!(run(8, &["a", "b"])[0], w1[0]);
        // k > n/2 takes the complement path.
        let mut w = vec![t("a", &[1000], v.clone())];
        prune_tensors(
            &mut w,
            &names(&["a"]),
            &Method::Random,
            &targets(0.9, Scope::Layer),
            1,
        )
        .unwrap();
        assert_eq!(zeros(&w[0].values), 900);
    }

    #[test]
    fn n_m_keeps_the_n_largest_of_every_group() {
        let v = normal(4 * 8, 6);
        let mut w = vec![t("fc.weight", &[4, 8], v.clone())];
        let r = prune_tensors(
            &mut w,
            &names(&["fc.weight"]),
            &Method::NM { n: 2, m: 4 },
            &targets(0.0, Scope::Layer),
            0,
        )
        .unwrap();
        assert_eq!(r[0].pruned, 16);
        for row in 0..4 {
            for g in 0..2 {
                let idx: Vec<usize> = (0..4).map(|j| row * 8 + g * 4 + j).collect();
                let kept: Vec<usize> = idx
                    .iter()
                    .copied()
                    .filter(|&i| w[0].values[i] != 0.0)
                    .collect();
                assert_eq!(kept.len(), 2);
                let min_kept = kept.iter().map(|&i| v[i].abs()).fold(f32::MAX, f32::min);
                for &i in &idx {
                    if !kept.contains(&i) {
                        assert!(v[i].abs() <= min_kept);
                    }
                }
            }
        }
        // Conv [out, in, kh, kw]: groups along `in` for each (out, kh, kw).
        let v = normal(2 * 8 * 3 * 3, 7);
        let mut w = vec![t("conv.weight", &[2, 8, 3, 3], v)];
        prune_tensors(
            &mut w,
            &names(&["conv.weight"]),
            &Method::NM { n: 1, m: 4 },
            &targets(0.0, Scope::Layer),
            0,
        )
        .unwrap();
        for o in 0..2 {
            for g in 0..2 {
                for sp in 0..9 {
                    let nz = (0..4)
                        .filter(|&j| w[0].values[(o * 8 + g * 4 + j) * 9 + sp] != 0.0)
                        .count();
                    assert_eq!(nz, 1, "o {o} g {g} sp {sp}");
                }
            }
        }
        // Ties and zeros: the lower index wins a tie; zeros are pruned first.
        let mut w = vec![t("x", &[1, 4], vec![1.0, 1.0, 0.0, -1.0])];
        prune_tensors(
            &mut w,
            &names(&["x"]),
            &Method::NM { n: 2, m: 4 },
            &targets(0.0, Scope::Layer),
            0,
        )
        .unwrap();
        assert_eq!(w[0].values, [1.0, 1.0, 0.0, 0.0]);
    }

    fn pointer_of(e: Error) -> (String, String) {
        match e {
            Error::InvalidParameter { pointer, detail } => (pointer, detail),
            other => panic!("expected InvalidParameter, got {other:?}"),
        }
    }

    #[test]
    fn refusals_name_the_parameter() {
        let mut w = vec![
            t("fc1.weight", &[3, 6], vec![1.0; 18]),
            t("b", &[3], vec![1.0; 3]),
        ];
        let sel = names(&["fc1.weight"]);
        for s in [1.0, -0.1, f64::NAN, 1.5] {
            let e = prune_tensors(
                &mut w,
                &sel,
                &Method::Magnitude,
                &targets(s, Scope::Layer),
                0,
            )
            .unwrap_err();
            assert_eq!(pointer_of(e).0, "/sparsity");
        }
        let tg = PruneTargets {
            sparsity: 0.5,
            scope: Scope::Layer,
            overrides: vec![("fc1/x".into(), 1.0)],
        };
        let e = prune_tensors(&mut w, &sel, &Method::Magnitude, &tg, 0).unwrap_err();
        assert_eq!(pointer_of(e).0, "/layers/fc1~1x");
        for (n, m, ptr) in [(4, 4, "/n"), (5, 4, "/n"), (0, 4, "/n"), (1, 0, "/m")] {
            let e = prune_tensors(
                &mut w,
                &sel,
                &Method::NM { n, m },
                &targets(0.0, Scope::Layer),
                0,
            )
            .unwrap_err();
            assert_eq!(pointer_of(e).0, ptr);
        }
        let e = prune_tensors(
            &mut w,
            &sel,
            &Method::NM { n: 2, m: 4 },
            &targets(0.0, Scope::Layer),
            0,
        )
        .unwrap_err();
        let (p, d) = pointer_of(e);
        assert_eq!(p, "/m");
        assert!(
            d.contains("fc1.weight")
                && d.contains("[3, 6]")
                && d.contains("6 elements")
                && d.contains("m = 4"),
            "{d}"
        );
        let e = prune_tensors(
            &mut w,
            &names(&["b"]),
            &Method::NM { n: 1, m: 3 },
            &targets(0.0, Scope::Layer),
            0,
        )
        .unwrap_err();
        assert_eq!(pointer_of(e).0, "/method");
        // Nothing was modified by a refused call.
        assert_eq!(w[0].values, vec![1.0; 18]);
    }

    fn f16_bytes(v: &[f32]) -> Vec<u8> {
        v.iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect()
    }

    /// A file with an f32 and an f16 weight and an f32 bias (unselected).
    fn sample_file() -> (tempfile::NamedTempFile, SafetensorsFile) {
        let a = normal(30 * 40, 21);
        let b = normal(16 * 8, 22);
        let mut meta = BTreeMap::new();
        meta.insert("whittle.architecture".to_owned(), "{}".to_owned());
        file_of(
            &[
                (
                    TensorSpec::new("fc1.weight", Dtype::F32, vec![30, 40]),
                    encode_f32(&a),
                ),
                (
                    TensorSpec::new("fc1.bias", Dtype::F32, vec![3]),
                    encode_f32(&[1.0, 0.0, -2.0]),
                ),
                (
                    TensorSpec::new("fc2.weight", Dtype::F16, vec![16, 8]),
                    f16_bytes(&b),
                ),
            ],
            &meta,
        )
    }

    fn run_file(
        f: &SafetensorsFile,
        method: Method,
        tg: &PruneTargets,
        output: Output,
    ) -> (Vec<u8>, Vec<LayerReport>) {
        let mut meta = BTreeMap::new();
        meta.insert("k".to_owned(), "v".to_owned());
        let mut out = Vec::new();
        let r = ctx_run(|ctx| {
            prune_file(
                f,
                &names(&["fc1.weight", "fc2.weight"]),
                &method,
                tg,
                3,
                output,
                &meta,
                &mut out,
                ctx,
            )
        })
        .unwrap();
        (out, r)
    }

    #[test]
    fn file_dense_matches_in_memory_and_keeps_dtypes() {
        let (_tmp, f) = sample_file();
        for method in [Method::Magnitude, Method::Random, Method::NM { n: 2, m: 4 }] {
            let tg = targets(0.6, Scope::Global);
            let (bytes, reports) = run_file(&f, method, &tg, Output::Dense);
            let (_t2, g) = reopen(bytes);
            let h = g.header();
            assert_eq!(h.metadata.get("k").map(String::as_str), Some("v"));
            assert_eq!(
                h.tensors
                    .iter()
                    .map(|t| (t.name.as_str(), t.dtype, t.shape.clone()))
                    .collect::<Vec<_>>(),
                f.header()
                    .tensors
                    .iter()
                    .map(|t| (t.name.as_str(), t.dtype, t.shape.clone()))
                    .collect::<Vec<_>>()
            );
            assert_eq!(
                g.bytes(g.get("fc1.bias").unwrap()),
                f.bytes(f.get("fc1.bias").unwrap())
            );
            // In memory on the decoded values gives the same zeros (f16 -> f32 is exact).
            let mut w = decode_sparse(&f).unwrap();
            let mem = prune_tensors(
                &mut w,
                &names(&["fc1.weight", "fc2.weight"]),
                &method,
                &tg,
                3,
            )
            .unwrap();
            let back = decode_sparse(&g).unwrap();
            assert_eq!(back, w, "{method:?}");
            for (a, b) in reports.iter().zip(&mem) {
                assert_eq!(
                    (a.pruned, a.nonzero, a.threshold),
                    (b.pruned, b.nonzero, b.threshold)
                );
            }
            assert_eq!(reports[1].dtype, "F16");
            assert_eq!(reports[1].dense_bytes, 16 * 8 * 2);
            if method == Method::Magnitude {
                // Global: 0.6 of all 1328 weights.
                let pruned: u64 = reports.iter().map(|r| r.pruned).sum();
                assert_eq!(pruned, prune_count(0.6, 1328));
            }
        }
    }

    #[test]
    fn sparse_round_trips_bit_exactly_and_reports_its_bytes() {
        let (_tmp, f) = sample_file();
        let tg = targets(0.75, Scope::Layer);
        let (dense, _) = run_file(&f, Method::Magnitude, &tg, Output::Dense);
        let (sparse, reports) = run_file(&f, Method::Magnitude, &tg, Output::Sparse);
        let (_t1, d) = reopen(dense);
        let (_t2, s) = reopen(sparse.clone());
        let meta: Value = serde_json::from_str(&s.header().metadata[SPARSE_METADATA_KEY]).unwrap();
        assert_eq!(meta["format"], "bitmask-v1");
        assert_eq!(
            meta["tensors"]["fc2.weight"],
            serde_json::json!({"dtype":"F16","shape":[16,8]})
        );
        assert_eq!(s.header().metadata["k"], "v");
        let order: Vec<&str> = s.header().tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            order,
            [
                "fc1.weight.sparse_mask",
                "fc1.weight.sparse_values",
                "fc1.bias",
                "fc2.weight.sparse_mask",
                "fc2.weight.sparse_values"
            ]
        );
        for r in &reports {
            let m = s.get(&format!("{}{MASK_SUFFIX}", r.tensor)).unwrap();
            let v = s.get(&format!("{}{VALUES_SUFFIX}", r.tensor)).unwrap();
            assert_eq!(r.packed_bytes, (m.nbytes() + v.nbytes()) as u64);
            assert_eq!(v.dtype.as_str(), r.dtype);
            // The kept values are the original bytes, in order.
            let es = v.dtype.size_in_bytes();
            let orig = f.bytes(f.get(&r.tensor).unwrap());
            let mask = s.bytes(m);
            let kept: Vec<u8> = orig
                .chunks_exact(es)
                .enumerate()
                .filter(|(i, _)| bit(mask, *i))
                .flat_map(|(_, e)| e.to_vec())
                .collect();
            assert_eq!(s.bytes(v), kept.as_slice());
        }
        let a = decode_sparse(&s).unwrap();
        let b = decode_sparse(&d).unwrap();
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.name, y.name);
            assert_eq!(x.shape, y.shape);
            let xb: Vec<u32> = x.values.iter().map(|v| v.to_bits()).collect();
            let yb: Vec<u32> = y.values.iter().map(|v| v.to_bits()).collect();
            assert_eq!(xb, yb);
        }
        // Packing the dense pruned file gives the same bytes (no zeros among kept values).
        let mut packed = Vec::new();
        let mut meta = BTreeMap::new();
        meta.insert("k".to_owned(), "v".to_owned());
        let r2 = ctx_run(|ctx| {
            encode_sparse(
                &d,
                &names(&["fc1.weight", "fc2.weight"]),
                &meta,
                &mut packed,
                ctx,
            )
        })
        .unwrap();
        assert_eq!(packed, sparse);
        assert_eq!(
            r2.iter().map(|r| r.packed_bytes).collect::<Vec<_>>(),
            reports.iter().map(|r| r.packed_bytes).collect::<Vec<_>>()
        );
        let sum = summarize(&reports);
        assert_eq!(sum.numel, 1328);
        assert!(sum.packed_bytes < sum.dense_bytes);
    }

    #[test]
    fn bf16_and_f64_inputs_keep_their_dtype_and_kept_bytes() {
        let v = normal(64, 30);
        let bf: Vec<u8> = v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect();
        let f64b: Vec<u8> = v
            .iter()
            .flat_map(|x| (f64::from(*x) * 1.000_000_1).to_le_bytes())
            .collect();
        let (_t, f) = file_of(
            &[
                (TensorSpec::new("a", Dtype::BF16, vec![8, 8]), bf),
                (TensorSpec::new("b", Dtype::F64, vec![8, 8]), f64b),
            ],
            &BTreeMap::new(),
        );
        let mut out = Vec::new();
        let r = ctx_run(|ctx| {
            prune_file(
                &f,
                &names(&["a", "b"]),
                &Method::Magnitude,
                &targets(0.5, Scope::Layer),
                0,
                Output::Dense,
                &BTreeMap::new(),
                &mut out,
                ctx,
            )
        })
        .unwrap();
        let (_t2, g) = reopen(out);
        for (name, dtype) in [("a", Dtype::BF16), ("b", Dtype::F64)] {
            let (i, o) = (f.get(name).unwrap(), g.get(name).unwrap());
            assert_eq!(o.dtype, dtype);
            let es = dtype.size_in_bytes();
            let (ib, ob) = (f.bytes(i), g.bytes(o));
            let mut zeroed = 0;
            for (x, y) in ib.chunks_exact(es).zip(ob.chunks_exact(es)) {
                if y.iter().all(|&b| b == 0) {
                    zeroed += 1;
                } else {
                    assert_eq!(x, y, "kept elements are bit-exact");
                }
            }
            assert_eq!(zeroed, 32);
        }
        assert_eq!(r.iter().map(|r| r.pruned).collect::<Vec<_>>(), [32, 32]);
    }

    #[test]
    fn n_m_sparse_sizes_are_known_up_front() {
        let (_tmp, f) = sample_file();
        let (sparse, reports) = run_file(
            &f,
            Method::NM { n: 1, m: 4 },
            &targets(0.0, Scope::Layer),
            Output::Sparse,
        );
        let (_t, s) = reopen(sparse);
        assert_eq!(s.get("fc1.weight.sparse_values").unwrap().shape, vec![300]);
        assert_eq!(reports[0].pruned, 900);
    }

    #[test]
    fn decode_refuses_inconsistent_packing() {
        let mut meta = BTreeMap::new();
        meta.insert(
            SPARSE_METADATA_KEY.to_owned(),
            r#"{"format":"bitmask-v1","tensors":{"w":{"dtype":"F32","shape":[3]}}}"#.to_owned(),
        );
        let (_t, f) = file_of(
            &[
                (
                    TensorSpec::new("w.sparse_mask", Dtype::U8, vec![1]),
                    vec![0b011],
                ),
                (
                    TensorSpec::new("w.sparse_values", Dtype::F32, vec![1]),
                    encode_f32(&[1.0]),
                ),
            ],
            &meta,
        );
        assert!(
            matches!(decode_sparse(&f), Err(Error::InvalidSafetensors(m)) if m.contains("keeps 2"))
        );
        let (_t, f) = file_of(
            &[
                (
                    TensorSpec::new("w.sparse_mask", Dtype::U8, vec![1]),
                    vec![0b1001],
                ),
                (
                    TensorSpec::new("w.sparse_values", Dtype::F32, vec![2]),
                    encode_f32(&[1.0, 2.0]),
                ),
            ],
            &meta,
        );
        assert!(
            matches!(decode_sparse(&f), Err(Error::InvalidSafetensors(m)) if m.contains("padding"))
        );
        let (_t, f) = file_of(
            &[
                (
                    TensorSpec::new("w.sparse_mask", Dtype::U8, vec![1]),
                    vec![0b101],
                ),
                (
                    TensorSpec::new("w.sparse_values", Dtype::F32, vec![2]),
                    encode_f32(&[1.0, 2.0]),
                ),
            ],
            &meta,
        );
        assert_eq!(decode_sparse(&f).unwrap()[0].values, [1.0, 0.0, 2.0]);
    }

    #[test]
    fn file_refusals_and_cancel() {
        let (_tmp, f) = sample_file();
        let mut out = Vec::new();
        let e = ctx_run(|ctx| {
            prune_file(
                &f,
                &names(&["fc1.weight"]),
                &Method::NM { n: 2, m: 3 },
                &targets(0.0, Scope::Layer),
                0,
                Output::Dense,
                &BTreeMap::new(),
                &mut out,
                ctx,
            )
        })
        .unwrap_err();
        assert!(pointer_of(e).1.contains("40 elements"));
        assert!(
            out.is_empty(),
            "nothing is written before the parameters are checked"
        );
        let (_t, g) = file_of(
            &[(
                TensorSpec::new("codes", Dtype::I32, vec![2, 2]),
                vec![0; 16],
            )],
            &BTreeMap::new(),
        );
        let e = ctx_run(|ctx| {
            prune_file(
                &g,
                &names(&["codes"]),
                &Method::Magnitude,
                &targets(0.5, Scope::Layer),
                0,
                Output::Dense,
                &BTreeMap::new(),
                &mut out,
                ctx,
            )
        })
        .unwrap_err();
        assert_eq!(e.code(), "unsupported_dtype");
        let cancel = AtomicBool::new(true);
        let progress = |_: f64, _: &str| {};
        let ctx = Ctx::new(&progress, &cancel);
        let e = prune_file(
            &f,
            &names(&["fc1.weight"]),
            &Method::Magnitude,
            &targets(0.5, Scope::Layer),
            0,
            Output::Dense,
            &BTreeMap::new(),
            &mut out,
            &ctx,
        )
        .unwrap_err();
        assert!(matches!(e, Error::Cancelled));
    }

    #[test]
    fn split_parts_balances_and_covers() {
        let b = blocks(&[BLOCK * 3 + 5, 10, BLOCK * 2]);
        assert_eq!(b.len(), 7);
        let parts = split_parts(&b, 2);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].start, 0);
        assert_eq!(parts[0].end, parts[1].start);
        assert_eq!(parts[1].end, b.len());
        assert_eq!(split_parts(&blocks(&[10]), 2).len(), 1);
    }
}
