//! Parsing a `sequential` architecture document: field readers with JSON-pointer errors and
//! the builder that infers every layer's shape, names its parameters (PyTorch
//! `nn.Sequential` state_dict names) and counts parameters, FLOPs and activation bytes.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::layer::*;
use crate::compress::engine::{ParamKind, ParamSpec};
use crate::compress::{json_kind, pointer_token as escape, Error, Result};

pub(super) fn invalid(pointer: impl Into<String>, detail: impl Into<String>) -> Error {
    Error::ArchitectureInvalid {
        pointer: pointer.into(),
        detail: detail.into(),
    }
}

/// Reads a non-negative size from a JSON value, or says why not.
pub(super) fn size_value(v: &Value, min: usize) -> std::result::Result<usize, String> {
    let n = match v.as_u64() {
        Some(n) => n,
        None => {
            return Err(match v {
                Value::Number(n) if n.as_i64().is_some() => {
                    format!("must be a positive integer, got {n}")
                }
                Value::Number(n) => format!("must be an integer, got {n}"),
                other => format!("must be an integer, got {}", json_kind(other)),
            })
        }
    };
    if n < min as u64 {
        return Err(format!("must be at least {min}, got {n}"));
    }
    if n > MAX_DIM as u64 {
        return Err(format!("is {n}, more than the limit of {MAX_DIM}"));
    }
    // n <= MAX_DIM fits usize.
    Ok(n as usize)
}

/// The fields of one JSON object, read with pointers for every error.
pub(super) struct Fields<'a> {
    pub(super) map: &'a Map<String, Value>,
    pub(super) ptr: &'a str,
    pub(super) what: &'a str,
}

impl<'a> Fields<'a> {
    pub(super) fn at(&self, key: &str) -> String {
        format!("{}/{}", self.ptr, escape(key))
    }

    pub(super) fn deny_unknown(&self, allowed: &[&str]) -> Result<()> {
        match self.map.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(k) => Err(invalid(
                self.at(k),
                format!(
                    "unknown field `{k}` for {} (expected {})",
                    self.what,
                    allowed.join(", ")
                ),
            )),
            None => Ok(()),
        }
    }

    pub(super) fn required(&self, key: &str) -> Result<&'a Value> {
        self.map.get(key).ok_or_else(|| {
            invalid(
                self.at(key),
                format!("missing required field `{key}` for {}", self.what),
            )
        })
    }

    pub(super) fn size(&self, key: &str, default: Option<usize>, min: usize) -> Result<usize> {
        let v = match (self.map.get(key), default) {
            (Some(v), _) => v,
            (None, Some(d)) => return Ok(d),
            (None, None) => self.required(key)?,
        };
        size_value(v, min).map_err(|m| invalid(self.at(key), format!("`{key}` {m}")))
    }

    pub(super) fn size2(&self, key: &str, default: Option<Size2>, min: usize) -> Result<Size2> {
        let v = match (self.map.get(key), default) {
            (Some(v), _) => v,
            (None, Some(d)) => return Ok(d),
            (None, None) => self.required(key)?,
        };
        let bad = |m: String| invalid(self.at(key), format!("`{key}` {m}"));
        match v {
            Value::Array(items) if items.len() == 2 => Ok(Size2(
                size_value(&items[0], min).map_err(bad)?,
                size_value(&items[1], min).map_err(bad)?,
            )),
            Value::Array(_) => Err(bad(
                "must be an integer or a list of two integers [height, width]".to_owned(),
            )),
            other => {
                let n = size_value(other, min).map_err(bad)?;
                Ok(Size2(n, n))
            }
        }
    }

    pub(super) fn flag(&self, key: &str, default: bool) -> Result<bool> {
        match self.map.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(invalid(
                self.at(key),
                format!("`{key}` must be true or false, got {}", json_kind(other)),
            )),
        }
    }

    /// A finite number accepted by `ok`, described by `expect` in errors.
    pub(super) fn number(
        &self,
        key: &str,
        default: f64,
        ok: fn(f64) -> bool,
        expect: &str,
    ) -> Result<f64> {
        let Some(v) = self.map.get(key) else {
            return Ok(default);
        };
        match v.as_f64() {
            Some(x) if x.is_finite() && ok(x) => Ok(x),
            Some(x) => Err(invalid(
                self.at(key),
                format!("`{key}` must be {expect}, got {x}"),
            )),
            None => Err(invalid(
                self.at(key),
                format!("`{key}` must be a number, got {}", json_kind(v)),
            )),
        }
    }

    pub(super) fn name(&self) -> Result<Option<String>> {
        let Some(v) = self.map.get("name") else {
            return Ok(None);
        };
        let Value::String(s) = v else {
            return Err(invalid(
                self.at("name"),
                format!("`name` must be a string, got {}", json_kind(v)),
            ));
        };
        if s.is_empty() || s.len() > 128 || s.contains('.') || s.trim() != s {
            return Err(invalid(
                self.at("name"),
                format!(
                    "layer name {s:?} must be 1 to 128 characters without dots or surrounding spaces (dots separate the parts of tensor names)"
                ),
            ));
        }
        Ok(Some(s.clone()))
    }
}

pub(super) fn numel(shape: &[usize]) -> u64 {
    shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .unwrap_or(u64::MAX)
}

/// Output size of a sliding window along one axis, or `None` when the window does not fit.
pub(super) fn window_out(
    len: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Option<usize> {
    let padded = len.checked_add(padding.checked_mul(2)?)?;
    let span = padded.checked_sub(kernel)?;
    Some(span / stride + 1)
}

/// What one built layer contributes.
pub(super) struct Built {
    pub(super) layer: Layer,
    pub(super) summary: LayerSummary,
    pub(super) output: Vec<usize>,
}

/// Accumulates parameters while layers are parsed and shapes inferred.
/// Where a layer stands in the document: its pointer, index in its list, the name prefix of
/// its parameters, the names of the layers before it in the list, and its residual depth.
#[derive(Clone, Copy)]
pub(super) struct Place<'a> {
    pub(super) ptr: &'a str,
    pub(super) index: usize,
    pub(super) prefix: &'a str,
    pub(super) siblings: &'a HashMap<String, usize>,
    pub(super) depth: usize,
}

#[derive(Default)]
pub(super) struct Builder {
    pub(super) params: Vec<(ParamSpec, Init)>,
    pub(super) total: u64,
    pub(super) optional_buffers: Vec<String>,
}

impl Builder {
    /// Registers a parameter, refusing absurd sizes. Returns its element count.
    pub(super) fn param(
        &mut self,
        ptr: &str,
        layer: &str,
        kind: ParamKind,
        shape: Vec<usize>,
        init: Init,
    ) -> Result<u64> {
        let n = numel(&shape);
        if n > MAX_ELEMENTS {
            return Err(invalid(
                ptr,
                format!(
                    "parameter {layer}.{} of shape {shape:?} has {n} elements, more than the limit of {MAX_ELEMENTS}",
                    kind.suffix()
                ),
            ));
        }
        self.total = self.total.saturating_add(n);
        if self.total > MAX_PARAMETERS {
            return Err(invalid(
                ptr,
                format!("the network has more than {MAX_PARAMETERS} parameters"),
            ));
        }
        self.params.push((
            ParamSpec {
                name: format!("{layer}.{}", kind.suffix()),
                shape,
                kind,
                layer: layer.to_owned(),
            },
            init,
        ));
        Ok(n)
    }

    /// Builds a list of layers (the top level or a residual's body).
    pub(super) fn list(
        &mut self,
        values: &[Value],
        ptr: &str,
        prefix: &str,
        input: &[usize],
        depth: usize,
    ) -> Result<(Vec<Layer>, Vec<LayerSummary>, Vec<usize>)> {
        if values.is_empty() {
            return Err(invalid(ptr, "`layers` must hold at least one layer"));
        }
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut layers = Vec::with_capacity(values.len());
        let mut summaries = Vec::with_capacity(values.len());
        let mut shape = input.to_vec();
        for (i, v) in values.iter().enumerate() {
            let lptr = format!("{ptr}/{i}");
            let place = Place {
                ptr: &lptr,
                index: i,
                prefix,
                siblings: &names,
                depth,
            };
            let built = self.layer(v, &place, &shape)?;
            let local = built
                .layer
                .name()
                .map_or_else(|| i.to_string(), str::to_owned);
            names.insert(local, i);
            shape = built.output;
            layers.push(built.layer);
            summaries.push(built.summary);
        }
        Ok((layers, summaries, shape))
    }

    pub(super) fn layer(&mut self, v: &Value, place: &Place<'_>, input: &[usize]) -> Result<Built> {
        let Place {
            ptr,
            index,
            prefix,
            siblings,
            depth,
        } = *place;
        let Value::Object(map) = v else {
            return Err(invalid(
                ptr,
                format!(
                    "a layer must be an object with a `type`, got {}",
                    json_kind(v)
                ),
            ));
        };
        let ty = match map.get("type") {
            Some(Value::String(t)) => t.as_str(),
            Some(other) => {
                return Err(invalid(
                    format!("{ptr}/type"),
                    format!("`type` must be a string, got {}", json_kind(other)),
                ))
            }
            None => {
                return Err(invalid(
                    format!("{ptr}/type"),
                    format!(
                        "missing required field `type` (one of {})",
                        LAYER_TYPES.join(", ")
                    ),
                ))
            }
        };
        let Some(ty) = LAYER_TYPES.iter().copied().find(|t| *t == ty) else {
            return Err(invalid(
                format!("{ptr}/type"),
                format!(
                    "unknown layer type {ty:?} (expected one of {})",
                    LAYER_TYPES.join(", ")
                ),
            ));
        };
        let what = format!("a {ty} layer");
        let f = Fields {
            map,
            ptr,
            what: &what,
        };
        let allowed: &[&str] = match ty {
            "linear" => &["type", "name", "in_features", "out_features", "bias"],
            "conv2d" => &[
                "type",
                "name",
                "in_channels",
                "out_channels",
                "kernel_size",
                "stride",
                "padding",
                "bias",
            ],
            "max_pool2d" | "avg_pool2d" => &["type", "name", "kernel_size", "stride", "padding"],
            "batch_norm1d" | "batch_norm2d" => &["type", "name", "num_features", "eps", "momentum"],
            "layer_norm" => &[
                "type",
                "name",
                "normalized_shape",
                "eps",
                "elementwise_affine",
            ],
            "dropout" => &["type", "name", "p"],
            "residual" => &["type", "name", "layers"],
            _ => &["type", "name"],
        };
        f.deny_unknown(allowed)?;

        let name = f.name()?;
        let local = name.clone().unwrap_or_else(|| index.to_string());
        if let Some(other) = siblings.get(&local) {
            let at = if name.is_some() {
                format!("{ptr}/name")
            } else {
                ptr.to_owned()
            };
            return Err(invalid(
                at,
                format!(
                    "layer name {local:?} is already taken by layer {other} of this list (unnamed layers are named by their index)"
                ),
            ));
        }
        let full = format!("{prefix}{local}");
        let in_numel = numel(input);
        let mut params = 0u64;
        let mut inner = Vec::new();

        let (layer, output, flops) = match ty {
            "linear" => {
                let in_features = f.size("in_features", None, 1)?;
                let out_features = f.size("out_features", None, 1)?;
                let bias = f.flag("bias", true)?;
                let last = input.last().copied().unwrap_or(0);
                if last != in_features {
                    let hint = if input.len() > 1 && in_numel == in_features as u64 {
                        " (add a flatten layer before it)"
                    } else {
                        ""
                    };
                    return Err(invalid(
                        f.at("in_features"),
                        format!(
                            "linear expects inputs whose last dimension is in_features = {in_features}, but its input shape is {input:?}{hint}"
                        ),
                    ));
                }
                let bound = 1.0 / (in_features as f32).sqrt();
                params += self.param(
                    ptr,
                    &full,
                    ParamKind::Weight,
                    vec![out_features, in_features],
                    Init::Uniform(bound),
                )?;
                if bias {
                    params += self.param(
                        ptr,
                        &full,
                        ParamKind::Bias,
                        vec![out_features],
                        Init::Uniform(bound),
                    )?;
                }
                let mut output = input.to_vec();
                if let Some(l) = output.last_mut() {
                    *l = out_features;
                }
                let rows = in_numel / in_features as u64;
                let flops = 2u64
                    .saturating_mul(in_features as u64)
                    .saturating_mul(out_features as u64)
                    .saturating_mul(rows);
                let layer = Layer::Linear {
                    name,
                    in_features,
                    out_features,
                    bias,
                };
                (layer, output, flops)
            }
            "conv2d" => {
                let in_channels = f.size("in_channels", None, 1)?;
                let out_channels = f.size("out_channels", None, 1)?;
                let kernel_size = f.size2("kernel_size", None, 1)?;
                let stride = f.size2("stride", Some(Size2(1, 1)), 1)?;
                let padding = f.size2("padding", Some(Size2(0, 0)), 0)?;
                let bias = f.flag("bias", true)?;
                let [c, h, w] = chw(input, ptr, "conv2d")?;
                if c != in_channels {
                    return Err(invalid(
                        f.at("in_channels"),
                        format!(
                            "conv2d has in_channels = {in_channels}, but its input shape {input:?} has {c} channels (C = first dimension)"
                        ),
                    ));
                }
                let (oh, ow) = windows([h, w], kernel_size, stride, padding)
                    .ok_or_else(|| window_error(&f, "conv2d", input, kernel_size, padding))?;
                // Saturating: absurd kernels are refused by the parameter-size check below.
                let fan_in = (in_channels as u64)
                    .saturating_mul(kernel_size.0 as u64)
                    .saturating_mul(kernel_size.1 as u64);
                let bound = 1.0 / (fan_in as f32).sqrt();
                params += self.param(
                    ptr,
                    &full,
                    ParamKind::Weight,
                    vec![out_channels, in_channels, kernel_size.0, kernel_size.1],
                    Init::Uniform(bound),
                )?;
                if bias {
                    params += self.param(
                        ptr,
                        &full,
                        ParamKind::Bias,
                        vec![out_channels],
                        Init::Uniform(bound),
                    )?;
                }
                let flops = 2u64
                    .saturating_mul(fan_in)
                    .saturating_mul(out_channels as u64)
                    .saturating_mul(oh as u64)
                    .saturating_mul(ow as u64);
                let layer = Layer::Conv2d {
                    name,
                    in_channels,
                    out_channels,
                    kernel_size,
                    stride,
                    padding,
                    bias,
                };
                (layer, vec![out_channels, oh, ow], flops)
            }
            "max_pool2d" | "avg_pool2d" => {
                let kernel_size = f.size2("kernel_size", None, 1)?;
                let stride = f.size2("stride", Some(kernel_size), 1)?;
                let padding = f.size2("padding", Some(Size2(0, 0)), 0)?;
                let [c, h, w] = chw(input, ptr, ty)?;
                if padding.0 > kernel_size.0 / 2 || padding.1 > kernel_size.1 / 2 {
                    return Err(invalid(
                        f.at("padding"),
                        format!(
                            "{ty} padding {padding:?} must be at most half the kernel size {kernel_size:?}"
                        ),
                    ));
                }
                let (oh, ow) = windows([h, w], kernel_size, stride, padding)
                    .ok_or_else(|| window_error(&f, ty, input, kernel_size, padding))?;
                let flops = (c as u64)
                    .saturating_mul(oh as u64)
                    .saturating_mul(ow as u64)
                    .saturating_mul(kernel_size.0 as u64)
                    .saturating_mul(kernel_size.1 as u64);
                let layer = if ty == "max_pool2d" {
                    Layer::MaxPool2d {
                        name,
                        kernel_size,
                        stride,
                        padding,
                    }
                } else {
                    Layer::AvgPool2d {
                        name,
                        kernel_size,
                        stride,
                        padding,
                    }
                };
                (layer, vec![c, oh, ow], flops)
            }
            "global_avg_pool2d" => {
                let [c, _, _] = chw(input, ptr, ty)?;
                (Layer::GlobalAvgPool2d { name }, vec![c, 1, 1], in_numel)
            }
            "batch_norm1d" | "batch_norm2d" => {
                let num_features = f.size("num_features", None, 1)?;
                let eps = f.number("eps", 1e-5, |x| x > 0.0, "a positive number")?;
                let momentum = f.number(
                    "momentum",
                    0.1,
                    |x| (0.0..=1.0).contains(&x),
                    "between 0 and 1",
                )?;
                let two_d = ty == "batch_norm2d";
                let rank_ok = if two_d {
                    input.len() == 3
                } else {
                    input.len() == 1 || input.len() == 2
                };
                if !rank_ok {
                    let expected = if two_d {
                        "a [channels, height, width] input"
                    } else {
                        "a [features] or [channels, length] input"
                    };
                    return Err(invalid(
                        ptr,
                        format!("{ty} expects {expected}, but its input shape is {input:?}"),
                    ));
                }
                if input[0] != num_features {
                    return Err(invalid(
                        f.at("num_features"),
                        format!(
                            "{ty} has num_features = {num_features}, but its input shape {input:?} has {} channels (C = first dimension)",
                            input[0]
                        ),
                    ));
                }
                for (kind, init) in [
                    (ParamKind::Weight, Init::Const(1.0)),
                    (ParamKind::Bias, Init::Const(0.0)),
                    (ParamKind::RunningMean, Init::Const(0.0)),
                    (ParamKind::RunningVar, Init::Const(1.0)),
                ] {
                    params += self.param(ptr, &full, kind, vec![num_features], init)?;
                }
                self.optional_buffers
                    .push(format!("{full}.num_batches_tracked"));
                let layer = if two_d {
                    Layer::BatchNorm2d {
                        name,
                        num_features,
                        eps,
                        momentum,
                    }
                } else {
                    Layer::BatchNorm1d {
                        name,
                        num_features,
                        eps,
                        momentum,
                    }
                };
                (layer, input.to_vec(), in_numel.saturating_mul(2))
            }
            "layer_norm" => {
                let key = "normalized_shape";
                let bad = |m: String| invalid(f.at(key), format!("`{key}` {m}"));
                let normalized_shape = match f.required(key)? {
                    Value::Array(items) if !items.is_empty() => items
                        .iter()
                        .map(|v| size_value(v, 1).map_err(bad))
                        .collect::<Result<Vec<_>>>()?,
                    Value::Array(_) => return Err(bad("must not be empty".to_owned())),
                    other => vec![size_value(other, 1).map_err(bad)?],
                };
                let eps = f.number("eps", 1e-5, |x| x > 0.0, "a positive number")?;
                let elementwise_affine = f.flag("elementwise_affine", true)?;
                if !input.ends_with(&normalized_shape) {
                    return Err(invalid(
                        f.at(key),
                        format!(
                            "layer_norm normalizes the trailing dimensions {normalized_shape:?}, but its input shape is {input:?}"
                        ),
                    ));
                }
                if elementwise_affine {
                    params += self.param(
                        ptr,
                        &full,
                        ParamKind::Weight,
                        normalized_shape.clone(),
                        Init::Const(1.0),
                    )?;
                    params += self.param(
                        ptr,
                        &full,
                        ParamKind::Bias,
                        normalized_shape.clone(),
                        Init::Const(0.0),
                    )?;
                }
                let layer = Layer::LayerNorm {
                    name,
                    normalized_shape,
                    eps,
                    elementwise_affine,
                };
                (layer, input.to_vec(), in_numel.saturating_mul(5))
            }
            "dropout" => {
                let p = f.number(
                    "p",
                    0.5,
                    |x| (0.0..=1.0).contains(&x),
                    "a probability between 0 and 1",
                )?;
                (Layer::Dropout { name, p }, input.to_vec(), 0)
            }
            "flatten" => {
                // in_numel <= MAX_ELEMENTS, checked when the input was produced.
                (Layer::Flatten { name }, vec![in_numel as usize], 0)
            }
            "relu" => (Layer::Relu { name }, input.to_vec(), in_numel),
            "gelu" => (Layer::Gelu { name }, input.to_vec(), in_numel),
            "tanh" => (Layer::Tanh { name }, input.to_vec(), in_numel),
            "sigmoid" => (Layer::Sigmoid { name }, input.to_vec(), in_numel),
            _ => {
                // "residual", the last entry of LAYER_TYPES.
                if depth >= MAX_NESTING {
                    return Err(invalid(
                        ptr,
                        format!("residual layers nest more than {MAX_NESTING} deep"),
                    ));
                }
                let lptr = f.at("layers");
                let Value::Array(values) = f.required("layers")? else {
                    return Err(invalid(lptr, "`layers` must be an array of layers"));
                };
                let (layers, summaries, output) =
                    self.list(values, &lptr, &format!("{full}."), input, depth + 1)?;
                if output != input {
                    return Err(invalid(
                        ptr,
                        format!(
                            "a residual adds its input to its output, so its layers must keep the shape, but they turn {input:?} into {output:?}"
                        ),
                    ));
                }
                params = summaries.iter().map(|s| s.parameters).sum();
                let flops = summaries
                    .iter()
                    .fold(in_numel, |acc, s| acc.saturating_add(s.flops));
                inner = summaries;
                (Layer::Residual { name, layers }, output, flops)
            }
        };

        let out_numel = numel(&output);
        if out_numel > MAX_ELEMENTS {
            return Err(invalid(
                ptr,
                format!(
                    "output shape {output:?} has {out_numel} elements per sample, more than the limit of {MAX_ELEMENTS}"
                ),
            ));
        }
        let summary = LayerSummary {
            name: full,
            layer_type: ty.to_owned(),
            output_shape: output.clone(),
            parameters: params,
            flops,
            activation_bytes: out_numel.saturating_mul(4),
            layers: inner,
        };
        Ok(Built {
            layer,
            summary,
            output,
        })
    }
}

/// Splits a `[C, H, W]` input, or explains that the layer needs one.
pub(super) fn chw(input: &[usize], ptr: &str, ty: &str) -> Result<[usize; 3]> {
    match input {
        &[c, h, w] => Ok([c, h, w]),
        _ => Err(invalid(
            ptr,
            format!(
                "{ty} expects a [channels, height, width] input, but its input shape is {input:?}"
            ),
        )),
    }
}

pub(super) fn windows(
    [h, w]: [usize; 2],
    kernel: Size2,
    stride: Size2,
    padding: Size2,
) -> Option<(usize, usize)> {
    Some((
        window_out(h, kernel.0, stride.0, padding.0)?,
        window_out(w, kernel.1, stride.1, padding.1)?,
    ))
}

pub(super) fn window_error(
    f: &Fields<'_>,
    ty: &str,
    input: &[usize],
    kernel: Size2,
    padding: Size2,
) -> Error {
    invalid(
        f.at("kernel_size"),
        format!(
            "{ty} kernel {}x{} is larger than its padded input (input shape {input:?}, padding {}x{})",
            kernel.0, kernel.1, padding.0, padding.1
        ),
    )
}
