//! `kmeans`: a per-tensor codebook fitted by 1-D Lloyd iterations (Deep Compression).

#[allow(unused_imports)]
use super::*;

/// Fits a sorted `clusters`-entry codebook to `values` by 1-D Lloyd iterations.
///
/// The values are sorted once; with prefix sums, each iteration costs O(k log n): the
/// clusters are the runs between consecutive midpoints (found by binary search) and their
/// means come from the prefix sums. When the tensor holds exact zeros (a pruned tensor),
/// one centroid is pinned at 0.0 and the others are fitted to the non-zero weights, so
/// pruned weights stay exactly zero (Deep Compression shares only the surviving weights).
pub(super) fn kmeans_codebook(
    values: &[f32],
    clusters: usize,
    init: KmeansInit,
    max_iterations: usize,
    tolerance: f64,
    seed: u64,
) -> Vec<f32> {
    let pin_zero = values.contains(&0.0);
    let mut data: Vec<f32> = values
        .iter()
        .copied()
        .filter(|&v| !pin_zero || v != 0.0)
        .collect();
    data.sort_unstable_by(f32::total_cmp);
    let free = clusters - usize::from(pin_zero);
    if data.is_empty() {
        return vec![0.0; clusters];
    }
    // Weights that already take at most `free` distinct values (a network trained with
    // shared weights, see `sharing`) are their own codebook, exactly; the unused entries
    // repeat the largest value so the codebook stays sorted.
    let mut distinct: Vec<f32> = Vec::with_capacity(free + 1);
    for &v in &data {
        if distinct.last() != Some(&v) {
            distinct.push(v);
            if distinct.len() > free {
                break;
            }
        }
    }
    if distinct.len() <= free {
        if pin_zero {
            distinct.push(0.0);
            distinct.sort_by(f32::total_cmp);
        }
        let last = distinct[distinct.len() - 1];
        distinct.resize(clusters, last);
        return distinct;
    }
    let mut prefix = Vec::with_capacity(data.len() + 1);
    prefix.push(0f64);
    let mut acc = 0f64;
    for &v in &data {
        acc += f64::from(v);
        prefix.push(acc);
    }
    let (lo, hi) = (f64::from(data[0]), f64::from(data[data.len() - 1]));
    let mut cents: Vec<(f64, bool)> = initial_centroids(&data, free, init, seed)
        .into_iter()
        .map(|c| (c, false))
        .collect();
    if pin_zero {
        cents.push((0.0, true));
    }
    cents.sort_by(|a, b| a.0.total_cmp(&b.0));
    let tol = tolerance * (hi - lo);
    for _ in 0..max_iterations {
        let mut start = 0usize;
        let mut shift = 0f64;
        let bounds: Vec<usize> = cents
            .windows(2)
            .map(|w| {
                let mid = 0.5 * (w[0].0 + w[1].0);
                data.partition_point(|&x| f64::from(x) < mid)
            })
            .chain(std::iter::once(data.len()))
            .collect();
        for (c, &end) in cents.iter_mut().zip(&bounds) {
            let end = end.max(start);
            if end > start && !c.1 {
                let mean = (prefix[end] - prefix[start]) / (end - start) as f64;
                shift = shift.max((mean - c.0).abs());
                c.0 = mean;
            }
            start = end;
        }
        cents.sort_by(|a, b| a.0.total_cmp(&b.0));
        if shift <= tol {
            break;
        }
    }
    cents.into_iter().map(|c| c.0 as f32).collect()
}

/// `k` starting centroids for sorted, non-empty `data`.
pub(super) fn initial_centroids(data: &[f32], k: usize, init: KmeansInit, seed: u64) -> Vec<f64> {
    let n = data.len();
    let (lo, hi) = (f64::from(data[0]), f64::from(data[n - 1]));
    match init {
        KmeansInit::Linear => (0..k)
            .map(|i| {
                if k == 1 {
                    0.5 * (lo + hi)
                } else {
                    lo + (hi - lo) * i as f64 / (k - 1) as f64
                }
            })
            .collect(),
        KmeansInit::Density => (0..k)
            .map(|i| {
                let q = (i as f64 + 0.5) / k as f64;
                f64::from(data[((q * n as f64) as usize).min(n - 1)])
            })
            .collect(),
        KmeansInit::KmeansPlusPlus => {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let sample: Vec<f64> = if n <= KMEANS_PP_SAMPLE {
                data.iter().map(|&v| f64::from(v)).collect()
            } else {
                (0..KMEANS_PP_SAMPLE)
                    .map(|_| f64::from(data[rng.gen_range(0..n)]))
                    .collect()
            };
            let mut cents = vec![sample[rng.gen_range(0..sample.len())]];
            let mut d2: Vec<f64> = sample.iter().map(|&x| (x - cents[0]).powi(2)).collect();
            while cents.len() < k {
                let total: f64 = d2.iter().sum();
                let next = if total > 0.0 {
                    let mut r = rng.gen::<f64>() * total;
                    let mut pick = sample.len() - 1;
                    for (i, &d) in d2.iter().enumerate() {
                        if r < d {
                            pick = i;
                            break;
                        }
                        r -= d;
                    }
                    sample[pick]
                } else {
                    // Fewer distinct values than clusters: duplicates are harmless.
                    cents[cents.len() - 1]
                };
                cents.push(next);
                for (d, &x) in d2.iter_mut().zip(&sample) {
                    *d = d.min((x - next).powi(2));
                }
            }
            cents
        }
    }
}
