//! Weight sharing for k-means quantization-aware training (Han et al. 2016, Deep Compression
//! §3.3: "fine-tuning the shared centroids").
//!
//! Every selected weight tensor is clustered once with the k-means codec and set to its
//! codebook values; the assignments stay fixed. Training then updates the weights as usual,
//! and after every optimizer step [`SharedWeights::project`] moves each cluster to the mean
//! of its members, so the network always computes with at most `clusters` distinct values
//! per tensor. With plain SGD that is Han et al.'s centroid update with the gradient
//! averaged instead of summed over the cluster (a per-cluster learning-rate scale; Adam-type
//! optimizers normalise the scale anyway). An exact-zero centroid (the pruned weights, which
//! the codec pins) stays at zero, so sparsity survives training. The final k-means pass then
//! finds the trained values exactly (a tensor with no more distinct values than clusters is
//! its own codebook), so the packed codes are the trained network.

use std::collections::HashSet;

use candle_core::{DType, Tensor};

use crate::compress::engine::Network;
use crate::compress::quant::{quantize_named, Method};
use crate::compress::{Error, Result};

/// One shared tensor: its parameter index and fixed cluster assignments.
struct Group {
    param: usize,
    shape: Vec<usize>,
    /// Cluster of each weight, `U32`, `[numel]`.
    codes: Tensor,
    /// `1 / members` per cluster (0 for empty ones), `[clusters]`.
    inv_counts: Tensor,
    /// 0 for a pinned exact-zero centroid, else 1, `[clusters]`.
    free: Tensor,
}

/// Tensors whose weights are tied within k-means clusters while training.
pub struct SharedWeights {
    groups: Vec<Group>,
}

impl SharedWeights {
    /// Clusters every parameter of `model` named in `selected` with `method` (a
    /// [`Method::Kmeans`]) and sets it to its codebook values.
    pub fn new(
        model: &dyn Network,
        selected: &HashSet<String>,
        method: &Method,
        seed: u64,
    ) -> Result<SharedWeights> {
        if !matches!(method, Method::Kmeans { .. }) {
            return Err(Error::Internal(format!(
                "weight sharing needs a k-means method, not {}",
                method.name()
            )));
        }
        let mut groups = Vec::new();
        for (i, p) in model.params().iter().enumerate() {
            if !selected.contains(p.name()) {
                continue;
            }
            let w = p.var().as_tensor();
            let shape = w.dims().to_vec();
            let values = w.flatten_all()?.to_vec1::<f32>()?;
            let (q, _) = quantize_named(p.name(), &values, &shape, method, seed, None)?;
            let k = q.params.codebook.len();
            let mut counts = vec![0u32; k];
            for &c in &q.codes {
                counts[c as usize] += 1;
            }
            let inv: Vec<f32> = counts
                .iter()
                .map(|&n| if n == 0 { 0.0 } else { 1.0 / n as f32 })
                .collect();
            let free: Vec<f32> = q
                .params
                .codebook
                .iter()
                .map(|&c| if c == 0.0 { 0.0 } else { 1.0 })
                .collect();
            let device = w.device();
            let codes: Vec<u32> = q.codes.iter().map(|&c| u32::from(c)).collect();
            p.var()
                .set(&Tensor::from_vec(q.dequantized, shape.clone(), device)?)?;
            groups.push(Group {
                param: i,
                shape,
                codes: Tensor::from_vec(codes, values.len(), device)?,
                inv_counts: Tensor::from_vec(inv, k, device)?,
                free: Tensor::from_vec(free, k, device)?,
            });
        }
        Ok(SharedWeights { groups })
    }

    /// Sets every shared weight to the mean of its cluster (pinned zeros to 0).
    pub fn project(&self, model: &dyn Network) -> Result<()> {
        let params = model.params();
        for g in &self.groups {
            let var = params[g.param].var();
            let w = var.as_tensor().flatten_all()?.to_dtype(DType::F32)?;
            let sums = g.inv_counts.zeros_like()?.index_add(&g.codes, &w, 0)?;
            let means = sums.mul(&g.inv_counts)?.mul(&g.free)?;
            let shared = means
                .index_select(&g.codes, 0)?
                .reshape(g.shape.as_slice())?;
            var.set(&shared.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// Number of shared tensors.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    /// Whether no tensor is shared.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::engine::sequential::arch::Architecture;
    use crate::compress::engine::sequential::model::Model;
    use crate::compress::quant::KmeansInit;
    use serde_json::json;

    fn kmeans(clusters: usize) -> Method {
        Method::Kmeans {
            clusters,
            init: KmeansInit::Linear,
            max_iterations: 50,
            tolerance: 1e-6,
        }
    }

    fn distinct(t: &Tensor) -> Vec<f32> {
        let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.sort_by(f32::total_cmp);
        v.dedup();
        v
    }

    #[test]
    fn projection_ties_clusters_to_their_mean_and_keeps_pruned_zeros() {
        let arch = Architecture::from_json(&json!({"kind": "sequential", "input_shape": [16],
            "layers": [{"type": "linear", "name": "fc", "in_features": 16, "out_features": 8}]}))
        .unwrap();
        let model = Model::init(&arch, 3).unwrap();
        // Prune half of the weights to exact zeros first.
        let fc = &model.params()[0];
        assert_eq!(fc.name(), "fc.weight");
        let w = fc.var().as_tensor().to_vec2::<f32>().unwrap();
        let pruned: Vec<f32> = w
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, &v)| if i % 2 == 0 { 0.0 } else { v })
            .collect();
        fc.var()
            .set(&Tensor::from_vec(pruned, (8, 16), fc.var().device()).unwrap())
            .unwrap();
        let selected = HashSet::from(["fc.weight".to_string()]);
        let shared = SharedWeights::new(&model, &selected, &kmeans(4), 0).unwrap();
        assert_eq!(shared.len(), 1);
        let values = || {
            fc.var()
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let start = values();
        let levels = distinct(fc.var().as_tensor());
        assert!(levels.len() <= 4 && levels.contains(&0.0), "{levels:?}");
        // An optimizer-like update that moves every weight differently.
        let noise: Vec<f32> = (0..128).map(|i| (i as f32 * 0.37).sin() * 0.01).collect();
        let noise = Tensor::from_vec(noise.clone(), (8, 16), fc.var().device()).unwrap();
        fc.var()
            .set(&(fc.var().as_tensor() + &noise).unwrap())
            .unwrap();
        shared.project(&model).unwrap();
        let after = values();
        let noise = noise.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Each cluster moved by the mean of its members' updates; zeros stayed zero.
        for level in levels {
            let members: Vec<usize> = (0..128).filter(|&i| start[i] == level).collect();
            let mean = members.iter().map(|&i| noise[i]).sum::<f32>() / members.len() as f32;
            for &i in &members {
                let want = if level == 0.0 { 0.0 } else { level + mean };
                assert!(
                    (after[i] - want).abs() < 1e-6,
                    "weight {i}: {} vs {want}",
                    after[i]
                );
            }
        }
        assert!(distinct(fc.var().as_tensor()).len() <= 4);
        // The trained values are their own k-means codebook: quantizing them changes nothing.
        let shape = [8usize, 16];
        let (q, stats) = quantize_named("fc.weight", &after, &shape, &kmeans(4), 0, None).unwrap();
        assert_eq!(q.dequantized, after);
        assert_eq!(stats.noise, 0.0);
    }

    #[test]
    fn only_kmeans_can_share() {
        let arch = Architecture::from_json(&json!({"kind": "sequential", "input_shape": [4],
            "layers": [{"type": "linear", "name": "fc", "in_features": 4, "out_features": 2}]}))
        .unwrap();
        let model = Model::init(&arch, 0).unwrap();
        let m = Method::Nf4 { group_size: 64 };
        assert!(SharedWeights::new(&model, &HashSet::new(), &m, 0).is_err());
    }
}
