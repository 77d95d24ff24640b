//! What the transformer families share: their parameters (every float tensor of the weights
//! file, as f32 candle variables under their file names), the linear layer every projection
//! goes through (weight transforms for QAT, the probe for calibration), and the
//! differentiable building blocks — layer norm and RMS norm written out (candle's fused norms
//! and `softmax_last_dim` have no backward pass), attention, dropout.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::sequential::linear;
use super::{LayerInput, Mode, Param, ParamKind, ParamSpec, ProbeFn, WeightTransform};
use crate::compress::formats::safetensors::{NamedTensor, SafetensorsFile};
use crate::compress::select::glob_match;
use crate::compress::{Error, Result};

/// The parameters of a transformer, by name.
#[derive(Debug)]
pub struct Weights {
    params: Vec<Param>,
    index: HashMap<String, usize>,
    transform: Option<WeightTransform>,
}

/// The probe of a forward pass, with its running layer count.
pub struct Probe<'p> {
    f: Option<&'p mut ProbeFn<'p>>,
    next: usize,
}

impl<'p> Probe<'p> {
    /// No probe.
    pub fn none() -> Probe<'static> {
        Probe { f: None, next: 0 }
    }

    /// A probe calling `f` with every linear layer's input.
    pub fn new(f: &'p mut ProbeFn<'p>) -> Probe<'p> {
        Probe {
            f: Some(f),
            next: 0,
        }
    }
}

/// The role of a tensor from its name (for freezing, trainability and reports).
fn kind_of(name: &str) -> ParamKind {
    if name.ends_with(".bias") {
        ParamKind::Bias
    } else {
        ParamKind::Weight
    }
}

impl Weights {
    /// Every floating-point tensor of `file` as an f32 variable (integer buffers such as
    /// `position_ids` are left out: they are recomputed).
    pub fn from_file(file: &SafetensorsFile) -> Result<Weights> {
        let mut params = Vec::new();
        for t in file.header().tensors.iter().filter(|t| t.dtype.is_float()) {
            let values = file.to_f32(t)?;
            file.release(t);
            let var = Var::from_vec(values, t.shape.clone(), &Device::Cpu)?;
            let spec = ParamSpec {
                name: t.name.clone(),
                shape: t.shape.clone(),
                kind: kind_of(&t.name),
                layer: t.name.rsplit_once('.').map_or("", |(l, _)| l).to_string(),
            };
            params.push(Param::new(spec, var));
        }
        Ok(Self::from_params(params))
    }

    /// Named f32 tensors as variables, in the given order (a network whose tensors changed:
    /// a new head, renamed tensors).
    pub fn from_tensors(tensors: Vec<NamedTensor>) -> Result<Weights> {
        let mut params = Vec::with_capacity(tensors.len());
        for t in tensors {
            let var = Var::from_vec(t.values, t.shape.clone(), &Device::Cpu)?;
            let spec = ParamSpec {
                kind: kind_of(&t.name),
                layer: t.name.rsplit_once('.').map_or("", |(l, _)| l).to_string(),
                shape: t.shape,
                name: t.name,
            };
            params.push(Param::new(spec, var));
        }
        Ok(Self::from_params(params))
    }

    /// The same names and shapes holding `weights`.
    pub fn with_values(&self, weights: Vec<NamedTensor>) -> Result<Weights> {
        let by_name: HashMap<String, NamedTensor> =
            weights.into_iter().map(|w| (w.name.clone(), w)).collect();
        let mut params = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let w = by_name.get(p.name()).ok_or_else(|| {
                Error::ArchitectureMismatch(format!("missing tensors: {}", p.name()))
            })?;
            if w.shape != p.spec().shape {
                return Err(Error::ArchitectureMismatch(format!(
                    "wrong shapes: {} expected {:?}, found {:?}",
                    p.name(),
                    p.spec().shape,
                    w.shape
                )));
            }
            let var = Var::from_vec(w.values.clone(), w.shape.clone(), &Device::Cpu)?;
            params.push(Param::new(p.spec().clone(), var));
        }
        Ok(Self::from_params(params))
    }

    fn from_params(params: Vec<Param>) -> Weights {
        let index = params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name().to_string(), i))
            .collect();
        Weights {
            params,
            index,
            transform: None,
        }
    }

    /// Every parameter, in file order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Whether a tensor of this name exists.
    pub fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The shape of a tensor.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.index
            .get(name)
            .map(|&i| self.params[i].spec().shape.as_slice())
    }

    /// A tensor as it enters the graph (tracked when training and trainable).
    pub fn get(&self, name: &str, mode: &Mode<'_>) -> Result<Tensor> {
        let i = self
            .index
            .get(name)
            .ok_or_else(|| Error::ArchitectureMismatch(format!("missing tensors: {name}")))?;
        Ok(self.params[*i].tensor(matches!(mode, Mode::Train(_))))
    }

    /// Freezes the tensors matching the glob `pattern`; how many matched.
    pub fn freeze(&mut self, pattern: &str) -> usize {
        self.freeze_where(|name| glob_match(pattern, name))
    }

    /// Freezes the tensors whose names `matches`; how many matched.
    pub fn freeze_where(&mut self, matches: impl Fn(&str) -> bool) -> usize {
        let mut n = 0;
        for p in &mut self.params {
            if matches(p.name()) {
                p.set_frozen(true);
                n += 1;
            }
        }
        n
    }

    /// The current values.
    pub fn export(&self) -> Result<Vec<NamedTensor>> {
        self.params
            .iter()
            .map(|p| {
                Ok(NamedTensor {
                    name: p.name().to_string(),
                    shape: p.spec().shape.clone(),
                    values: p.var().as_tensor().flatten_all()?.to_vec1::<f32>()?,
                })
            })
            .collect()
    }

    /// Overwrites every tensor with `weights`.
    pub fn load(&self, weights: &[NamedTensor]) -> Result<()> {
        let by_name: HashMap<&str, &NamedTensor> =
            weights.iter().map(|t| (t.name.as_str(), t)).collect();
        for p in &self.params {
            let t = by_name.get(p.name()).ok_or_else(|| {
                Error::ArchitectureMismatch(format!("missing tensors: {}", p.name()))
            })?;
            if t.shape != p.spec().shape {
                return Err(Error::ArchitectureMismatch(format!(
                    "wrong shapes: {} expected {:?}, found {:?}",
                    p.name(),
                    p.spec().shape,
                    t.shape
                )));
            }
            p.var().set(&Tensor::from_slice(
                &t.values,
                t.shape.clone(),
                &Device::Cpu,
            )?)?;
        }
        Ok(())
    }

    /// Sets (or clears) the transform applied to every linear weight.
    pub fn set_transform(&mut self, transform: Option<WeightTransform>) {
        self.transform = transform;
    }

    /// `x · Wᵀ (+ b)` for the linear layer `layer` (`{layer}.weight`, optional
    /// `{layer}.bias`), on the last dimension of `x`; the probe sees the input first.
    pub fn linear(
        &self,
        layer: &str,
        x: &Tensor,
        mode: &Mode<'_>,
        probe: &mut Probe<'_>,
    ) -> Result<Tensor> {
        let weight_name = format!("{layer}.weight");
        let w = self.get(&weight_name, mode)?;
        let bias_name = format!("{layer}.bias");
        let b = if self.has(&bias_name) {
            Some(self.get(&bias_name, mode)?)
        } else {
            None
        };
        let dims = x.dims().to_vec();
        let (in_f, out_f) = (w.dim(1)?, w.dim(0)?);
        let rows = x.elem_count() / in_f.max(1);
        let x2 = x.reshape((rows, in_f))?;
        if let Some(f) = probe.f.as_deref_mut() {
            f(LayerInput {
                index: probe.next,
                layer,
                window: 1,
                x: &x2,
            })?;
        }
        probe.next += 1;
        let w = match &self.transform {
            None => w,
            Some(t) => match (t.0)(&weight_name, &w.detach())? {
                None => w,
                Some(q) if matches!(mode, Mode::Train(_)) => (&w + (q - w.detach())?)?,
                Some(q) => q,
            },
        };
        let y = linear::Linear.forward(&x2, &w, b.as_ref())?;
        let mut out = dims;
        if let Some(last) = out.last_mut() {
            *last = out_f;
        }
        Ok(y.reshape(out)?)
    }
}

/// A student built from a teacher (`from_teacher`): the tensors of the blocks in `layers`
/// (block `i` named `{block_prefix}{i}.…`), renumbered from 0 in that order, with every
/// tensor outside the blocks; and `document` (a `config.json`) with `num_hidden_layers` set
/// and any per-layer list (`layer_types`, …) cut the same way. `layers` must be
/// non-empty, strictly increasing and below `total`.
pub fn keep_blocks(
    tensors: Vec<NamedTensor>,
    block_prefix: &str,
    layers: &[usize],
    total: usize,
    document: &serde_json::Value,
) -> Result<(Vec<NamedTensor>, serde_json::Value)> {
    let field = "student.from_teacher.layers";
    if layers.is_empty() {
        return Err(Error::invalid(field, "keep at least one block"));
    }
    if let Some(&l) = layers.iter().find(|&&l| l >= total) {
        return Err(Error::invalid(
            field,
            format!(
                "block {l} does not exist: the teacher has blocks 0..{}",
                total - 1
            ),
        ));
    }
    if layers.windows(2).any(|w| w[0] >= w[1]) {
        return Err(Error::invalid(
            field,
            "list each block once, in increasing order",
        ));
    }
    let new_index: HashMap<usize, usize> = layers
        .iter()
        .enumerate()
        .map(|(new, &old)| (old, new))
        .collect();
    let mut kept = Vec::with_capacity(tensors.len());
    for mut t in tensors {
        let Some(rest) = t.name.strip_prefix(block_prefix) else {
            kept.push(t);
            continue;
        };
        let (index, tail) = rest.split_once('.').unwrap_or((rest, ""));
        match index.parse::<usize>().ok().and_then(|i| new_index.get(&i)) {
            Some(new) => {
                t.name = format!("{block_prefix}{new}.{tail}");
                kept.push(t);
            }
            None if index.parse::<usize>().is_ok() => {}
            None => kept.push(t),
        }
    }
    let mut doc = document.clone();
    if let Some(o) = doc.as_object_mut() {
        for v in o.values_mut() {
            if let serde_json::Value::Array(items) = v {
                if items.len() == total && total > 1 {
                    *items = layers.iter().map(|&l| items[l].clone()).collect();
                }
            }
        }
        o.insert("num_hidden_layers".into(), layers.len().into());
    }
    Ok((kept, doc))
}

/// Layer normalisation over the last dimension (biased variance), written out so it has a
/// backward pass.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mu = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mu)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(y.broadcast_mul(w)?.broadcast_add(b)?)
}

/// RMS normalisation over the last dimension: `x / sqrt(mean(x²) + eps) · w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)?)
}

/// [`layer_norm`], through candle's fused kernel when no gradient is needed (evaluation).
pub fn layer_norm_in(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    mode: &Mode<'_>,
) -> Result<Tensor> {
    match mode {
        Mode::Eval => Ok(candle_nn::ops::layer_norm(
            &x.contiguous()?,
            w,
            b,
            eps as f32,
        )?),
        Mode::Train(_) => Ok(super::fused::LayerNorm { eps: eps as f32 }.forward(x, w, b)?),
    }
}

/// [`rms_norm`], through candle's fused kernel when no gradient is needed (evaluation).
pub fn rms_norm_in(x: &Tensor, w: &Tensor, eps: f64, mode: &Mode<'_>) -> Result<Tensor> {
    match mode {
        Mode::Eval => Ok(candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)?),
        Mode::Train(_) => rms_norm(x, w, eps),
    }
}

/// Inverted dropout with probability `p` in training mode; the identity otherwise.
pub fn dropout(x: &Tensor, p: f64, mode: &mut Mode<'_>) -> Result<Tensor> {
    match mode {
        Mode::Train(_) if p >= 1.0 => Ok(x.zeros_like()?),
        Mode::Train(rng) if p > 0.0 => {
            let rng: &mut ChaCha8Rng = rng;
            let op = super::fused::Dropout {
                p: p as f32,
                seed: rng.gen(),
            };
            Ok(op.forward(x)?)
        }
        _ => Ok(x.clone()),
    }
}

/// `[b, s, heads·d] → [b, heads, s, d]`.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, s, hd) = x.dims3()?;
    Ok(x.reshape((b, s, heads, hd / heads))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// `[b, heads, s, d] → [b, s, heads·d]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, s, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.contiguous()?.reshape((b, s, h * d))?)
}

/// Scaled dot-product attention: `softmax(q·kᵀ/√d + bias)·v` with `q, k, v` of
/// `[b, heads, s, d]` and an additive `bias` broadcastable to `[b, heads, s, s]`; the
/// attention probabilities go through `dropout` in training.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    dropout_p: f64,
    mode: &mut Mode<'_>,
) -> Result<Tensor> {
    let d = q.dim(D::Minus1)?;
    if let Mode::Eval = mode {
        // No backward pass: scale the (smaller) queries.
        return attention_scaled(&(q * (1.0 / (d as f64).sqrt()))?, k, v, bias);
    }
    let scores = q.matmul(&k.t()?)?;
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    let probs = super::fused::Softmax { scale }.forward(&scores, bias)?;
    let probs = dropout(&probs, dropout_p, mode)?;
    Ok(probs.matmul(&v.contiguous()?)?)
}

/// Evaluation's attention on queries already scaled by `1/√d`: `softmax(q·kᵀ + bias)·v`.
/// The matmul reads kᵀ through its strides, and the bias is added inside the softmax's own
/// pass (with the vectorised exp; candle's softmax calls libm's expf per element, after a
/// separate broadcast add). The bias's query rows may repeat over stacked query groups.
pub fn attention_scaled(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let scores = q.matmul(&k.t()?)?;
    let probs = super::fused::Softmax { scale: 1.0 }.forward(&scores, bias)?;
    Ok(probs.matmul(v)?)
}

/// The additive attention bias of a padding mask `[b, s]` (1 real, 0 padding): 0 where a key
/// counts, the smallest f32 where it is padding; `[b, 1, 1, s]`.
pub fn padding_bias(mask: &Tensor) -> Result<Tensor> {
    let (b, s) = mask.dims2()?;
    let bias = ((mask.to_dtype(DType::F32)? - 1.0)?.abs()? * f64::from(f32::MIN))?;
    Ok(bias.reshape((b, 1, 1, s))?)
}

/// The id that pads shorter texts in a batch: the config's `pad_token_id` (else 0; padded
/// positions are masked out, so any id in the vocabulary works).
pub fn pad_id(config: &serde_json::Value) -> u32 {
    config
        .get("pad_token_id")
        .and_then(serde_json::Value::as_u64)
        .and_then(|v| u32::try_from(v).ok())
        .unwrap_or(0)
}

/// The ids of a batch as a u32 tensor `[b, s]`.
pub fn token_ids(x: &Tensor) -> Result<Tensor> {
    if x.rank() != 2 {
        return Err(Error::Internal(format!(
            "token ids must be [batch, seq], got {:?}",
            x.dims()
        )));
    }
    Ok(match x.dtype() {
        DType::U32 => x.clone(),
        DType::I64 | DType::U8 | DType::F32 => x.to_dtype(DType::U32)?,
        other => {
            return Err(Error::Internal(format!(
                "token ids must be integers, got {other:?}"
            )))
        }
    })
}

/// Rows of an embedding table `[n, h]` for ids `[b, s]`: `[b, s, h]`.
pub fn embed(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, s) = ids.dims2()?;
    let h = table.dim(1)?;
    let flat = ids.flatten_all()?;
    // Training: the table's gradient written row by row (see `fused::Embedding`).
    let rows = if table.track_op() {
        super::fused::Embedding.forward(table, &flat)?
    } else {
        table.index_select(&flat, 0)?
    };
    Ok(rows.reshape((b, s, h))?)
}

/// `n` draws of a normal distribution of standard deviation `std` (Box–Muller).
fn normal(n: usize, std: f64, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
        let u2: f64 = rng.gen();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let t = std::f64::consts::TAU * u2;
        out.push((r * t.cos()) as f32);
        out.push((r * t.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// Tensors drawn as `transformers` initialises a fresh model: normal with std `std` for
/// matrices and embeddings, zero biases, norm weights of one.
pub(super) fn draw(shapes: &[(String, Vec<usize>)], std: f64, seed: u64) -> Vec<NamedTensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    shapes
        .iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            let values = if name.ends_with(".bias") {
                vec![0.0; n]
            } else if name.to_ascii_lowercase().ends_with("norm.weight") {
                vec![1.0; n]
            } else {
                normal(n, std, &mut rng)
            };
            NamedTensor {
                name: name.clone(),
                shape: shape.clone(),
                values,
            }
        })
        .collect()
}

/// `document` (a `config.json`) with the keys of `overrides` replaced; per-layer lists
/// (`layer_types`, …) are dropped when the depth changes.
pub fn merge_config(
    document: &serde_json::Value,
    overrides: &serde_json::Map<String, serde_json::Value>,
) -> serde_json::Value {
    let mut out = document.clone();
    if let Some(doc) = out.as_object_mut() {
        let depth = doc.get("num_hidden_layers").cloned();
        for (k, v) in overrides {
            doc.insert(k.clone(), v.clone());
        }
        if doc.get("num_hidden_layers") != depth.as_ref() {
            doc.retain(|_, v| {
                !v.as_array().is_some_and(|a| {
                    depth.as_ref().and_then(|d| d.as_u64()) == Some(a.len() as u64)
                })
            });
        }
    }
    out
}

/// Every `(name, shape)` is a tensor of `weights` with that shape.
pub(super) fn check_tensors(weights: &Weights, want: &[(String, Vec<usize>)]) -> Result<()> {
    let mut missing = Vec::new();
    let mut wrong = Vec::new();
    for (name, shape) in want {
        match weights.shape(name) {
            None => missing.push(name.clone()),
            Some(s) if s != shape.as_slice() => {
                wrong.push(format!("{name} expected {shape:?}, found {s:?}"))
            }
            Some(_) => {}
        }
    }
    let mut parts = Vec::new();
    if !missing.is_empty() {
        let shown: Vec<&String> = missing.iter().take(8).collect();
        parts.push(format!(
            "missing tensors: {shown:?} ({} in all)",
            missing.len()
        ));
    }
    if !wrong.is_empty() {
        parts.push(format!("wrong shapes: {}", wrong.join(", ")));
    }
    if parts.is_empty() {
        Ok(())
    } else {
        Err(Error::ArchitectureMismatch(parts.join("; ")))
    }
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! The reference folders of `tests/fixtures/transformers/` (made by
    //! `scripts/make_transformer_fixtures.py` with Hugging Face `transformers`).

    use std::path::PathBuf;

    use candle_core::{DType, Device, Tensor};
    use serde_json::Value;

    use crate::compress::engine::data::Batch;
    use crate::compress::formats::safetensors::SafetensorsFile;

    /// The fixture folder `name`.
    pub fn dir(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/transformers")
            .join(name)
    }

    /// Its config.json, model.safetensors and expected.safetensors.
    pub fn open(name: &str) -> (Value, SafetensorsFile, SafetensorsFile) {
        let d = dir(name);
        let config =
            serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap();
        (
            config,
            SafetensorsFile::open(d.join("model.safetensors")).unwrap(),
            SafetensorsFile::open(d.join("expected.safetensors")).unwrap(),
        )
    }

    /// The fixture `name` as a network reading text with its tokenizer.json.
    pub fn network(name: &str) -> Box<dyn crate::compress::engine::Network> {
        let (config, file, _) = open(name);
        let tok =
            crate::compress::engine::data::TextEncoder::from_file(dir(name).join("tokenizer.json"))
                .unwrap();
        crate::compress::engine::families::load(&config, &file, Some(std::sync::Arc::new(tok)))
            .unwrap()
    }

    /// `net` with every tensor whose name ends with a key of `scale` multiplied by its value.
    pub fn scaled(
        net: &dyn crate::compress::engine::Network,
        scale: &[(&str, f32)],
    ) -> Box<dyn crate::compress::engine::Network> {
        let mut w = net.export().unwrap();
        for t in &mut w {
            for (suffix, f) in scale {
                if t.name.ends_with(suffix) {
                    t.values.iter_mut().for_each(|v| *v *= f);
                }
            }
        }
        net.with_weights(w).unwrap()
    }

    /// An expected f32 tensor.
    pub fn f32s(file: &SafetensorsFile, name: &str) -> Tensor {
        let t = file.get(name).unwrap_or_else(|| panic!("no {name}"));
        Tensor::from_vec(file.to_f32(t).unwrap(), t.shape.clone(), &Device::Cpu).unwrap()
    }

    /// An expected integer tensor as u32.
    pub fn ids(file: &SafetensorsFile, name: &str) -> Tensor {
        let t = file.get(name).unwrap_or_else(|| panic!("no {name}"));
        let v: Vec<u32> = file
            .to_i64(t)
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect();
        Tensor::from_vec(v, t.shape.clone(), &Device::Cpu).unwrap()
    }

    /// A batch of token ids with an optional mask and segments.
    pub fn batch(x: Tensor, mask: Option<Tensor>, segments: Option<Tensor>) -> Batch {
        let len = x.dim(0).unwrap();
        Batch {
            x,
            mask: mask.map(|m| m.to_dtype(DType::F32).unwrap()),
            segments,
            y: None,
            labels: None,
            len,
            indices: (0..len).collect(),
        }
    }

    /// The gradients of a training-mode forward pass reach every trainable tensor (but those
    /// named `unread_prefix…`, which the output does not read and must get none), and agree
    /// with central finite differences at one entry of each tensor whose name ends with one of
    /// `checked`.
    ///
    /// The loss is `mean(output · R)` for a fixed random `R` (so every output element matters
    /// with its own weight); dropout masks repeat because every pass draws them from the same
    /// seed. Candle's fused norms and softmax have no backward pass (CANDLE.md): a network
    /// that used them in training would leave the tensors before its last norm without a
    /// gradient, and fail the first check.
    pub fn check_gradients(
        net: &dyn crate::compress::engine::Network,
        batch: &Batch,
        checked: &[&str],
        unread_prefix: Option<&str>,
    ) {
        use crate::compress::engine::Mode;
        use rand::{Rng, SeedableRng};
        let loss_of = |r: Option<&Tensor>| -> (Tensor, Tensor) {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
            let out = net.forward(batch, Mode::Train(&mut rng)).unwrap();
            let r = match r {
                Some(r) => r.clone(),
                None => {
                    let mut g = rand_chacha::ChaCha8Rng::seed_from_u64(11);
                    let v: Vec<f32> = (0..out.elem_count())
                        .map(|_| g.gen::<f32>() - 0.5)
                        .collect();
                    Tensor::from_vec(v, out.dims(), &Device::Cpu).unwrap()
                }
            };
            let loss = (&out * &r).unwrap().mean_all().unwrap();
            (loss, r)
        };
        let (loss, r) = loss_of(None);
        let grads = loss.backward().unwrap();
        let mut missing = Vec::new();
        for p in net.params().iter().filter(|p| p.is_trainable()) {
            let norm = grads.get(p.var().as_tensor()).map(|g| {
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            });
            // Tensors the output does not read (a sentence embedding's unused pooler) must
            // get none; every other one must get some.
            let unread = unread_prefix.is_some_and(|u| p.name().starts_with(u));
            if norm.is_some_and(|n| n > 0.0) == unread {
                missing.push(p.name().to_string());
            }
        }
        assert!(
            missing.is_empty(),
            "gradients wrong (none, or on an unread tensor) for {missing:?}"
        );
        for suffix in checked {
            let p = net
                .params()
                .iter()
                .find(|p| p.name().ends_with(suffix))
                .unwrap_or_else(|| panic!("no parameter named …{suffix}"));
            let name = p.name();
            let var = p.var();
            let values = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let grad = grads.get(var.as_tensor()).unwrap();
            let grad = grad.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // The entry with the largest gradient, so the difference stands above rounding.
            let (i, analytic) = grad
                .iter()
                .copied()
                .enumerate()
                .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
                .unwrap();
            let eps = 1e-2f32;
            let at = |delta: f32| -> f32 {
                let mut v = values.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.as_tensor().dims(), &Device::Cpu).unwrap())
                    .unwrap();
                loss_of(Some(&r)).0.to_scalar::<f32>().unwrap()
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            var.set(
                &Tensor::from_vec(values.clone(), var.as_tensor().dims(), &Device::Cpu).unwrap(),
            )
            .unwrap();
            let tolerance = 2e-2 * analytic.abs().max(numeric.abs()) + 1e-5;
            assert!(
                (numeric - analytic).abs() <= tolerance,
                "{name}[{i}]: backward {analytic:e}, finite differences {numeric:e}"
            );
        }
    }

    /// The largest absolute difference of two tensors of one shape.
    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }
}
