//! The `llama` family: decoder-only Llama-style models as Hugging Face `transformers`
//! defines them (`LlamaForCausalLM`; SmolLM2, Llama 2/3): RMSNorm, rotary position
//! embeddings (half-split `rotate_half`, with the config's `rope_theta` and `llama3` or
//! `linear` scaling), grouped-query attention with a causal mask, SwiGLU, and an output
//! projection that may be tied to the token embeddings. The forward pass returns the logits
//! of every position, `[batch, seq, vocab]` (perplexity and KL need all of them).

use candle_core::{Device, Tensor, D};
use serde::Deserialize;
use serde_json::Value;

use super::transformer::check_tensors;
use std::sync::Arc;

use super::data::{Batch, Dataset, TextEncoder, TextInput};
use super::sequential::linear;
use super::transformer::{
    attention, attention_scaled, embed, merge_heads, pad_id, padding_bias, rms_norm_in,
    split_heads, token_ids, Probe, Weights,
};
use super::{BlockRunner, BlockState, Family, Mode, Network, Param, ProbeFn, WeightTransform};
use crate::compress::formats::safetensors::{NamedTensor, SafetensorsFile};
use crate::compress::{Error, Result};

/// Stages of a block (see [`Llama::stage`]).
const STAGES: usize = 4;

/// Rotary scaling (`rope_scaling` / `rope_parameters`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3's frequency-dependent scaling.
    Llama3 {
        /// Scaling factor.
        factor: f64,
        /// Low-frequency factor.
        low_freq_factor: f64,
        /// High-frequency factor.
        high_freq_factor: f64,
        /// The context length the model was trained with.
        original_max_position_embeddings: f64,
    },
}

/// The `config.json` fields the engine reads.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Width of the SwiGLU layer.
    pub intermediate_size: usize,
    /// Decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Longest sequence.
    pub max_position_embeddings: usize,
    /// Whether the output projection is the token embeddings.
    pub tie_word_embeddings: bool,
    /// Dropout of attention probabilities in training.
    pub attention_dropout: f64,
}

#[derive(Deserialize)]
struct RawConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_dropout: Option<f64>,
    hidden_act: Option<String>,
}

impl LlamaConfig {
    /// Reads and checks a `config.json` (transformers 4 and 5 spellings of the RoPE fields).
    pub fn from_json(config: &Value) -> Result<LlamaConfig> {
        let r: RawConfig = serde_json::from_value(config.clone())
            .map_err(|e| Error::ArchitectureMismatch(format!("config.json for llama: {e}")))?;
        if r.hidden_act.as_deref().is_some_and(|a| a != "silu") {
            return Err(Error::UnsupportedFamily(format!(
                "llama with hidden_act {:?} (silu only)",
                r.hidden_act
            )));
        }
        let heads = r.num_attention_heads;
        let kv = r.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
            return Err(Error::ArchitectureMismatch(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
            )));
        }
        let head_dim = r.head_dim.unwrap_or(r.hidden_size / heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(Error::ArchitectureMismatch(format!(
                "head_dim {head_dim} must be even"
            )));
        }
        let params = r.rope_parameters.as_ref().or(r.rope_scaling.as_ref());
        let number = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64);
        let rope_theta = r
            .rope_theta
            .or_else(|| params.and_then(|p| number(p, "rope_theta")))
            .unwrap_or(10_000.0);
        let kind = params
            .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let rope_scaling = match (kind, params) {
            ("default", _) | (_, None) => RopeScaling::Default,
            ("linear", Some(p)) => RopeScaling::Linear {
                factor: number(p, "factor").unwrap_or(1.0),
            },
            ("llama3", Some(p)) => RopeScaling::Llama3 {
                factor: number(p, "factor").unwrap_or(8.0),
                low_freq_factor: number(p, "low_freq_factor").unwrap_or(1.0),
                high_freq_factor: number(p, "high_freq_factor").unwrap_or(4.0),
                original_max_position_embeddings: number(p, "original_max_position_embeddings")
                    .unwrap_or(8192.0),
            },
            (other, _) => {
                return Err(Error::UnsupportedFamily(format!(
                    "llama with RoPE scaling {other:?} (default, linear and llama3 are supported)"
                )))
            }
        };
        Ok(LlamaConfig {
            vocab_size: r.vocab_size,
            hidden_size: r.hidden_size,
            intermediate_size: r.intermediate_size,
            num_hidden_layers: r.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: r.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: r.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: r.tie_word_embeddings.unwrap_or(false),
            attention_dropout: r.attention_dropout.unwrap_or(0.0),
        })
    }

    /// The rotary inverse frequencies (`head_dim / 2` of them), in f32 as transformers
    /// computes them.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / (self.rope_theta as f32).powf((2 * i) as f32 / d as f32))
            .collect();
        match self.rope_scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let f = f as f64;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                        if medium {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
                        } else {
                            scaled as f32
                        }
                    })
                    .collect()
            }
        }
    }
}

/// A Llama-style decoder over its weights.
#[derive(Debug)]
pub struct Llama {
    config: LlamaConfig,
    document: Value,
    weights: Weights,
    /// The model's `tokenizer.json`, when it has one (text datasets need it).
    tokenizer: Option<Arc<TextEncoder>>,
}

impl Llama {
    /// The decoder described by `config` (a `config.json`) with the weights of `file`.
    pub fn from_safetensors(config: &Value, file: &SafetensorsFile) -> Result<Llama> {
        Self::new(config, Weights::from_file(file)?)
    }

    /// This network reading text with `tokenizer`.
    pub fn with_tokenizer(mut self, tokenizer: Option<Arc<TextEncoder>>) -> Llama {
        self.tokenizer = tokenizer;
        self
    }

    fn new(document: &Value, weights: Weights) -> Result<Llama> {
        let config = LlamaConfig::from_json(document)?;
        let llama = Llama {
            config,
            document: document.clone(),
            weights,
            tokenizer: None,
        };
        llama.check_shapes()?;
        Ok(llama)
    }

    fn check_shapes(&self) -> Result<()> {
        check_tensors(&self.weights, &Self::shapes(&self.config, self.tied()))
    }

    /// A llama model of `document` (a `config.json`) drawn afresh as `transformers` would.
    pub fn fresh(document: &Value, seed: u64) -> Result<Llama> {
        let std = super::bert::initializer_range(document);
        let tensors = super::transformer::draw(&Self::shapes_of(document)?, std, seed);
        Llama::new(document, Weights::from_tensors(tensors)?)
    }

    /// The tensors [`Llama::fresh`] draws for `document` (no `lm_head` when the embeddings
    /// are tied).
    pub fn shapes_of(document: &Value) -> Result<Vec<(String, Vec<usize>)>> {
        let config = LlamaConfig::from_json(document)?;
        let tied = document
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(Self::shapes(&config, tied))
    }

    /// The tensors `c` implies (no `lm_head` when `tied`), with their shapes.
    fn shapes(c: &LlamaConfig, tied: bool) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let (q, kv) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let mut want = vec![
            (
                "model.embed_tokens.weight".to_string(),
                vec![c.vocab_size, h],
            ),
            ("model.norm.weight".to_string(), vec![h]),
        ];
        if !tied {
            want.push(("lm_head.weight".into(), vec![c.vocab_size, h]));
        }
        for l in 0..c.num_hidden_layers {
            let b = format!("model.layers.{l}");
            for (name, shape) in [
                ("self_attn.q_proj.weight", vec![q, h]),
                ("self_attn.k_proj.weight", vec![kv, h]),
                ("self_attn.v_proj.weight", vec![kv, h]),
                ("self_attn.o_proj.weight", vec![h, q]),
                ("mlp.gate_proj.weight", vec![i, h]),
                ("mlp.up_proj.weight", vec![i, h]),
                ("mlp.down_proj.weight", vec![h, i]),
                ("input_layernorm.weight", vec![h]),
                ("post_attention_layernorm.weight", vec![h]),
            ] {
                want.push((format!("{b}.{name}"), shape));
            }
        }
        want
    }

    /// Whether the logits come from the token embeddings (no `lm_head.weight` of its own).
    fn tied(&self) -> bool {
        !self.weights.has("lm_head.weight")
    }

    /// The config this model runs.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// `cos` and `sin` of the rotary angles for positions `0..s`, each `[s, head_dim]`.
    fn rotary(&self, s: usize) -> Result<(Tensor, Tensor)> {
        let inv = self.config.inv_freq();
        let d = self.config.head_dim;
        let mut cos = Vec::with_capacity(s * d);
        let mut sin = Vec::with_capacity(s * d);
        for p in 0..s {
            let angles: Vec<f32> = inv.iter().map(|f| p as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        Ok((
            Tensor::from_vec(cos, (s, d), &Device::Cpu)?,
            Tensor::from_vec(sin, (s, d), &Device::Cpu)?,
        ))
    }

    /// Block `l` on the hidden states `h` `[b, s, hidden]`, with the rotary tables and the
    /// attention bias of the batch: its stages in turn.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        l: usize,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: &Tensor,
        mode: &mut Mode<'_>,
        probe: &mut Probe<'_>,
    ) -> Result<Tensor> {
        let mut h = h.clone();
        let mut inner = None;
        for k in 0..STAGES {
            (h, inner) = self.stage(l, k, &h, inner.as_ref(), cos, sin, bias, mode, probe)?;
        }
        Ok(h)
    }

    /// Stage `k` of block `l` (see [`BlockRunner::run_stage`]): 0 the attention up to the
    /// input of `o_proj`, 1 `o_proj` and the residual, 2 the MLP up to the input of
    /// `down_proj`, 3 `down_proj` and the residual. `h` is the residual stream and `inner`
    /// the stage's other input (the attention context, the MLP's activation); returns both
    /// for the next stage.
    #[allow(clippy::too_many_arguments)]
    fn stage(
        &self,
        l: usize,
        k: usize,
        h: &Tensor,
        inner: Option<&Tensor>,
        cos: &Tensor,
        sin: &Tensor,
        bias: &Tensor,
        mode: &mut Mode<'_>,
        probe: &mut Probe<'_>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let c = &self.config;
        let block = format!("model.layers.{l}");
        let norm = |n: &str, x: &Tensor, mode: &Mode<'_>| -> Result<Tensor> {
            rms_norm_in(
                x,
                &self.weights.get(&format!("{block}.{n}.weight"), mode)?,
                c.rms_norm_eps,
                mode,
            )
        };
        let lin = |n: &str, x: &Tensor, mode: &Mode<'_>, probe: &mut Probe<'_>| {
            self.weights.linear(&format!("{block}.{n}"), x, mode, probe)
        };
        let inner = || {
            inner.ok_or_else(|| {
                Error::Internal(format!("llama block {l} stage {k} without its input"))
            })
        };
        match k {
            0 => {
                let (b, s, _) = h.dims3()?;
                let x = norm("input_layernorm", h, mode)?;
                // Evaluation splits the heads, rotates them and scales the queries by 1/√d in
                // one pass (the same values); training keeps the differentiable ops.
                let eval = matches!(mode, Mode::Eval);
                let d = c.head_dim;
                let rotate = |x: &Tensor, heads: usize, scale: f32| -> Result<Tensor> {
                    if eval {
                        let op = super::fused::RopeHeads { heads, scale };
                        Ok(op.forward(x, cos, sin)?)
                    } else {
                        rope(&split_heads(x, heads)?, cos, sin)
                    }
                };
                let q = rotate(
                    &lin("self_attn.q_proj", &x, mode, probe)?,
                    c.num_attention_heads,
                    (1.0 / (d as f64).sqrt()) as f32,
                )?;
                let key = rotate(
                    &lin("self_attn.k_proj", &x, mode, probe)?,
                    c.num_key_value_heads,
                    1.0,
                )?;
                let v = split_heads(
                    &lin("self_attn.v_proj", &x, mode, probe)?,
                    c.num_key_value_heads,
                )?;
                // Grouped-query attention without copying keys and values: the `rep` query
                // heads sharing a key/value head are stacked along the sequence
                // ([b, kv, rep·s, d]); the softmax repeats the bias's rows to match.
                let rep = c.num_attention_heads / c.num_key_value_heads;
                let kv = c.num_key_value_heads;
                let grouped = q.reshape((b, kv, rep * s, d))?;
                let ctx = if eval {
                    attention_scaled(&grouped, &key, &v, Some(bias))?
                } else {
                    attention(&grouped, &key, &v, Some(bias), c.attention_dropout, mode)?
                };
                let ctx = merge_heads(&ctx.reshape((b, c.num_attention_heads, s, d))?)?;
                Ok((h.clone(), Some(ctx)))
            }
            1 => Ok(((h + lin("self_attn.o_proj", inner()?, mode, probe)?)?, None)),
            2 => {
                let x = norm("post_attention_layernorm", h, mode)?;
                let gate = lin("mlp.gate_proj", &x, mode, probe)?;
                let up = lin("mlp.up_proj", &x, mode, probe)?;
                let act = if matches!(mode, Mode::Eval) {
                    super::fused::SiluMul.forward(&gate, &up)?
                } else {
                    (candle_nn::ops::silu(&gate)? * up)?
                };
                Ok((h.clone(), Some(act)))
            }
            3 => Ok(((h + lin("mlp.down_proj", inner()?, mode, probe)?)?, None)),
            _ => Err(Error::Internal(format!(
                "llama blocks have {STAGES} stages, not {k}"
            ))),
        }
    }

    fn forward_impl(
        &self,
        batch: &Batch,
        mut mode: Mode<'_>,
        probe: &mut Probe<'_>,
        taps: &[&str],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let c = &self.config;
        let ids = token_ids(&batch.x)?;
        let (_, s) = ids.dims2()?;
        if s > c.max_position_embeddings {
            return Err(Error::DatasetMismatch(format!(
                "sequences of {s} tokens are longer than the model's {} positions",
                c.max_position_embeddings
            )));
        }
        let mut h = embed(&self.weights.get("model.embed_tokens.weight", &mode)?, &ids)?;
        let (cos, sin) = self.rotary(s)?;
        let bias = causal_bias(s, batch.mask.as_ref())?;
        let mut tapped = vec![None; taps.len()];
        for l in 0..c.num_hidden_layers {
            h = self.block(l, &h, &cos, &sin, &bias, &mut mode, probe)?;
            let tap_name = format!("model.layers.{l}");
            for (slot, t) in taps.iter().enumerate() {
                if *t == tap_name {
                    tapped[slot] = Some(h.clone());
                }
            }
        }
        let logits = self.logits(&h, &mode, probe)?;
        let tapped = tapped
            .into_iter()
            .zip(taps)
            .map(|(t, name)| t.ok_or_else(|| Error::Internal(format!("no layer {name} to tap"))))
            .collect::<Result<_>>()?;
        Ok((logits, tapped))
    }
}

impl Llama {
    /// The final norm and the language-model head on the last block's output `[b, s, hidden]`:
    /// logits `[b, s, vocab]`.
    fn logits(&self, h: &Tensor, mode: &Mode<'_>, probe: &mut Probe<'_>) -> Result<Tensor> {
        let c = &self.config;
        let (b, s, _) = h.dims3()?;
        let h = rms_norm_in(
            h,
            &self.weights.get("model.norm.weight", mode)?,
            c.rms_norm_eps,
            mode,
        )?;
        Ok(if self.tied() {
            let w = self.weights.get("model.embed_tokens.weight", mode)?;
            let (rows, hid) = (b * s, c.hidden_size);
            linear::Linear
                .forward(&h.reshape((rows, hid))?, &w, None)?
                .reshape((b, s, c.vocab_size))?
        } else {
            self.weights.linear("lm_head", &h, mode, probe)?
        })
    }
}

/// `x·cos + rotate_half(x)·sin` for `x` of `[b, heads, s, d]` and `cos`, `sin` of `[s, d]`,
/// where `rotate_half` swaps the halves of the last dimension and negates the new first one.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let (x1, x2) = (
        x.narrow(D::Minus1, 0, d / 2)?,
        x.narrow(D::Minus1, d / 2, d / 2)?,
    );
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok(x.broadcast_mul(cos)?.add(&rotated.broadcast_mul(sin)?)?)
}

/// The causal mask as an additive bias `[1, 1, s, s]` (the smallest f32 above the diagonal),
/// plus the padding of `mask` when there is one.
fn causal_bias(s: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    let values: Vec<f32> = (0..s * s)
        .map(|i| if i % s > i / s { f32::MIN } else { 0.0 })
        .collect();
    let causal = Tensor::from_vec(values, (1, 1, s, s), &Device::Cpu)?;
    match mask {
        None => Ok(causal),
        Some(m) => {
            // Adding two f32::MIN would overflow to -inf; take the minimum instead.
            Ok(causal.broadcast_minimum(&padding_bias(m)?)?)
        }
    }
}

impl BlockRunner for Llama {
    fn num_blocks(&self) -> usize {
        self.config.num_hidden_layers
    }

    fn embed(&self, batch: &Batch) -> Result<BlockState> {
        let ids = token_ids(&batch.x)?;
        let (_, s) = ids.dims2()?;
        if s > self.config.max_position_embeddings {
            return Err(Error::DatasetMismatch(format!(
                "sequences of {s} tokens are longer than the model's {} positions",
                self.config.max_position_embeddings
            )));
        }
        let hidden = embed(
            &self.weights.get("model.embed_tokens.weight", &Mode::Eval)?,
            &ids,
        )?;
        let (cos, sin) = self.rotary(s)?;
        let bias = causal_bias(s, batch.mask.as_ref())?;
        Ok(BlockState {
            hidden,
            aux: vec![cos, sin, bias],
            inner: Vec::new(),
        })
    }

    fn num_stages(&self, _i: usize) -> usize {
        STAGES
    }

    fn run_stage(
        &self,
        i: usize,
        k: usize,
        state: &BlockState,
        probe: &mut ProbeFn<'_>,
    ) -> Result<BlockState> {
        let [cos, sin, bias] = &state.aux[..] else {
            return Err(Error::Internal(
                "llama block state without its tables".into(),
            ));
        };
        let (hidden, inner) = self.stage(
            i,
            k,
            &state.hidden,
            state.inner.first(),
            cos,
            sin,
            bias,
            &mut Mode::Eval,
            &mut Probe::new(probe),
        )?;
        Ok(BlockState {
            hidden,
            aux: state.aux.clone(),
            inner: inner.into_iter().collect(),
        })
    }

    fn finish(&self, _batch: &Batch, state: &BlockState) -> Result<Tensor> {
        self.logits(&state.hidden, &Mode::Eval, &mut Probe::none())
    }
}

impl Network for Llama {
    fn matches(&self, pattern: &str, name: &str) -> bool {
        crate::compress::select::glob_match(pattern, name)
    }

    fn family(&self) -> Family {
        Family::Llama
    }

    fn describe(&self) -> Value {
        self.document.clone()
    }

    fn params(&self) -> &[Param] {
        self.weights.params()
    }

    fn freeze(&mut self, pattern: &str) -> usize {
        self.weights.freeze(pattern)
    }

    fn export(&self) -> Result<Vec<NamedTensor>> {
        self.weights.export()
    }

    fn load(&self, weights: &[NamedTensor]) -> Result<()> {
        self.weights.load(weights)
    }

    fn with_weights(&self, weights: Vec<NamedTensor>) -> Result<Box<dyn Network>> {
        Ok(Box::new(
            Llama::new(&self.document, self.weights.with_values(weights)?)?
                .with_tokenizer(self.tokenizer.clone()),
        ))
    }

    fn check_trainable(&self) -> Result<()> {
        Ok(())
    }

    fn check_dataset(&self, dataset: &Dataset, _labels_required: bool) -> Result<()> {
        if dataset.is_text() {
            Ok(())
        } else {
            Err(Error::DatasetMismatch(
                "a llama model reads text: upload the dataset as `text` or `jsonl`".into(),
            ))
        }
    }

    fn output_width(&self) -> Result<usize> {
        Ok(self.config.vocab_size)
    }

    fn with_blocks(&self, layers: &[usize]) -> Result<Box<dyn Network>> {
        let (tensors, document) = super::transformer::keep_blocks(
            self.weights.export()?,
            "model.layers.",
            layers,
            self.config.num_hidden_layers,
            &self.document,
        )?;
        Ok(Box::new(
            Llama::new(&document, Weights::from_tensors(tensors)?)?
                .with_tokenizer(self.tokenizer.clone()),
        ))
    }

    fn objective(&self) -> super::Objective {
        super::Objective::CausalLm
    }

    fn with_config(
        &self,
        overrides: &serde_json::Map<String, Value>,
        seed: u64,
    ) -> Result<Box<dyn Network>> {
        let document = super::transformer::merge_config(&self.document, overrides);
        Ok(Box::new(
            Llama::fresh(&document, seed)?.with_tokenizer(self.tokenizer.clone()),
        ))
    }

    fn text_input(&self) -> Option<TextInput<'_>> {
        self.tokenizer.as_deref().map(|encoder| TextInput {
            encoder,
            max_len: self.config.max_position_embeddings,
            pad_id: pad_id(&self.document),
        })
    }

    fn forward(&self, batch: &Batch, mode: Mode<'_>) -> Result<Tensor> {
        Ok(self.forward_impl(batch, mode, &mut Probe::none(), &[])?.0)
    }

    fn forward_taps(
        &self,
        batch: &Batch,
        mode: Mode<'_>,
        layers: &[&str],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        self.forward_impl(batch, mode, &mut Probe::none(), layers)
    }

    fn has_layer(&self, layer: &str) -> bool {
        self.layer_names().iter().any(|l| l == layer)
    }

    fn layer_names(&self) -> Vec<String> {
        (0..self.config.num_hidden_layers)
            .map(|l| format!("model.layers.{l}"))
            .collect()
    }

    fn layer_width(&self, layer: &str) -> Result<usize> {
        if self.has_layer(layer) {
            Ok(self.config.hidden_size)
        } else {
            Err(Error::Internal(format!("llama has no layer {layer:?}")))
        }
    }

    fn block_runner(&self) -> Option<&dyn BlockRunner> {
        Some(self)
    }

    fn forward_probed(&self, batch: &Batch, probe: &mut ProbeFn<'_>) -> Result<Tensor> {
        Ok(self
            .forward_impl(batch, Mode::Eval, &mut Probe::new(probe), &[])?
            .0)
    }

    fn set_weight_transform(&mut self, transform: Option<WeightTransform>) {
        self.weights.set_transform(transform);
    }

    fn with_head(&self, _layer: &str, _num_classes: usize, _seed: u64) -> Result<Box<dyn Network>> {
        Err(Error::Unsupported(
            "`head` applies to classifiers; a llama model is trained with its language-model head"
                .into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::engine::transformer::fixtures::{batch, f32s, ids, max_diff, open};

    #[test]
    fn tiny_llama_matches_transformers() {
        let (config, weights, expected) = open("tiny-llama");
        let llama = Llama::from_safetensors(&config, &weights).unwrap();
        assert!(llama.tied());
        assert_eq!(llama.config().num_key_value_heads, 2);
        for i in 0..2 {
            let x = ids(&expected, &format!("input_ids_{i}"))
                .unsqueeze(0)
                .unwrap();
            let logits = llama
                .forward(&batch(x.clone(), None, None), Mode::Eval)
                .unwrap();
            let want = f32s(&expected, &format!("logits_{i}"))
                .unsqueeze(0)
                .unwrap();
            let d = max_diff(&logits, &want);
            assert!(d < 1e-4, "text {i}: logits differ by {d}");
            // The training forward (fused norms, masked softmax; no dropout in this config)
            // computes the same logits.
            let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
            let train = llama
                .forward(&batch(x, None, None), Mode::Train(&mut rng))
                .unwrap();
            let d = max_diff(&train, &want);
            assert!(d < 1e-4, "text {i}: training logits differ by {d}");
        }
    }

    /// Evaluation's one-pass rotary embedding is `split_heads` + `rope` bit for bit, and its
    /// fused `silu(gate)·up` agrees with candle's ops to float rounding.
    #[test]
    fn evaluation_ops_equal_the_training_formulas() {
        use super::super::fused::{RopeHeads, SiluMul};
        let dev = Device::Cpu;
        let vals = |n: usize, seed: u32| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    let h = (i as u32 ^ seed).wrapping_mul(2_654_435_761) >> 8;
                    h as f32 / (1u32 << 24) as f32 * 6.0 - 3.0
                })
                .collect()
        };
        let (b, s, heads, d) = (2, 37, 3, 64);
        let x = Tensor::from_vec(vals(b * s * heads * d, 1), (b, s, heads * d), &dev).unwrap();
        let cos = Tensor::from_vec(vals(s * d, 2), (s, d), &dev).unwrap();
        let sin = Tensor::from_vec(vals(s * d, 3), (s, d), &dev).unwrap();
        let want = rope(&split_heads(&x, heads).unwrap(), &cos, &sin).unwrap();
        let got = RopeHeads { heads, scale: 1.0 }
            .forward(&x, &cos, &sin)
            .unwrap();
        assert_eq!(got.dims(), want.dims());
        assert_eq!(max_diff(&got, &want), 0.0);
        let got = RopeHeads {
            heads,
            scale: 0.125,
        }
        .forward(&x, &cos, &sin)
        .unwrap();
        assert_eq!(max_diff(&got, &(want * 0.125).unwrap()), 0.0);
        assert!(RopeHeads {
            heads: 5,
            scale: 1.0
        }
        .forward(&x, &cos, &sin)
        .is_err());
        // The softmax repeats a bias's query rows over stacked query groups: the same as
        // the bias repeated.
        let scores = Tensor::from_vec(vals(2 * 3 * 2 * s * s, 6), (2, 3, 2 * s, s), &dev).unwrap();
        let bias = causal_bias(s, None).unwrap();
        let softmax = super::super::fused::Softmax { scale: 0.5 };
        let tiled = softmax.forward(&scores, Some(&bias)).unwrap();
        let repeated = softmax
            .forward(&scores, Some(&bias.repeat((1, 1, 2, 1)).unwrap()))
            .unwrap();
        assert_eq!(max_diff(&tiled, &repeated), 0.0);
        let odd = Tensor::zeros((1, 1, 3, s), candle_core::DType::F32, &dev).unwrap();
        assert!(softmax.forward(&scores, Some(&odd)).is_err());
        let gate = Tensor::from_vec(vals(200_000, 4), (2, 100_000), &dev).unwrap();
        let up = Tensor::from_vec(vals(200_000, 5), (2, 100_000), &dev).unwrap();
        let want = (candle_nn::ops::silu(&gate).unwrap() * &up).unwrap();
        let got = SiluMul.forward(&gate, &up).unwrap();
        assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
        assert!(SiluMul
            .forward(&gate, &up.narrow(1, 0, 10).unwrap())
            .is_err());
    }

    #[test]
    fn gradients_reach_every_tensor_and_match_finite_differences() {
        use crate::compress::engine::transformer::fixtures::check_gradients;
        let (config, weights, expected) = open("tiny-llama");
        let llama = Llama::from_safetensors(&config, &weights).unwrap();
        let x = ids(&expected, "input_ids_0").unsqueeze(0).unwrap();
        let checked = [
            "embed_tokens.weight",
            "layers.0.input_layernorm.weight",
            "layers.0.self_attn.q_proj.weight",
            "layers.0.self_attn.k_proj.weight",
            "layers.1.self_attn.v_proj.weight",
            "layers.0.mlp.gate_proj.weight",
            "layers.1.post_attention_layernorm.weight",
            "model.norm.weight",
        ];
        check_gradients(&llama, &batch(x, None, None), &checked, None);
    }

    #[test]
    fn block_by_block_calibration_equals_runs_of_the_whole_network() {
        use crate::compress::calib::{assert_blockwise_equals_whole, CalibrationSet};
        use crate::compress::quant::gptq::GptqParams;
        let (config, weights, expected) = open("tiny-llama");
        let set = CalibrationSet {
            batches: (0..2)
                .map(|i| {
                    batch(
                        ids(&expected, &format!("input_ids_{i}"))
                            .unsqueeze(0)
                            .unwrap(),
                        None,
                        None,
                    )
                })
                .collect(),
            samples: 2,
            tokens: 0,
            indices: vec![0, 1],
            kind: "windows",
        };
        let p = GptqParams {
            bits: 3,
            group_size: Some(16),
            symmetric: true,
            act_order: false,
            damp: 0.01,
            block_size: 8,
            gguf_grid: false,
            clip: false,
        };
        let groups = assert_blockwise_equals_whole(
            || Llama::from_safetensors(&config, &weights).unwrap(),
            &set,
            &p,
        );
        // q/k/v, o, gate/up, down in each of the two blocks.
        assert_eq!(groups, 8);
    }

    #[test]
    fn padding_on_the_right_changes_nothing_before_it() {
        let (config, weights, expected) = open("tiny-llama");
        let llama = Llama::from_safetensors(&config, &weights).unwrap();
        let a = ids(&expected, "input_ids_0");
        let n = a.dim(0).unwrap();
        let padded = Tensor::cat(
            &[
                &a,
                &Tensor::zeros(5, candle_core::DType::U32, &Device::Cpu).unwrap(),
            ],
            0,
        )
        .unwrap()
        .unsqueeze(0)
        .unwrap();
        let mut mask = vec![1u32; n];
        mask.extend([0; 5]);
        let mask = Tensor::from_vec(mask, (1, n + 5), &Device::Cpu).unwrap();
        let logits = llama
            .forward(&batch(padded, Some(mask), None), Mode::Eval)
            .unwrap()
            .narrow(1, 0, n)
            .unwrap();
        let want = f32s(&expected, "logits_0").unsqueeze(0).unwrap();
        assert!(max_diff(&logits, &want) < 1e-4);
    }

    #[test]
    fn rope_settings_are_read_from_either_spelling() {
        let c = LlamaConfig::from_json(&serde_json::json!({"vocab_size": 8, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}))
        .unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { .. }));
        assert_eq!(c.num_key_value_heads, 2);
        assert_eq!(c.inv_freq().len(), 2);
        let c = LlamaConfig::from_json(&serde_json::json!({"vocab_size": 8, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "rope_parameters": {"rope_theta": 1000.0, "rope_type": "default"}}))
        .unwrap();
        assert_eq!(c.rope_theta, 1000.0);
        let e = LlamaConfig::from_json(&serde_json::json!({"vocab_size": 8, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 3,
            "num_key_value_heads": 2}))
        .unwrap_err();
        assert_eq!(e.code().as_str(), "architecture_mismatch");
    }
}
