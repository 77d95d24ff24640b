//! The network engine: a `sequential` [`Architecture`] plus named weights, run with candle.
//!
//! This module owns turning an architecture and its parameters into something that runs:
//! the forward pass of every layer type in training and evaluation mode (dropout masks,
//! batch-norm batch statistics and PyTorch-exact running-statistic updates), parameters as
//! candle [`Var`]s named like a PyTorch `nn.Sequential` state_dict, loading them from a
//! safetensors file (any float dtype, converted to f32), exporting them back as named f32
//! tensors, and freezing parameters by glob pattern.
//!
//! Only differentiable candle ops are used in the forward pass (layer norm is written out
//! by hand; the fused `candle_nn` norms and softmax have no backward, CANDLE.md trap 1).
//! In training mode, convolution, linear layers, max pooling (window = stride) and ReLU
//! run as the fused ops of [`crate::compress::engine::sequential::conv`], whose backward passes are gemm calls or
//! single passes (candle's own conv2d backward made CNN training ~50× slower than
//! PyTorch, and its max-pool gradient is scaled by 1/window); evaluation keeps candle's
//! ops, which the fused ones match.
//! Frozen parameters enter the graph detached, so a frozen prefix of the network is not
//! part of the backward pass at all. It knows nothing of optimizers or datasets.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::compress::engine::data::{Batch, Dataset};
use crate::compress::engine::sequential::arch::{
    Architecture, Layer, LayerSummary, ParamKind, Size2,
};
use crate::compress::engine::sequential::{conv, linear};
use crate::compress::engine::{Family, LayerInput, Mode, Network, Param, ProbeFn, WeightTransform};
use crate::compress::formats::safetensors::{NamedTensor, SafetensorsFile};
use crate::compress::select::glob_match;
use crate::compress::{Error, Result};

/// candle errors inside this module's own computations are bugs (shapes are validated
/// before anything runs), so they surface as [`Error::Internal`].
impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Internal(format!("tensor engine: {e}"))
    }
}

/// A built layer, pointing at its parameters by index into [`Model::params`].
#[derive(Debug)]
enum Node {
    Linear {
        w: usize,
        b: Option<usize>,
    },
    Conv2d {
        w: usize,
        b: Option<usize>,
        stride: usize,
        padding: Size2,
    },
    Pool {
        name: String,
        max: bool,
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: Size2,
    },
    GlobalAvgPool,
    BatchNorm {
        name: String,
        w: usize,
        b: usize,
        mean: usize,
        var: usize,
        eps: f64,
        momentum: f64,
    },
    LayerNorm {
        w: Option<usize>,
        b: Option<usize>,
        dims: usize,
        eps: f64,
    },
    Dropout {
        p: f64,
    },
    Flatten,
    Relu,
    Gelu,
    Tanh,
    Sigmoid,
    Residual(Vec<Node>),
}

/// A runnable network: an [`Architecture`] with its parameters as candle variables (CPU, f32).
#[derive(Debug)]
pub struct Model {
    arch: Architecture,
    nodes: Vec<Node>,
    params: Vec<Param>,
    weight_transform: Option<WeightTransform>,
    activation_transform: Option<ActivationTransform>,
}

/// A function of `(top-level layer index, that layer's input)` giving the input the layer
/// computes with: static activation quantization simulates integer inputs with it.
#[derive(Clone)]
pub struct ActivationTransform(
    #[allow(clippy::type_complexity)]
    pub  std::sync::Arc<dyn Fn(usize, &Tensor) -> Result<Option<Tensor>> + Send + Sync>,
);

impl std::fmt::Debug for ActivationTransform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ActivationTransform(..)")
    }
}

/// Looks up the parameter indices of one layer while building.
struct Lookup<'a> {
    index: &'a HashMap<String, usize>,
}

impl Lookup<'_> {
    fn get(&self, layer: &str, kind: ParamKind) -> Result<usize> {
        let name = format!("{layer}.{}", kind.suffix());
        self.index
            .get(&name)
            .copied()
            .ok_or_else(|| Error::Internal(format!("the architecture lists no parameter {name}")))
    }

    fn opt(&self, layer: &str, kind: ParamKind) -> Option<usize> {
        self.index
            .get(&format!("{layer}.{}", kind.suffix()))
            .copied()
    }
}

fn build_nodes(layers: &[Layer], prefix: &str, lookup: &Lookup<'_>) -> Result<Vec<Node>> {
    layers
        .iter()
        .enumerate()
        .map(|(i, layer)| {
            let full = format!(
                "{prefix}{}",
                layer.name().map_or_else(|| i.to_string(), str::to_owned)
            );
            Ok(match layer {
                Layer::Linear { .. } => Node::Linear {
                    w: lookup.get(&full, ParamKind::Weight)?,
                    b: lookup.opt(&full, ParamKind::Bias),
                },
                Layer::Conv2d {
                    stride, padding, ..
                } => {
                    if stride.0 != stride.1 {
                        return Err(Error::Unsupported(format!(
                            "conv2d layer {full}: different strides per axis ({}x{}) are not supported by the engine",
                            stride.0, stride.1
                        )));
                    }
                    Node::Conv2d {
                        w: lookup.get(&full, ParamKind::Weight)?,
                        b: lookup.opt(&full, ParamKind::Bias),
                        stride: stride.0,
                        padding: *padding,
                    }
                }
                Layer::MaxPool2d {
                    kernel_size,
                    stride,
                    padding,
                    ..
                }
                | Layer::AvgPool2d {
                    kernel_size,
                    stride,
                    padding,
                    ..
                } => Node::Pool {
                    name: full,
                    max: matches!(layer, Layer::MaxPool2d { .. }),
                    kernel: (kernel_size.0, kernel_size.1),
                    stride: (stride.0, stride.1),
                    padding: *padding,
                },
                Layer::GlobalAvgPool2d { .. } => Node::GlobalAvgPool,
                Layer::BatchNorm1d { eps, momentum, .. }
                | Layer::BatchNorm2d { eps, momentum, .. } => Node::BatchNorm {
                    w: lookup.get(&full, ParamKind::Weight)?,
                    b: lookup.get(&full, ParamKind::Bias)?,
                    mean: lookup.get(&full, ParamKind::RunningMean)?,
                    var: lookup.get(&full, ParamKind::RunningVar)?,
                    name: full,
                    eps: *eps,
                    momentum: *momentum,
                },
                Layer::LayerNorm {
                    normalized_shape,
                    eps,
                    ..
                } => Node::LayerNorm {
                    w: lookup.opt(&full, ParamKind::Weight),
                    b: lookup.opt(&full, ParamKind::Bias),
                    dims: normalized_shape.len(),
                    eps: *eps,
                },
                Layer::Dropout { p, .. } => Node::Dropout { p: *p },
                Layer::Flatten { .. } => Node::Flatten,
                Layer::Relu { .. } => Node::Relu,
                Layer::Gelu { .. } => Node::Gelu,
                Layer::Tanh { .. } => Node::Tanh,
                Layer::Sigmoid { .. } => Node::Sigmoid,
                Layer::Residual { layers, .. } => {
                    Node::Residual(build_nodes(layers, &format!("{full}."), lookup)?)
                }
            })
        })
        .collect()
}

/// Pads dims 2 and 3 of an NCHW tensor with `value`.
fn pad_hw(x: &Tensor, padding: Size2, value: f32) -> Result<Tensor> {
    let mut x = x.clone();
    for (dim, p) in [(2, padding.0), (3, padding.1)] {
        if p == 0 {
            continue;
        }
        if value == 0.0 {
            x = x.pad_with_zeros(dim, p, p)?;
        } else {
            let mut dims = x.dims().to_vec();
            dims[dim] = p;
            let edge = Tensor::full(value, dims, x.device())?;
            x = Tensor::cat(&[&edge, &x, &edge], dim)?;
        }
    }
    Ok(x)
}

impl Model {
    /// Builds a model from an architecture and one f32 tensor per parameter (names and
    /// shapes exactly as [`Architecture::parameters`]; extra or missing names are refused).
    pub fn new(arch: &Architecture, weights: Vec<NamedTensor>) -> Result<Model> {
        let mut by_name: HashMap<String, NamedTensor> =
            weights.into_iter().map(|t| (t.name.clone(), t)).collect();
        let specs = arch.parameters();
        let mut missing = Vec::new();
        let mut wrong = Vec::new();
        let mut params = Vec::with_capacity(specs.len());
        for spec in specs {
            match by_name.remove(&spec.name) {
                None => missing.push(spec.name.clone()),
                Some(t) if t.shape != spec.shape || t.values.len() != spec.numel() => {
                    wrong.push(format!(
                        "{} expected {:?}, found {:?}",
                        spec.name, spec.shape, t.shape
                    ))
                }
                Some(t) => {
                    let var = Var::from_vec(t.values, spec.shape.clone(), &Device::Cpu)?;
                    params.push(Param::new(spec, var));
                }
            }
        }
        let mut extra: Vec<String> = by_name.into_keys().collect();
        extra.sort();
        let mut parts = Vec::new();
        for (label, items) in [
            ("missing tensors", missing),
            ("unexpected tensors", extra),
            ("wrong shapes", wrong),
        ] {
            if !items.is_empty() {
                parts.push(format!("{label}: {}", items.join(", ")));
            }
        }
        if !parts.is_empty() {
            return Err(Error::ArchitectureMismatch(parts.join("; ")));
        }
        let index: HashMap<String, usize> = params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.spec().name.clone(), i))
            .collect();
        let nodes = build_nodes(arch.layers(), "", &Lookup { index: &index })?;
        Ok(Model {
            arch: arch.clone(),
            nodes,
            params,
            weight_transform: None,
            activation_transform: None,
        })
    }

    /// A model of the architecture document `doc` (what [`Network::describe`] returns).
    pub fn described(doc: &serde_json::Value, weights: Vec<NamedTensor>) -> Result<Model> {
        Model::new(&Architecture::from_json(doc)?, weights)
    }

    /// A freshly initialised model ([`Architecture::init_weights`], PyTorch defaults).
    pub fn init(arch: &Architecture, seed: u64) -> Result<Model> {
        let weights = arch
            .init_weights(seed)
            .into_iter()
            .map(|(spec, values)| NamedTensor {
                name: spec.name,
                shape: spec.shape,
                values,
            })
            .collect();
        Model::new(arch, weights)
    }

    /// Loads the parameters from a safetensors file, converting any float dtype to f32.
    /// The file must match the architecture ([`Architecture::validate_weights`]).
    pub fn from_safetensors(arch: &Architecture, file: &SafetensorsFile) -> Result<Model> {
        arch.validate_weights(file.header())?;
        let mut weights = Vec::new();
        for spec in arch.parameters() {
            let info = file.get(&spec.name).ok_or_else(|| {
                Error::ArchitectureMismatch(format!("missing tensors: {}", spec.name))
            })?;
            weights.push(NamedTensor {
                values: file.to_f32(info)?,
                name: spec.name,
                shape: spec.shape,
            });
        }
        Model::new(arch, weights)
    }

    /// The architecture this model runs.
    pub fn architecture(&self) -> &Architecture {
        &self.arch
    }

    /// Per-layer parameter counts, FLOPs per sample and activation bytes per sample.
    pub fn summary(&self) -> Vec<LayerSummary> {
        self.arch.summary()
    }

    /// Every parameter and buffer, in [`Architecture::parameters`] order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Freezes every parameter or buffer whose name matches the glob `pattern`; returns how
    /// many matched. A frozen batch-norm `running_mean` / `running_var` keeps that layer
    /// on its running statistics during training (like `module.eval()` in PyTorch).
    pub fn freeze(&mut self, pattern: &str) -> usize {
        let mut n = 0;
        for p in &mut self.params {
            if glob_match(pattern, p.name()) {
                p.set_frozen(true);
                n += 1;
            }
        }
        n
    }

    /// The current parameters and buffers as named f32 tensors, in architecture order.
    pub fn export(&self) -> Result<Vec<NamedTensor>> {
        self.params
            .iter()
            .map(|p| {
                Ok(NamedTensor {
                    name: p.spec().name.clone(),
                    shape: p.spec().shape.clone(),
                    values: p.var().as_tensor().flatten_all()?.to_vec1::<f32>()?,
                })
            })
            .collect()
    }

    /// Overwrites every parameter and buffer with `weights` (same names and shapes as
    /// [`Model::export`] returns).
    pub fn load(&self, weights: &[NamedTensor]) -> Result<()> {
        let by_name: HashMap<&str, &NamedTensor> =
            weights.iter().map(|t| (t.name.as_str(), t)).collect();
        for p in &self.params {
            let t = by_name.get(p.spec().name.as_str()).ok_or_else(|| {
                Error::ArchitectureMismatch(format!("missing tensors: {}", p.spec().name))
            })?;
            if t.shape != p.spec().shape {
                return Err(Error::ArchitectureMismatch(format!(
                    "wrong shapes: {} expected {:?}, found {:?}",
                    p.spec().name,
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

    /// Refuses training when a layer has no working backward pass in candle: pooling
    /// whose kernel differs from its stride (CANDLE.md trap 12).
    pub fn check_trainable(&self) -> Result<()> {
        fn walk(nodes: &[Node]) -> Result<()> {
            for n in nodes {
                match n {
                    Node::Pool {
                        name,
                        kernel,
                        stride,
                        max,
                        ..
                    } if kernel != stride => {
                        let ty = if *max { "max_pool2d" } else { "avg_pool2d" };
                        return Err(Error::Unsupported(format!(
                            "{ty} layer {name} has kernel {}x{} but stride {}x{}; training needs pooling with kernel equal to stride (candle has no backward pass for overlapping windows)",
                            kernel.0, kernel.1, stride.0, stride.1
                        )));
                    }
                    Node::Residual(inner) => walk(inner)?,
                    _ => {}
                }
            }
            Ok(())
        }
        walk(&self.nodes)
    }

    /// Inference forward pass: `x` is `[batch, ...]` f32 whose per-sample element count
    /// equals the architecture input's (it is reshaped to `[batch, input_shape...]`);
    /// returns `[batch, output_shape...]`. Nothing is recorded for backward.
    pub fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.as_input(x)?;
        self.run_top(x, None)
    }

    /// Training forward pass: dropout draws its masks from `rng`, batch norm normalises
    /// with batch statistics and updates its running statistics (unless frozen), and
    /// trainable parameters are tracked for backward.
    pub fn forward_train(&self, x: &Tensor, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        let x = self.as_input(x)?;
        self.run_top(x, Some(rng))
    }

    /// Sets (or clears) the transform applied to the input of every top-level layer.
    pub fn set_activation_transform(&mut self, transform: Option<ActivationTransform>) {
        self.activation_transform = transform;
    }

    /// The input top-level layer `i` computes with.
    fn activation_in(&self, i: usize, x: Tensor) -> Result<Tensor> {
        match &self.activation_transform {
            Some(f) => Ok((f.0)(i, &x)?.unwrap_or(x)),
            None => Ok(x),
        }
    }

    fn run_top(&self, mut x: Tensor, mut rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        for (i, node) in self.nodes.iter().enumerate() {
            x = self.activation_in(i, x)?;
            x = self.layer(node, &x, rng.as_deref_mut())?;
        }
        Ok(x)
    }

    /// The index of the top-level layer called `name`: its `name`, or its index when it
    /// has none (the names [`Model::forward_eval_taps`] accepts).
    pub fn layer_index(&self, name: &str) -> Option<usize> {
        self.arch
            .layers()
            .iter()
            .enumerate()
            .position(|(i, l)| l.name().map_or_else(|| i.to_string(), str::to_owned) == name)
    }

    /// [`Model::forward_eval`] that also returns the outputs of the named top-level
    /// layers (`[batch, that layer's output shape...]`, in the order of `names`).
    pub fn forward_eval_taps(&self, x: &Tensor, names: &[&str]) -> Result<(Tensor, Vec<Tensor>)> {
        self.run_taps(x, None, names)
    }

    /// [`Model::forward_train`] that also returns the outputs of the named top-level
    /// layers, tracked for backward (for losses on intermediate features).
    pub fn forward_train_taps(
        &self,
        x: &Tensor,
        rng: &mut ChaCha8Rng,
        names: &[&str],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        self.run_taps(x, Some(rng), names)
    }

    fn run_taps(
        &self,
        x: &Tensor,
        mut rng: Option<&mut ChaCha8Rng>,
        names: &[&str],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let wanted: Vec<usize> = names
            .iter()
            .map(|name| {
                self.layer_index(name).ok_or_else(|| {
                    Error::invalid(
                        "",
                        format!(
                            "the model has no top-level layer named {name:?} (unnamed layers are named by their index; it has {} layers)",
                            self.nodes.len()
                        ),
                    )
                })
            })
            .collect::<Result<_>>()?;
        let mut x = self.as_input(x)?;
        let mut taps: Vec<Option<Tensor>> = vec![None; wanted.len()];
        for (i, node) in self.nodes.iter().enumerate() {
            x = self.activation_in(i, x)?;
            x = self.layer(node, &x, rng.as_deref_mut())?;
            for (slot, _) in wanted.iter().enumerate().filter(|(_, &w)| w == i) {
                taps[slot] = Some(x.clone());
            }
        }
        let taps = taps
            .into_iter()
            .map(|t| t.ok_or_else(|| Error::Internal("a tapped layer did not run".into())))
            .collect::<Result<_>>()?;
        Ok((x, taps))
    }

    fn as_input(&self, x: &Tensor) -> Result<Tensor> {
        let per_sample: usize = self.arch.input_shape().iter().product();
        let batch = x.dims().first().copied().unwrap_or(0);
        if x.rank() < 2 || x.elem_count() != batch * per_sample || x.dtype() != DType::F32 {
            return Err(Error::Internal(format!(
                "model input must be f32 [batch, {:?}], got {:?} {:?}",
                self.arch.input_shape(),
                x.dtype(),
                x.dims()
            )));
        }
        let mut shape = vec![batch];
        shape.extend_from_slice(self.arch.input_shape());
        Ok(x.reshape(shape)?)
    }

    fn run(
        &self,
        nodes: &[Node],
        mut x: Tensor,
        mut rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        for node in nodes {
            x = self.layer(node, &x, rng.as_deref_mut())?;
        }
        Ok(x)
    }

    /// The weight a linear or conv layer computes with: the parameter, or its transform
    /// with a straight-through gradient.
    fn weight(&self, i: usize, train: bool) -> Result<Tensor> {
        let w = self.params[i].tensor(train);
        let Some(f) = &self.weight_transform else {
            return Ok(w);
        };
        match (f.0)(self.params[i].name(), &w.detach())? {
            None => Ok(w),
            Some(q) if train && self.params[i].is_trainable() => Ok((&w + (q - w.detach())?)?),
            Some(q) => Ok(q),
        }
    }

    fn layer(&self, node: &Node, x: &Tensor, rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        let train = rng.is_some();
        let t = |i: usize| self.params[i].tensor(train);
        Ok(match node {
            Node::Linear { w, b } => {
                let w = self.weight(*w, train)?;
                let (in_f, out_f) = (w.dim(1)?, w.dim(0)?);
                let rows = x.elem_count() / in_f;
                // Reshapes only when needed: even a no-op reshape is a backward node.
                let x2 = if x.rank() == 2 {
                    x.clone()
                } else {
                    x.reshape((rows, in_f))?
                };
                // One fused node; no input gradient for a first layer (conv.rs).
                let bias = b.map(t);
                let y = linear::Linear.forward(&x2, &w, bias.as_ref())?;
                if x.rank() == 2 {
                    y
                } else {
                    let mut out = x.dims().to_vec();
                    if let Some(last) = out.last_mut() {
                        *last = out_f;
                    }
                    y.reshape(out)?
                }
            }
            Node::Conv2d {
                w,
                b,
                stride,
                padding,
            } => {
                if train {
                    // im2col + gemm, bias folded in: candle's conv2d backward is ~50x
                    // slower (conv.rs).
                    let bias = b.map(t);
                    let w = self.weight(*w, train)?;
                    conv::conv2d(x, &w, bias.as_ref(), *stride, (padding.0, padding.1))?
                } else {
                    let (x, pad) = if padding.0 == padding.1 {
                        (x.clone(), padding.0)
                    } else {
                        (pad_hw(x, *padding, 0.0)?, 0)
                    };
                    let y = x.conv2d(&self.weight(*w, train)?, pad, *stride, 1, 1)?;
                    match b {
                        Some(b) => y.broadcast_add(&t(*b).reshape((1, (), 1, 1))?)?,
                        None => y,
                    }
                }
            }
            Node::Pool {
                max,
                kernel,
                stride,
                padding,
                ..
            } => {
                let x = pad_hw(x, *padding, if *max { f32::NEG_INFINITY } else { 0.0 })?;
                // Trim rows and columns no window covers: candle's pooling backward maps
                // gradients by nearest upsampling, which is only right without a remainder.
                let (_, _, h, w) = x.dims4()?;
                let used_h = (h - kernel.0) / stride.0 * stride.0 + kernel.0;
                let used_w = (w - kernel.1) / stride.1 * stride.1 + kernel.1;
                let x = x.narrow(2, 0, used_h)?.narrow(3, 0, used_w)?;
                if *max && train && kernel == stride {
                    // Fused, with PyTorch's gradient (candle's is scaled by 1/(kh·kw)).
                    conv::MaxPool2d { kernel: *kernel }.forward(&x)?
                } else if *max {
                    x.max_pool2d_with_stride(*kernel, *stride)?
                } else {
                    x.avg_pool2d_with_stride(*kernel, *stride)?
                }
            }
            Node::GlobalAvgPool => x.mean_keepdim(3)?.mean_keepdim(2)?,
            Node::BatchNorm {
                name,
                w,
                b,
                mean,
                var,
                eps,
                momentum,
            } => {
                let c = x.dim(1)?;
                let mut bshape = vec![1usize; x.rank()];
                bshape[1] = c;
                let stats_frozen = self.params[*mean].is_frozen() || self.params[*var].is_frozen();
                let normed = if train && !stats_frozen {
                    let dims: Vec<usize> = (0..x.rank()).filter(|&d| d != 1).collect();
                    let n = x.elem_count() / c;
                    if n < 2 {
                        return Err(Error::Unsupported(format!(
                            "batch norm layer {name} needs more than one value per channel in training, got a batch of {n}"
                        )));
                    }
                    let mu = x.mean_keepdim(dims.as_slice())?;
                    let xc = x.broadcast_sub(&mu)?;
                    let var_b = xc.sqr()?.mean_keepdim(dims.as_slice())?;
                    self.update_running(*mean, *var, &mu, &var_b, n, *momentum)?;
                    xc.broadcast_div(&(var_b + *eps)?.sqrt()?)?
                } else {
                    let rm = t(*mean).reshape(bshape.as_slice())?;
                    let rv = t(*var).reshape(bshape.as_slice())?;
                    x.broadcast_sub(&rm)?.broadcast_div(&(rv + *eps)?.sqrt()?)?
                };
                normed
                    .broadcast_mul(&t(*w).reshape(bshape.as_slice())?)?
                    .broadcast_add(&t(*b).reshape(bshape.as_slice())?)?
            }
            Node::LayerNorm { w, b, dims, eps } => {
                let shape = x.dims().to_vec();
                let d: usize = shape[shape.len() - dims..].iter().product();
                let rows = x.elem_count() / d;
                let x2 = x.reshape((rows, d))?;
                let mu = x2.mean_keepdim(1)?;
                let xc = x2.broadcast_sub(&mu)?;
                let var = xc.sqr()?.mean_keepdim(1)?;
                let mut y = xc.broadcast_div(&(var + *eps)?.sqrt()?)?;
                if let Some(w) = w {
                    y = y.broadcast_mul(&t(*w).reshape(d)?)?;
                }
                if let Some(b) = b {
                    y = y.broadcast_add(&t(*b).reshape(d)?)?;
                }
                y.reshape(shape)?
            }
            Node::Dropout { p } => match rng {
                Some(rng) if *p > 0.0 => {
                    let keep = 1.0 - *p;
                    let scale = if keep > 0.0 { (1.0 / keep) as f32 } else { 0.0 };
                    let pf = *p as f32;
                    let mask: Vec<f32> = (0..x.elem_count())
                        .map(|_| if rng.gen::<f32>() < pf { 0.0 } else { scale })
                        .collect();
                    x.mul(&Tensor::from_vec(mask, x.dims(), x.device())?)?
                }
                _ => x.clone(),
            },
            Node::Flatten => x.flatten_from(1)?,
            // Fused backward in one pass instead of candle's four temporaries.
            Node::Relu if train => conv::Relu.forward(x)?,
            Node::Relu => x.relu()?,
            Node::Gelu => x.gelu_erf()?,
            Node::Tanh => x.tanh()?,
            Node::Sigmoid => candle_nn::ops::sigmoid(x)?,
            Node::Residual(inner) => {
                let y = self.run(inner, x.clone(), rng)?;
                (x + y)?
            }
        })
    }

    /// PyTorch's update: `running = (1 - momentum) · running + momentum · batch`, with the
    /// unbiased batch variance (`n / (n - 1)`) for the running estimate.
    fn update_running(
        &self,
        mean: usize,
        var: usize,
        mu: &Tensor,
        var_b: &Tensor,
        n: usize,
        momentum: f64,
    ) -> Result<()> {
        let m = momentum as f32;
        let unbias = n as f32 / (n - 1) as f32;
        let mu = mu.detach().flatten_all()?.to_vec1::<f32>()?;
        let vb = var_b.detach().flatten_all()?.to_vec1::<f32>()?;
        for (idx, batch, scale) in [(mean, mu, 1.0f32), (var, vb, unbias)] {
            let var = self.params[idx].var();
            let old = var.as_tensor().to_vec1::<f32>()?;
            let new: Vec<f32> = old
                .iter()
                .zip(&batch)
                .map(|(r, v)| (1.0 - m) * r + m * (v * scale))
                .collect();
            var.set(&Tensor::from_vec(new, old.len(), &Device::Cpu)?)?;
        }
        Ok(())
    }
}

/// Checks that `dataset` can be fed to a model of `arch`: the per-sample feature count
/// equals the model input's (a `[64]` dataset feeds a `[1, 8, 8]` model), the model emits
/// one vector of class scores per sample, and every label is below the number of classes.
/// `require_labels` refuses an unlabelled dataset.
pub fn check_dataset(arch: &Architecture, dataset: &Dataset, require_labels: bool) -> Result<()> {
    let input: usize = arch.input_shape().iter().product();
    if dataset.features_per_sample() != input {
        return Err(Error::DatasetMismatch(format!(
            "the dataset's samples have shape {:?} ({} values) but the model's input shape is {:?} ({input} values)",
            dataset.feature_shape,
            dataset.features_per_sample(),
            arch.input_shape()
        )));
    }
    let classes = classes_of(arch)?;
    match (dataset.num_classes, require_labels) {
        (None, true) => Err(Error::DatasetMismatch(
            "the dataset has no labels (`y`), but this operation needs class labels".into(),
        )),
        (Some(n), _) if n > classes => Err(Error::DatasetMismatch(format!(
            "the dataset has labels up to {}, but the model's output has only {classes} classes (labels must be below {classes}; replace the head with `head` to change the class count)",
            n - 1
        ))),
        _ => Ok(()),
    }
}

/// The number of classes of a classifier architecture (its output must be one vector).
pub fn classes_of(arch: &Architecture) -> Result<usize> {
    match arch.output_shape() {
        [c] => Ok(*c),
        other => Err(Error::Unsupported(format!(
            "evaluation and training need a classifier whose output is one vector of class scores per sample, but this model's output shape is {other:?} (add a flatten and a linear layer)"
        ))),
    }
}

/// Replaces the top-level linear layer `layer` with a fresh one of `num_classes` outputs: the new architecture, and the weights with the head's
/// tensors freshly initialised (seeded).
fn replace_head(
    model: &Model,
    layer: &str,
    num_classes: usize,
    seed: u64,
) -> Result<(Architecture, Vec<NamedTensor>)> {
    let arch = model.architecture();
    let index = arch
        .layers()
        .iter()
        .enumerate()
        .position(|(i, l)| l.name().map_or_else(|| i.to_string(), str::to_owned) == layer);
    let Some(index) = index else {
        return Err(Error::invalid(
            "head.layer",
            format!(
                "no top-level layer is named {:?} (unnamed layers are named by their index)",
                layer
            ),
        ));
    };
    if !matches!(arch.layers()[index], Layer::Linear { .. }) {
        return Err(Error::invalid(
            "head.layer",
            format!(
                "layer {:?} is a {}, but the head must be a linear layer",
                layer,
                arch.layers()[index].type_name()
            ),
        ));
    }
    if num_classes == 0 {
        return Err(Error::invalid(
            "head.num_classes",
            "`num_classes` must be at least 1",
        ));
    }
    let mut doc = arch.to_json();
    doc["layers"][index]["out_features"] = serde_json::json!(num_classes);
    let new_arch = Architecture::from_json(&doc).map_err(|e| {
        Error::invalid(
            "head.layer",
            format!(
                "layer {:?} is not the final classifier: widening it breaks the layers after it ({e})",
                layer
            ),
        )
    })?;
    let prefix = format!("{}.", layer);
    let mut weights: Vec<NamedTensor> = model
        .export()?
        .into_iter()
        .filter(|t| !t.name.starts_with(&prefix))
        .collect();
    weights.extend(
        new_arch
            .init_weights(seed)
            .into_iter()
            .filter(|(spec, _)| spec.layer == layer)
            .map(|(spec, values)| NamedTensor {
                name: spec.name,
                shape: spec.shape,
                values,
            }),
    );
    Ok((new_arch, weights))
}

impl Network for Model {
    fn matches(&self, pattern: &str, name: &str) -> bool {
        glob_match(pattern, name)
    }

    fn family(&self) -> Family {
        Family::Sequential
    }

    fn describe(&self) -> serde_json::Value {
        self.arch.to_json()
    }

    fn params(&self) -> &[Param] {
        &self.params
    }

    fn freeze(&mut self, pattern: &str) -> usize {
        Model::freeze(self, pattern)
    }

    fn export(&self) -> Result<Vec<NamedTensor>> {
        Model::export(self)
    }

    fn load(&self, weights: &[NamedTensor]) -> Result<()> {
        Model::load(self, weights)
    }

    fn with_weights(&self, weights: Vec<NamedTensor>) -> Result<Box<dyn Network>> {
        Ok(Box::new(Model::new(&self.arch, weights)?))
    }

    fn check_trainable(&self) -> Result<()> {
        Model::check_trainable(self)
    }

    fn check_dataset(&self, dataset: &Dataset, labels_required: bool) -> Result<()> {
        check_dataset(&self.arch, dataset, labels_required)
    }

    fn output_width(&self) -> Result<usize> {
        classes_of(&self.arch)
    }

    fn forward(&self, batch: &Batch, mode: Mode<'_>) -> Result<Tensor> {
        match mode {
            Mode::Eval => self.forward_eval(&batch.x),
            Mode::Train(rng) => self.forward_train(&batch.x, rng),
        }
    }

    fn forward_taps(
        &self,
        batch: &Batch,
        mode: Mode<'_>,
        layers: &[&str],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        match mode {
            Mode::Eval => self.forward_eval_taps(&batch.x, layers),
            Mode::Train(rng) => self.forward_train_taps(&batch.x, rng, layers),
        }
    }

    fn has_layer(&self, layer: &str) -> bool {
        self.layer_index(layer).is_some()
    }

    fn layer_names(&self) -> Vec<String> {
        self.arch.summary().into_iter().map(|s| s.name).collect()
    }

    fn layer_width(&self, layer: &str) -> Result<usize> {
        let i = self.layer_index(layer).ok_or_else(|| {
            Error::Internal(format!("the model has no top-level layer {layer:?}"))
        })?;
        Ok(self.arch.summary()[i].output_shape.iter().product())
    }

    fn forward_probed(&self, batch: &Batch, probe: &mut ProbeFn<'_>) -> Result<Tensor> {
        let mut x = self.as_input(&batch.x)?;
        for (i, (node, layer)) in self.nodes.iter().zip(self.arch.layers()).enumerate() {
            x = self.activation_in(i, x)?;
            let window = match layer {
                Layer::Linear { .. } => Some(1),
                Layer::Conv2d { kernel_size, .. } => Some(kernel_size.0 * kernel_size.1),
                _ => None,
            };
            if let Some(window) = window {
                let name = layer.name().map_or_else(|| i.to_string(), str::to_owned);
                probe(LayerInput {
                    index: i,
                    layer: &name,
                    window,
                    x: &x,
                })?;
            }
            x = self.layer(node, &x, None)?;
        }
        Ok(x)
    }

    fn set_weight_transform(&mut self, transform: Option<WeightTransform>) {
        self.weight_transform = transform;
    }

    fn with_head(&self, layer: &str, num_classes: usize, seed: u64) -> Result<Box<dyn Network>> {
        let (arch, weights) = replace_head(self, layer, num_classes, seed)?;
        Ok(Box::new(Model::new(&arch, weights)?))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::SeedableRng;
    use serde_json::json;

    /// An architecture using every layer type.
    pub(crate) fn every_layer() -> Architecture {
        Architecture::from_json(&json!({"kind":"sequential","input_shape":[1,8,8],"layers":[
            {"type":"conv2d","name":"c1","in_channels":1,"out_channels":4,"kernel_size":3,"padding":1},
            {"type":"batch_norm2d","name":"bn1","num_features":4},
            {"type":"relu"},
            {"type":"max_pool2d","kernel_size":2},
            {"type":"residual","name":"res","layers":[
                {"type":"conv2d","in_channels":4,"out_channels":4,"kernel_size":[3,3],"padding":[1,1],"bias":false},
                {"type":"gelu"}]},
            {"type":"avg_pool2d","kernel_size":2},
            {"type":"conv2d","name":"c2","in_channels":4,"out_channels":6,"kernel_size":1},
            {"type":"global_avg_pool2d"},
            {"type":"flatten"},
            {"type":"linear","name":"fc1","in_features":6,"out_features":8},
            {"type":"batch_norm1d","name":"bn2","num_features":8},
            {"type":"tanh"},
            {"type":"layer_norm","name":"ln","normalized_shape":8},
            {"type":"dropout","p":0.25},
            {"type":"sigmoid"},
            {"type":"linear","name":"head","in_features":8,"out_features":3}]}))
        .unwrap()
    }

    fn input(batch: usize, seed: u64) -> Tensor {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f32> = (0..batch * 64).map(|_| rng.gen_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, (batch, 1, 8, 8), &Device::Cpu).unwrap()
    }

    #[test]
    fn gradient_reaches_every_trainable_var() {
        let arch = every_layer();
        let model = Model::init(&arch, 3).unwrap();
        model.check_trainable().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let y = model.forward_train(&input(5, 1), &mut rng).unwrap();
        assert_eq!(y.dims(), &[5, 3]);
        let loss = y.sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let mut checked = 0;
        for p in model.params() {
            let g = grads.get(p.var().as_tensor());
            if p.is_trainable() {
                let g = g.unwrap_or_else(|| panic!("no gradient for {}", p.name()));
                let norm = g
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(norm > 0.0 && norm.is_finite(), "{}: {norm}", p.name());
                checked += 1;
            } else {
                assert!(g.is_none(), "buffer {} got a gradient", p.name());
            }
        }
        assert_eq!(checked, 15);
        // Eval mode is deterministic and differs from train mode (dropout, batch stats).
        let a = model.forward_eval(&input(5, 1)).unwrap();
        let b = model.forward_eval(&input(5, 1)).unwrap();
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn taps_return_named_layer_outputs() {
        let model = Model::init(&every_layer(), 3).unwrap();
        let x = input(4, 7);
        let (y, taps) = model.forward_eval_taps(&x, &["fc1", "8", "head"]).unwrap();
        assert_eq!(
            y.to_vec2::<f32>().unwrap(),
            model.forward_eval(&x).unwrap().to_vec2::<f32>().unwrap()
        );
        assert_eq!(taps[0].dims(), &[4, 8]);
        assert_eq!(taps[1].dims(), &[4, 6]);
        assert_eq!(
            taps[2].to_vec2::<f32>().unwrap(),
            y.to_vec2::<f32>().unwrap()
        );
        assert_eq!(model.layer_index("c2"), Some(6));
        // Train mode: same dropout stream as forward_train, taps carry gradients.
        let (mut r1, mut r2) = (ChaCha8Rng::seed_from_u64(1), ChaCha8Rng::seed_from_u64(1));
        let (yt, taps) = model.forward_train_taps(&x, &mut r1, &["fc1"]).unwrap();
        let plain = model.forward_train(&x, &mut r2).unwrap();
        assert_eq!(
            yt.to_vec2::<f32>().unwrap(),
            plain.to_vec2::<f32>().unwrap()
        );
        let grads = taps[0].sum_all().unwrap().backward().unwrap();
        assert!(grads.get(model.params()[0].var().as_tensor()).is_some());
        let e = model.forward_eval_taps(&x, &["nope"]).unwrap_err();
        assert_eq!(e.code().as_str(), "validation_failed");
        assert!(e.to_string().contains("\"nope\""), "{e}");
    }

    #[test]
    fn frozen_prefix_gets_no_gradient() {
        let mut model = Model::init(&every_layer(), 3).unwrap();
        assert_eq!(model.freeze("c1.*"), 2);
        assert_eq!(model.freeze("bn1.*"), 4);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let y = model.forward_train(&input(4, 2), &mut rng).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        for p in model.params() {
            let has = grads.get(p.var().as_tensor()).is_some();
            assert_eq!(has, p.is_trainable(), "{}", p.name());
        }
    }

    #[test]
    fn batch_norm_running_stats_match_pytorch() {
        let arch =
            Architecture::from_json(&json!({"kind":"sequential","input_shape":[2],"layers":[
            {"type":"batch_norm1d","num_features":2,"momentum":0.1}]}))
            .unwrap();
        let model = Model::init(&arch, 0).unwrap();
        let x = Tensor::from_vec(vec![1f32, 10., 2., 20., 4., 60.], (3, 2), &Device::Cpu).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let y = model
            .forward_train(&x, &mut rng)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // Channel 0: mean 7/3, biased var 14/9, unbiased 7/3.
        let (m0, v0) = (7.0f32 / 3.0, 14.0f32 / 9.0);
        assert!((y[0][0] - (1.0 - m0) / (v0 + 1e-5).sqrt()).abs() < 1e-5);
        let w = model.export().unwrap();
        let rm = &w[2].values;
        let rv = &w[3].values;
        assert_eq!(w[2].name, "0.running_mean");
        // Channel 1: mean 30, unbiased var ((20)^2+(10)^2+(30)^2)/2 = 700.
        assert!(
            (rm[0] - 0.1 * m0).abs() < 1e-6 && (rm[1] - 3.0).abs() < 1e-5,
            "{rm:?}"
        );
        assert!((rv[0] - (0.9 + 0.1 * 7.0 / 3.0)).abs() < 1e-6, "{rv:?}");
        assert!((rv[1] - (0.9 + 70.0)).abs() < 1e-4, "{rv:?}");
        // Eval uses the running statistics.
        let e = model.forward_eval(&x).unwrap().to_vec2::<f32>().unwrap();
        assert!((e[0][1] - (10.0 - rm[1]) / (rv[1] + 1e-5).sqrt()).abs() < 1e-5);
        // A batch of one cannot be normalised with batch statistics.
        let one = Tensor::from_vec(vec![1f32, 2.], (1, 2), &Device::Cpu).unwrap();
        assert!(matches!(
            model.forward_train(&one, &mut rng),
            Err(Error::Unsupported(_))
        ));
    }

    #[test]
    fn overlapping_pooling_is_refused_for_training_only() {
        let arch = Architecture::from_json(&json!({"kind":"sequential","input_shape":[1,6,6],"layers":[
            {"type":"max_pool2d","name":"pool","kernel_size":3,"stride":2,"padding":1},{"type":"flatten"}]}))
        .unwrap();
        let model = Model::init(&arch, 0).unwrap();
        let e = model.check_trainable().unwrap_err();
        assert_eq!(e.code().as_str(), "unsupported_operation");
        assert!(
            e.to_string().contains("pool") && e.to_string().contains("3x3"),
            "{e}"
        );
        // Inference still works, padding with -inf like PyTorch.
        let x = Tensor::arange(0f32, 36., &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 6, 6))
            .unwrap();
        let y = model.forward_eval(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(y[0], vec![7., 9., 11., 19., 21., 23., 31., 33., 35.]);
    }

    #[test]
    fn load_export_round_trip_and_mismatches() {
        let arch = every_layer();
        let model = Model::init(&arch, 9).unwrap();
        let w = model.export().unwrap();
        assert_eq!(w, Model::new(&arch, w.clone()).unwrap().export().unwrap());
        let mut bad = w.clone();
        bad.remove(0);
        bad[0].shape = vec![1];
        bad.push(NamedTensor {
            name: "zz.weight".into(),
            shape: vec![1],
            values: vec![0.0],
        });
        let e = Model::new(&arch, bad).unwrap_err().to_string();
        assert!(e.contains("missing tensors: c1.weight"), "{e}");
        assert!(e.contains("unexpected tensors: zz.weight"), "{e}");
        assert!(e.contains("c1.bias expected [4], found [1]"), "{e}");
    }

    #[test]
    fn loads_half_precision_safetensors_as_f32() {
        use crate::compress::formats::safetensors::{self, Dtype, TensorSpec};
        let arch =
            Architecture::from_json(&json!({"kind":"sequential","input_shape":[2],"layers":[
            {"type":"linear","name":"fc","in_features":2,"out_features":1}]}))
            .unwrap();
        let half = |v: &[f32]| -> Vec<u8> {
            v.iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect()
        };
        let (w, b) = (half(&[0.5, -1.25]), half(&[2.0]));
        let bytes = safetensors::serialize(
            &std::collections::BTreeMap::new(),
            &[
                (
                    TensorSpec::new("fc.weight", Dtype::F16, vec![1, 2]),
                    w.as_slice(),
                ),
                (
                    TensorSpec::new("fc.bias", Dtype::F16, vec![1]),
                    b.as_slice(),
                ),
            ],
        )
        .unwrap();
        let path =
            std::env::temp_dir().join(format!("whittle-model-{}.safetensors", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        let file = SafetensorsFile::open(&path).unwrap();
        let model = Model::from_safetensors(&arch, &file).unwrap();
        std::fs::remove_file(&path).unwrap();
        let x = Tensor::from_vec(vec![2f32, 4.], (1, 2), &Device::Cpu).unwrap();
        let y = model.forward_eval(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(y, vec![vec![2.0 * 0.5 - 4.0 * 1.25 + 2.0]]);
        let names: Vec<String> = model
            .export()
            .unwrap()
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(names, ["fc.weight", "fc.bias"]);
    }
}
