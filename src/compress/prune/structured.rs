//! Structured pruning (the `prune` op's `structured` method): removes whole output neurons
//! of linear layers (weight rows) and output channels of conv2d layers, ranked by the L1 or
//! L2 norm of their weights, and physically shrinks the network: the layer's weight and
//! bias, the batch norms that follow it (weight, bias, running mean and variance), and what
//! consumes its output — the next linear's input columns (a block of H·W columns per
//! channel after a conv → … → flatten; one column after global average pooling) or the
//! next conv's input channels. The returned architecture validates and loads.
//!
//! Which layers can shrink: top-level linear / conv2d layers whose output reaches the next
//! linear / conv2d through batch norms, ReLU, GELU, tanh, dropout, pooling and flatten only.
//! Skipped, with the reason: the layer producing the network output, layers inside a
//! `residual`, layers feeding a residual's add or a layer_norm, and layers followed by a
//! sigmoid (sigmoid(0) = 0.5, so a removed unit would not be equivalent to a zeroed one).
//! With these rules the shrunk network computes exactly what the original computes with the
//! removed units zeroed (weight row, bias and the following batch norms' weight and bias).
//!
//! Counts: `round_half_even(s · units)` units per layer (`s` = the layer's override, or the
//! sparsity in `layer` scope). In `global` scope the non-overridden layers' units are ranked
//! together by their norm divided by their layer's mean unit norm (raw norms of layers with
//! different fan-in are not comparable), and the `round_half_even(s · total units)` lowest
//! are removed. Ties: the lower unit index (then the earlier layer) is removed first. All
//! norms are computed on the input weights, before any layer shrinks. A layer that would
//! lose every unit is refused.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::Value;

use crate::compress::engine::sequential::arch::{Architecture, Layer};
use crate::compress::formats::safetensors::NamedTensor;
use crate::compress::prune::{prune_count, PruneTargets, Scope};
use crate::compress::select::glob_match;
use crate::compress::{Error, Result};

/// What happened to one shrunk layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StructuredReport {
    /// Full layer name (`fc1`, `0`).
    pub layer: String,
    /// Its weight tensor.
    pub tensor: String,
    /// Output units (neurons / channels) before.
    pub units_before: usize,
    /// Output units after.
    pub units_after: usize,
    /// Number of units removed.
    pub removed: usize,
    /// Their indices in the original layer, ascending.
    pub removed_units: Vec<usize>,
    /// The norm they were ranked by (1 or 2).
    pub norm: u8,
}

/// The shrunk network.
#[derive(Debug, Clone)]
pub struct StructuredOutput {
    /// The new architecture (validated).
    pub architecture: Architecture,
    /// The new weights, in the input's order (unchanged tensors included).
    pub weights: Vec<NamedTensor>,
    /// One report per shrunk (or considered and kept) layer, in network order.
    pub layers: Vec<StructuredReport>,
    /// `(weight tensor, why)` for selected tensors that were not shrunk.
    pub skipped: Vec<(String, String)>,
}

/// How a unit's features are laid out downstream of the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repr {
    /// `[C, H, W]`: unit `u` is channel `u`.
    Channels,
    /// `[F]`: unit `u` is features `u·block .. (u+1)·block`.
    Flat { block: usize },
}

/// Who reads the layer's units.
#[derive(Debug, Clone)]
struct Chain {
    /// `(layer index, full name, block)` of each batch norm on the way.
    norms: Vec<(usize, String, usize)>,
    /// `(layer index, full name, block, is_conv)` of the consumer.
    consumer: (usize, String, usize, bool),
}

/// A layer to shrink.
#[derive(Debug, Clone)]
struct Candidate {
    index: usize,
    full: String,
    tensor: String,
    units: usize,
    chain: Chain,
    /// Per-unit norms.
    norms: Vec<f64>,
    /// The override's pattern and sparsity, if one matches.
    own: Option<(String, f64)>,
}

fn full_name(layer: &Layer, index: usize) -> String {
    layer
        .name()
        .map_or_else(|| index.to_string(), str::to_owned)
}

/// Follows the output of top-level layer `i` to its consumer, or says why it cannot shrink.
fn chain(arch: &Architecture, i: usize) -> std::result::Result<Chain, String> {
    let layers = arch.layers();
    let summary = arch.summary();
    let mut repr = match &layers[i] {
        Layer::Conv2d { .. } => Repr::Channels,
        _ if summary[i].output_shape.len() == 1 => Repr::Flat { block: 1 },
        _ => {
            return Err(format!(
                "the linear layer has a multi-dimensional output {:?}; only [features] outputs can shrink",
                summary[i].output_shape
            ))
        }
    };
    let mut norms = Vec::new();
    for (j, layer) in layers.iter().enumerate().skip(i + 1) {
        let full = full_name(layer, j);
        match (layer, repr) {
            (Layer::BatchNorm2d { .. }, Repr::Channels) => norms.push((j, full, 1)),
            (Layer::BatchNorm1d { .. }, Repr::Flat { block }) => norms.push((j, full, block)),
            (Layer::Relu { .. } | Layer::Gelu { .. } | Layer::Tanh { .. } | Layer::Dropout { .. }, _) => {}
            (
                Layer::MaxPool2d { .. } | Layer::AvgPool2d { .. } | Layer::GlobalAvgPool2d { .. },
                Repr::Channels,
            ) => {}
            (Layer::Flatten { .. }, Repr::Channels) => {
                let before = &summary[j - 1].output_shape;
                let block = before.iter().skip(1).product();
                repr = Repr::Flat { block };
            }
            (Layer::Flatten { .. }, Repr::Flat { .. }) => {}
            (Layer::Linear { .. }, Repr::Flat { block }) => {
                return Ok(Chain {
                    norms,
                    consumer: (j, full, block, false),
                })
            }
            (Layer::Conv2d { .. }, Repr::Channels) => {
                return Ok(Chain {
                    norms,
                    consumer: (j, full, 1, true),
                })
            }
            (Layer::Sigmoid { .. }, _) => {
                return Err(format!(
                    "it is followed by sigmoid layer {full}: sigmoid(0) = 0.5, so removed units would shift the next layer's input"
                ))
            }
            (Layer::LayerNorm { .. }, _) => {
                return Err(format!(
                    "its output feeds layer_norm {full}, which normalises over all units"
                ))
            }
            (Layer::Residual { .. }, _) => {
                return Err(format!(
                    "its output feeds residual block {full}, whose add needs the width unchanged"
                ))
            }
            (other, _) => {
                return Err(format!(
                    "its output reaches {} layer {full} in a layout structured pruning cannot follow",
                    other.type_name()
                ))
            }
        }
    }
    Err("it produces the network output".to_owned())
}

/// Per-row L1 or L2 norms of a `[rows, ...]` tensor.
fn row_norms(t: &NamedTensor, norm: u8) -> Vec<f64> {
    let rows = t.shape.first().copied().unwrap_or(0);
    let len = t.values.len().checked_div(rows).unwrap_or(0);
    t.values
        .chunks(len.max(1))
        .take(rows)
        .map(|row| {
            if norm == 1 {
                row.iter().map(|&v| f64::from(v.abs())).sum()
            } else {
                row.iter()
                    .map(|&v| f64::from(v) * f64::from(v))
                    .sum::<f64>()
                    .sqrt()
            }
        })
        .collect()
}

/// Keeps the `keep` indices of `axis` (ascending) of a row-major tensor.
fn take_axis(t: &mut NamedTensor, axis: usize, keep: &[usize]) -> Result<()> {
    let dim = *t
        .shape
        .get(axis)
        .ok_or_else(|| Error::Internal(format!("tensor {} has no axis {axis}", t.name)))?;
    let outer: usize = t.shape[..axis].iter().product();
    let inner: usize = t.shape[axis + 1..].iter().product();
    if t.values.len() != outer * dim * inner || keep.iter().any(|&k| k >= dim) {
        return Err(Error::Internal(format!(
            "cannot take {} of {dim} along axis {axis} of {} {:?}",
            keep.len(),
            t.name,
            t.shape
        )));
    }
    let mut values = Vec::with_capacity(outer * keep.len() * inner);
    for o in 0..outer {
        for &k in keep {
            let s = (o * dim + k) * inner;
            values.extend_from_slice(&t.values[s..s + inner]);
        }
    }
    t.values = values;
    t.shape[axis] = keep.len();
    Ok(())
}

/// Unit indices expanded to feature indices (`block` consecutive features per unit).
fn expand(units: &[usize], block: usize) -> Vec<usize> {
    units
        .iter()
        .flat_map(|&u| u * block..(u + 1) * block)
        .collect()
}

/// Removes whole output units of the selected linear / conv2d weights (module docs).
/// `selected` names weight tensors (`fc1.weight`); `norm` is 1 or 2.
pub fn prune_structured(
    arch: &Architecture,
    weights: Vec<NamedTensor>,
    selected: &[String],
    targets: &PruneTargets,
    norm: u8,
) -> Result<StructuredOutput> {
    targets.validate()?;
    if norm != 1 && norm != 2 {
        return Err(Error::InvalidParameter {
            field: "norm".into(),
            detail: format!("norm must be 1 or 2, got {norm}"),
        });
    }
    let layers = arch.layers();
    let by_name: HashMap<&str, usize> = weights
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let params = arch.parameters();
    let mut skipped = Vec::new();
    let mut candidates = Vec::new();
    let mut seen = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let full = full_name(layer, i);
        let tensor = format!("{full}.weight");
        if !selected.contains(&tensor) {
            continue;
        }
        seen.push(tensor.clone());
        let units = match layer {
            Layer::Linear { out_features, .. } => *out_features,
            Layer::Conv2d { out_channels, .. } => *out_channels,
            other => {
                skipped.push((
                    tensor,
                    format!(
                        "it belongs to {} layer {full}; only linear and conv2d layers shrink",
                        other.type_name()
                    ),
                ));
                continue;
            }
        };
        match chain(arch, i) {
            Err(why) => skipped.push((tensor, why)),
            Ok(chain) => {
                let w = by_name
                    .get(tensor.as_str())
                    .map(|&k| &weights[k])
                    .ok_or_else(|| {
                        Error::ArchitectureMismatch(format!("missing tensors: {tensor}"))
                    })?;
                let own = targets
                    .overrides
                    .iter()
                    .find(|(p, _)| glob_match(p, &tensor))
                    .cloned();
                candidates.push(Candidate {
                    index: i,
                    full,
                    norms: row_norms(w, norm),
                    tensor,
                    units,
                    chain,
                    own,
                });
            }
        }
    }
    for name in selected {
        if seen.contains(name) {
            continue;
        }
        let why = match params.iter().find(|p| &p.name == name) {
            Some(p) if p.layer.contains('.') => format!(
                "layer {} is inside a residual block, whose add needs the width unchanged",
                p.layer
            ),
            Some(p) => format!(
                "it is not the weight of a linear or conv2d layer (layer {})",
                p.layer
            ),
            None => "it is not a parameter of the architecture".to_owned(),
        };
        skipped.push((name.clone(), why));
    }

    let removals = choose_units(&candidates, targets)?;
    apply(arch, weights, &candidates, &removals, norm, skipped)
}

/// The units to remove from each candidate (ascending indices).
fn choose_units(candidates: &[Candidate], targets: &PruneTargets) -> Result<Vec<Vec<usize>>> {
    let mut removals = vec![Vec::new(); candidates.len()];
    let mut pooled: Vec<(f64, usize, usize)> = Vec::new();
    let mut pooled_units = 0u64;
    for (c, cand) in candidates.iter().enumerate() {
        let own = match (&cand.own, targets.scope) {
            (Some((_, s)), _) => Some(*s),
            (None, Scope::Layer) => Some(targets.sparsity),
            (None, Scope::Global) => None,
        };
        match own {
            Some(s) => {
                let r = prune_count(s, cand.units as u64) as usize;
                let mut order: Vec<usize> = (0..cand.units).collect();
                order.sort_by(|&a, &b| cand.norms[a].total_cmp(&cand.norms[b]).then(a.cmp(&b)));
                removals[c] = order[..r].to_vec();
            }
            None => {
                let mean = cand.norms.iter().sum::<f64>() / cand.units.max(1) as f64;
                for (u, &n) in cand.norms.iter().enumerate() {
                    let score = if mean > 0.0 { n / mean } else { 0.0 };
                    pooled.push((score, u, c));
                }
                pooled_units += cand.units as u64;
            }
        }
    }
    let r = prune_count(targets.sparsity, pooled_units) as usize;
    pooled.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    for &(_, u, c) in &pooled[..r] {
        removals[c].push(u);
    }
    for (c, cand) in candidates.iter().enumerate() {
        removals[c].sort_unstable();
        if removals[c].len() >= cand.units {
            let (field, s) = match &cand.own {
                Some((p, s)) => (format!("layers[{p}]"), *s),
                None => ("sparsity".to_owned(), targets.sparsity),
            };
            return Err(Error::invalid(
                field,
                format!(
                    "structured pruning at sparsity {s} would remove all {} units of layer {} ({}); lower the sparsity or exclude it",
                    cand.units, cand.full, cand.tensor
                ),
            ));
        }
    }
    Ok(removals)
}

fn apply(
    arch: &Architecture,
    mut weights: Vec<NamedTensor>,
    candidates: &[Candidate],
    removals: &[Vec<usize>],
    norm: u8,
    skipped: Vec<(String, String)>,
) -> Result<StructuredOutput> {
    let mut doc = arch.to_json();
    let index: HashMap<String, usize> = weights
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    let mut reports = Vec::new();
    for (cand, removed) in candidates.iter().zip(removals) {
        let keep: Vec<usize> = (0..cand.units)
            .filter(|u| removed.binary_search(u).is_err())
            .collect();
        reports.push(StructuredReport {
            layer: cand.full.clone(),
            tensor: cand.tensor.clone(),
            units_before: cand.units,
            units_after: keep.len(),
            removed: removed.len(),
            removed_units: removed.clone(),
            norm,
        });
        if removed.is_empty() {
            continue;
        }
        let mut take = |name: String, axis: usize, keep: &[usize], required: bool| -> Result<()> {
            match index.get(&name) {
                Some(&k) => take_axis(&mut weights[k], axis, keep),
                None if required => Err(Error::ArchitectureMismatch(format!(
                    "missing tensors: {name}"
                ))),
                None => Ok(()),
            }
        };
        take(format!("{}.weight", cand.full), 0, &keep, true)?;
        take(format!("{}.bias", cand.full), 0, &keep, false)?;
        let field = if matches!(arch.layers()[cand.index], Layer::Conv2d { .. }) {
            "out_channels"
        } else {
            "out_features"
        };
        set(&mut doc, cand.index, field, keep.len());
        for (j, full, block) in &cand.chain.norms {
            let cols = expand(&keep, *block);
            for suffix in ["weight", "bias", "running_mean", "running_var"] {
                take(format!("{full}.{suffix}"), 0, &cols, true)?;
            }
            set(&mut doc, *j, "num_features", cols.len());
        }
        let (j, full, block, is_conv) = &cand.chain.consumer;
        let cols = expand(&keep, *block);
        take(format!("{full}.weight"), 1, &cols, true)?;
        let field = if *is_conv {
            "in_channels"
        } else {
            "in_features"
        };
        set(&mut doc, *j, field, cols.len());
    }
    let architecture = Architecture::from_json(&doc).map_err(|e| {
        Error::Internal(format!(
            "structured pruning built an invalid architecture: {e}"
        ))
    })?;
    Ok(StructuredOutput {
        architecture,
        weights,
        layers: reports,
        skipped,
    })
}

fn set(doc: &mut Value, layer: usize, field: &str, value: usize) {
    if let Some(obj) = doc
        .get_mut("layers")
        .and_then(|l| l.get_mut(layer))
        .and_then(Value::as_object_mut)
    {
        obj.insert(field.to_owned(), Value::from(value));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use serde_json::json;

    use super::*;
    use crate::compress::engine::sequential::model::Model;
    use crate::compress::formats::safetensors::{encode_f32, serialize, Dtype, TensorSpec};

    fn conv_net() -> Architecture {
        Architecture::from_json(&json!({"kind":"sequential","input_shape":[2,8,8],"layers":[
            {"type":"conv2d","name":"c1","in_channels":2,"out_channels":6,"kernel_size":3,"padding":1},
            {"type":"batch_norm2d","name":"bn1","num_features":6},
            {"type":"relu"},
            {"type":"max_pool2d","kernel_size":2},
            {"type":"conv2d","name":"c2","in_channels":6,"out_channels":5,"kernel_size":3,"padding":1},
            {"type":"relu"},
            {"type":"avg_pool2d","kernel_size":2},
            {"type":"flatten"},
            {"type":"linear","name":"fc1","in_features":20,"out_features":7},
            {"type":"batch_norm1d","name":"bn2","num_features":7},
            {"type":"gelu"},
            {"type":"dropout","p":0.3},
            {"type":"linear","name":"fc2","in_features":7,"out_features":3}]}))
        .unwrap()
    }

    fn mlp() -> Architecture {
        Architecture::from_json(&json!({"kind":"sequential","input_shape":[1,4,4],"layers":[
            {"type":"flatten"},
            {"type":"linear","name":"fc1","in_features":16,"out_features":12},
            {"type":"relu"},
            {"type":"linear","name":"fc2","in_features":12,"out_features":10},
            {"type":"tanh"},
            {"type":"linear","name":"fc3","in_features":10,"out_features":4}]}))
        .unwrap()
    }

    /// Random weights, with non-trivial batch-norm statistics.
    fn weights(arch: &Architecture, seed: u64) -> Vec<NamedTensor> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        arch.init_weights(seed)
            .into_iter()
            .map(|(spec, mut values)| {
                if spec.name.ends_with("running_var") {
                    values.iter_mut().for_each(|v| *v = rng.gen_range(0.5..2.0));
                } else if spec.layer.starts_with("bn") {
                    values
                        .iter_mut()
                        .for_each(|v| *v = rng.gen_range(-1.0..1.0));
                }
                NamedTensor {
                    name: spec.name,
                    shape: spec.shape,
                    values,
                }
            })
            .collect()
    }

    fn input(arch: &Architecture, batch: usize) -> Tensor {
        let per: usize = arch.input_shape().iter().product();
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        let v: Vec<f32> = (0..batch * per).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut shape = vec![batch];
        shape.extend_from_slice(arch.input_shape());
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The original weights with the removed units zeroed (row, bias, chain batch norms).
    fn masked(
        arch: &Architecture,
        w: &[NamedTensor],
        reports: &[StructuredReport],
    ) -> Vec<NamedTensor> {
        let mut w = w.to_vec();
        let idx = |w: &[NamedTensor], n: &str| w.iter().position(|t| t.name == n);
        for r in reports {
            let i = arch
                .layers()
                .iter()
                .enumerate()
                .position(|(j, l)| full_name(l, j) == r.layer)
                .unwrap();
            let chain = chain(arch, i).unwrap();
            for &u in &r.removed_units {
                let k = idx(&w, &format!("{}.weight", r.layer)).unwrap();
                let row = w[k].values.len() / w[k].shape[0];
                w[k].values[u * row..(u + 1) * row]
                    .iter_mut()
                    .for_each(|v| *v = 0.0);
                if let Some(k) = idx(&w, &format!("{}.bias", r.layer)) {
                    w[k].values[u] = 0.0;
                }
                for (_, bn, block) in &chain.norms {
                    for s in ["weight", "bias"] {
                        let k = idx(&w, &format!("{bn}.{s}")).unwrap();
                        w[k].values[u * block..(u + 1) * block]
                            .iter_mut()
                            .for_each(|v| *v = 0.0);
                    }
                }
            }
        }
        w
    }

    fn assert_close(a: &Tensor, b: &Tensor) {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 * scale, "{x} vs {y}");
        }
    }

    fn bytes_of(w: &[NamedTensor]) -> usize {
        let data: Vec<Vec<u8>> = w.iter().map(|t| encode_f32(&t.values)).collect();
        let pairs: Vec<(TensorSpec, &[u8])> = w
            .iter()
            .zip(&data)
            .map(|(t, d)| {
                (
                    TensorSpec::new(t.name.clone(), Dtype::F32, t.shape.clone()),
                    d.as_slice(),
                )
            })
            .collect();
        serialize(&BTreeMap::new(), &pairs).unwrap().len()
    }

    fn sel(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn targets(s: f64, scope: Scope) -> PruneTargets {
        PruneTargets {
            sparsity: s,
            scope,
            overrides: vec![],
        }
    }

    fn check_equivalent(arch: &Architecture, w: Vec<NamedTensor>, out: &StructuredOutput) {
        let x = input(arch, 5);
        let shrunk = Model::new(&out.architecture, out.weights.clone()).unwrap();
        let reference = Model::new(arch, masked(arch, &w, &out.layers)).unwrap();
        assert_close(
            &shrunk.forward_eval(&x).unwrap(),
            &reference.forward_eval(&x).unwrap(),
        );
        assert!(out.architecture.flops() < arch.flops());
        assert!(out.architecture.parameter_count() < arch.parameter_count());
        assert!(bytes_of(&out.weights) < bytes_of(&w));
        // The new architecture round-trips through its JSON.
        assert_eq!(
            Architecture::from_json(&out.architecture.to_json()).unwrap(),
            out.architecture
        );
    }

    #[test]
    fn conv_net_shrinks_and_matches_the_masked_original() {
        let arch = conv_net();
        let w = weights(&arch, 1);
        let out = prune_structured(
            &arch,
            w.clone(),
            &sel(&["c1.weight", "c2.weight", "fc1.weight", "fc2.weight"]),
            &targets(0.4, Scope::Layer),
            2,
        )
        .unwrap();
        let counts: Vec<(&str, usize, usize)> = out
            .layers
            .iter()
            .map(|r| (r.layer.as_str(), r.units_before, r.units_after))
            .collect();
        // round(0.4·6) = 2, round(0.4·5) = 2, round(0.4·7) = 3.
        assert_eq!(counts, [("c1", 6, 4), ("c2", 5, 3), ("fc1", 7, 4)]);
        assert_eq!(out.skipped.len(), 1);
        assert_eq!(out.skipped[0].0, "fc2.weight");
        assert!(out.skipped[0].1.contains("network output"));
        let doc = out.architecture.to_json();
        assert_eq!(doc["layers"][8]["in_features"], 12); // 3 channels · 2·2
        assert_eq!(doc["layers"][1]["num_features"], 4);
        // The removed units are those with the smallest L2 norms.
        let c1 = &w[0];
        let norms = row_norms(c1, 2);
        let max_removed = out.layers[0]
            .removed_units
            .iter()
            .map(|&u| norms[u])
            .fold(0.0, f64::max);
        for (u, &n) in norms.iter().enumerate() {
            if !out.layers[0].removed_units.contains(&u) {
                assert!(n >= max_removed);
            }
        }
        check_equivalent(&arch, w, &out);
    }

    #[test]
    fn global_pool_before_flatten_uses_one_column_per_channel() {
        let arch =
            Architecture::from_json(&json!({"kind":"sequential","input_shape":[3,6,6],"layers":[
            {"type":"conv2d","name":"c","in_channels":3,"out_channels":8,"kernel_size":3},
            {"type":"batch_norm2d","name":"bn","num_features":8},
            {"type":"relu"},
            {"type":"global_avg_pool2d"},
            {"type":"flatten"},
            {"type":"linear","name":"fc","in_features":8,"out_features":2}]}))
            .unwrap();
        let w = weights(&arch, 2);
        let out = prune_structured(
            &arch,
            w.clone(),
            &sel(&["c.weight"]),
            &targets(0.5, Scope::Global),
            1,
        )
        .unwrap();
        assert_eq!(out.layers[0].units_after, 4);
        assert_eq!(out.architecture.to_json()["layers"][5]["in_features"], 4);
        check_equivalent(&arch, w, &out);
    }

    #[test]
    fn mlp_global_scope_shrinks_and_matches() {
        let arch = mlp();
        let w = weights(&arch, 3);
        let out = prune_structured(
            &arch,
            w.clone(),
            &sel(&["fc1.weight", "fc2.weight"]),
            &targets(0.3, Scope::Global),
            1,
        )
        .unwrap();
        let removed: usize = out.layers.iter().map(|r| r.removed).sum();
        assert_eq!(removed, 7); // round(0.3 · 22) = 7, shared by rank
        check_equivalent(&arch, w.clone(), &out);
        // An override takes a layer out of the global ranking.
        let tg = PruneTargets {
            sparsity: 0.0,
            scope: Scope::Global,
            overrides: vec![("fc2.*".into(), 0.5)],
        };
        let out = prune_structured(&arch, w, &sel(&["fc1.weight", "fc2.weight"]), &tg, 2).unwrap();
        assert_eq!((out.layers[0].removed, out.layers[1].removed), (0, 5));
    }

    #[test]
    fn skips_what_cannot_shrink_with_reasons() {
        let arch =
            Architecture::from_json(&json!({"kind":"sequential","input_shape":[8],"layers":[
            {"type":"linear","name":"a","in_features":8,"out_features":8},
            {"type":"residual","name":"res","layers":[
                {"type":"linear","name":"in","in_features":8,"out_features":8},
                {"type":"relu"}]},
            {"type":"linear","name":"b","in_features":8,"out_features":6},
            {"type":"layer_norm","name":"ln","normalized_shape":6},
            {"type":"linear","name":"c","in_features":6,"out_features":6},
            {"type":"sigmoid"},
            {"type":"linear","name":"d","in_features":6,"out_features":2}]}))
            .unwrap();
        let w = weights(&arch, 4);
        let out = prune_structured(
            &arch,
            w.clone(),
            &sel(&[
                "a.weight",
                "res.in.weight",
                "b.weight",
                "c.weight",
                "d.weight",
                "ln.weight",
            ]),
            &targets(0.5, Scope::Layer),
            2,
        )
        .unwrap();
        assert!(out.layers.is_empty());
        let why: HashMap<&str, &str> = out
            .skipped
            .iter()
            .map(|(t, w)| (t.as_str(), w.as_str()))
            .collect();
        assert!(why["a.weight"].contains("residual"));
        assert!(why["res.in.weight"].contains("inside a residual"));
        assert!(why["b.weight"].contains("layer_norm"));
        assert!(why["c.weight"].contains("sigmoid"));
        assert!(why["d.weight"].contains("network output"));
        assert!(why["ln.weight"].contains("only linear and conv2d"));
        assert_eq!(out.weights, w);
        assert_eq!(out.architecture, arch);
    }

    #[test]
    fn refuses_removing_every_unit_and_bad_parameters() {
        let arch = mlp();
        let w = weights(&arch, 5);
        let tg = PruneTargets {
            sparsity: 0.1,
            scope: Scope::Layer,
            overrides: vec![("fc1.weight".into(), 0.99)],
        };
        match prune_structured(&arch, w.clone(), &sel(&["fc1.weight"]), &tg, 2) {
            Err(Error::InvalidParameter {
                field: pointer,
                detail,
            }) => {
                assert_eq!(pointer, "layers[fc1.weight]");
                assert!(detail.contains("all 12 units"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
        let e = prune_structured(
            &arch,
            w.clone(),
            &sel(&["fc1.weight"]),
            &targets(0.5, Scope::Layer),
            3,
        )
        .unwrap_err();
        assert_eq!(e.field(), Some("norm"));
        let e = prune_structured(
            &arch,
            w,
            &sel(&["fc1.weight"]),
            &targets(1.0, Scope::Layer),
            2,
        )
        .unwrap_err();
        assert_eq!(e.field(), Some("sparsity"));
    }

    #[test]
    fn take_axis_keeps_the_right_slices() {
        let mut t = NamedTensor {
            name: "w".into(),
            shape: vec![2, 3, 2],
            values: (0..12).map(|v| v as f32).collect(),
        };
        take_axis(&mut t, 1, &[0, 2]).unwrap();
        assert_eq!(t.shape, [2, 2, 2]);
        assert_eq!(t.values, [0.0, 1.0, 4.0, 5.0, 6.0, 7.0, 10.0, 11.0]);
        assert_eq!(expand(&[1, 3], 2), [2, 3, 6, 7]);
    }
}
