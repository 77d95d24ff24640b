//! Static activation quantization, simulated: calibrate an integer range for the input of
//! every top-level `linear` / `conv2d` layer on a seeded sample of a dataset, then run the
//! network with those inputs fake-quantized (`x̂ = (clamp(round(x / s) + z, 0, 2^b − 1) − z) · s`).
//!
//! The ranges travel with the model in the safetensors metadata key
//! [`METADATA_KEY`] (`whittle.activations`), so any later evaluation of the file simulates
//! the same integer inputs. Calibration methods: `minmax` (observed range), `percentile`
//! (the `p`-th and `(100 − p)`-th percentiles, ignoring outliers) and `mse` (the clipping of
//! the observed range that minimises the squared error of the fake-quantized values).

use std::sync::Arc;

use candle_core::Tensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::compress::engine::data::{Dataset, Subset};
use crate::compress::engine::sequential::model::ActivationTransform;
use crate::compress::engine::{LayerInput, Network};
use crate::compress::progress::Ctx;
use crate::compress::quant::Importance;
use crate::compress::{Error, Result};

/// Metadata key carrying the calibrated ranges of a model file.
pub const METADATA_KEY: &str = "whittle.activations";

/// Values kept per layer for calibration (a uniform subsample beyond this).
const MAX_VALUES_PER_LAYER: usize = 4 << 20;

/// How a range is chosen from the observed activations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Calibration {
    /// Observed min and max.
    MinMax,
    /// The `p`-th percentile (and `100 − p`-th for the low end), `p` in (50, 100].
    Percentile(f64),
    /// The clipping that minimises the mean squared quantization error.
    Mse,
}

impl Calibration {
    /// API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MinMax => "minmax",
            Self::Percentile(_) => "percentile",
            Self::Mse => "mse",
        }
    }
}

/// Parameters of activation quantization.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActivationParams {
    /// Bits per activation (2–8).
    pub bits: u8,
    /// Symmetric (zero-point at the middle code) or affine.
    pub symmetric: bool,
    /// Range selection.
    pub calibration: Calibration,
    /// Calibration samples drawn from the dataset.
    pub samples: usize,
    /// Seed of the sample draw.
    pub seed: u64,
}

/// The integer range of one layer's input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerRange {
    /// Top-level layer index.
    pub index: usize,
    /// Layer name (its `name`, or its index).
    pub layer: String,
    /// Observed minimum over the calibration set.
    pub observed_min: f32,
    /// Observed maximum.
    pub observed_max: f32,
    /// Chosen (clipped) low end.
    pub min: f32,
    /// Chosen high end.
    pub max: f32,
    /// Step between codes.
    pub scale: f32,
    /// The code of 0.0.
    pub zero_point: i32,
    /// Bits.
    pub bits: u8,
    /// MSE of the fake-quantized calibration values.
    pub mse: f64,
}

/// What [`calibrate`] returns: the ranges and the sample indices used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibrated {
    /// Calibration method (API spelling).
    pub method: String,
    /// One entry per top-level linear / conv layer.
    pub layers: Vec<LayerRange>,
    /// Dataset rows used, in draw order.
    pub indices: Vec<usize>,
}

/// The range `[lo, hi]` (widened to hold 0) as scale and zero point for `bits`.
fn scale_zero(lo: f32, hi: f32, bits: u8, symmetric: bool) -> (f32, i32) {
    let qmax = ((1u32 << bits) - 1) as f32;
    if symmetric {
        let amax = lo.abs().max(hi.abs());
        let half = ((1u32 << (bits - 1)) - 1) as f32;
        let scale = if amax > 0.0 { amax / half } else { 1.0 };
        (scale, 1 << (bits - 1))
    } else {
        let (lo, hi) = (lo.min(0.0), hi.max(0.0));
        let scale = if hi > lo { (hi - lo) / qmax } else { 1.0 };
        let zero = (-lo / scale).round().clamp(0.0, qmax) as i32;
        (scale, zero)
    }
}

/// Fake-quantize one value.
fn fake(x: f32, scale: f32, zero: i32, bits: u8) -> f32 {
    let qmax = ((1u32 << bits) - 1) as f32;
    ((x / scale).round() + zero as f32).clamp(0.0, qmax) * scale - zero as f32 * scale
}

fn mse_of(values: &[f32], scale: f32, zero: i32, bits: u8) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values
        .iter()
        .map(|&x| {
            let d = (fake(x, scale, zero, bits) - x) as f64;
            d * d
        })
        .sum::<f64>()
        / values.len() as f64
}

/// Choose the range of one layer's observed values.
fn choose(values: &mut [f32], p: &ActivationParams) -> (f32, f32, f32, f32) {
    let observed_min = values.iter().copied().fold(f32::INFINITY, f32::min);
    let observed_max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let (lo, hi) = match p.calibration {
        Calibration::MinMax => (observed_min, observed_max),
        Calibration::Percentile(pct) => {
            let n = values.len();
            let rank = |q: f64| ((q / 100.0) * (n - 1) as f64).round() as usize;
            let hi_i = rank(pct).min(n - 1);
            let lo_i = rank(100.0 - pct).min(n - 1);
            let (_, hi, _) = values.select_nth_unstable_by(hi_i, f32::total_cmp);
            let hi = *hi;
            let (_, lo, _) = values.select_nth_unstable_by(lo_i, f32::total_cmp);
            (*lo, hi)
        }
        Calibration::Mse => {
            let mut best = (f64::INFINITY, observed_min, observed_max);
            for step in 0..=60 {
                let r = 1.0 - step as f32 * 0.0125; // 1.0 down to 0.25
                let (lo, hi) = (observed_min * r, observed_max * r);
                let (s, z) = scale_zero(lo, hi, p.bits, p.symmetric);
                let e = mse_of(values, s, z, p.bits);
                if e < best.0 {
                    best = (e, lo, hi);
                }
            }
            (best.1, best.2)
        }
    };
    (observed_min, observed_max, lo, hi)
}

/// Calibrate the input range of every top-level linear / conv layer of `model` on a seeded
/// sample of `data`'s rows.
pub fn calibrate(
    model: &dyn Network,
    data: &Dataset,
    params: &ActivationParams,
    ctx: &Ctx,
) -> Result<Calibrated> {
    if !(2..=8).contains(&params.bits) {
        return Err(Error::InvalidParameter {
            field: "activations.bits".into(),
            detail: format!("must be in [2, 8], got {}", params.bits),
        });
    }
    if params.samples == 0 {
        return Err(Error::InvalidParameter {
            field: "activations.calibration.samples".into(),
            detail: "must be at least 1".into(),
        });
    }
    let indices = calibration_draw(data, params.samples, params.seed);
    let subset = Subset {
        dataset: data,
        indices: indices.clone(),
    };
    // (layer index, layer name, sampled input values), in the order the network runs them.
    let mut collected: Vec<(usize, String, Vec<f32>)> = Vec::new();
    for batch in subset.batches(256) {
        ctx.check()?;
        let batch = batch?;
        model.forward_probed(&batch, &mut |input: LayerInput<'_>| {
            let slot = slot_of(&mut collected, &input, Vec::new);
            let values = input.x.flatten_all()?.to_vec1::<f32>()?;
            let kept = &mut collected[slot].2;
            let room = MAX_VALUES_PER_LAYER.saturating_sub(kept.len());
            let stride = values.len().div_ceil(room.max(1)).max(1);
            kept.extend(values.iter().step_by(stride).take(room));
            Ok(())
        })?;
    }
    let mut out = Vec::with_capacity(collected.len());
    for (index, layer, mut values) in collected {
        if values.is_empty() {
            continue;
        }
        let (observed_min, observed_max, lo, hi) = choose(&mut values, params);
        let (scale, zero_point) = scale_zero(lo, hi, params.bits, params.symmetric);
        out.push(LayerRange {
            index,
            layer,
            observed_min,
            observed_max,
            min: lo,
            max: hi,
            scale,
            zero_point,
            bits: params.bits,
            mse: mse_of(&values, scale, zero_point, params.bits),
        });
    }
    Ok(Calibrated {
        method: params.calibration.as_str().into(),
        layers: out,
        indices,
    })
}

/// The index of `input`'s layer in `slots`, appending a new slot made by `fresh` the first
/// time the layer is seen (so slots follow the network's order).
fn slot_of<T>(
    slots: &mut Vec<(usize, String, T)>,
    input: &LayerInput<'_>,
    fresh: impl FnOnce() -> T,
) -> usize {
    match slots.iter().position(|(_, name, _)| name == input.layer) {
        Some(i) => i,
        None => {
            slots.push((input.index, input.layer.to_string(), fresh()));
            slots.len() - 1
        }
    }
}

/// The seeded draw of `samples` calibration samples (all of them when there are fewer).
fn calibration_draw(data: &Dataset, samples: usize, seed: u64) -> Vec<usize> {
    let mut indices: Vec<usize> = (0..data.samples).collect();
    indices.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    indices.truncate(samples.min(data.samples));
    indices
}

/// Per-column importance of each top-level linear / conv2d weight for `uniform`'s search,
/// measured on a seeded draw of `samples` calibration samples: for a linear layer, the mean
/// square of each input feature; for a conv2d, each input channel's mean square over samples
/// and positions, repeated over the kernel window (a weight row is in_channels × kh × kw,
/// channel-major). Keys are the weights' tensor names; also returns the drawn indices.
/// Layers inside residual blocks are not measured.
pub fn input_importance(
    model: &dyn Network,
    data: &Dataset,
    samples: usize,
    seed: u64,
    ctx: &Ctx,
) -> Result<(Importance, Vec<usize>)> {
    if samples == 0 {
        return Err(Error::InvalidParameter {
            field: "importance.samples".into(),
            detail: "must be at least 1".into(),
        });
    }
    let indices = calibration_draw(data, samples, seed);
    let subset = Subset {
        dataset: data,
        indices: indices.clone(),
    };
    // (layer index, layer name, (Σx² per input channel, values counted, kernel window)).
    type Sums = (Vec<f64>, usize, usize);
    let mut sums: Vec<(usize, String, Sums)> = Vec::new();
    for batch in subset.batches(256) {
        ctx.check()?;
        let batch = batch?;
        model.forward_probed(&batch, &mut |input: LayerInput<'_>| {
            let slot = slot_of(&mut sums, &input, || (Vec::new(), 0, input.window));
            let x = input.x;
            // Linear: [batch, features]; conv2d: [batch, channels, h, w].
            let (squares, n) = match x.dims() {
                [b, _] => (x.sqr()?.sum(0)?, *b),
                [b, _, h, w] => (x.sqr()?.sum(0)?.sum(1)?.sum(1)?, b * h * w),
                dims => {
                    return Err(Error::Internal(format!(
                        "input of layer {} has shape {dims:?}",
                        input.layer
                    )))
                }
            };
            let squares = squares.to_vec1::<f32>()?;
            let (acc, count, _) = &mut sums[slot].2;
            acc.resize(squares.len(), 0.0);
            for (a, v) in acc.iter_mut().zip(squares) {
                *a += f64::from(v);
            }
            *count += n;
            Ok(())
        })?;
    }
    let mut out = Importance::new();
    for (_, layer, (sum, count, window)) in sums {
        let n = count.max(1) as f64;
        let per_channel = sum.iter().map(|s| (s / n) as f32);
        let row: Vec<f32> = per_channel
            .flat_map(|v| std::iter::repeat_n(v, window))
            .collect();
        out.insert(format!("{layer}.weight"), row);
    }
    Ok((out, indices))
}

/// The transform that fake-quantizes each calibrated layer's input.
pub fn transform(ranges: &[LayerRange]) -> ActivationTransform {
    let ranges: Vec<LayerRange> = ranges.to_vec();
    ActivationTransform(Arc::new(move |i: usize, x: &Tensor| {
        let Some(r) = ranges.iter().find(|r| r.index == i) else {
            return Ok(None);
        };
        let qmax = ((1u32 << r.bits) - 1) as f64;
        let z = r.zero_point as f64;
        let s = r.scale as f64;
        // round() passes no gradient, so training through this sees the straight-through
        // gradient only inside the clamp.
        let q = (x.affine(1.0 / s, 0.0)?.round()?.affine(1.0, z)?).clamp(0.0, qmax)?;
        Ok(Some(q.affine(s, -z * s)?))
    }))
}

/// The ranges stored in a file's metadata, if any.
pub fn from_metadata(
    metadata: &std::collections::BTreeMap<String, String>,
) -> Result<Option<Vec<LayerRange>>> {
    match metadata.get(METADATA_KEY) {
        None => Ok(None),
        Some(json) => serde_json::from_str(json).map(Some).map_err(|e| {
            Error::InvalidSafetensors(format!("metadata {METADATA_KEY:?} is not valid: {e}"))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::engine::data::DatasetX;
    use crate::compress::engine::sequential::arch::Architecture;
    use crate::compress::engine::sequential::model::Model;
    use std::sync::atomic::AtomicBool;

    fn data(n: usize) -> Dataset {
        let x: Vec<f32> = (0..n * 8)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        Dataset {
            x: DatasetX::F32(x),
            feature_shape: vec![8],
            samples: n,
            y: Some((0..n as i64).map(|i| i % 3).collect()),
            num_classes: Some(3),
        }
    }

    fn mlp() -> Model {
        let arch = Architecture::from_json(
            &serde_json::json!({"kind":"sequential","input_shape":[8],"layers":[
            {"type":"linear","name":"fc1","in_features":8,"out_features":16},{"type":"relu"},
            {"type":"linear","name":"fc2","in_features":16,"out_features":3}]}),
        )
        .unwrap();
        Model::init(&arch, 1).unwrap()
    }

    fn params(calibration: Calibration) -> ActivationParams {
        ActivationParams {
            bits: 8,
            symmetric: false,
            calibration,
            samples: 50,
            seed: 4,
        }
    }

    #[test]
    fn ranges_cover_each_linear_input_and_the_simulation_is_close_at_8_bits() {
        let cancel = AtomicBool::new(false);
        let ctx = Ctx::new(&|_, _| {}, &cancel);
        let mut model = mlp();
        let d = data(100);
        let c = calibrate(&model, &d, &params(Calibration::MinMax), &ctx).unwrap();
        assert_eq!(c.layers.len(), 2);
        assert_eq!((c.layers[0].layer.as_str(), c.layers[1].index), ("fc1", 2));
        assert_eq!(c.indices.len(), 50);
        // Inputs of fc2 follow a ReLU: the range starts at 0 and the zero point is code 0.
        assert_eq!(c.layers[1].observed_min, 0.0);
        assert_eq!(c.layers[1].zero_point, 0);
        // Seeded: the same draw twice.
        let again = calibrate(&model, &d, &params(Calibration::MinMax), &ctx).unwrap();
        assert_eq!(c, again);
        let x = Subset::all(&d).batches(100).next().unwrap().unwrap().x;
        let float = model
            .forward_eval(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        model.set_activation_transform(Some(transform(&c.layers)));
        let sim = model
            .forward_eval(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let max_diff = float
            .iter()
            .zip(&sim)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max_diff > 0.0 && max_diff < 0.05, "{max_diff}");
        // At 2 bits the simulation is much further off.
        let mut p2 = params(Calibration::MinMax);
        p2.bits = 2;
        model.set_activation_transform(None);
        let c2 = calibrate(&model, &d, &p2, &ctx).unwrap();
        model.set_activation_transform(Some(transform(&c2.layers)));
        let sim2 = model
            .forward_eval(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let max2 = float
            .iter()
            .zip(&sim2)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max2 > 4.0 * max_diff, "{max2} vs {max_diff}");
    }

    #[test]
    fn percentile_and_mse_clip_outliers_and_never_raise_the_error() {
        let mut values: Vec<f32> = (0..10_000).map(|i| (i % 100) as f32 / 100.0).collect();
        values.push(50.0); // one outlier
        let p = |c| ActivationParams {
            bits: 4,
            symmetric: false,
            calibration: c,
            samples: 1,
            seed: 0,
        };
        let (_, omax, _, hi_mm) = choose(&mut values.clone(), &p(Calibration::MinMax));
        assert_eq!((omax, hi_mm), (50.0, 50.0));
        let (_, _, _, hi_p) = choose(&mut values.clone(), &p(Calibration::Percentile(99.9)));
        assert!(hi_p < 1.0, "{hi_p}");
        let (_, _, lo_m, hi_m) = choose(&mut values.clone(), &p(Calibration::Mse));
        let (s, z) = scale_zero(0.0, 50.0, 4, false);
        let (sm, zm) = scale_zero(lo_m, hi_m, 4, false);
        assert!(mse_of(&values, sm, zm, 4) <= mse_of(&values, s, z, 4));
        assert!(hi_m < 50.0);
    }

    #[test]
    fn fake_quantization_is_exact_on_the_grid_and_clamps_outside() {
        let (s, z) = scale_zero(-1.0, 3.0, 8, false);
        assert_eq!(fake(0.0, s, z, 8), 0.0);
        assert!((fake(10.0, s, z, 8) - 3.0).abs() < s);
        assert!((fake(-10.0, s, z, 8) + 1.0).abs() < s);
        let (s, z) = scale_zero(-2.0, 1.0, 8, true);
        assert_eq!(z, 128);
        assert!((fake(2.0, s, z, 8) - 2.0).abs() < 1e-6);
    }

    #[test]
    fn importance_is_each_input_features_mean_square_on_the_drawn_samples() {
        let cancel = AtomicBool::new(false);
        let ctx = Ctx::new(&|_, _| {}, &cancel);
        let d = data(300);
        let model = mlp();
        let (imp, indices) = input_importance(&model, &d, 200, 7, &ctx).unwrap();
        assert_eq!(indices, calibration_draw(&d, 200, 7));
        let DatasetX::F32(x) = &d.x else {
            unreachable!()
        };
        // fc1 sees the raw features.
        let fc1 = &imp["fc1.weight"];
        assert_eq!(fc1.len(), 8);
        for (j, &v) in fc1.iter().enumerate() {
            let want: f64 = indices
                .iter()
                .map(|&s| f64::from(x[s * 8 + j]).powi(2))
                .sum::<f64>()
                / indices.len() as f64;
            assert!(
                (f64::from(v) - want).abs() <= 1e-5 * want.max(1e-6),
                "fc1[{j}]: {v} vs {want}"
            );
        }
        // fc2 sees fc1's ReLU output: 16 non-negative values.
        assert_eq!(imp["fc2.weight"].len(), 16);
        assert!(imp["fc2.weight"].iter().all(|v| *v >= 0.0));
        // A conv layer's row is channels × kernel window, channel-major.
        let arch = Architecture::from_json(
            &serde_json::json!({"kind":"sequential","input_shape":[2,2,2],"layers":[
            {"type":"conv2d","name":"c","in_channels":2,"out_channels":3,"kernel_size":2},
            {"type":"flatten"},{"type":"linear","name":"fc","in_features":3,"out_features":3}]}),
        )
        .unwrap();
        let conv = Model::init(&arch, 2).unwrap();
        let (imp, indices) = input_importance(&conv, &d, 300, 1, &ctx).unwrap();
        let c = &imp["c.weight"];
        assert_eq!(c.len(), 2 * 4);
        for ch in 0..2 {
            let want: f64 = indices
                .iter()
                .flat_map(|&s| (0..4).map(move |p| s * 8 + ch * 4 + p))
                .map(|i| f64::from(x[i]).powi(2))
                .sum::<f64>()
                / (indices.len() * 4) as f64;
            for k in 0..4 {
                assert!(
                    (f64::from(c[ch * 4 + k]) - want).abs() <= 1e-5 * want,
                    "channel {ch}"
                );
            }
        }
        assert!(input_importance(&model, &d, 0, 7, &ctx).is_err());
    }
}
