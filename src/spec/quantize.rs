//! The `quantize` step: float casts, integer and non-uniform codebooks, GGUF.

use serde_json::{json, Map, Value};

use super::fields::{bool_or, choice, deny_unknown, embedded_training, f64_in, object, usize_in};
use super::train::{require_architecture, FinetuneSpec};
use super::{
    check_patterns, patterns, Facts, FieldError, FloatDtype, FloatQuantize, Selection, Step,
};
use crate::codes::Code;
use crate::compress::formats::gguf::GgufType;
use crate::compress::formats::packed::Entropy;
use crate::compress::quant::activations::Calibration;
use crate::compress::quant::{self, Format, Granularity, KmeansInit, Method, Quantization};
use crate::ids::DatasetId;

/// Where `uniform`'s per-column importance weights come from.
#[derive(Debug, Clone, PartialEq)]
pub enum ImportanceSource {
    /// An uploaded safetensors of weights, by model id.
    Model(String),
    /// Measured on the job's model over a seeded draw of a dataset's samples.
    Calibration {
        /// The calibration dataset.
        dataset_id: DatasetId,
        /// Samples drawn.
        samples: usize,
    },
}

impl ImportanceSource {
    /// Normalised JSON.
    pub fn to_json(&self) -> Value {
        match self {
            Self::Model(id) => json!({ "model_id": id }),
            Self::Calibration {
                dataset_id,
                samples,
            } => json!({"dataset_id": dataset_id.to_string(), "samples": samples}),
        }
    }
}

/// Static activation quantization (simulated), calibrated on a dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct ActivationSpec {
    /// Bits per activation.
    pub bits: u8,
    /// Symmetric or affine ranges.
    pub symmetric: bool,
    /// Calibration data.
    pub dataset_id: DatasetId,
    /// Calibration samples (a seeded draw).
    pub samples: usize,
    /// Range selection.
    pub method: Calibration,
}

impl ActivationSpec {
    /// Normalised JSON.
    pub fn to_json(&self) -> Value {
        let percentile = match self.method {
            Calibration::Percentile(p) => Some(p),
            Calibration::MinMax | Calibration::Mse => None,
        };
        let method = self.method.as_str();
        json!({"bits": self.bits, "symmetric": self.symmetric,
               "calibration": {"dataset_id": self.dataset_id.to_string(), "samples": self.samples,
                               "method": method, "percentile": percentile}})
    }
}

/// A validated non-float `quantize` step.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizeSpec {
    /// Method and its parameters.
    pub method: Quantization,
    /// Per-column weights of `uniform`'s clipping search.
    pub importance: Option<ImportanceSource>,
    /// Which tensors (`skip` folded into `exclude`).
    pub selection: Selection,
    /// Output encoding.
    pub format: Format,
    /// Entropy coding of a `packed` artifact's codes and index gaps.
    pub entropy: Entropy,
    /// Accuracy budget (needs the job's `eval`): revert the most sensitive tensors to float.
    pub max_accuracy_drop: Option<f64>,
    /// Quantization-aware training before the final quantization.
    pub qat: Option<FinetuneSpec>,
    /// Static activation quantization (simulated).
    pub activations: Option<ActivationSpec>,
}

impl QuantizeSpec {
    /// Normalised JSON.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "op": "quantize",
            "method": self.method.as_str(),
            "include": self.selection.include,
            "exclude": self.selection.exclude,
            "format": self.format.as_str(),
            "max_accuracy_drop": self.max_accuracy_drop,
        });
        if self.format == Format::Packed {
            v["entropy"] = json!(self.entropy.as_str());
        }
        match &self.method {
            Quantization::Codec(Method::Uniform {
                bits,
                symmetric,
                granularity,
                search,
            }) => {
                v["bits"] = json!(bits);
                v["symmetric"] = json!(symmetric);
                v["search"] = json!(search);
                if let Some(source) = &self.importance {
                    v["importance"] = source.to_json();
                }
                v["granularity"] = json!(granularity.as_str());
                if let Granularity::PerGroup { group_size } = granularity {
                    v["group_size"] = json!(group_size);
                }
            }
            Quantization::Codec(Method::Kmeans { clusters, init, .. }) => {
                v["clusters"] = json!(clusters);
                v["init"] = json!(init.as_str());
            }
            Quantization::Codec(Method::Log2 { bits }) => v["bits"] = json!(bits),
            Quantization::Codec(Method::Nf4 { group_size }) => v["group_size"] = json!(group_size),
            Quantization::Gguf(ty) => {
                v["type"] = json!(ty.as_str());
                if let Some(source) = &self.importance {
                    v["importance"] = source.to_json();
                }
            }
        }
        if let Some(a) = &self.activations {
            v["activations"] = a.to_json();
        }
        if let Some(q) = &self.qat {
            let mut f = q.to_json();
            if let Some(o) = f.as_object_mut() {
                for k in ["op", "freeze", "head", "layer_lr"] {
                    o.remove(k);
                }
            }
            v["qat"] = f;
        }
        v
    }
}

const METHODS: &[&str] = &[
    "uniform", "kmeans", "log2", "nf4", "float", "gguf", "gptq", "awq", "hqq", "auto",
];

/// Parse a `quantize` step at `pointer`.
pub fn parse(
    obj: &Map<String, Value>,
    pointer: &str,
    facts: Option<&Facts>,
) -> Result<Step, Vec<FieldError>> {
    let mut errors = Vec::new();
    let method = match obj.get("method").and_then(Value::as_str) {
        Some(m) if METHODS.contains(&m) => m,
        Some(m) => {
            return Err(vec![FieldError::new(
                format!("{pointer}/method"),
                format!(
                    "unknown method `{m}`; expected one of {}",
                    METHODS.join(", ")
                ),
            )])
        }
        None => {
            return Err(vec![FieldError::new(
                format!("{pointer}/method"),
                format!("is required; one of {}", METHODS.join(", ")),
            )])
        }
    };
    let mut allowed = vec![
        "op",
        "method",
        "include",
        "exclude",
        "skip",
        "format",
        "max_accuracy_drop",
        "qat",
        "activations",
    ];
    allowed.extend(match method {
        "float" => &["dtype"][..],
        "uniform" => &[
            "bits",
            "symmetric",
            "granularity",
            "group_size",
            "search",
            "importance",
            "entropy",
        ][..],
        "kmeans" => &["clusters", "init", "entropy"][..],
        "log2" => &["bits", "entropy"][..],
        "nf4" => &["group_size", "entropy"][..],
        _ => &["type", "importance"][..],
    });
    deny_unknown(obj, &allowed, pointer, &mut errors);
    let include = patterns(
        obj.get("include"),
        &format!("{pointer}/include"),
        &mut errors,
    );
    let mut exclude = patterns(
        obj.get("exclude"),
        &format!("{pointer}/exclude"),
        &mut errors,
    );
    let skip = patterns(obj.get("skip"), &format!("{pointer}/skip"), &mut errors);
    if let Some(f) = facts {
        check_patterns(
            &f.tensors,
            &include,
            &format!("{pointer}/include"),
            &mut errors,
        );
        check_patterns(
            &f.tensors,
            &exclude,
            &format!("{pointer}/exclude"),
            &mut errors,
        );
        check_patterns(&f.tensors, &skip, &format!("{pointer}/skip"), &mut errors);
    }
    exclude.extend(skip);
    let selection = Selection::of(include, exclude, facts);
    let activations = parse_activations(obj, pointer, method, facts, &mut errors);
    let format_given = choice(
        obj,
        "format",
        &["dequantized", "packed", "gguf"],
        pointer,
        &mut errors,
    );
    let bits = |lo: u64, default: u8, errors: &mut Vec<FieldError>| match obj.get("bits") {
        None | Some(Value::Null) => default,
        Some(v) => match v.as_u64() {
            Some(b) if (lo..=8).contains(&b) => b as u8,
            _ => {
                errors.push(FieldError::new(
                    format!("{pointer}/bits"),
                    format!("must be an integer in [{lo}, 8]"),
                ));
                default
            }
        },
    };
    let group_size = |errors: &mut Vec<FieldError>, default: Option<usize>| {
        let g = usize_in(obj, "group_size", (2, 1 << 20), pointer, errors).or(default);
        if let (Some(g), Some(f)) = (g, facts) {
            for t in selection.resolve(&f.tensors) {
                let cols: usize = t.shape.iter().skip(1).product::<usize>().max(1);
                let cols = if t.shape.len() <= 1 { t.numel() } else { cols };
                if cols % g != 0 {
                    errors.push(FieldError::new(
                        format!("{pointer}/group_size"),
                        format!(
                            "tensor `{}` has rows of {cols} weights, not a multiple of group_size {g}; \
                             pick a divisor of {cols} (e.g. {}) or exclude the tensor",
                            t.name,
                            largest_divisor_at_most(cols, g)
                        ),
                    ));
                }
            }
        }
        g
    };
    if method == "float" {
        let dtype = match obj.get("dtype").and_then(Value::as_str) {
            Some("f16") => Some(FloatDtype::F16),
            Some("bf16") => Some(FloatDtype::Bf16),
            _ => {
                errors.push(FieldError::new(
                    format!("{pointer}/dtype"),
                    "must be `f16` or `bf16`",
                ));
                None
            }
        };
        if format_given.is_some_and(|f| f != "dequantized") {
            errors.push(FieldError::new(
                format!("{pointer}/format"),
                "float quantization writes a float safetensors file: only `dequantized` applies",
            ));
        }
        for key in ["qat", "max_accuracy_drop"] {
            if obj.get(key).is_some_and(|v| !v.is_null()) {
                errors.push(FieldError::new(
                    format!("{pointer}/{key}"),
                    "does not apply to `float` (f16/bf16 casts lose too little to need it)",
                ));
            }
        }
        check_selection(facts, &selection, pointer, &mut errors);
        return match (dtype, errors.is_empty()) {
            (Some(dtype), true) => Ok(Step::QuantizeFloat(FloatQuantize { dtype, selection })),
            _ => Err(errors),
        };
    }
    let (qmethod, importance) = match method {
        "uniform" => {
            let bits = bits(2, 8, &mut errors);
            let symmetric = bool_or(obj, "symmetric", true, pointer, &mut errors);
            let importance = parse_importance(obj, pointer, &selection, facts, &mut errors);
            // Importance weights the search, so it turns the search on.
            let search = bool_or(obj, "search", importance.is_some(), pointer, &mut errors);
            if importance.is_some() && !search {
                errors.push(FieldError::new(
                    format!("{pointer}/search"),
                    "`importance` weights the clipping search; leave `search` out or set it to true",
                ));
            }
            let granularity = match choice(
                obj,
                "granularity",
                &["per_tensor", "per_channel", "per_group"],
                pointer,
                &mut errors,
            ) {
                Some("per_tensor") => Granularity::PerTensor,
                Some("per_group") => {
                    if !obj.contains_key("group_size") {
                        errors.push(FieldError::new(
                            format!("{pointer}/group_size"),
                            "is required for `per_group` (e.g. 64 or 128)",
                        ));
                    }
                    Granularity::PerGroup {
                        group_size: group_size(&mut errors, None).unwrap_or(64),
                    }
                }
                _ => {
                    if obj.get("group_size").is_some_and(|v| !v.is_null()) {
                        errors.push(FieldError::new(
                            format!("{pointer}/group_size"),
                            "applies to `granularity: per_group` only",
                        ));
                    }
                    Granularity::PerChannel
                }
            };
            (
                Quantization::Codec(Method::Uniform {
                    bits,
                    symmetric,
                    granularity,
                    search,
                }),
                importance,
            )
        }
        "kmeans" => {
            let clusters = usize_in(obj, "clusters", (2, 256), pointer, &mut errors).unwrap_or(16);
            if let Some(f) = facts {
                for t in selection.resolve(&f.tensors) {
                    if t.numel() < clusters {
                        errors.push(FieldError::new(
                            format!("{pointer}/clusters"),
                            format!("tensor `{}` has {} weights, fewer than {clusters} clusters; exclude it or use fewer clusters", t.name, t.numel()),
                        ));
                    }
                }
            }
            let init = match choice(
                obj,
                "init",
                &["linear", "density", "kmeans++"],
                pointer,
                &mut errors,
            ) {
                Some("density") => KmeansInit::Density,
                Some("kmeans++") => KmeansInit::KmeansPlusPlus,
                _ => KmeansInit::Linear,
            };
            (
                Quantization::Codec(Method::Kmeans {
                    clusters,
                    init,
                    max_iterations: quant::DEFAULT_KMEANS_MAX_ITERATIONS,
                    tolerance: quant::DEFAULT_KMEANS_TOLERANCE,
                }),
                None,
            )
        }
        "log2" => (
            Quantization::Codec(Method::Log2 {
                bits: bits(3, 4, &mut errors),
            }),
            None,
        ),
        "nf4" => (
            Quantization::Codec(Method::Nf4 {
                group_size: group_size(&mut errors, Some(64)).unwrap_or(64),
            }),
            None,
        ),
        _ => {
            let ty = match obj
                .get("type")
                .and_then(Value::as_str)
                .and_then(|t| t.parse::<GgufType>().ok())
            {
                Some(t) => t,
                None => {
                    errors.push(FieldError::new(
                        format!("{pointer}/type"),
                        format!(
                            "is required; one of {}",
                            GgufType::ALL.map(GgufType::as_str).join(", ")
                        ),
                    ));
                    GgufType::Q8_0
                }
            };
            if let Some(f) = facts {
                for t in selection.resolve(&f.tensors) {
                    let row = t.shape.last().copied().unwrap_or(0);
                    if ty.for_row(row).is_none() {
                        errors.push(FieldError::new(
                            format!("{pointer}/type"),
                            format!(
                                "tensor `{}` has rows of {row} values; {ty} packs blocks of {}{}, which must divide the row. Add the tensor to `skip` (it stays float) or pad the layer to a multiple of 32.",
                                t.name,
                                ty.block_size(),
                                match ty.fallback() {
                                    Some(f) => format!(" (or its fallback {f}'s 32)"),
                                    None => String::new(),
                                }
                            ),
                        ));
                    }
                }
            }
            let importance = parse_importance(obj, pointer, &selection, facts, &mut errors);
            (Quantization::Gguf(ty), importance)
        }
    };
    let format = match (method, format_given) {
        ("gguf", None | Some("gguf")) => Format::Gguf,
        ("gguf", Some(_)) => {
            errors.push(FieldError::new(
                format!("{pointer}/format"),
                "method `gguf` writes a GGUF file: only `gguf` applies",
            ));
            Format::Gguf
        }
        (_, Some("gguf")) => {
            errors.push(FieldError::new(
                format!("{pointer}/format"),
                "`gguf` output needs `method: gguf` with a GGUF `type`",
            ));
            Format::Packed
        }
        (_, Some("packed")) => Format::Packed,
        _ => Format::Dequantized,
    };
    let entropy = match choice(obj, "entropy", &["none", "huffman"], pointer, &mut errors) {
        Some("huffman") if format != Format::Packed => {
            errors.push(FieldError::new(
                format!("{pointer}/entropy"),
                "entropy coding applies to the packed artifact; add `format: packed`",
            ));
            Entropy::None
        }
        Some("huffman") => Entropy::Huffman,
        _ => Entropy::None,
    };
    let max_accuracy_drop = f64_in(obj, "max_accuracy_drop", (0.0, 1.0), pointer, &mut errors);
    let qat = match object(obj, "qat", pointer, &mut errors) {
        None => None,
        Some(q) => {
            if matches!(qmethod, Quantization::Gguf(_)) {
                errors.push(FieldError::new(
                    format!("{pointer}/qat"),
                    "QAT is available for uniform, kmeans, log2 and nf4; for GGUF, train with `qat` on `uniform` at the same bits, then export",
                ));
            }
            match facts.map(|f| (f, &f.transformer)) {
                // A transformer trains on its own loss: a llama model's next-token loss, a
                // bert classifier's cross-entropy; a bert encoder has none.
                Some((_, Some(t)))
                    if t.family == crate::compress::engine::Family::Bert && t.classes.is_none() =>
                {
                    errors.push(FieldError::new(
                        format!("{pointer}/qat"),
                        "QAT trains on a loss, and a bert encoder without a classifier has none: add a classifier first (`finetune` with `head`)",
                    ))
                }
                Some((_, Some(_))) => {}
                Some((f, None)) => {
                    require_architecture(f, pointer, &mut errors);
                }
                None => {}
            }
            embedded_training(q, &format!("{pointer}/qat"), facts, true, &mut errors)
        }
    };
    if max_accuracy_drop.is_some() {
        if let Some(f) = facts {
            require_architecture(f, pointer, &mut errors);
        }
    }
    check_selection(facts, &selection, pointer, &mut errors);
    if errors.is_empty() {
        Ok(Step::Quantize(Box::new(QuantizeSpec {
            method: qmethod,
            importance,
            selection,
            format,
            entropy,
            max_accuracy_drop,
            qat,
            activations,
        })))
    } else {
        Err(errors)
    }
}

/// `importance`: `{"model_id"}`, an uploaded safetensors whose tensor named like a selected
/// weight holds one non-negative weight per element of that weight's rows (`shape[1..]`); or
/// `{"dataset_id", "samples"}`, measured on the model (needs its architecture). Checked here:
/// the model exists, names at least one selected tensor, and each such entry has the right
/// number of elements (its values are checked when the step reads them); the dataset exists
/// and fits the model.
fn parse_importance(
    obj: &Map<String, Value>,
    pointer: &str,
    selection: &Selection,
    facts: Option<&Facts>,
    errors: &mut Vec<FieldError>,
) -> Option<ImportanceSource> {
    let imp = object(obj, "importance", pointer, errors)?;
    let ip = format!("{pointer}/importance");
    deny_unknown(imp, &["model_id", "dataset_id", "samples"], &ip, errors);
    if imp.contains_key("dataset_id") {
        if imp.contains_key("model_id") {
            errors.push(FieldError::new(
                &ip,
                "give either `model_id` (uploaded weights) or `dataset_id` (measured here), not both",
            ));
            return None;
        }
        let samples = usize_in(imp, "samples", (1, 100_000), &ip, errors).unwrap_or(256);
        let dataset_id = super::train::dataset_ref(imp, &ip, facts, errors)?;
        if let Some(f) = facts {
            if let Some(t) = &f.transformer {
                super::train::check_text_dataset(
                    f,
                    t,
                    &dataset_id,
                    false,
                    &format!("{ip}/dataset_id"),
                    errors,
                );
            } else if require_architecture(f, pointer, errors) {
                super::train::check_dataset_fits(
                    f,
                    &dataset_id,
                    None,
                    false,
                    &format!("{ip}/dataset_id"),
                    errors,
                );
            }
        }
        return Some(ImportanceSource::Calibration {
            dataset_id,
            samples,
        });
    }
    if imp.contains_key("samples") {
        errors.push(FieldError::new(
            format!("{ip}/samples"),
            "applies to a measured importance (`dataset_id`) only",
        ));
    }
    let id = match imp.get("model_id") {
        Some(Value::String(id)) if uuid::Uuid::parse_str(id).is_ok() => id.clone(),
        _ => {
            errors.push(FieldError::new(
                format!("{ip}/model_id"),
                "is required: the id of an uploaded safetensors of importance weights, or give `dataset_id` to measure them",
            ));
            return None;
        }
    };
    let source = Some(ImportanceSource::Model(id.clone()));
    let Some(f) = facts else { return source };
    let Some(m) = f.models.get(&id) else {
        errors.push(FieldError {
            code: Code::ModelNotFound,
            ..FieldError::new(format!("{ip}/model_id"), "no model with this id")
        });
        return source;
    };
    let mut named = 0;
    for t in selection.resolve(&f.tensors) {
        let Some(w) = m.tensors.iter().find(|w| w.name == t.name) else {
            continue;
        };
        named += 1;
        let (_, cols) = crate::compress::quant::rows_cols(&t.shape);
        if !w.dtype.is_float() || w.numel() != cols {
            errors.push(FieldError::new(
                format!("{ip}/model_id"),
                format!(
                    "importance `{}` is {} {:?}; weight {:?} needs {cols} float values, one per element of a row",
                    w.name,
                    w.dtype.as_str(),
                    w.shape,
                    t.shape
                ),
            ));
        }
    }
    if named == 0 {
        errors.push(FieldError::new(
            format!("{ip}/model_id"),
            "the importance model has no tensor named like a selected weight",
        ));
    }
    source
}

/// The `activations` object: bits, symmetric, and `calibration` {dataset_id, samples, method,
/// percentile}. Needs the architecture; not for `float` or `gguf`.
fn parse_activations(
    obj: &Map<String, Value>,
    pointer: &str,
    method: &str,
    facts: Option<&Facts>,
    errors: &mut Vec<FieldError>,
) -> Option<ActivationSpec> {
    let a = object(obj, "activations", pointer, errors)?;
    let ap = format!("{pointer}/activations");
    let before = errors.len();
    if method == "float" || method == "gguf" {
        errors.push(FieldError::new(
            &ap,
            "activation quantization applies to the integer and codebook methods (uniform, kmeans, log2, nf4)",
        ));
    }
    deny_unknown(a, &["bits", "symmetric", "calibration"], &ap, errors);
    let bits = usize_in(a, "bits", (2, 8), &ap, errors).unwrap_or(8) as u8;
    let symmetric = bool_or(a, "symmetric", false, &ap, errors);
    let cp = format!("{ap}/calibration");
    let Some(c) = object(a, "calibration", &ap, errors) else {
        if !a.contains_key("calibration") {
            errors.push(FieldError::new(
                cp,
                "is required: {\"dataset_id\": …} (the samples activation ranges are measured on)",
            ));
        }
        return None;
    };
    deny_unknown(
        c,
        &["dataset_id", "samples", "method", "percentile"],
        &cp,
        errors,
    );
    let samples = usize_in(c, "samples", (1, 100_000), &cp, errors).unwrap_or(256);
    let calibration = match choice(c, "method", &["minmax", "percentile", "mse"], &cp, errors) {
        Some("percentile") => Calibration::Percentile(
            match c.get("percentile") {
                None | Some(Value::Null) => Some(99.99),
                Some(v) => match v.as_f64() {
                    Some(p) if p > 50.0 && p <= 100.0 => Some(p),
                    _ => {
                        errors.push(FieldError::new(
                            format!("{cp}/percentile"),
                            "must be a number in (50, 100]",
                        ));
                        None
                    }
                },
            }
            .unwrap_or(99.99),
        ),
        Some("mse") => Calibration::Mse,
        _ => Calibration::MinMax,
    };
    let dataset_id = super::train::dataset_ref(c, &cp, facts, errors);
    if let Some(f) = facts {
        if require_architecture(f, pointer, errors) {
            if let Some(d) = &dataset_id {
                super::train::check_dataset_fits(
                    f,
                    d,
                    None,
                    false,
                    &format!("{cp}/dataset_id"),
                    errors,
                );
            }
        }
    }
    if errors.len() > before {
        return None;
    }
    Some(ActivationSpec {
        bits,
        symmetric,
        dataset_id: dataset_id?,
        samples,
        method: calibration,
    })
}

/// The selection matches at least one tensor and only float ones.
fn check_selection(
    facts: Option<&Facts>,
    selection: &Selection,
    pointer: &str,
    errors: &mut Vec<FieldError>,
) {
    let Some(f) = facts else { return };
    if !errors.is_empty() {
        return;
    }
    let chosen = selection.resolve(&f.tensors);
    if chosen.is_empty() {
        errors.push(FieldError::new(
            pointer.to_string(),
            "the selection matches no tensor (default: float tensors with ndim ≥ 2; use `include` to choose)",
        ));
    } else if let Some(bad) = chosen.iter().find(|t| !t.dtype.is_float()) {
        errors.push(FieldError::new(
            format!("{pointer}/include"),
            format!(
                "tensor `{}` has dtype {} and cannot be quantized",
                bad.name,
                bad.dtype.as_str()
            ),
        ));
    }
}

/// The largest divisor of `n` not above `g` (a group size that would work).
fn largest_divisor_at_most(n: usize, g: usize) -> usize {
    (1..=g.min(n))
        .rev()
        .find(|d| n.is_multiple_of(*d))
        .unwrap_or(1)
}
