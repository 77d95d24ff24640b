//! The layers of a `sequential` architecture: their parameters as written in the document,
//! the size limits, and the per-layer figures shape inference produces.

use serde::Serialize;

/// Largest accepted size field (features, channels, kernel, input dimension).
pub const MAX_DIM: usize = 1 << 24;

/// Largest accepted number of elements in one per-sample activation or one parameter tensor.
pub const MAX_ELEMENTS: u64 = 1 << 31;

/// Largest accepted total parameter count (8 GiB of f32).
pub const MAX_PARAMETERS: u64 = 1 << 31;

/// Deepest accepted nesting of `residual` layers.
pub const MAX_NESTING: usize = 16;

/// A pair of sizes (height, width). Written as one integer when both are equal, and
/// read from either an integer or a two-element list, like PyTorch's `_pair`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size2(pub usize, pub usize);

impl Serialize for Size2 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        if self.0 == self.1 {
            s.serialize_u64(self.0 as u64)
        } else {
            [self.0, self.1].serialize(s)
        }
    }
}

/// One layer of a sequential network. Every layer may carry a `name`; unnamed layers are
/// named by their index in their list, like `nn.Sequential`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Layer {
    /// `y = x Wᵀ + b` over the last dimension.
    Linear {
        /// Optional name.
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// Size of the input's last dimension.
        in_features: usize,
        /// Size of the output's last dimension.
        out_features: usize,
        /// Whether the layer has a bias (default true).
        bias: bool,
    },
    /// 2-D convolution over a `[channels, height, width]` input.
    Conv2d {
        /// Optional name.
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// Input channels.
        in_channels: usize,
        /// Output channels.
        out_channels: usize,
        /// Kernel size.
        kernel_size: Size2,
        /// Stride (default 1).
        stride: Size2,
        /// Zero padding on each side (default 0).
        padding: Size2,
        /// Whether the layer has a bias (default true).
        bias: bool,
    },
    /// 2-D max pooling.
    MaxPool2d {
        /// Optional name.
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// Window size.
        kernel_size: Size2,
        /// Stride (default: the kernel size).
        stride: Size2,
        /// Implicit padding on each side (default 0, at most half the kernel).
        padding: Size2,
    },
    /// 2-D average pooling (padding counted in the average, as PyTorch's default).
    AvgPool2d {
        /// Optional name.
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// Window size.
        kernel_size: Size2,
        /// Stride (default: the kernel size).
        stride: Size2,
        /// Implicit padding on each side (default 0, at most half the kernel).
        padding: Size2,
    },
    /// Average over height and width: `[C, H, W]` → `[C, 1, 1]`, like
    /// `nn.AdaptiveAvgPool2d(1)` (follow it with `flatten` before a `linear`).
    GlobalAvgPool2d {
        /// Optional name.
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Batch normalisation over `[C]` or `[C, L]` inputs.
    BatchNorm1d {
        /// Optional name.
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// Number of channels `C`.
        num_features: usize,
        /// Added to the variance (default 1e-5).
        eps: f64,
        /// Running-statistics momentum (default 0.1).
        momentum: f64,
    },
    /// Batch normalisation over `[C, H, W]` inputs.
    BatchNorm2d {
        /// Optional name.
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// Number of channels `C`.
        num_features: usize,
        /// Added to the variance (default 1e-5).
        eps: f64,
        /// Running-statistics momentum (default 0.1).
        momentum: f64,
    },
    /// Layer normalisation over the trailing dimensions.
    LayerNorm {
        /// Optional name.
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// The trailing dimensions normalised over (an integer or a list in JSON).
        normalized_shape: Vec<usize>,
        /// Added to the variance (default 1e-5).
        eps: f64,
        /// Whether the layer has a weight and a bias (default true).
        elementwise_affine: bool,
    },
    /// Dropout (identity at inference).
    Dropout {
        /// Optional name.
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// Drop probability in [0, 1] (default 0.5).
        p: f64,
    },
    /// Flattens each sample to one dimension.
    Flatten {
        /// Optional name.
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Rectified linear unit.
    Relu {
        /// Optional name.
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Gaussian error linear unit.
    Gelu {
        /// Optional name.
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Hyperbolic tangent.
    Tanh {
        /// Optional name.
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Logistic sigmoid.
    Sigmoid {
        /// Optional name.
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// `y = x + f(x)` where `f` is the inner sequence; `f` must preserve the shape.
    Residual {
        /// Optional name.
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// The inner layers, named `{residual}.{index}` (or `{residual}.{name}`).
        layers: Vec<Layer>,
    },
}

/// Every layer type, in the spelling of the JSON `type` field.
pub const LAYER_TYPES: [&str; 15] = [
    "linear",
    "conv2d",
    "max_pool2d",
    "avg_pool2d",
    "global_avg_pool2d",
    "batch_norm1d",
    "batch_norm2d",
    "layer_norm",
    "dropout",
    "flatten",
    "relu",
    "gelu",
    "tanh",
    "sigmoid",
    "residual",
];

impl Layer {
    /// The layer's own `name`, if it has one.
    pub fn name(&self) -> Option<&str> {
        match self {
            Layer::Linear { name, .. }
            | Layer::Conv2d { name, .. }
            | Layer::MaxPool2d { name, .. }
            | Layer::AvgPool2d { name, .. }
            | Layer::GlobalAvgPool2d { name }
            | Layer::BatchNorm1d { name, .. }
            | Layer::BatchNorm2d { name, .. }
            | Layer::LayerNorm { name, .. }
            | Layer::Dropout { name, .. }
            | Layer::Flatten { name }
            | Layer::Relu { name }
            | Layer::Gelu { name }
            | Layer::Tanh { name }
            | Layer::Sigmoid { name }
            | Layer::Residual { name, .. } => name.as_deref(),
        }
    }

    /// The JSON `type` of this layer (`"linear"`, `"max_pool2d"`, ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            Layer::Linear { .. } => "linear",
            Layer::Conv2d { .. } => "conv2d",
            Layer::MaxPool2d { .. } => "max_pool2d",
            Layer::AvgPool2d { .. } => "avg_pool2d",
            Layer::GlobalAvgPool2d { .. } => "global_avg_pool2d",
            Layer::BatchNorm1d { .. } => "batch_norm1d",
            Layer::BatchNorm2d { .. } => "batch_norm2d",
            Layer::LayerNorm { .. } => "layer_norm",
            Layer::Dropout { .. } => "dropout",
            Layer::Flatten { .. } => "flatten",
            Layer::Relu { .. } => "relu",
            Layer::Gelu { .. } => "gelu",
            Layer::Tanh { .. } => "tanh",
            Layer::Sigmoid { .. } => "sigmoid",
            Layer::Residual { .. } => "residual",
        }
    }
}

/// Per-layer figures for one sample.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerSummary {
    /// Full layer name (`fc1`, `3`, `4.0`).
    pub name: String,
    /// Layer type (`linear`, ...).
    #[serde(rename = "type")]
    pub layer_type: String,
    /// Output shape for one sample (no batch dimension).
    pub output_shape: Vec<usize>,
    /// Number of parameter elements (batch-norm running statistics included).
    pub parameters: u64,
    /// Floating-point operations for one sample's forward pass: multiply-adds count 2
    /// for linear and conv; other layers count their element-wise operations.
    pub flops: u64,
    /// Bytes of the f32 output activation for one sample.
    pub activation_bytes: u64,
    /// For a residual: its inner layers (its own figures include theirs).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerSummary>,
}

/// How a parameter is initialised (PyTorch defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Init {
    /// U(-bound, bound).
    Uniform(f32),
    /// Every element the same.
    Const(f32),
}
