//! The `bert` family: BERT-style encoders as Hugging Face `transformers` defines them
//! (`BertModel`, `BertForSequenceClassification`): token + position + token-type
//! embeddings, post-LN blocks (self-attention with a padding mask, GELU feed-forward), and
//! either a `[CLS]` classifier (pooler + `classifier`) when the weights have one, or the
//! sentence embedding of sentence-transformers (mean pooling over the attention mask, then
//! L2 normalisation; all-MiniLM-L6-v2's recipe).

use candle_core::{Tensor, D};
use serde::Deserialize;
use serde_json::Value;

use std::sync::Arc;

use super::data::{Batch, Dataset, TextEncoder, TextInput};
use super::transformer::{
    attention, check_tensors, draw, dropout, embed, keep_blocks, layer_norm_in, merge_heads,
    pad_id, padding_bias, split_heads, token_ids, Probe, Weights,
};
use super::{BlockRunner, BlockState, Family, Mode, Network, Param, ProbeFn, WeightTransform};
use crate::compress::formats::safetensors::{NamedTensor, SafetensorsFile};
use crate::compress::select::glob_match;
use crate::compress::{Error, Result};

/// Stages of an encoder block (see [`Bert::stage`]).
const STAGES: usize = 4;

/// The prefix of the encoder's tensors in a `BertFor…` checkpoint.
const BASE_PREFIX: &str = "bert.";

/// The std of freshly drawn weights (`initializer_range`, transformers' default 0.02).
pub(super) fn initializer_range(document: &Value) -> f64 {
    document
        .get("initializer_range")
        .and_then(Value::as_f64)
        .unwrap_or(0.02)
}

/// The `config.json` fields the engine reads.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Encoder blocks.
    pub num_hidden_layers: usize,
    /// Attention heads per block.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Feed-forward activation (`gelu`: the exact erf form).
    #[serde(default = "gelu")]
    pub hidden_act: String,
    /// Longest sequence (position embeddings).
    pub max_position_embeddings: usize,
    /// Token types (segments).
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    /// Layer-norm epsilon.
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    /// Dropout of hidden states in training.
    #[serde(default = "tenth")]
    pub hidden_dropout_prob: f64,
    /// Dropout of attention probabilities in training.
    #[serde(default = "tenth")]
    pub attention_probs_dropout_prob: f64,
    /// Dropout before the classifier in training (`hidden_dropout_prob` when unset).
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
    /// Position embeddings (`absolute` only).
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

fn gelu() -> String {
    "gelu".into()
}
fn two() -> usize {
    2
}
fn eps() -> f64 {
    1e-12
}
fn tenth() -> f64 {
    0.1
}

impl BertConfig {
    /// Reads and checks a `config.json`.
    pub fn from_json(config: &Value) -> Result<BertConfig> {
        let c: BertConfig = serde_json::from_value(config.clone())
            .map_err(|e| Error::ArchitectureMismatch(format!("config.json for bert: {e}")))?;
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(Error::ArchitectureMismatch(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                c.hidden_size, c.num_attention_heads
            )));
        }
        if !matches!(
            c.hidden_act.as_str(),
            "gelu" | "relu" | "gelu_new" | "gelu_pytorch_tanh"
        ) {
            return Err(Error::UnsupportedFamily(format!(
                "bert with hidden_act {:?} (gelu, gelu_new, relu are supported)",
                c.hidden_act
            )));
        }
        if c.position_embedding_type
            .as_deref()
            .is_some_and(|p| p != "absolute")
        {
            return Err(Error::UnsupportedFamily(
                "bert with relative position embeddings (absolute only)".into(),
            ));
        }
        Ok(c)
    }
}

/// A BERT-style encoder over its weights.
#[derive(Debug)]
pub struct Bert {
    config: BertConfig,
    document: Value,
    weights: Weights,
    /// The model's `tokenizer.json`, when it has one (text datasets need it).
    tokenizer: Option<Arc<TextEncoder>>,
    /// `bert.` for `BertFor…` checkpoints, empty for `BertModel` ones.
    prefix: String,
    /// Classes of the `[CLS]` classifier, when the weights have one.
    classes: Option<usize>,
}

impl Bert {
    /// The encoder described by `config` (a `config.json`) with the weights of `file`.
    pub fn from_safetensors(config: &Value, file: &SafetensorsFile) -> Result<Bert> {
        Self::new(config, Weights::from_file(file)?)
    }

    /// This network reading text with `tokenizer`.
    pub fn with_tokenizer(mut self, tokenizer: Option<Arc<TextEncoder>>) -> Bert {
        self.tokenizer = tokenizer;
        self
    }

    fn new(document: &Value, weights: Weights) -> Result<Bert> {
        let config = BertConfig::from_json(document)?;
        let prefix = if weights.has(&format!("{BASE_PREFIX}embeddings.word_embeddings.weight")) {
            BASE_PREFIX.to_string()
        } else {
            String::new()
        };
        let bert = Bert {
            classes: weights.shape("classifier.weight").map(|s| s[0]),
            config,
            document: document.clone(),
            weights,
            tokenizer: None,
            prefix,
        };
        bert.check_shapes()?;
        Ok(bert)
    }

    /// Every tensor the config implies is there with its shape.
    fn check_shapes(&self) -> Result<()> {
        let want = Self::shapes(&self.config, &self.prefix, self.classes, false);
        check_tensors(&self.weights, &want)
    }

    /// The tensors `c` implies, under `p`, with a classifier of `classes` (and its pooler;
    /// the pooler alone with `pooler`).
    fn shapes(
        c: &BertConfig,
        p: &str,
        classes: Option<usize>,
        pooler: bool,
    ) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let mut want: Vec<(String, Vec<usize>)> = vec![
            (
                format!("{p}embeddings.word_embeddings.weight"),
                vec![c.vocab_size, h],
            ),
            (
                format!("{p}embeddings.position_embeddings.weight"),
                vec![c.max_position_embeddings, h],
            ),
            (
                format!("{p}embeddings.token_type_embeddings.weight"),
                vec![c.type_vocab_size, h],
            ),
            (format!("{p}embeddings.LayerNorm.weight"), vec![h]),
            (format!("{p}embeddings.LayerNorm.bias"), vec![h]),
        ];
        for l in 0..c.num_hidden_layers {
            let b = format!("{p}encoder.layer.{l}");
            for (name, shape) in [
                ("attention.self.query", vec![h, h]),
                ("attention.self.key", vec![h, h]),
                ("attention.self.value", vec![h, h]),
                ("attention.output.dense", vec![h, h]),
                ("intermediate.dense", vec![i, h]),
                ("output.dense", vec![h, i]),
            ] {
                want.push((format!("{b}.{name}.bias"), vec![shape[0]]));
                want.push((format!("{b}.{name}.weight"), shape));
            }
            for ln in ["attention.output.LayerNorm", "output.LayerNorm"] {
                want.push((format!("{b}.{ln}.weight"), vec![h]));
                want.push((format!("{b}.{ln}.bias"), vec![h]));
            }
        }
        if classes.is_some() || pooler {
            want.push((format!("{p}pooler.dense.weight"), vec![h, h]));
            want.push((format!("{p}pooler.dense.bias"), vec![h]));
        }
        if let Some(n) = classes {
            want.push(("classifier.weight".into(), vec![n, h]));
            want.push(("classifier.bias".into(), vec![n]));
        }
        want
    }

    /// The tensors [`Bert::fresh`] draws for `document`.
    pub fn shapes_of(
        document: &Value,
        classes: Option<usize>,
        pooler: bool,
    ) -> Result<Vec<(String, Vec<usize>)>> {
        let config = BertConfig::from_json(document)?;
        let prefix = if classes.is_some() { BASE_PREFIX } else { "" };
        Ok(Self::shapes(&config, prefix, classes, pooler))
    }

    /// A bert model of `document` (a `config.json`) drawn afresh as `transformers` would,
    /// with a classifier of `classes` when given, and a pooler with it or with `pooler`.
    pub fn fresh(
        document: &Value,
        classes: Option<usize>,
        pooler: bool,
        seed: u64,
    ) -> Result<Bert> {
        let std = initializer_range(document);
        let tensors = draw(&Self::shapes_of(document, classes, pooler)?, std, seed);
        Bert::new(document, Weights::from_tensors(tensors)?)
    }

    /// This encoder with a freshly initialised `[CLS]` classifier of `num_classes` outputs
    /// (`BertForSequenceClassification`: the pooler, kept when the weights have one, then
    /// `classifier`), the layout Hugging Face `transformers` loads: every encoder tensor
    /// under `bert.`, the config naming the architecture and its labels. New tensors are
    /// drawn as `transformers` initialises them (normal, std `initializer_range`; zero biases).
    pub fn with_classifier(&self, layer: &str, num_classes: usize, seed: u64) -> Result<Bert> {
        if layer != "classifier" {
            return Err(Error::invalid(
                "head.layer",
                format!("a bert model's head is `classifier`, not {layer:?}"),
            ));
        }
        if num_classes == 0 {
            return Err(Error::invalid(
                "head.num_classes",
                "`num_classes` must be at least 1",
            ));
        }
        let h = self.config.hidden_size;
        let std = initializer_range(&self.document);
        let mut tensors: Vec<NamedTensor> = self
            .weights
            .export()?
            .into_iter()
            .filter(|t| !t.name.starts_with("classifier."))
            .map(|mut t| {
                if self.prefix.is_empty() {
                    t.name = format!("{BASE_PREFIX}{}", t.name);
                }
                t
            })
            .collect();
        // The new tensors, in this order from one seeded stream: a pooler where there is
        // none, then the classifier.
        let mut new: Vec<(String, Vec<usize>)> = Vec::new();
        if !tensors
            .iter()
            .any(|t| t.name == format!("{BASE_PREFIX}pooler.dense.weight"))
        {
            new.push((format!("{BASE_PREFIX}pooler.dense.weight"), vec![h, h]));
            new.push((format!("{BASE_PREFIX}pooler.dense.bias"), vec![h]));
        }
        new.push(("classifier.weight".into(), vec![num_classes, h]));
        new.push(("classifier.bias".into(), vec![num_classes]));
        tensors.extend(draw(&new, std, seed));
        let mut document = self.document.clone();
        if let Some(doc) = document.as_object_mut() {
            doc.insert(
                "architectures".into(),
                serde_json::json!(["BertForSequenceClassification"]),
            );
            let id2label: serde_json::Map<String, Value> = (0..num_classes)
                .map(|i| (i.to_string(), Value::from(format!("LABEL_{i}"))))
                .collect();
            let label2id: serde_json::Map<String, Value> = (0..num_classes)
                .map(|i| (format!("LABEL_{i}"), Value::from(i)))
                .collect();
            doc.insert("id2label".into(), Value::Object(id2label));
            doc.insert("label2id".into(), Value::Object(label2id));
            doc.remove("num_labels");
        }
        Ok(Bert::new(&document, Weights::from_tensors(tensors)?)?
            .with_tokenizer(self.tokenizer.clone()))
    }

    fn name(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    /// The final hidden states `[b, s, h]`, and the layers' outputs named in `taps`
    /// (`encoder.layer.{i}`).
    /// Encoder block `l` on the hidden states `h` `[b, s, hidden]`, with the batch's
    /// attention bias: its stages in turn.
    fn block(
        &self,
        l: usize,
        h: &Tensor,
        bias: Option<&Tensor>,
        mode: &mut Mode<'_>,
        probe: &mut Probe<'_>,
    ) -> Result<Tensor> {
        let mut h = h.clone();
        let mut inner = None;
        for k in 0..STAGES {
            (h, inner) = self.stage(l, k, &h, inner.as_ref(), bias, mode, probe)?;
        }
        Ok(h)
    }

    /// Stage `k` of encoder block `l` (see [`BlockRunner::run_stage`]): 0 the self-attention
    /// up to the input of `attention.output.dense`, 1 that layer, the residual and its
    /// LayerNorm, 2 `intermediate.dense` and the activation, 3 `output.dense`, the residual
    /// and its LayerNorm. `h` is the residual stream and `inner` the stage's other input
    /// (the attention context, the activation); returns both for the next stage.
    #[allow(clippy::too_many_arguments)]
    fn stage(
        &self,
        l: usize,
        k: usize,
        h: &Tensor,
        inner: Option<&Tensor>,
        bias: Option<&Tensor>,
        mode: &mut Mode<'_>,
        probe: &mut Probe<'_>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let c = &self.config;
        let block = self.name(&format!("encoder.layer.{l}"));
        let lin = |n: &str, x: &Tensor, mode: &Mode<'_>, probe: &mut Probe<'_>| {
            self.weights.linear(&format!("{block}.{n}"), x, mode, probe)
        };
        let ln = |n: &str, x: &Tensor, mode: &Mode<'_>| -> Result<Tensor> {
            layer_norm_in(
                x,
                &self.weights.get(&format!("{block}.{n}.weight"), mode)?,
                &self.weights.get(&format!("{block}.{n}.bias"), mode)?,
                c.layer_norm_eps,
                mode,
            )
        };
        let inner = || {
            inner.ok_or_else(|| {
                Error::Internal(format!("bert block {l} stage {k} without its input"))
            })
        };
        match k {
            0 => {
                let q = split_heads(
                    &lin("attention.self.query", h, mode, probe)?,
                    c.num_attention_heads,
                )?;
                let key = split_heads(
                    &lin("attention.self.key", h, mode, probe)?,
                    c.num_attention_heads,
                )?;
                let v = split_heads(
                    &lin("attention.self.value", h, mode, probe)?,
                    c.num_attention_heads,
                )?;
                let ctx = merge_heads(&attention(
                    &q,
                    &key,
                    &v,
                    bias,
                    c.attention_probs_dropout_prob,
                    mode,
                )?)?;
                Ok((h.clone(), Some(ctx)))
            }
            1 => {
                let a = dropout(
                    &lin("attention.output.dense", inner()?, mode, probe)?,
                    c.hidden_dropout_prob,
                    mode,
                )?;
                Ok((ln("attention.output.LayerNorm", &(a + h)?, mode)?, None))
            }
            2 => {
                let act = activation(
                    &c.hidden_act,
                    &lin("intermediate.dense", h, mode, probe)?,
                    matches!(mode, Mode::Train(_)),
                )?;
                Ok((h.clone(), Some(act)))
            }
            3 => {
                let out = dropout(
                    &lin("output.dense", inner()?, mode, probe)?,
                    c.hidden_dropout_prob,
                    mode,
                )?;
                Ok((ln("output.LayerNorm", &(out + h)?, mode)?, None))
            }
            _ => Err(Error::Internal(format!(
                "bert blocks have {STAGES} stages, not {k}"
            ))),
        }
    }

    /// The input of block 0 for `batch` and the batch's attention bias.
    fn embeddings(&self, batch: &Batch, mode: &mut Mode<'_>) -> Result<(Tensor, Option<Tensor>)> {
        let c = &self.config;
        let ids = token_ids(&batch.x)?;
        let (b, s) = ids.dims2()?;
        if s > c.max_position_embeddings {
            return Err(Error::DatasetMismatch(format!(
                "sequences of {s} tokens are longer than the model's {} positions",
                c.max_position_embeddings
            )));
        }
        let w = |n: &str, mode: &Mode<'_>| self.weights.get(&self.name(n), mode);
        let words = embed(&w("embeddings.word_embeddings.weight", mode)?, &ids)?;
        let positions = w("embeddings.position_embeddings.weight", mode)?.narrow(0, 0, s)?;
        let segments = match &batch.segments {
            Some(t) => token_ids(t)?,
            None => Tensor::zeros((b, s), candle_core::DType::U32, ids.device())?,
        };
        let types = embed(
            &w("embeddings.token_type_embeddings.weight", mode)?,
            &segments,
        )?;
        let x = words.broadcast_add(&positions)?.add(&types)?;
        let mut h = layer_norm_in(
            &x,
            &w("embeddings.LayerNorm.weight", mode)?,
            &w("embeddings.LayerNorm.bias", mode)?,
            c.layer_norm_eps,
            mode,
        )?;
        h = dropout(&h, c.hidden_dropout_prob, mode)?;
        let bias = match &batch.mask {
            Some(m) => Some(padding_bias(m)?),
            None => None,
        };
        Ok((h, bias))
    }

    fn encode(
        &self,
        batch: &Batch,
        mode: &mut Mode<'_>,
        probe: &mut Probe<'_>,
        taps: &[&str],
    ) -> Result<(Tensor, Vec<Option<Tensor>>)> {
        let c = &self.config;
        let (mut h, bias) = self.embeddings(batch, mode)?;
        let mut tapped = vec![None; taps.len()];
        for l in 0..c.num_hidden_layers {
            h = self.block(l, &h, bias.as_ref(), mode, probe)?;
            let tap_name = format!("encoder.layer.{l}");
            for (slot, t) in taps.iter().enumerate() {
                if *t == tap_name {
                    tapped[slot] = Some(h.clone());
                }
            }
        }
        Ok((h, tapped))
    }

    /// The network's output for hidden states `h`: classifier logits `[b, classes]`, or the
    /// L2-normalised mean-pooled sentence embedding `[b, h]`.
    fn head(
        &self,
        h: &Tensor,
        batch: &Batch,
        mode: &mut Mode<'_>,
        probe: &mut Probe<'_>,
    ) -> Result<Tensor> {
        if self.classes.is_some() {
            let first = h.narrow(1, 0, 1)?.squeeze(1)?;
            let pooled = self
                .weights
                .linear(&self.name("pooler.dense"), &first, mode, probe)?
                .tanh()?;
            let p = self
                .config
                .classifier_dropout
                .unwrap_or(self.config.hidden_dropout_prob);
            let pooled = dropout(&pooled, p, mode)?;
            return self.weights.linear("classifier", &pooled, mode, probe);
        }
        mean_pool_normalised(h, batch.mask.as_ref())
    }

    fn forward_impl(
        &self,
        batch: &Batch,
        mut mode: Mode<'_>,
        probe: &mut Probe<'_>,
        taps: &[&str],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let (h, tapped) = self.encode(batch, &mut mode, probe, taps)?;
        let out = self.head(&h, batch, &mut mode, probe)?;
        let tapped = tapped
            .into_iter()
            .zip(taps)
            .map(|(t, name)| t.ok_or_else(|| Error::Internal(format!("no layer {name} to tap"))))
            .collect::<Result<_>>()?;
        Ok((out, tapped))
    }
}

/// The activation of the feed-forward layer (in training the exact GELU runs fused with its
/// backward pass).
fn activation(name: &str, x: &Tensor, train: bool) -> Result<Tensor> {
    Ok(match name {
        "relu" => x.relu()?,
        "gelu_new" | "gelu_pytorch_tanh" => x.gelu()?,
        _ if train => super::fused::GeluErf.forward(x)?,
        _ => x.gelu_erf()?,
    })
}

/// Mean of `h` `[b, s, d]` over the positions the mask `[b, s]` keeps: `[b, d]`.
pub fn mean_pool(h: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    match mask {
        None => Ok(h.mean(1)?),
        Some(m) => {
            let m = m.to_dtype(candle_core::DType::F32)?.unsqueeze(2)?;
            let summed = h.broadcast_mul(&m)?.sum(1)?;
            let counts = m.sum(1)?.clamp(1e-9, f64::MAX)?;
            Ok(summed.broadcast_div(&counts)?)
        }
    }
}

/// [`mean_pool`] followed by L2 normalisation of each row (sentence-transformers).
pub fn mean_pool_normalised(h: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    unit_rows(&mean_pool(h, mask)?)
}

/// Rows of `x` (last dimension) scaled to unit length (lengths below 1e-12 count as 1e-12).
pub fn unit_rows(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    Ok(x.broadcast_div(&norm)?)
}

impl BlockRunner for Bert {
    fn num_blocks(&self) -> usize {
        self.config.num_hidden_layers
    }

    fn embed(&self, batch: &Batch) -> Result<BlockState> {
        let (hidden, bias) = self.embeddings(batch, &mut Mode::Eval)?;
        Ok(BlockState {
            hidden,
            aux: bias.into_iter().collect(),
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
        let (hidden, inner) = self.stage(
            i,
            k,
            &state.hidden,
            state.inner.first(),
            state.aux.first(),
            &mut Mode::Eval,
            &mut Probe::new(probe),
        )?;
        Ok(BlockState {
            hidden,
            aux: state.aux.clone(),
            inner: inner.into_iter().collect(),
        })
    }

    fn finish(&self, batch: &Batch, state: &BlockState) -> Result<Tensor> {
        self.head(&state.hidden, batch, &mut Mode::Eval, &mut Probe::none())
    }
}

impl Network for Bert {
    fn family(&self) -> Family {
        Family::Bert
    }

    fn describe(&self) -> Value {
        self.document.clone()
    }

    fn params(&self) -> &[Param] {
        self.weights.params()
    }

    fn freeze(&mut self, pattern: &str) -> usize {
        let prefixed = !self.prefix.is_empty();
        self.weights.freeze_where(|name| {
            glob_match(pattern, name)
                || (prefixed
                    && name
                        .strip_prefix(BASE_PREFIX)
                        .is_some_and(|bare| glob_match(pattern, bare)))
        })
    }

    fn export(&self) -> Result<Vec<NamedTensor>> {
        self.weights.export()
    }

    fn load(&self, weights: &[NamedTensor]) -> Result<()> {
        self.weights.load(weights)
    }

    fn with_weights(&self, weights: Vec<NamedTensor>) -> Result<Box<dyn Network>> {
        Ok(Box::new(
            Bert::new(&self.document, self.weights.with_values(weights)?)?
                .with_tokenizer(self.tokenizer.clone()),
        ))
    }

    fn check_trainable(&self) -> Result<()> {
        Ok(())
    }

    fn check_dataset(&self, dataset: &Dataset, labels_required: bool) -> Result<()> {
        if !dataset.is_text() {
            return Err(Error::DatasetMismatch(
                "a bert model reads text: upload the dataset as `text` or `jsonl`".into(),
            ));
        }
        match (dataset.num_classes, labels_required, self.classes) {
            (None, true, _) => Err(Error::DatasetMismatch(
                "the dataset has no labels, but this operation needs them".into(),
            )),
            (Some(n), true, Some(c)) if n > c => Err(Error::DatasetMismatch(format!(
                "the dataset has labels up to {}, but the classifier has {c} classes",
                n - 1
            ))),
            (Some(_), true, None) => Err(Error::DatasetMismatch(
                "the model has no classifier head: give `head` with the number of classes".into(),
            )),
            _ => Ok(()),
        }
    }

    fn output_width(&self) -> Result<usize> {
        Ok(self.classes.unwrap_or(self.config.hidden_size))
    }

    fn has_head(&self) -> bool {
        self.classes.is_some()
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
            .map(|l| format!("encoder.layer.{l}"))
            .collect()
    }

    fn layer_width(&self, layer: &str) -> Result<usize> {
        if self.has_layer(layer) {
            Ok(self.config.hidden_size)
        } else {
            Err(Error::Internal(format!("bert has no layer {layer:?}")))
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

    fn with_head(&self, layer: &str, num_classes: usize, seed: u64) -> Result<Box<dyn Network>> {
        Ok(Box::new(self.with_classifier(layer, num_classes, seed)?))
    }

    fn with_blocks(&self, layers: &[usize]) -> Result<Box<dyn Network>> {
        let (tensors, document) = keep_blocks(
            self.weights.export()?,
            &self.name("encoder.layer."),
            layers,
            self.config.num_hidden_layers,
            &self.document,
        )?;
        Ok(Box::new(
            Bert::new(&document, Weights::from_tensors(tensors)?)?
                .with_tokenizer(self.tokenizer.clone()),
        ))
    }

    fn with_config(
        &self,
        overrides: &serde_json::Map<String, Value>,
        seed: u64,
    ) -> Result<Box<dyn Network>> {
        let document = super::transformer::merge_config(&self.document, overrides);
        Ok(Box::new(
            // The teacher's pooler, when it has one, is drawn too (transformers' BertModel has one).
            Bert::fresh(
                &document,
                self.classes,
                self.weights.has(&self.name("pooler.dense.weight")),
                seed,
            )?
            .with_tokenizer(self.tokenizer.clone()),
        ))
    }

    fn matches(&self, pattern: &str, name: &str) -> bool {
        glob_match(pattern, name)
            || name
                .strip_prefix(BASE_PREFIX)
                .is_some_and(|bare| glob_match(pattern, bare))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::engine::transformer::fixtures::{batch, f32s, ids, max_diff, open};
    use crate::compress::engine::LayerInput;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn block_by_block_calibration_equals_runs_of_the_whole_network() {
        use crate::compress::calib::{assert_blockwise_equals_whole, CalibrationSet};
        use crate::compress::quant::gptq::GptqParams;
        let (config, weights, expected) = open("tiny-bert");
        // A padded batch: the mask's bias travels with the block states.
        let b = batch(
            ids(&expected, "input_ids"),
            Some(ids(&expected, "attention_mask")),
            Some(ids(&expected, "token_type_ids")),
        );
        let set = CalibrationSet {
            batches: vec![b],
            samples: 1,
            tokens: 0,
            indices: vec![0],
            kind: "documents",
        };
        let p = GptqParams {
            bits: 3,
            group_size: None,
            symmetric: true,
            act_order: true,
            damp: 0.01,
            block_size: 8,
            gguf_grid: false,
            clip: false,
        };
        let groups = assert_blockwise_equals_whole(
            || Bert::from_safetensors(&config, &weights).unwrap(),
            &set,
            &p,
        );
        // q/k/v, attention output, intermediate, output in each block; no pooler or head.
        assert_eq!(groups, 4 * bert_blocks(&config));
    }

    fn bert_blocks(config: &Value) -> usize {
        config["num_hidden_layers"].as_u64().unwrap() as usize
    }

    #[test]
    fn tiny_bert_matches_transformers() {
        let (config, weights, expected) = open("tiny-bert");
        let bert = Bert::from_safetensors(&config, &weights).unwrap();
        assert_eq!(bert.family(), Family::Bert);
        let b = batch(
            ids(&expected, "input_ids"),
            Some(ids(&expected, "attention_mask")),
            Some(ids(&expected, "token_type_ids")),
        );
        let (h, _) = bert
            .encode(&b, &mut Mode::Eval, &mut Probe::none(), &[])
            .unwrap();
        let d = max_diff(&h, &f32s(&expected, "last_hidden_state"));
        assert!(d < 1e-5, "last_hidden_state differs by {d}");
        let e = bert.forward(&b, Mode::Eval).unwrap();
        let d = max_diff(&e, &f32s(&expected, "sentence_embedding"));
        assert!(d < 1e-5, "sentence_embedding differs by {d}");
        assert_eq!(bert.output_width().unwrap(), 32);
    }

    #[test]
    fn gradients_reach_every_tensor_and_match_finite_differences() {
        use crate::compress::engine::transformer::fixtures::check_gradients;
        // The mean-pooled sentence embedding does not read the pooler; the classifier does.
        for (fixture, unread) in [("tiny-bert", Some("pooler.")), ("tiny-bert-cls", None)] {
            let (config, weights, expected) = open(fixture);
            let bert = Bert::from_safetensors(&config, &weights).unwrap();
            let b = batch(
                ids(&expected, "input_ids"),
                Some(ids(&expected, "attention_mask")),
                Some(ids(&expected, "token_type_ids")),
            );
            let checked = [
                "embeddings.word_embeddings.weight",
                "embeddings.LayerNorm.weight",
                "layer.0.attention.self.query.weight",
                "layer.1.attention.self.key.weight",
                "layer.0.attention.output.LayerNorm.bias",
                "layer.0.intermediate.dense.weight",
                "layer.1.output.dense.weight",
            ];
            check_gradients(&bert, &b, &checked, unread);
        }
    }

    #[test]
    fn tiny_bert_classifier_matches_transformers() {
        let (config, weights, expected) = open("tiny-bert-cls");
        let bert = Bert::from_safetensors(&config, &weights).unwrap();
        assert_eq!(bert.output_width().unwrap(), 3);
        let b = batch(
            ids(&expected, "input_ids"),
            Some(ids(&expected, "attention_mask")),
            Some(ids(&expected, "token_type_ids")),
        );
        let logits = bert.forward(&b, Mode::Eval).unwrap();
        let d = max_diff(&logits, &f32s(&expected, "logits"));
        assert!(d < 1e-5, "logits differ by {d}");
        // Without dropout the training forward (fused layer norm, masked softmax, GELU)
        // computes the same logits on the padded batch.
        let mut quiet = config.clone();
        quiet["hidden_dropout_prob"] = serde_json::json!(0.0);
        quiet["attention_probs_dropout_prob"] = serde_json::json!(0.0);
        let bert = Bert::from_safetensors(&quiet, &weights).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let train = bert.forward(&b, Mode::Train(&mut rng)).unwrap();
        let d = max_diff(&train, &f32s(&expected, "logits"));
        assert!(d < 1e-5, "training logits differ by {d}");
    }

    #[test]
    fn the_probe_sees_every_linear_input_and_exports_round_trip() {
        let (config, weights, expected) = open("tiny-bert");
        let bert = Bert::from_safetensors(&config, &weights).unwrap();
        let b = batch(
            ids(&expected, "input_ids"),
            Some(ids(&expected, "attention_mask")),
            None,
        );
        let mut seen = Vec::new();
        bert.forward_probed(&b, &mut |i: LayerInput<'_>| {
            seen.push((i.index, i.layer.to_string(), i.x.dims().to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen.len(), 2 * 6, "6 linear layers per block");
        assert_eq!(seen[0].1, "encoder.layer.0.attention.self.query");
        assert_eq!(seen[0].2, vec![3 * 37, 32]);
        assert_eq!(seen[4].1, "encoder.layer.0.intermediate.dense");
        assert_eq!(seen[11].0, 11);
        let exported = bert.export().unwrap();
        assert_eq!(exported.len(), 39);
        let copy = bert.with_weights(exported).unwrap();
        let d = max_diff(
            &copy.forward(&b, Mode::Eval).unwrap(),
            &bert.forward(&b, Mode::Eval).unwrap(),
        );
        assert_eq!(d, 0.0);
    }

    #[test]
    fn a_new_classifier_is_laid_out_as_transformers_loads_it() {
        let (config, weights, expected) = open("tiny-bert");
        let bert = Bert::from_safetensors(&config, &weights).unwrap();
        let mut cls = bert.with_classifier("classifier", 4, 7).unwrap();
        assert!(cls.has_head());
        assert_eq!(cls.output_width().unwrap(), 4);
        let doc = cls.describe();
        assert_eq!(doc["architectures"][0], "BertForSequenceClassification");
        assert_eq!(doc["id2label"].as_object().unwrap().len(), 4);
        assert_eq!(doc["label2id"]["LABEL_3"], 3);
        let exported = cls.export().unwrap();
        // Every encoder tensor under `bert.` (the pooler kept), and the new head.
        assert_eq!(exported.len(), 39 + 2);
        let pooler = bert.export().unwrap();
        let pooler = pooler
            .iter()
            .find(|t| t.name == "pooler.dense.weight")
            .unwrap();
        assert!(exported
            .iter()
            .any(|t| t.name == "bert.pooler.dense.weight" && t.values == pooler.values));
        assert!(exported
            .iter()
            .all(|t| t.name.starts_with("bert.") || t.name.starts_with("classifier.")));
        let w = exported
            .iter()
            .find(|t| t.name == "classifier.weight")
            .unwrap();
        assert_eq!(w.shape, vec![4, 32]);
        // transformers' initialisation: normal with std `initializer_range` (0.2 here).
        let n = w.values.len() as f64;
        let mean = w.values.iter().map(|&v| v as f64).sum::<f64>() / n;
        let std = (w
            .values
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        assert!(
            (std - 0.2).abs() < 0.03 && mean.abs() < 0.05,
            "{mean} {std}"
        );
        let b = exported
            .iter()
            .find(|t| t.name == "classifier.bias")
            .unwrap();
        assert!(b.values.iter().all(|&v| v == 0.0));
        // Seeded: the same seed draws the same head, another seed another.
        let again = bert
            .with_classifier("classifier", 4, 7)
            .unwrap()
            .export()
            .unwrap();
        let other = bert
            .with_classifier("classifier", 4, 8)
            .unwrap()
            .export()
            .unwrap();
        let head = |e: &[NamedTensor]| {
            e.iter()
                .find(|t| t.name == "classifier.weight")
                .unwrap()
                .values
                .clone()
        };
        assert_eq!(head(&again), w.values);
        assert_ne!(head(&other), w.values);
        // The encoder is untouched: the last block's pooled output is the same.
        let b = batch(
            ids(&expected, "input_ids"),
            Some(ids(&expected, "attention_mask")),
            Some(ids(&expected, "token_type_ids")),
        );
        let last = ["encoder.layer.1"];
        let (_, before) = bert.forward_taps(&b, Mode::Eval, &last).unwrap();
        let (logits, after) = cls.forward_taps(&b, Mode::Eval, &last).unwrap();
        assert_eq!(max_diff(&before[0], &after[0]), 0.0);
        assert_eq!(logits.dims(), &[3, 4]);
        // Patterns written for the uploaded names still name the prefixed tensors.
        assert!(cls.matches("embeddings.*", "bert.embeddings.LayerNorm.weight"));
        assert_eq!(cls.freeze("embeddings.*"), 5);
        assert_eq!(cls.freeze("bert.encoder.layer.0.*"), 16);
        assert!(!cls.matches("classifier.*", "bert.pooler.dense.weight"));
        // A reload of what it exports reads the same network.
        let copy = cls.with_weights(exported).unwrap();
        assert_eq!(
            max_diff(&copy.forward(&b, Mode::Eval).unwrap(), &logits),
            0.0
        );
        // An encoder saved without its pooler gets a fresh one.
        let bare: Vec<NamedTensor> = bert
            .export()
            .unwrap()
            .into_iter()
            .filter(|t| !t.name.starts_with("pooler."))
            .collect();
        let bare = Bert::new(&config, Weights::from_tensors(bare).unwrap()).unwrap();
        let fresh = bare
            .with_classifier("classifier", 2, 1)
            .unwrap()
            .export()
            .unwrap();
        let p = fresh
            .iter()
            .find(|t| t.name == "bert.pooler.dense.weight")
            .unwrap();
        assert_eq!(p.shape, vec![32, 32]);
        assert_ne!(p.values, pooler.values);
        let e = bert.with_classifier("fc", 4, 7).unwrap_err();
        assert_eq!(e.code().as_str(), "validation_failed", "{e}");
    }

    #[test]
    fn configs_and_weights_that_do_not_fit_are_refused() {
        let (mut config, weights, _) = open("tiny-bert");
        config["hidden_size"] = serde_json::json!(48);
        let e = Bert::from_safetensors(&config, &weights).unwrap_err();
        assert_eq!(e.code().as_str(), "architecture_mismatch", "{e}");
        let (mut config, weights, _) = open("tiny-bert");
        config["hidden_act"] = serde_json::json!("swish");
        let e = Bert::from_safetensors(&config, &weights).unwrap_err();
        assert_eq!(e.code().as_str(), "unsupported_family", "{e}");
    }
}
