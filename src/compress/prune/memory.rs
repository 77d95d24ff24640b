//! Pruning named f32 tensors in memory (gradual pruning between training rounds).

#[allow(unused_imports)]
use super::*;

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

pub(super) fn prune_in_memory(
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
        Method::Structured { .. } => return Err(structured_elsewhere()),
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

pub(super) fn report(
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
pub(super) fn zero_below(values: &mut [f32], lim: u32) -> [u64; 2] {
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
pub(super) fn apply_thresholds(
    weights: &mut [NamedTensor],
    chosen: &[usize],
    rules: &[Rule],
) -> Vec<[u64; 2]> {
    pub(super) struct Job<'a> {
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

/// Per-tensor figures of already-pruned `selected` weights (after retraining, say): their
/// zeros count as pruned.
pub fn reports_of(weights: &[NamedTensor], selected: &[String]) -> Vec<LayerReport> {
    weights
        .iter()
        .filter(|w| selected.contains(&w.name))
        .map(|w| {
            let numel = w.values.len() as u64;
            let nonzero = w.values.iter().filter(|v| **v != 0.0).count() as u64;
            LayerReport {
                tensor: w.name.clone(),
                shape: w.shape.clone(),
                dtype: "F32".into(),
                numel,
                pruned: numel - nonzero,
                nonzero,
                sparsity: if numel == 0 {
                    0.0
                } else {
                    1.0 - nonzero as f64 / numel as f64
                },
                threshold: None,
                dense_bytes: numel * 4,
                packed_bytes: numel.div_ceil(8) + nonzero * 4,
            }
        })
        .collect()
}
