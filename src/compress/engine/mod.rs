//! The network engine: networks that run on candle, the data they read, and the one
//! training loop, evaluation and fine-tuning built on them.
//!
//! Every family (`sequential`, `bert`, `llama`) implements [`Network`]; training,
//! evaluation, distillation, calibration and QAT use only the trait (a network says what it
//! minimises through [`Network::objective`]). A family is one module under `engine/`; the
//! transformer families share `transformer.rs`, and train through the fused ops of `fused.rs`.

pub mod augment;
pub mod bert;
pub mod data;
pub mod evaluate;
pub mod families;
pub mod finetune;
pub mod fused;
pub mod llama;
pub mod lm;
pub mod masks;
pub mod optim;
pub mod sequential;
pub mod text_eval;
pub mod train;
pub mod transformer;

use candle_core::{Tensor, Var};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::compress::engine::data::{Batch, Batches, Dataset, Subset, TextInput};
use crate::compress::formats::safetensors::{Dtype, NamedTensor, TensorSpec};
use crate::compress::Result;

/// The model families the engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// Layers in order: MLPs and CNNs (API.md "Architecture (sequential/v1)").
    Sequential,
    /// BERT-style encoders (post-LN blocks, GELU; MiniLM, BERT-base).
    Bert,
    /// Llama-style decoders (RMSNorm, RoPE, grouped-query attention, SwiGLU).
    Llama,
}

impl Family {
    /// API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Sequential => "sequential",
            Family::Bert => "bert",
            Family::Llama => "llama",
        }
    }
}

/// What training minimises for a network unless the caller gives its own loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Cross-entropy of the output's class logits `[batch, classes]` against the labels.
    Classification,
    /// A language model's next-token cross-entropy over its own input (`[batch, seq, vocab]`
    /// logits, padding left out).
    CausalLm,
}

/// The role of a parameter tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    /// `{name}.weight`.
    Weight,
    /// `{name}.bias`.
    Bias,
    /// `{name}.running_mean` (batch norm buffer).
    RunningMean,
    /// `{name}.running_var` (batch norm buffer).
    RunningVar,
}

impl ParamKind {
    /// The suffix after the layer name.
    pub fn suffix(self) -> &'static str {
        match self {
            ParamKind::Weight => "weight",
            ParamKind::Bias => "bias",
            ParamKind::RunningMean => "running_mean",
            ParamKind::RunningVar => "running_var",
        }
    }
}

/// A tensor a network expects in its weights file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParamSpec {
    /// Full tensor name, as in a PyTorch `state_dict` (`fc1.weight`, `3.1.bias`).
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its role.
    pub kind: ParamKind,
    /// Full name of the layer it belongs to (`fc1`, `3.1`).
    pub layer: String,
}

impl ParamSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The spec to write this parameter with [`crate::compress::formats::safetensors::write_safetensors`].
    pub fn tensor_spec(&self, dtype: Dtype) -> TensorSpec {
        TensorSpec::new(self.name.clone(), dtype, self.shape.clone())
    }
}

/// One parameter or buffer of a network.
#[derive(Debug)]
pub struct Param {
    spec: ParamSpec,
    var: Var,
    frozen: bool,
}

impl Param {
    /// A parameter holding `var`, trainable.
    pub fn new(spec: ParamSpec, var: Var) -> Param {
        Param {
            spec,
            var,
            frozen: false,
        }
    }

    /// The tensor's name, shape and role.
    pub fn spec(&self) -> &ParamSpec {
        &self.spec
    }

    /// The tensor's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The candle variable holding its current value.
    pub fn var(&self) -> &Var {
        &self.var
    }

    /// Whether it is frozen (kept fixed during training).
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// Keeps it fixed during training (or not).
    pub fn set_frozen(&mut self, frozen: bool) {
        self.frozen = frozen;
    }

    /// Whether an optimizer updates it: a weight or bias that is not frozen (batch-norm
    /// running statistics are buffers, updated by the forward pass, never by gradients).
    pub fn is_trainable(&self) -> bool {
        !self.frozen && matches!(self.spec.kind, ParamKind::Weight | ParamKind::Bias)
    }

    /// The value as it enters the graph: tracked when trainable, detached otherwise.
    pub fn tensor(&self, train: bool) -> Tensor {
        if train && self.is_trainable() {
            self.var.as_tensor().clone()
        } else {
            self.var.as_detached_tensor()
        }
    }
}

/// A function of `(parameter name, weight)` giving the weight a linear or conv layer computes
/// with instead (`None`: unchanged). Quantization-aware training uses it to fake-quantize
/// weights; in training the gradient passes straight through (`w + (q(w) − w).detach()`).
#[derive(Clone)]
pub struct WeightTransform(
    #[allow(clippy::type_complexity)]
    pub  std::sync::Arc<dyn Fn(&str, &Tensor) -> Result<Option<Tensor>> + Send + Sync>,
);

impl std::fmt::Debug for WeightTransform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WeightTransform(..)")
    }
}

/// How a forward pass runs.
pub enum Mode<'a> {
    /// Inference: nothing is recorded for backward, batch norm uses running statistics,
    /// dropout is off.
    Eval,
    /// Training: dropout draws its masks from the stream, batch norm normalises with batch
    /// statistics (and updates its running statistics unless frozen), trainable parameters
    /// are tracked for backward.
    Train(&'a mut ChaCha8Rng),
}

/// The input of one linear (or convolution) layer, as a probe sees it in a forward pass.
#[derive(Debug)]
pub struct LayerInput<'a> {
    /// The layer's position in the network's own order (sequential: the top-level index).
    pub index: usize,
    /// The layer's name: its weight is `{layer}.weight`.
    pub layer: &'a str,
    /// Kernel window of a convolution (`kh · kw`; 1 for a linear layer): a weight row holds
    /// `in_channels × window` values, channel-major.
    pub window: usize,
    /// The input, `[batch, features]` (linear) or `[batch, channels, h, w]` (convolution).
    pub x: &'a Tensor,
}

/// What a probe does with each linear layer's input ([`Network::forward_probed`]).
pub type ProbeFn<'p> = dyn FnMut(LayerInput<'_>) -> Result<()> + 'p;

/// The state between the blocks of a transformer run one block at a time: the hidden states
/// and what every block of the batch reads besides them (rotary tables, attention bias).
#[derive(Debug, Clone)]
pub struct BlockState {
    /// `[batch, seq, hidden]`.
    pub hidden: Tensor,
    /// Family-specific per-batch inputs of every block.
    pub aux: Vec<Tensor>,
    /// Between two stages of a block ([`BlockRunner::run_stage`]): what the next stage reads
    /// besides the hidden states (the residual stream); empty between blocks.
    pub inner: Vec<Tensor>,
}

/// A network that can run block by block in evaluation mode, so that calibration keeps one
/// block's inputs in memory instead of running the network from its input for every layer
/// group.
pub trait BlockRunner {
    /// Number of blocks.
    fn num_blocks(&self) -> usize;
    /// The input of block 0 for `batch`.
    fn embed(&self, batch: &Batch) -> Result<BlockState>;
    /// The network's output for `batch` from the state after the last block (what
    /// [`Network::forward`] returns).
    fn finish(&self, batch: &Batch, state: &BlockState) -> Result<Tensor>;
    /// The stages block `i` runs in: each after the first begins with a group of linear
    /// layers that read one input, so that a calibration sweep solves the group and then runs
    /// the stage once with its new weights instead of re-running the block up to it.
    fn num_stages(&self, i: usize) -> usize;
    /// Stage `k` of block `i` on `state` (the block's input for stage 0; the last stage's
    /// output is the next block's input); `probe` sees the input of each of its linear
    /// layers. The stages in turn are the block: its operations in its order.
    fn run_stage(
        &self,
        i: usize,
        k: usize,
        state: &BlockState,
        probe: &mut ProbeFn<'_>,
    ) -> Result<BlockState>;
    /// Block `i` on `state`: its stages in turn; `probe` sees the input of each of its
    /// linear layers.
    fn run_block(
        &self,
        i: usize,
        state: &BlockState,
        probe: &mut ProbeFn<'_>,
    ) -> Result<BlockState> {
        let mut state = self.run_stage(i, 0, state, probe)?;
        for k in 1..self.num_stages(i) {
            state = self.run_stage(i, k, &state, probe)?;
        }
        Ok(state)
    }
}

/// A network the engine can run, train and calibrate: a family's implementation over its
/// named parameters. Inputs are batches of one sample shape (`x: [batch, ...]`).
pub trait Network: Send + Sync + std::fmt::Debug {
    /// The family.
    fn family(&self) -> Family;

    /// The architecture (or configuration) document that describes this network, as stored
    /// in a model's `architecture` and the files' metadata.
    fn describe(&self) -> serde_json::Value;

    /// Every parameter and buffer, in state-dict order.
    fn params(&self) -> &[Param];

    /// Freezes every parameter or buffer whose name matches the glob `pattern`; returns how
    /// many matched.
    fn freeze(&mut self, pattern: &str) -> usize;

    /// The current parameters and buffers as named f32 tensors, in state-dict order.
    fn export(&self) -> Result<Vec<NamedTensor>>;

    /// Overwrites every parameter and buffer with `weights` (names and shapes as
    /// [`Network::export`] returns).
    fn load(&self, weights: &[NamedTensor]) -> Result<()>;

    /// A network of the same family and shape holding `weights` (e.g. a copy to train
    /// separately).
    fn with_weights(&self, weights: Vec<NamedTensor>) -> Result<Box<dyn Network>>;

    /// Refuses training when a layer has no working backward pass.
    fn check_trainable(&self) -> Result<()>;

    /// Refuses a dataset whose samples do not fit the input, or (when labelled or
    /// `labels_required`) whose labels do not fit the output.
    fn check_dataset(&self, dataset: &Dataset, labels_required: bool) -> Result<()>;

    /// Width of the output (classes of a classifier).
    fn output_width(&self) -> Result<usize>;

    /// Whether the output is a classification head's logits (a bert encoder's output is
    /// otherwise its sentence embedding; a sequential network is a classifier).
    fn has_head(&self) -> bool {
        self.family() == Family::Sequential
    }

    /// What training minimises by default.
    fn objective(&self) -> Objective {
        Objective::Classification
    }

    /// Whether the glob `pattern` (of `freeze`, `layer_lr`) names the parameter `name`.
    /// Transformers also accept the name without the base-model prefix that a new head adds
    /// (`embeddings.*` still names `bert.embeddings.…`).
    fn matches(&self, pattern: &str, name: &str) -> bool;

    /// How this network reads text datasets (its tokenizer); `None`: it reads tensors.
    fn text_input(&self) -> Option<TextInput<'_>> {
        None
    }

    /// The batches of `view` as this network reads them (text tokenized with its tokenizer).
    fn batches<'a>(&'a self, view: &'a Subset<'a>, batch_size: usize) -> Batches<'a> {
        view.batches(batch_size).reading(self.text_input())
    }

    /// The forward pass of a batch (features `[batch, ...]`, or token ids `[batch, seq]` with
    /// their attention mask); returns `[batch, outputs...]` (a transformer language model:
    /// `[batch, seq, vocab]` logits).
    fn forward(&self, batch: &Batch, mode: Mode<'_>) -> Result<Tensor>;

    /// [`Network::forward`] that also returns the outputs of the named layers, in the order of
    /// `layers` (tracked for backward in training mode, for losses on intermediate features):
    /// `[batch, ...]`, a transformer block's per token `[batch, seq, hidden]`.
    fn forward_taps(
        &self,
        batch: &Batch,
        mode: Mode<'_>,
        layers: &[&str],
    ) -> Result<(Tensor, Vec<Tensor>)>;

    /// Whether `layer` names a layer [`Network::forward_taps`] can tap.
    fn has_layer(&self, layer: &str) -> bool;

    /// The names of the layers [`Network::forward_taps`] can tap, in order.
    fn layer_names(&self) -> Vec<String>;

    /// The per-sample output width of a tappable layer.
    fn layer_width(&self, layer: &str) -> Result<usize>;

    /// An evaluation forward pass of `x` in which `probe` sees the input of every linear and
    /// convolution layer it reaches (calibration statistics: ranges, Σx², Hessians).
    fn forward_probed(&self, batch: &Batch, probe: &mut ProbeFn<'_>) -> Result<Tensor>;

    /// Block-by-block execution, for the families that have blocks.
    fn block_runner(&self) -> Option<&dyn BlockRunner> {
        None
    }

    /// Sets (or clears) the transform applied to linear and conv weights in every forward.
    fn set_weight_transform(&mut self, transform: Option<WeightTransform>);

    /// A smaller network of the same family keeping only the blocks `layers` (their weights
    /// copied, renumbered from 0) and everything outside the blocks: a distillation student
    /// built from its teacher. Families without blocks refuse.
    fn with_blocks(&self, layers: &[usize]) -> Result<Box<dyn Network>> {
        let _ = layers;
        Err(crate::compress::Error::Unsupported(format!(
            "a {} network has no blocks to keep: build the student from an architecture or a model",
            self.family().as_str()
        )))
    }

    /// A network of the same family drawn afresh (as `transformers` initialises one, from
    /// `seed`) with this one's config changed by `overrides` (`num_hidden_layers`,
    /// `hidden_size`, …), its tokenizer and its head: a distillation student described by a
    /// config. Families without a config refuse.
    fn with_config(
        &self,
        overrides: &serde_json::Map<String, serde_json::Value>,
        seed: u64,
    ) -> Result<Box<dyn Network>> {
        let _ = (overrides, seed);
        Err(crate::compress::Error::Unsupported(format!(
            "a {} network has no config to draw a student from",
            self.family().as_str()
        )))
    }

    /// This network with the named final linear layer replaced by a freshly initialised one
    /// of `num_classes` outputs (transfer learning's new head).
    fn with_head(&self, layer: &str, num_classes: usize, seed: u64) -> Result<Box<dyn Network>>;
}
