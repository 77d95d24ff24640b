//! Calibration-based steps: `quantize` with `method: "gptq"`, `prune` with `method: "wanda"`
//! or `"sparsegpt"` (API.md "Calibration-based compression"). Each needs a `calibration`
//! block naming a dataset the network reads.

use serde_json::{json, Map, Value};

use super::fields::{bool_or, deny_unknown, f64_in, object, seed, usize_in};
use super::train::{check_dataset_fits, check_text_dataset, dataset_ref, require_runnable};
use super::{check_patterns, patterns, Facts, FieldError, Selection};
use crate::compress::formats::gguf::GgufType;
use crate::compress::prune::calibrated::Target;
use crate::compress::quant::gptq::GptqParams;
use crate::compress::quant::{auto, gptq};
use crate::ids::DatasetId;

/// Group size of `gptq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupSize {
    /// 128, or the largest of 64 / 32 dividing the tensor's rows, else one scale per row.
    Default,
    /// One scale per output row (`-1`).
    PerChannel,
    /// This many consecutive columns per scale.
    Size(usize),
}

impl GroupSize {
    /// The group size for rows of `cols` weights (`None`: per row).
    pub fn for_cols(self, cols: usize) -> Option<usize> {
        match self {
            GroupSize::PerChannel => None,
            GroupSize::Size(g) => Some(g),
            GroupSize::Default => [128, 64, 32].into_iter().find(|g| cols.is_multiple_of(*g)),
        }
    }
}

/// The size budget of `auto`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AutoBudget {
    /// Mean bits per weight over the selected tensors.
    BitsPerWeight(f64),
    /// Bytes of the selected tensors' data in the file.
    Bytes(u64),
}

impl AutoBudget {
    /// The budget in bytes for `numel` selected weights.
    pub fn bytes(self, numel: u64) -> u64 {
        match self {
            AutoBudget::BitsPerWeight(b) => (b * numel as f64 / 8.0).floor() as u64,
            AutoBudget::Bytes(n) => n,
        }
    }

    /// Normalised JSON.
    pub fn to_json(self) -> Value {
        match self {
            AutoBudget::BitsPerWeight(b) => json!({ "bits_per_weight": b }),
            AutoBudget::Bytes(n) => json!({ "size_bytes": n }),
        }
    }
}

/// The candidates of `auto` when the step names none (API.md).
pub const AUTO_CANDIDATES: [GgufType; 4] =
    [GgufType::Q4K, GgufType::Q5K, GgufType::Q6K, GgufType::Q8_0];

/// Most floats the reference outputs of `auto` may hold (tokens × output width): 2 GiB.
pub const MAX_AUTO_OUTPUT_FLOATS: usize = 1 << 29;

/// The method of a calibrated step and its parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum CalibratedMethod {
    /// Mixed GGUF types per tensor under a budget, from measured sensitivities.
    Auto {
        /// The size budget.
        budget: AutoBudget,
        /// The GGUF types each tensor may take (before fallbacks).
        candidates: Vec<GgufType>,
    },
    /// GPTQ quantization (`group_size` in `params` is filled per tensor from `group`).
    Gptq {
        /// Bits, symmetric, act_order, damp, block size.
        params: GptqParams,
        /// The requested group size.
        group: GroupSize,
    },
    /// AWQ quantization.
    Awq {
        /// Bits per weight.
        bits: u8,
        /// The requested group size.
        group: GroupSize,
        /// Symmetric or affine grid.
        symmetric: bool,
        /// Exponents tried.
        grid: usize,
        /// Search each row group's clipping range after the scales.
        clip: bool,
    },
    /// HQQ quantization (calibration-free).
    Hqq {
        /// Bits per weight.
        bits: u8,
        /// The requested group size.
        group: GroupSize,
    },
    /// Wanda pruning.
    Wanda(Target),
    /// SparseGPT pruning.
    SparseGpt {
        /// How many weights go.
        target: Target,
        /// Damping fraction.
        damp: f64,
        /// Columns per mask selection and lazy update.
        block_size: usize,
    },
}

/// The `calibration` block.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationSpec {
    /// The dataset drawn from.
    pub dataset_id: DatasetId,
    /// Samples drawn.
    pub samples: usize,
    /// Tokens per window (text).
    pub seq_len: usize,
    /// Seed of the draw (`None`: the job's).
    pub seed: Option<u64>,
}

/// A validated calibration-based step.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibratedSpec {
    /// Method.
    pub method: CalibratedMethod,
    /// What to calibrate on (`None` for `hqq`, which needs no data).
    pub calibration: Option<CalibrationSpec>,
    /// Which tensors (linear layers' weights).
    pub selection: Selection,
    /// `gptq` only: also write the packed encoding of its codes (an artifact; last step).
    pub packed: bool,
    /// `gptq` only: write its codes as GGUF blocks (the artifact; last step).
    pub gguf: bool,
}

impl CalibratedSpec {
    /// `quantize` or `prune`.
    pub fn op(&self) -> &'static str {
        match self.method {
            CalibratedMethod::Gptq { .. }
            | CalibratedMethod::Awq { .. }
            | CalibratedMethod::Hqq { .. }
            | CalibratedMethod::Auto { .. } => "quantize",
            _ => "prune",
        }
    }

    /// API spelling of the method.
    pub fn method_name(&self) -> &'static str {
        match self.method {
            CalibratedMethod::Auto { .. } => "auto",
            CalibratedMethod::Gptq { .. } => "gptq",
            CalibratedMethod::Awq { .. } => "awq",
            CalibratedMethod::Hqq { .. } => "hqq",
            CalibratedMethod::Wanda(_) => "wanda",
            CalibratedMethod::SparseGpt { .. } => "sparsegpt",
        }
    }

    /// Normalised JSON.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "op": self.op(),
            "method": self.method_name(),
            "include": self.selection.include,
            "exclude": self.selection.exclude,
            "calibration": self.calibration.as_ref().map(|c| json!({
                "dataset_id": c.dataset_id.to_string(), "samples": c.samples,
                "seq_len": c.seq_len, "seed": c.seed})),
        });
        let group_json = |g: GroupSize| match g {
            GroupSize::Default => Value::Null,
            GroupSize::PerChannel => json!(-1),
            GroupSize::Size(g) => json!(g),
        };
        let target = |v: &mut Value, t: Target| match t {
            Target::Sparsity(s) => v["sparsity"] = json!(s),
            Target::NM { n, m } => {
                v["n"] = json!(n);
                v["m"] = json!(m);
            }
        };
        match &self.method {
            CalibratedMethod::Auto { budget, candidates } => {
                v["budget"] = budget.to_json();
                v["candidates"] = json!(candidates.iter().map(|c| c.as_str()).collect::<Vec<_>>());
                v["format"] = json!("gguf");
            }
            &CalibratedMethod::Gptq { params, group } => {
                v["bits"] = json!(params.bits);
                v["group_size"] = group_json(group);
                v["symmetric"] = json!(params.symmetric);
                v["act_order"] = json!(params.act_order);
                v["damp"] = json!(params.damp);
                v["block_size"] = json!(params.block_size);
                v["clip"] = json!(params.clip);
                v["format"] = json!(if self.packed {
                    "packed"
                } else if self.gguf {
                    "gguf"
                } else {
                    "dequantized"
                });
            }
            &CalibratedMethod::Awq {
                bits,
                group,
                symmetric,
                grid,
                clip,
            } => {
                v["bits"] = json!(bits);
                v["group_size"] = group_json(group);
                v["symmetric"] = json!(symmetric);
                v["grid"] = json!(grid);
                v["clip"] = json!(clip);
                v["format"] = json!("dequantized");
            }
            &CalibratedMethod::Hqq { bits, group } => {
                v["bits"] = json!(bits);
                v["group_size"] = group_json(group);
                v["format"] = json!("dequantized");
            }
            &CalibratedMethod::Wanda(t) => target(&mut v, t),
            &CalibratedMethod::SparseGpt {
                target: t,
                damp,
                block_size,
            } => {
                target(&mut v, t);
                v["damp"] = json!(damp);
                v["block_size"] = json!(block_size);
            }
        }
        v
    }
}

/// Parses a calibrated step (`op` quantize with method gptq, or prune with wanda /
/// sparsegpt) at `pointer`.
pub fn parse(
    obj: &Map<String, Value>,
    pointer: &str,
    facts: Option<&Facts>,
) -> Result<CalibratedSpec, Vec<FieldError>> {
    let mut errors = Vec::new();
    let method = obj.get("method").and_then(Value::as_str).unwrap_or("");
    let mut allowed = vec!["op", "method", "include", "exclude", "calibration"];
    allowed.extend(match method {
        "gptq" => &[
            "bits",
            "group_size",
            "symmetric",
            "act_order",
            "damp",
            "block_size",
            "clip",
            "format",
        ][..],
        "awq" => &["bits", "group_size", "symmetric", "grid", "clip", "format"][..],
        "hqq" => &["bits", "group_size", "format"][..],
        "auto" => &["budget", "candidates", "format"][..],
        // damp / block_size are SparseGPT's; a null (what generated clients send) is accepted.
        "wanda" => &["sparsity", "n", "m", "damp", "block_size"][..],
        _ => &["sparsity", "n", "m", "damp", "block_size"][..],
    });
    deny_unknown(obj, &allowed, pointer, &mut errors);
    let include = patterns(
        obj.get("include"),
        &format!("{pointer}/include"),
        &mut errors,
    );
    let exclude = patterns(
        obj.get("exclude"),
        &format!("{pointer}/exclude"),
        &mut errors,
    );
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
    }
    let selection = Selection::of(include, exclude, facts);
    let calibration = if method == "hqq" {
        if obj.get("calibration").is_some_and(|v| !v.is_null()) {
            errors.push(FieldError::new(
                format!("{pointer}/calibration"),
                "hqq is calibration-free: leave `calibration` out",
            ));
        }
        None
    } else {
        parse_calibration(obj, pointer, method, facts, &mut errors)
    };
    if method == "wanda" {
        for key in ["damp", "block_size"] {
            if obj.get(key).is_some_and(|v| !v.is_null()) {
                errors.push(FieldError::new(
                    format!("{pointer}/{key}"),
                    "applies to `sparsegpt` only (Wanda does not update weights)",
                ));
            }
        }
    }
    let damp = f64_in(obj, "damp", (0.0, 1.0), pointer, &mut errors).unwrap_or(0.01);
    let block_size = usize_in(obj, "block_size", (1, 4096), pointer, &mut errors).unwrap_or(128);
    // Rows of each selected 2-D weight (calibrated methods handle linear layers).
    let mut cols_of = Vec::new();
    if let Some(f) = facts {
        for t in selection.resolve(&f.tensors) {
            if t.shape.len() != 2 {
                errors.push(FieldError::new(
                    format!("{pointer}/include"),
                    format!(
                        "`{}` {:?} is not a linear layer's weight; {method} handles 2-D weights (exclude it)",
                        t.name, t.shape
                    ),
                ));
            } else {
                cols_of.push((t.name.clone(), t.shape[1]));
            }
        }
        if selection.resolve(&f.tensors).is_empty() {
            errors.push(FieldError::new(
                format!("{pointer}/include"),
                "selects no tensor",
            ));
        }
    }
    if method == "auto" {
        let auto = parse_auto(obj, pointer, facts, &selection, &mut errors);
        return match (auto, errors.is_empty()) {
            (Some(method), true) => Ok(CalibratedSpec {
                method,
                calibration,
                selection,
                packed: false,
                gguf: false,
            }),
            _ => Err(errors),
        };
    }
    let quantizing = matches!(method, "gptq" | "awq" | "hqq");
    let bits = match obj.get("bits") {
        None | Some(Value::Null) => 4,
        Some(v) => match v.as_u64() {
            Some(b) if (2..=8).contains(&b) => b as u8,
            _ => {
                errors.push(FieldError::new(
                    format!("{pointer}/bits"),
                    "must be an integer in [2, 8]",
                ));
                4
            }
        },
    };
    let group = match obj.get("group_size") {
        None | Some(Value::Null) => GroupSize::Default,
        Some(v) if v.as_i64() == Some(-1) => GroupSize::PerChannel,
        Some(v) => match v.as_u64() {
            Some(g) if (2..=1 << 20).contains(&g) => {
                let g = g as usize;
                for (name, cols) in &cols_of {
                    if cols % g != 0 {
                        errors.push(FieldError::new(
                            format!("{pointer}/group_size"),
                            format!("tensor `{name}` has rows of {cols} weights, not a multiple of group_size {g}; pick a divisor of {cols}, -1 (per row), or leave it out (128, else 64 or 32, else per row)"),
                        ));
                    }
                }
                GroupSize::Size(g)
            }
            _ => {
                errors.push(FieldError::new(
                    format!("{pointer}/group_size"),
                    "must be an integer ≥ 2, or -1 for one scale per row",
                ));
                GroupSize::Default
            }
        },
    };
    let (mut packed, mut gguf) = (false, false);
    if quantizing {
        match obj.get("format").and_then(Value::as_str) {
            None | Some("dequantized") => {}
            Some("packed") if method == "gptq" => packed = true,
            Some("gguf") if method == "gptq" => gguf = true,
            Some("packed" | "gguf") => errors.push(FieldError::unsupported(
                format!("{pointer}/format"),
                format!("{method} writes the dequantized model{}; `packed` and `gguf` are available for gptq, whose codes lie on integer grids", if method == "awq" { " (its per-channel scales are folded into the weights)" } else { "" }),
            )),
            Some(other) => errors.push(FieldError::new(
                format!("{pointer}/format"),
                format!("unknown format `{other}`; expected dequantized or packed"),
            )),
        }
    }
    let symmetric = bool_or(obj, "symmetric", true, pointer, &mut errors);
    let mut group = group;
    if gguf {
        // GGUF stores GPTQ's codes in its 32-value blocks with f16 scales.
        if gptq::gguf_type(bits, symmetric).is_none() {
            errors.push(FieldError::unsupported(
                format!("{pointer}/format"),
                format!(
                    "GGUF stores gptq codes of 4 bits (q4_0, or q4_1 affine), 5 bits (q5_0 / q5_1) or 8 bits symmetric (q8_0), not {bits} bits{}; use `packed` for other widths",
                    if symmetric { "" } else { " affine" }
                ),
            ));
        }
        match group {
            GroupSize::Default | GroupSize::Size(32) => group = GroupSize::Size(32),
            _ => errors.push(FieldError::new(
                format!("{pointer}/group_size"),
                "GGUF blocks hold 32 values with one scale: leave group_size out or set 32",
            )),
        }
        for (name, cols) in &cols_of {
            if cols % 32 != 0 {
                errors.push(FieldError::new(
                    format!("{pointer}/format"),
                    format!("tensor `{name}` has rows of {cols} weights, not a multiple of GGUF's 32-value blocks; exclude it"),
                ));
            }
        }
    }
    let method = match method {
        "gptq" => CalibratedMethod::Gptq {
            params: GptqParams {
                bits,
                group_size: None,
                symmetric,
                act_order: bool_or(obj, "act_order", false, pointer, &mut errors),
                damp,
                block_size,
                gguf_grid: gguf,
                clip: bool_or(obj, "clip", true, pointer, &mut errors),
            },
            group,
        },
        "awq" => CalibratedMethod::Awq {
            bits,
            group,
            symmetric,
            grid: usize_in(obj, "grid", (1, 100), pointer, &mut errors).unwrap_or(20),
            clip: bool_or(obj, "clip", true, pointer, &mut errors),
        },
        "hqq" => CalibratedMethod::Hqq { bits, group },
        m => {
            let target = parse_target(obj, pointer, &cols_of, &mut errors);
            if m == "wanda" {
                CalibratedMethod::Wanda(target)
            } else {
                CalibratedMethod::SparseGpt {
                    target,
                    damp,
                    block_size,
                }
            }
        }
    };
    if errors.is_empty() {
        Ok(CalibratedSpec {
            method,
            calibration,
            selection,
            packed,
            gguf,
        })
    } else {
        Err(errors)
    }
}

fn parse_target(
    obj: &Map<String, Value>,
    pointer: &str,
    cols_of: &[(String, usize)],
    errors: &mut Vec<FieldError>,
) -> Target {
    let given = |k: &str| obj.get(k).is_some_and(|v| !v.is_null());
    let has_nm = given("n") || given("m");
    if has_nm {
        if given("sparsity") {
            errors.push(FieldError::new(
                format!("{pointer}/sparsity"),
                "N:M sparsity is fixed by n and m (1 − n/m); leave `sparsity` out",
            ));
        }
        let n = usize_in(obj, "n", (1, 256), pointer, errors);
        let m = usize_in(obj, "m", (2, 256), pointer, errors);
        let (Some(n), Some(m)) = (n, m) else {
            errors.push(FieldError::new(
                format!("{pointer}/m"),
                "N:M needs both `n` (kept) and `m` (group length), e.g. 2 and 4",
            ));
            return Target::Sparsity(0.5);
        };
        if n >= m {
            errors.push(FieldError::new(
                format!("{pointer}/n"),
                format!(
                    "N:M keeps n of every m weights, so n must be smaller than m (got {n}:{m})"
                ),
            ));
        }
        for (name, cols) in cols_of {
            if cols % m != 0 {
                errors.push(FieldError::new(
                    format!("{pointer}/m"),
                    format!("tensor `{name}` has rows of {cols} weights, not a multiple of m = {m}; exclude it"),
                ));
            }
        }
        return Target::NM { n, m };
    }
    match obj
        .get("sparsity")
        .filter(|v| !v.is_null())
        .map(Value::as_f64)
    {
        Some(Some(s)) if s.is_finite() && (0.0..1.0).contains(&s) => Target::Sparsity(s),
        None => {
            errors.push(FieldError::new(
                format!("{pointer}/sparsity"),
                "is required (a fraction in [0, 1)), or give `n` and `m` for N:M",
            ));
            Target::Sparsity(0.5)
        }
        _ => {
            errors.push(FieldError::new(
                format!("{pointer}/sparsity"),
                "must be a fraction in [0, 1): the share of weights removed",
            ));
            Target::Sparsity(0.5)
        }
    }
}

/// Most tokens a transformer's calibration draw may hold (GPTQ's usual 128 windows of 2,048).
pub const MAX_CALIBRATION_TOKENS: usize = 1 << 18;

/// `budget`, `candidates` and `format` of `auto`, checked against the selected tensors.
fn parse_auto(
    obj: &Map<String, Value>,
    pointer: &str,
    facts: Option<&Facts>,
    selection: &super::Selection,
    errors: &mut Vec<FieldError>,
) -> Option<CalibratedMethod> {
    match obj.get("format").and_then(Value::as_str) {
        None | Some("gguf") => {}
        Some(_) => errors.push(FieldError::new(
            format!("{pointer}/format"),
            "auto writes a GGUF file (a type per tensor): only `gguf` applies",
        )),
    }
    let cp = format!("{pointer}/candidates");
    let candidates: Vec<GgufType> = match obj.get("candidates") {
        None | Some(Value::Null) => AUTO_CANDIDATES.to_vec(),
        Some(Value::Array(items)) if !items.is_empty() && items.len() <= GgufType::ALL.len() => {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                match item.as_str().and_then(|t| t.parse::<GgufType>().ok()) {
                    Some(t) if !out.contains(&t) => out.push(t),
                    Some(t) => errors.push(FieldError::new(
                        format!("{cp}/{i}"),
                        format!("{t} is listed twice"),
                    )),
                    None => errors.push(FieldError::new(
                        format!("{cp}/{i}"),
                        format!(
                            "must be a GGUF type: one of {}",
                            GgufType::ALL.map(GgufType::as_str).join(", ")
                        ),
                    )),
                }
            }
            out
        }
        Some(_) => {
            errors.push(FieldError::new(
                &cp,
                format!(
                    "must be a list of 1 to {} GGUF types, e.g. [\"q4_k\", \"q5_k\", \"q6_k\", \"q8_0\"]",
                    GgufType::ALL.len()
                ),
            ));
            Vec::new()
        }
    };
    let bp = format!("{pointer}/budget");
    let budget = match object(obj, "budget", pointer, errors) {
        None => {
            if obj.get("budget").is_none_or(Value::is_null) {
                errors.push(FieldError::new(
                    &bp,
                    "is required: {\"bits_per_weight\": 4.5} or {\"size_bytes\": N} (the selected tensors' data)",
                ));
            }
            None
        }
        Some(b) => {
            deny_unknown(b, &["bits_per_weight", "size_bytes"], &bp, errors);
            let bits = f64_in(b, "bits_per_weight", (0.5, 32.0), &bp, errors);
            let bytes = match b.get("size_bytes") {
                None | Some(Value::Null) => None,
                Some(v) => match v.as_u64() {
                    Some(n) if n >= 1 => Some(n),
                    _ => {
                        errors.push(FieldError::new(
                            format!("{bp}/size_bytes"),
                            "must be a positive integer (bytes)",
                        ));
                        None
                    }
                },
            };
            match (bits, bytes) {
                (Some(b), None) => Some(AutoBudget::BitsPerWeight(b)),
                (None, Some(n)) => Some(AutoBudget::Bytes(n)),
                (Some(_), Some(_)) => {
                    errors.push(FieldError::new(
                        &bp,
                        "give one of bits_per_weight and size_bytes, not both",
                    ));
                    None
                }
                (None, None) => {
                    let given = |k: &str| b.get(k).is_some_and(|v| !v.is_null());
                    if !given("bits_per_weight") && !given("size_bytes") {
                        errors.push(FieldError::new(
                            &bp,
                            "needs bits_per_weight (e.g. 4.5) or size_bytes",
                        ));
                    }
                    None
                }
            }
        }
    };
    if let (Some(f), Some(budget), false) = (facts, budget, candidates.is_empty()) {
        let (mut smallest, mut numel) = (0u64, 0u64);
        for t in selection.resolve(&f.tensors) {
            let choices = auto::choices(&t.shape, &candidates);
            match choices.first() {
                Some(c) => smallest += c.bytes,
                None => errors.push(FieldError::new(
                    &cp,
                    format!(
                        "no candidate fits `{}`: its rows of {} values are not a multiple of any candidate's (or its fallback's) block; add q8_0, or exclude the tensor",
                        t.name,
                        t.shape.last().copied().unwrap_or(0)
                    ),
                )),
            }
            numel += t.numel() as u64;
        }
        if numel > 0 && smallest > budget.bytes(numel) {
            errors.push(FieldError::new(
                &bp,
                format!(
                    "is below the smallest the candidates make of the selection: {smallest} bytes ({:.3} bits per weight over {numel} weights) with every tensor at its smallest candidate",
                    smallest as f64 * 8.0 / numel as f64
                ),
            ));
        }
    }
    Some(CalibratedMethod::Auto {
        budget: budget?,
        candidates,
    })
}

fn parse_calibration(
    obj: &Map<String, Value>,
    pointer: &str,
    method: &str,
    facts: Option<&Facts>,
    errors: &mut Vec<FieldError>,
) -> Option<CalibrationSpec> {
    let cp = format!("{pointer}/calibration");
    let Some(c) = object(obj, "calibration", pointer, errors) else {
        if obj.get("calibration").is_none_or(Value::is_null) {
            errors.push(FieldError::new(
                &cp,
                "is required: {\"dataset_id\", \"samples\", \"seq_len\", \"seed\"}, the data whose inputs the method measures",
            ));
        }
        return None;
    };
    deny_unknown(
        c,
        &["dataset_id", "samples", "seq_len", "seed"],
        &cp,
        errors,
    );
    // auto keeps the float network's outputs of every calibration token: fewer windows or
    // documents by default (rows of a tensor dataset are cheap).
    let transformer = facts.is_some_and(|f| f.transformer.is_some());
    let default_samples = match (method, transformer) {
        ("auto", true) => 8,
        ("auto", false) => 256,
        _ => 128,
    };
    let samples = usize_in(c, "samples", (1, 100_000), &cp, errors).unwrap_or(default_samples);
    let seq_len = usize_in(c, "seq_len", (2, 1 << 16), &cp, errors).unwrap_or(512);
    let seed = seed(c, &cp, errors);
    // Text only: a sequential network's samples are rows (`seq_len` does not apply).
    let text = facts.is_some_and(|f| f.transformer.is_some());
    if text && samples.saturating_mul(seq_len) > MAX_CALIBRATION_TOKENS {
        errors.push(FieldError::new(
            format!("{cp}/samples"),
            format!(
                "samples × seq_len is {} tokens; at most {MAX_CALIBRATION_TOKENS} (e.g. 128 × 2048) — the hidden states of every sample are kept while a block is calibrated",
                samples.saturating_mul(seq_len)
            ),
        ));
    }
    if let Some(t) = facts.and_then(|f| f.transformer.as_ref()) {
        let width = if t.family == crate::compress::engine::Family::Llama {
            t.vocab_size
        } else {
            t.hidden.max(t.classes.unwrap_or(0))
        };
        let tokens = samples.saturating_mul(seq_len);
        if method == "auto" && tokens.saturating_mul(width.max(1)) > MAX_AUTO_OUTPUT_FLOATS {
            errors.push(FieldError::new(
                format!("{cp}/samples"),
                format!(
                    "samples × seq_len is {tokens} tokens; auto keeps the float model's {width} outputs of every token, so at most {} here (e.g. 8 × 512)",
                    MAX_AUTO_OUTPUT_FLOATS / width.max(1)
                ),
            ));
        }
    }
    let dataset_id = dataset_ref(c, &cp, facts, errors)?;
    if let Some(f) = facts {
        if require_runnable(f, pointer, errors) {
            let dp = format!("{cp}/dataset_id");
            match &f.transformer {
                Some(t) => check_text_dataset(f, t, &dataset_id, false, &dp, errors),
                None => check_dataset_fits(f, &dataset_id, None, false, &dp, errors),
            }
        }
    }
    Some(CalibrationSpec {
        dataset_id,
        samples,
        seq_len,
        seed,
    })
}
