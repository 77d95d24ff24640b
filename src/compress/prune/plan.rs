//! Plans: what each selected tensor's mask is (a magnitude threshold, a random draw, N:M).

#[allow(unused_imports)]
use super::*;

// Plans: what each selected tensor's mask is.

/// How one tensor's keep-mask is decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Rule {
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
    pub(super) fn threshold(&self) -> Option<f64> {
        match *self {
            Rule::Threshold { t, .. } => Some(f64::from(f32::from_bits(t))),
            _ => None,
        }
    }
}

/// The magnitude rules of `srcs` (named `names`, in tensor order) under `targets`.
pub(super) fn magnitude_rules(
    names: &[&str],
    srcs: &[Src],
    targets: &PruneTargets,
) -> Result<Vec<Rule>> {
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
pub(super) fn own_sparsity(targets: &PruneTargets, name: &str) -> f64 {
    targets.override_for(name).unwrap_or(targets.sparsity)
}

/// Checks the N:M shape rules for one tensor.
pub(super) fn check_nm(name: &str, shape: &[usize], m: usize) -> Result<()> {
    if shape.len() < 2 {
        return Err(Error::InvalidParameter {
            field: "method".into(),
            detail: format!(
                "n_m pruning groups weights along the input dimension (dim 1), but tensor {name} has shape {shape:?}; exclude it"
            ),
        });
    }
    if !shape[1].is_multiple_of(m) {
        return Err(Error::InvalidParameter {
            field: "m".into(),
            detail: format!(
                "tensor {name} of shape {shape:?}: its input dimension (dim 1) has {} elements, not a multiple of m = {m}",
                shape[1]
            ),
        });
    }
    Ok(())
}

pub(super) fn nm_kept(numel: usize, n: usize, m: usize) -> usize {
    numel / m * n
}

/// Keep-bits of a magnitude rule.
pub(super) fn threshold_bits(vals: &[f32], t: u32, cut: usize) -> Vec<u8> {
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
pub(super) fn full_mask(n: usize) -> Vec<u8> {
    let mut bits = vec![0xffu8; mask_len(n)];
    if !n.is_multiple_of(8) {
        if let Some(last) = bits.last_mut() {
            *last = (1u8 << (n % 8)) - 1;
        }
    }
    bits
}

/// FNV-1a of a tensor name: the random stream of that tensor.
pub(super) fn fnv1a(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Keep-bits pruning exactly `k` of `n` elements chosen by a partial Fisher–Yates shuffle.
pub(super) fn random_bits(name: &str, n: usize, k: usize, seed: u64) -> Result<Vec<u8>> {
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
pub(super) fn nm_bits(vals: &[f32], shape: &[usize], n: usize, m: usize) -> Vec<u8> {
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
