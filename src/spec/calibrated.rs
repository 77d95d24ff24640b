//! Calibration-based steps: `quantize` with `method: "gptq"`, `prune` with `method: "wanda"`
//! or `"sparsegpt"` (API.md "Calibration-based compression"). Each needs a `calibration`
//! block naming a dataset the network reads.

use serde_json::{json, Map, Value};

use super::fields::{bool_or, deny_unknown, f64_in, object, seed, usize_in};
use super::train::{check_dataset_fits, check_text_dataset, dataset_ref, require_runnable};
use super::{check_patterns, patterns, Facts, FieldError, Selection};
use crate::compress::prune::calibrated::Target;
use crate::compress::quant::gptq::GptqParams;
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

/// The method of a calibrated step and its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CalibratedMethod {
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
}

impl CalibratedSpec {
    /// `quantize` or `prune`.
    pub fn op(&self) -> &'static str {
        match self.method {
            CalibratedMethod::Gptq { .. }
            | CalibratedMethod::Awq { .. }
            | CalibratedMethod::Hqq { .. } => "quantize",
            _ => "prune",
        }
    }

    /// API spelling of the method.
    pub fn method_name(&self) -> &'static str {
        match self.method {
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
        match self.method {
            CalibratedMethod::Gptq { params, group } => {
                v["bits"] = json!(params.bits);
                v["group_size"] = group_json(group);
                v["symmetric"] = json!(params.symmetric);
                v["act_order"] = json!(params.act_order);
                v["damp"] = json!(params.damp);
                v["block_size"] = json!(params.block_size);
                v["format"] = json!(if self.packed { "packed" } else { "dequantized" });
            }
            CalibratedMethod::Awq {
                bits,
                group,
                symmetric,
                grid,
            } => {
                v["bits"] = json!(bits);
                v["group_size"] = group_json(group);
                v["symmetric"] = json!(symmetric);
                v["grid"] = json!(grid);
                v["format"] = json!("dequantized");
            }
            CalibratedMethod::Hqq { bits, group } => {
                v["bits"] = json!(bits);
                v["group_size"] = group_json(group);
                v["format"] = json!("dequantized");
            }
            CalibratedMethod::Wanda(t) => target(&mut v, t),
            CalibratedMethod::SparseGpt {
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
            "format",
        ][..],
        "awq" => &["bits", "group_size", "symmetric", "grid", "format"][..],
        "hqq" => &["bits", "group_size", "format"][..],
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
        parse_calibration(obj, pointer, facts, &mut errors)
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
    let mut packed = false;
    if quantizing {
        match obj.get("format").and_then(Value::as_str) {
            None | Some("dequantized") => {}
            Some("packed") if method == "gptq" => packed = true,
            Some("packed" | "gguf") => errors.push(FieldError::unsupported(
                format!("{pointer}/format"),
                format!("{method} writes the dequantized model{}; `packed` is available for gptq, whose codes lie on integer grids", if method == "awq" { " (its per-channel scales are folded into the weights)" } else { "" }),
            )),
            Some(other) => errors.push(FieldError::new(
                format!("{pointer}/format"),
                format!("unknown format `{other}`; expected dequantized or packed"),
            )),
        }
    }
    let method = match method {
        "gptq" => CalibratedMethod::Gptq {
            params: GptqParams {
                bits,
                group_size: None,
                symmetric: bool_or(obj, "symmetric", true, pointer, &mut errors),
                act_order: bool_or(obj, "act_order", false, pointer, &mut errors),
                damp,
                block_size,
            },
            group,
        },
        "awq" => CalibratedMethod::Awq {
            bits,
            group,
            symmetric: bool_or(obj, "symmetric", true, pointer, &mut errors),
            grid: usize_in(obj, "grid", (1, 100), pointer, &mut errors).unwrap_or(20),
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

fn parse_calibration(
    obj: &Map<String, Value>,
    pointer: &str,
    facts: Option<&Facts>,
    errors: &mut Vec<FieldError>,
) -> Option<CalibrationSpec> {
    let cp = format!("{pointer}/calibration");
    let Some(c) = object(obj, "calibration", pointer, errors) else {
        if !obj.contains_key("calibration") {
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
    let samples = usize_in(c, "samples", (1, 100_000), &cp, errors).unwrap_or(128);
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
