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

mod file;
mod memory;
mod plan;
mod radix;
mod sparse;
pub mod splicing;
#[allow(unused_imports)]
pub use {file::*, memory::*, plan::*, radix::*, sparse::*};

pub mod calibrated;
pub mod schedule;
pub mod structured;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::ops::Range;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::Value;

use crate::compress::formats::safetensors::NamedTensor;
use crate::compress::formats::safetensors::{
    decode_f32, write_safetensors, Dtype, SafetensorsFile, TensorInfo, TensorSpec,
};
use crate::compress::parallel::{par_map, threads, PARALLEL_MIN};
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
        check_sparsity("sparsity", self.sparsity)?;
        for (pattern, s) in &self.overrides {
            check_sparsity(&format!("layers[{pattern}]"), *s)?;
        }
        Ok(())
    }

    /// These targets with every sparsity multiplied by `fraction` (a round of a schedule).
    pub fn scaled(&self, fraction: f64) -> PruneTargets {
        PruneTargets {
            sparsity: self.sparsity * fraction,
            scope: self.scope,
            overrides: self
                .overrides
                .iter()
                .map(|(p, s)| (p.clone(), s * fraction))
                .collect(),
        }
    }

    /// The override sparsity for `name` (first matching pattern), if any.
    pub fn override_for(&self, name: &str) -> Option<f64> {
        self.overrides
            .iter()
            .find(|(p, _)| glob_match(p, name))
            .map(|&(_, s)| s)
    }
}

fn check_sparsity(field: &str, s: f64) -> Result<()> {
    if (0.0..1.0).contains(&s) {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("sparsity must be in [0, 1), got {s}"),
        ))
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
    /// Whole output neurons / conv channels with the smallest L1 or L2 norm ([`structured`]):
    /// the tensors and the architecture shrink.
    Structured {
        /// 1 or 2.
        norm: u8,
    },
}

impl Method {
    /// API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Magnitude => "magnitude",
            Self::Random => "random",
            Self::NM { .. } => "n_m",
            Self::Structured { .. } => "structured",
        }
    }

    /// Refuses N:M with `m = 0`, `n = 0` or `n ≥ m` (pointers `/m`, `/n`), and `structured`,
    /// which [`structured::prune_structured`] runs instead (it rewrites the architecture).
    pub fn validate(&self) -> Result<()> {
        if let Method::Structured { .. } = self {
            return Err(structured_elsewhere());
        }
        if let Method::NM { n, m } = *self {
            if m == 0 {
                return Err(Error::InvalidParameter {
                    field: "m".into(),
                    detail: "m (the group size) must be at least 1, got 0".into(),
                });
            }
            if n == 0 || n >= m {
                return Err(Error::InvalidParameter {
                    field: "n".into(),
                    detail: format!(
                        "n (weights kept per group of m) must satisfy 1 <= n < m, got n = {n}, m = {m}"
                    ),
                });
            }
        }
        Ok(())
    }
}

/// The error of asking the mask-based pruners for structured pruning.
fn structured_elsewhere() -> Error {
    Error::Internal(
        "structured pruning rewrites the architecture: it runs in prune::structured, not on masks"
            .into(),
    )
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
            Error::InvalidParameter {
                field: pointer,
                detail,
            } => (pointer, detail),
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
            assert_eq!(pointer_of(e).0, "sparsity");
        }
        let tg = PruneTargets {
            sparsity: 0.5,
            scope: Scope::Layer,
            overrides: vec![("fc1/x".into(), 1.0)],
        };
        let e = prune_tensors(&mut w, &sel, &Method::Magnitude, &tg, 0).unwrap_err();
        assert_eq!(pointer_of(e).0, "layers[fc1/x]");
        for (n, m, ptr) in [(4, 4, "n"), (5, 4, "n"), (0, 4, "n"), (1, 0, "m")] {
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
        assert_eq!(p, "m");
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
        assert_eq!(pointer_of(e).0, "method");
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
                &PruneFile {
                    selected: &names(&["fc1.weight", "fc2.weight"]),
                    method,
                    targets: tg,
                    seed: 3,
                    output,
                    metadata: &meta,
                },
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
                &PruneFile {
                    selected: &names(&["a", "b"]),
                    method: Method::Magnitude,
                    targets: &targets(0.5, Scope::Layer),
                    seed: 0,
                    output: Output::Dense,
                    metadata: &BTreeMap::new(),
                },
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
                &PruneFile {
                    selected: &names(&["fc1.weight"]),
                    method: Method::NM { n: 2, m: 3 },
                    targets: &targets(0.0, Scope::Layer),
                    seed: 0,
                    output: Output::Dense,
                    metadata: &BTreeMap::new(),
                },
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
                &PruneFile {
                    selected: &names(&["codes"]),
                    method: Method::Magnitude,
                    targets: &targets(0.5, Scope::Layer),
                    seed: 0,
                    output: Output::Dense,
                    metadata: &BTreeMap::new(),
                },
                &mut out,
                ctx,
            )
        })
        .unwrap_err();
        assert_eq!(e.code().as_str(), "unsupported_dtype");
        let cancel = AtomicBool::new(true);
        let progress = |_: f64, _: &str| {};
        let ctx = Ctx::new(&progress, &cancel);
        let e = prune_file(
            &f,
            &PruneFile {
                selected: &names(&["fc1.weight"]),
                method: Method::Magnitude,
                targets: &targets(0.5, Scope::Layer),
                seed: 0,
                output: Output::Dense,
                metadata: &BTreeMap::new(),
            },
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
