//! The `quantize` operation's integer/codebook methods on files: streaming safetensors →
//! safetensors in the `dequantized` or `packed` format, and the `packed` reader.
//!
//! It owns the `packed` file layout and nothing else: the codecs are in [`crate::compress::quant`],
//! safetensors I/O in [`crate::compress::formats::safetensors`]. Work goes tensor by tensor, so peak memory is
//! bounded by the largest tensor (its f32 values, codes and reconstruction), not the model.
//!
//! # `dequantized` format
//! A float safetensors file with the input's names, dtypes and shapes, every selected
//! tensor replaced by its reconstruction (cast back to its dtype): a drop-in model that
//! carries the quantization error.
//!
//! # `packed` format (version 1)
//! A safetensors file. Tensors that were not quantized are stored unchanged under their own
//! names. A quantized tensor `{name}` becomes, in this order:
//! * `{name}.qcodes` — `U8`, shape `[⌈numel · bits / 8⌉]`: one code per weight in row-major
//!   order, bit-packed LSB-first (weight `i` occupies bits `i·bits … i·bits + bits − 1` of
//!   the little-endian bit stream; bit `k` is bit `k mod 8` of byte `k / 8`; the last byte is
//!   zero-padded). With 8 bits this is one byte per weight.
//! * `{name}.qscale` — `F32`, shape `[1]` (per tensor), `[rows]` (per channel, `log2`) or
//!   `[rows, cols / group_size]` (per group, `nf4`); absent for `kmeans`.
//! * `{name}.qzero` — `U8`, same shape as `qscale`, only for affine `uniform`: the integer
//!   zero-point of each block, in `0 … 2^bits − 1`.
//! * `{name}.qcodebook` — `F32`, shape `[entries]`, for `kmeans` (the sorted codebook),
//!   `nf4` (the 16 NF4 levels) and `log2` (the 2^bits-entry table `±2^−(m−1)`).
//! * Sparse (pruned) tensors: `qcodes` holds codes for the non-zero weights only, in index
//!   order (`nonzero` of them), every other weight decodes to exactly 0, and where the
//!   non-zeros are is stored one of two ways:
//!   * `{name}.qmask` — `U8`, shape `[⌈numel / 8⌉]`: bit `i` (bit `i mod 8` of byte `i / 8`,
//!     LSB-first) is 1 where weight `i` is non-zero;
//!   * `{name}.qindex` — `U8`, shape `[⌈index_entries · index_bits / 8⌉]`: relative indices
//!     (Han et al. 2016), `index_entries` values of `index_bits` bits packed like the codes.
//!     With `F = 2^index_bits − 1` and a position `p` starting at 0, an entry `g < F` skips
//!     `g` zeros and places the next code at `p + g` (then `p = p + g + 1`); an entry `g = F`
//!     skips `F` zeros and places nothing (a gap longer than `F − 1`). Zeros after the last
//!     non-zero take no entries.
//!
//!   The writer picks, per tensor, whichever of dense codes, mask and relative index (at
//!   the best `index_bits`, 1 to 8) takes the fewest bytes, dense on ties, then the mask. A
//!   pruned then quantized model is thus stored at about
//!   `min(numel / 8, entries · index_bits / 8) + nonzero · bits / 8` bytes per tensor.
//!
//! * Entropy coding (version 3, `entropy: "huffman"`): `{name}.qcodes` holds the codes
//!   Huffman-coded instead of at a fixed width, with `{name}.qcodes_lengths` — `U8`, shape
//!   `[2^bits]`, the canonical code length of each code value (see
//!   [`crate::compress::formats::huffman`] for the stream layout) — right after it; a
//!   relative index is likewise Huffman-coded when that is smaller, its entries'
//!   code lengths in `{name}.qindex_lengths` (`U8`, `[2^index_bits]`) right after
//!   `{name}.qindex`. The writer sizes dense codes, mask and every index width with entropy
//!   coding and keeps the smallest. Files without entropy coding are written as version 2.
//!
//! The metadata key `whittle.quantization` (next to the caller's metadata) holds JSON:
//! `{"format":"whittle.packed","version":1,"tensors":{"{name}":{…}}}` with, per tensor:
//! `method` (`uniform|kmeans|log2|nf4`), `bits`, `scheme`, `shape` and `dtype` (original),
//! `block_len` (weights per scale: element `i` uses scale `i / block_len`), `code_offset`
//! (2^(bits−1) for the symmetric scheme, else null), the names `codes`, `scale`,
//! `zero_point`, `codebook`, `mask` and `index` (null when absent), `nonzero` (the number of
//! codes when `mask` or `index` is set), `index_bits` and `index_entries` (with `index`), and
//! `entropy` (`"huffman"`, absent without), `code_lengths` and `index_lengths` (the length
//! tables' names, with `entropy`), the method's parameters `symmetric`,
//! `granularity`, `group_size`, `search`, `clusters`, `init` (null when not applicable).
//!
//! Decoding (what [`decode_packed`] does): unpack (or Huffman-decode) the codes and the
//! positions, place the codes (`numel` of them, or `nonzero` at the positions), then per
//! `scheme`
//! * `symmetric`: `(code − code_offset) · scale[i / block_len]`
//! * `affine`: `(code − zero[i / block_len]) · scale[i / block_len]`
//! * `codebook`: `codebook[code]`
//! * `scaled_codebook`: `codebook[code] · scale[i / block_len]`
//!
//! computed in f32, then cast to the original `dtype`; reshape to `shape`. The result equals
//! the `dequantized` format's values bit for bit.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

use crate::compress::formats::huffman;
use crate::compress::formats::packed_codes::{index_positions, Encoded, Positions};
pub use crate::compress::formats::packed_codes::{pack_bits, unpack_bits, EntropyReport};
use crate::compress::formats::safetensors::{
    encode_as, encode_f32, f32_view, write_safetensors, Dtype, SafetensorsFile, TensorSpec,
};
use crate::compress::formats::safetensors::{NamedTensor, TensorInfo};
use crate::compress::progress::Ctx;
use crate::compress::quant::{
    check_importance, error_stats, quantize_codes_only, quantize_named, Granularity, KmeansInit,
    Layout, Method, Params, Quantized, Quantizer, Scheme,
};
use crate::compress::{Error, Result};

/// Metadata key of the packed format's decoding instructions.
pub const METADATA_KEY: &str = "whittle.quantization";
/// `format` value in that metadata.
pub const FORMAT_NAME: &str = "whittle.packed";
/// Current version of the packed layout (2 added the relative `index`, 3 entropy coding;
/// older files still decode, and a file without entropy coding is written as version 2).
pub const FORMAT_VERSION: u32 = 3;

/// Entropy coding of a packed file's codes and index gaps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Entropy {
    /// Fixed-width codes and index entries.
    #[default]
    None,
    /// Canonical Huffman codes per tensor ([`huffman`]).
    Huffman,
}

impl Entropy {
    /// API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Entropy::None => "none",
            Entropy::Huffman => "huffman",
        }
    }
}

/// What [`quantize_file`] writes.
#[derive(Debug, Clone, Copy)]
pub struct QuantizeFile<'a> {
    /// The tensors to quantize.
    pub selected: &'a [String],
    /// The method, and the importance of the tensors it weights.
    pub quantizer: &'a Quantizer,
    /// Seed (`kmeans++` initialisation).
    pub seed: u64,
    /// `true`: codes, scales, zero-points and codebooks (see the module documentation);
    /// `false`: a float file of the same dtypes and shapes carrying the quantization error.
    pub packed: bool,
    /// Metadata of the written file.
    pub metadata: &'a BTreeMap<String, String>,
    /// Tensors already quantized elsewhere (GPTQ), written as they are: integer codes in the
    /// layout of `uniform` (symmetric or affine, per row or per group) whose
    /// `params.dequantize(codes)` is `dequantized`.
    pub precomputed: Option<&'a HashMap<String, Quantized>>,
    /// Entropy coding of the packed codes and index gaps (ignored unless `packed`).
    pub entropy: Entropy,
}

/// Weight-level figures for one quantized tensor.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QuantReport {
    /// Tensor name.
    pub tensor: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Method name (`uniform`, `kmeans`, `log2`, `nf4`).
    pub method: String,
    /// Bits per code.
    pub bits: u8,
    /// Mean squared error of the reconstruction (after casting to the tensor's dtype).
    pub mse: f64,
    /// Signal-to-quantization-noise ratio in dB (`null` when the error is zero).
    pub sqnr_db: Option<f64>,
    /// Largest |w − ŵ|.
    pub max_abs_error: f64,
    /// `packed_bytes · 8 / numel`: codes plus scales / zero-points / codebook.
    pub bits_per_weight: f64,
    /// Bytes this tensor takes in the packed format (whichever format was written).
    pub packed_bytes: u64,
    /// Bytes of the original tensor.
    pub dense_bytes: u64,
    /// With entropy coding: what it saved (Deep Compression's P+Q and P+Q+H columns).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyReport>,
}

/// The packed file's decoding instructions (the `whittle.quantization` metadata).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct QuantMeta {
    format: String,
    version: u32,
    tensors: BTreeMap<String, TensorMeta>,
}

/// How one tensor was quantized and where its parts are.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct TensorMeta {
    method: String,
    bits: u8,
    scheme: String,
    shape: Vec<usize>,
    dtype: Dtype,
    block_len: usize,
    code_offset: Option<u32>,
    codes: String,
    scale: Option<String>,
    zero_point: Option<String>,
    codebook: Option<String>,
    #[serde(default)]
    mask: Option<String>,
    #[serde(default)]
    nonzero: Option<usize>,
    #[serde(default)]
    index: Option<String>,
    #[serde(default)]
    index_bits: Option<u8>,
    #[serde(default)]
    index_entries: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    entropy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    code_lengths: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    index_lengths: Option<String>,
    symmetric: Option<bool>,
    granularity: Option<String>,
    group_size: Option<usize>,
    search: Option<bool>,
    clusters: Option<usize>,
    init: Option<String>,
}

impl TensorMeta {
    fn new(name: &str, method: &Method, layout: &Layout, shape: &[usize], dtype: Dtype) -> Self {
        let mut m = TensorMeta {
            method: method.name().into(),
            bits: layout.bits,
            scheme: layout.scheme.as_str().into(),
            shape: shape.to_vec(),
            dtype,
            block_len: layout.block_len,
            code_offset: (layout.scheme == Scheme::Symmetric).then(|| 1u32 << (layout.bits - 1)),
            codes: format!("{name}.qcodes"),
            scale: layout.scheme.has_scale().then(|| format!("{name}.qscale")),
            zero_point: (layout.scheme == Scheme::Affine).then(|| format!("{name}.qzero")),
            codebook: (layout.codebook_len > 0).then(|| format!("{name}.qcodebook")),
            mask: None,
            nonzero: None,
            index: None,
            index_bits: None,
            index_entries: None,
            entropy: None,
            code_lengths: None,
            index_lengths: None,
            symmetric: None,
            granularity: None,
            group_size: None,
            search: None,
            clusters: None,
            init: None,
        };
        match *method {
            Method::Uniform {
                symmetric,
                granularity,
                search,
                ..
            } => {
                m.symmetric = Some(symmetric);
                m.granularity = Some(granularity.as_str().into());
                if let Granularity::PerGroup { group_size } = granularity {
                    m.group_size = Some(group_size);
                }
                m.search = Some(search);
            }
            Method::Kmeans { clusters, init, .. } => {
                m.clusters = Some(clusters);
                m.init = Some(KmeansInit::as_str(init).into());
            }
            Method::Nf4 { group_size } => m.group_size = Some(group_size),
            Method::Log2 { .. } => m.granularity = Some("per_channel".into()),
        }
        m
    }
}

/// Which piece of which input tensor an output tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Raw,
    Dense,
    Codes,
    CodeLengths,
    Positions,
    IndexLengths,
    Scale,
    Zero,
    Codebook,
}

/// A selected tensor's values as f32 (borrowed when the file holds f32).
fn tensor_values<'a>(
    input: &'a SafetensorsFile,
    info: &TensorInfo,
) -> Result<std::borrow::Cow<'a, [f32]>> {
    Ok(match f32_view(info.dtype, input.bytes(info)) {
        Some(v) => v.into(),
        None => input.to_f32(info)?.into(),
    })
}

/// Quantizes the float tensors named in `selected` with `method` and writes them in
/// `format` to `out` (other tensors, and selected tensors that are not floating-point or
/// are empty, are copied unchanged), tensor by tensor; `importance` weights the search of
/// the tensors it names ([`check_importance`]). `metadata` is the caller's metadata
/// (provenance); the packed format adds [`METADATA_KEY`]. `seed` drives `kmeans++`
/// (mixed with each tensor's index). Every tensor is checked against the method before the
/// first byte is written. Returns one report per quantized tensor, in file order.
///
/// With `entropy: Huffman` the stored sizes are known only after quantizing, so every
/// selected tensor is quantized and encoded before the header is written: memory then holds
/// the encoded tensors (about the output's size) instead of one tensor at a time.
pub fn quantize_file(
    input: &SafetensorsFile,
    job: &QuantizeFile<'_>,
    out: &mut dyn Write,
    ctx: &Ctx,
) -> Result<Vec<QuantReport>> {
    let QuantizeFile {
        selected,
        quantizer,
        seed,
        packed,
        metadata,
        precomputed,
        entropy,
    } = *job;
    let huffman = packed && entropy == Entropy::Huffman;
    let precomputed = precomputed.filter(|p| !p.is_empty());
    // The `uniform` method describing a precomputed tensor's layout.
    let method_of = |t: &TensorInfo| -> Method {
        match precomputed.and_then(|p| p.get(&t.name)) {
            Some(q) => {
                let cols = t.shape.iter().skip(1).product::<usize>().max(1);
                Method::Uniform {
                    bits: q.params.bits,
                    symmetric: q.params.scheme == Scheme::Symmetric,
                    granularity: if q.params.block_len >= cols {
                        Granularity::PerChannel
                    } else {
                        Granularity::PerGroup {
                            group_size: q.params.block_len,
                        }
                    },
                    search: false,
                }
            }
            None => quantizer.method,
        }
    };
    let (method, importance) = (&quantizer.method, &*quantizer.importance);
    method.validate()?;
    let tensors = &input.header().tensors;
    let selected: HashSet<&str> = selected.iter().map(String::as_str).collect();
    // Per tensor: its layout and where its codes sit (decided once, used for the header,
    // the data and the reports alike).
    let mut layouts: Vec<Option<(Layout, Positions)>> = Vec::with_capacity(tensors.len());
    for t in tensors {
        let quantize = selected.contains(t.name.as_str()) && t.dtype.is_float() && t.numel() > 0;
        if !quantize {
            layouts.push(None);
            continue;
        }
        if !matches!(t.dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64) {
            return Err(Error::UnsupportedDtype {
                tensor: t.name.clone(),
                dtype: t.dtype.as_str().into(),
                expected: "F16, BF16, F32 or F64 for integer or codebook quantization".into(),
            });
        }
        let layout = method_of(t).layout(&t.name, &t.shape)?;
        if let Some(w) = importance.get(&t.name) {
            check_importance(&t.name, &t.shape, method, w)?;
        }
        let positions = if huffman {
            Positions::Dense // decided with the codes, below
        } else {
            Positions::choose(&tensor_values(input, t)?, layout.bits)
        };
        layouts.push(Some((layout, positions)));
    }

    let total = tensors.len().max(1) as f64;
    let mut reports = Vec::new();
    // One selected tensor: quantized (or taken from `precomputed`), its report pushed, its
    // values returned for the positions.
    let quantize_one = |i: usize, layout: &Layout, part: Part, reports: &mut Vec<QuantReport>| {
        ctx.check()?;
        let info = &tensors[i];
        let values = tensor_values(input, info)?;
        let tensor_seed = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let weights = importance.get(&info.name).map(Vec::as_slice);
        // A packed float32/64 tensor needs no reconstruction, only its statistics.
        let lean = part == Part::Codes && matches!(info.dtype, Dtype::F32 | Dtype::F64);
        let quantize = if lean {
            quantize_codes_only
        } else {
            quantize_named
        };
        let (mut q, mut stats) = match precomputed.and_then(|p| p.get(&info.name)) {
            Some(q) => (q.clone(), error_stats(&values, &q.dequantized)),
            None => quantize(
                &info.name,
                &values,
                &info.shape,
                method,
                tensor_seed,
                weights,
            )?,
        };
        check_params(&info.name, &q, layout)?;
        if round_to_dtype(&mut q.dequantized, info.dtype) {
            stats = error_stats(&values, &q.dequantized);
        }
        reports.push(QuantReport {
            tensor: info.name.clone(),
            shape: info.shape.clone(),
            method: if precomputed.is_some_and(|p| p.contains_key(&info.name)) {
                "gptq".into()
            } else {
                method.name().into()
            },
            bits: layout.bits,
            mse: stats.mse(),
            sqnr_db: stats.sqnr_db(),
            max_abs_error: stats.max_abs,
            bits_per_weight: 0.0,
            packed_bytes: 0,
            dense_bytes: info.nbytes() as u64,
            entropy: None,
        });
        ctx.report(
            (i + 1) as f64 / total,
            &format!("tensor {}/{} ({})", i + 1, tensors.len(), info.name),
        );
        Ok::<_, Error>((q, values))
    };
    // Entropy coding needs every stored size before the header: encode now.
    let mut encoded: Vec<Option<Encoded>> = (0..tensors.len()).map(|_| None).collect();
    if huffman {
        for i in 0..tensors.len() {
            let Some((layout, _)) = layouts[i].clone() else {
                continue;
            };
            let (q, values) = quantize_one(i, &layout, Part::Codes, &mut reports)?;
            let fixed = Positions::choose(&values, q.params.bits);
            let e = Encoded::huffman(&values, q);
            layouts[i] = Some((layout, e.layout));
            if let Some(r) = reports.last_mut() {
                r.entropy = Some(EntropyReport::of(fixed, values.len(), &e));
            }
            encoded[i] = Some(e);
        }
    }

    let mut parts: Vec<(usize, Part)> = Vec::new();
    let mut specs: Vec<TensorSpec> = Vec::new();
    let mut meta = QuantMeta {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        tensors: BTreeMap::new(),
    };
    for (i, (t, layout)) in tensors.iter().zip(&layouts).enumerate() {
        match (layout, packed) {
            (None, _) => {
                specs.push(TensorSpec::new(t.name.clone(), t.dtype, t.shape.clone()));
                parts.push((i, Part::Raw));
            }
            (Some(_), false) => {
                specs.push(TensorSpec::new(t.name.clone(), t.dtype, t.shape.clone()));
                parts.push((i, Part::Dense));
            }
            (Some((l, positions)), true) => {
                let positions = *positions;
                let mut m = TensorMeta::new(&t.name, &method_of(t), l, &t.shape, t.dtype);
                let e = encoded[i].as_ref();
                let code_bytes = e.map_or_else(
                    || (positions.codes(l.numel) * l.bits as usize).div_ceil(8),
                    |e| e.codes.len(),
                );
                specs.push(TensorSpec::new(
                    m.codes.clone(),
                    Dtype::U8,
                    vec![code_bytes],
                ));
                parts.push((i, Part::Codes));
                match positions {
                    Positions::Dense => {}
                    Positions::Mask { nonzero } => {
                        m.mask = Some(format!("{}.qmask", t.name));
                        m.nonzero = Some(nonzero);
                    }
                    Positions::Index {
                        nonzero,
                        bits,
                        entries,
                    } => {
                        m.index = Some(format!("{}.qindex", t.name));
                        m.nonzero = Some(nonzero);
                        m.index_bits = Some(bits);
                        m.index_entries = Some(entries);
                    }
                }
                if let Some(e) = e {
                    m.entropy = Some("huffman".into());
                    m.code_lengths = Some(format!("{}.qcodes_lengths", t.name));
                    if !e.index_lengths.is_empty() {
                        m.index_lengths = Some(format!("{}.qindex_lengths", t.name));
                    }
                }
                // The decoding tensors, in the documented order.
                let companions = [
                    (
                        m.code_lengths.as_ref(),
                        Dtype::U8,
                        vec![1usize << l.bits],
                        Part::CodeLengths,
                    ),
                    (
                        m.mask.as_ref().or(m.index.as_ref()),
                        Dtype::U8,
                        vec![e.map_or_else(|| positions.bytes(l.numel), |e| e.positions.len())],
                        Part::Positions,
                    ),
                    (
                        m.index_lengths.as_ref(),
                        Dtype::U8,
                        vec![e.map_or(0, |e| e.index_lengths.len())],
                        Part::IndexLengths,
                    ),
                    (
                        m.scale.as_ref(),
                        Dtype::F32,
                        l.scale_shape.clone(),
                        Part::Scale,
                    ),
                    (
                        m.zero_point.as_ref(),
                        Dtype::U8,
                        l.scale_shape.clone(),
                        Part::Zero,
                    ),
                    (
                        m.codebook.as_ref(),
                        Dtype::F32,
                        vec![l.codebook_len],
                        Part::Codebook,
                    ),
                ];
                for (name, dtype, shape, part) in companions {
                    if let Some(name) = name {
                        specs.push(TensorSpec::new(name.clone(), dtype, shape));
                        parts.push((i, part));
                    }
                }
                meta.tensors.insert(t.name.clone(), m);
            }
        }
    }
    let mut metadata = metadata.clone();
    if packed {
        // Version 3 only where a reader needs it: files without entropy coding stay readable
        // by version-2 readers.
        if !huffman {
            meta.version = 2;
        }
        let json = serde_json::to_string(&meta)
            .map_err(|e| Error::Internal(format!("quantization metadata: {e}")))?;
        metadata.insert(METADATA_KEY.into(), json);
    }

    let layout_of = |i: usize| {
        layouts[i]
            .clone()
            .ok_or_else(|| Error::Internal(format!("{:?}: no layout", tensors[i].name)))
    };
    let mut current: Option<Encoded> = None;
    write_safetensors(out, &metadata, &specs, |k, w| {
        let (i, part) = parts[k];
        let info = &tensors[i];
        match part {
            Part::Raw => w.write_all(input.bytes(info))?,
            Part::Dense => {
                let layout = layout_of(i)?;
                let (q, _) = quantize_one(i, &layout.0, part, &mut reports)?;
                w.write_all(&encode_as(info.dtype, &q.dequantized)?)?;
            }
            Part::Codes => {
                let e = match encoded[i].take() {
                    Some(e) => e,
                    None => {
                        let (layout, positions) = layout_of(i)?;
                        let (q, values) = quantize_one(i, &layout, part, &mut reports)?;
                        Encoded::fixed(&values, q, positions)
                    }
                };
                w.write_all(&e.codes)?;
                current = Some(e);
            }
            _ => {
                let e = current.as_ref().ok_or_else(|| {
                    Error::Internal(format!("{:?}: parts out of order", info.name))
                })?;
                match part {
                    Part::CodeLengths => w.write_all(&e.code_lengths)?,
                    Part::Positions => w.write_all(&e.positions)?,
                    Part::IndexLengths => w.write_all(&e.index_lengths)?,
                    Part::Scale => w.write_all(&encode_f32(&e.params.scales))?,
                    Part::Zero => w.write_all(&e.params.zero_points)?,
                    _ => w.write_all(&encode_f32(&e.params.codebook))?,
                }
            }
        }
        // The report of the tensor whose last part was just written gets its stored size.
        if parts.get(k + 1).is_none_or(|next| next.0 != i) && part != Part::Raw {
            let stored = match part {
                Part::Dense => {
                    let (l, positions) = layout_of(i)?;
                    l.packed_bytes() - l.code_bytes()
                        + (positions.codes(l.numel) * l.bits as usize).div_ceil(8)
                        + positions.bytes(l.numel)
                }
                _ => current.as_ref().map_or(0, Encoded::bytes),
            };
            if let Some(r) = reports.iter_mut().rfind(|r| r.tensor == info.name) {
                r.packed_bytes = stored as u64;
                r.bits_per_weight = stored as f64 * 8.0 / info.numel().max(1) as f64;
            }
        }
        Ok(())
    })?;
    Ok(reports)
}

/// The quantizer's parameter counts must match the layout the header was written from.
fn check_params(name: &str, q: &Quantized, layout: &Layout) -> Result<()> {
    let p = &q.params;
    let zeros = if layout.scheme == Scheme::Affine {
        layout.n_scales()
    } else {
        0
    };
    if p.bits != layout.bits
        || p.scales.len() != layout.n_scales()
        || p.zero_points.len() != zeros
        || p.codebook.len() != layout.codebook_len
    {
        return Err(Error::Internal(format!(
            "tensor {name:?}: quantizer produced {} scales, {} zero-points, {} codebook entries at {} bits; layout says {:?}",
            p.scales.len(),
            p.zero_points.len(),
            p.codebook.len(),
            p.bits,
            layout
        )));
    }
    Ok(())
}

/// Rounds f32 values to what `dtype` can hold (in place); whether anything could change.
fn round_to_dtype(values: &mut [f32], dtype: Dtype) -> bool {
    match dtype {
        Dtype::F16 => values
            .iter_mut()
            .for_each(|v| *v = f16::from_f32(*v).to_f32()),
        Dtype::BF16 => values
            .iter_mut()
            .for_each(|v| *v = bf16::from_f32(*v).to_f32()),
        _ => return false,
    }
    true
}

/// Every tensor of a packed file as f32, in file order: quantized tensors decoded (the same
/// values a `dequantized` file holds), the others converted (integer and BOOL tensors too).
/// A file without [`METADATA_KEY`] decodes as a plain float file.
pub fn decode_packed(file: &SafetensorsFile) -> Result<Vec<NamedTensor>> {
    let header = file.header();
    let meta: QuantMeta = match header.metadata.get(METADATA_KEY) {
        None => QuantMeta {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            tensors: BTreeMap::new(),
        },
        Some(json) => serde_json::from_str(json).map_err(|e| {
            Error::InvalidSafetensors(format!("metadata {METADATA_KEY:?} is not valid: {e}"))
        })?,
    };
    if meta.format != FORMAT_NAME || !(1..=FORMAT_VERSION).contains(&meta.version) {
        return Err(Error::InvalidSafetensors(format!(
            "packed format {:?} version {} is not supported (expected {FORMAT_NAME:?} version 1 to {FORMAT_VERSION})",
            meta.format, meta.version
        )));
    }
    let mut by_codes: BTreeMap<&str, (&str, &TensorMeta)> = BTreeMap::new();
    let mut companions: HashSet<&str> = HashSet::new();
    for (name, m) in &meta.tensors {
        by_codes.insert(m.codes.as_str(), (name.as_str(), m));
        let parts = [&m.scale, &m.zero_point, &m.codebook, &m.mask, &m.index];
        let entropy = [&m.code_lengths, &m.index_lengths];
        for c in parts.into_iter().chain(entropy).flatten() {
            companions.insert(c.as_str());
        }
    }
    let mut out = Vec::with_capacity(header.tensors.len());
    for t in &header.tensors {
        if let Some((name, m)) = by_codes.get(t.name.as_str()) {
            out.push(NamedTensor {
                name: (*name).to_string(),
                shape: m.shape.clone(),
                values: decode_one(file, name, m)?,
            });
        } else if !companions.contains(t.name.as_str()) {
            let values = if t.dtype.is_float() {
                file.to_f32(t)?
            } else {
                file.to_i64(t)?.into_iter().map(|v| v as f32).collect()
            };
            out.push(NamedTensor {
                name: t.name.clone(),
                shape: t.shape.clone(),
                values,
            });
        }
    }
    if out.len() + companions.len() != header.tensors.len() {
        return Err(Error::InvalidSafetensors(format!(
            "{METADATA_KEY} names tensors the file does not hold"
        )));
    }
    Ok(out)
}

fn decode_one(file: &SafetensorsFile, name: &str, m: &TensorMeta) -> Result<Vec<f32>> {
    let bad =
        |detail: String| Error::InvalidSafetensors(format!("packed tensor {name:?}: {detail}"));
    let scheme =
        Scheme::parse(&m.scheme).ok_or_else(|| bad(format!("unknown scheme {:?}", m.scheme)))?;
    if !(1..=8).contains(&m.bits) {
        return Err(bad(format!("bits {} (1 to 8 expected)", m.bits)));
    }
    if scheme == Scheme::Symmetric && m.code_offset != Some(1u32 << (m.bits - 1)) {
        return Err(bad(format!(
            "code_offset {:?} for {} bits",
            m.code_offset, m.bits
        )));
    }
    let numel = m
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {:?} overflows", m.shape)))?;
    fn part<'a>(
        file: &'a SafetensorsFile,
        key: Option<&str>,
        dtype: Dtype,
    ) -> std::result::Result<Option<&'a [u8]>, String> {
        let Some(n) = key else { return Ok(None) };
        let info = file
            .get(n)
            .ok_or_else(|| format!("tensor {n:?} is missing"))?;
        if info.dtype != dtype {
            return Err(format!("{n:?} is {}, expected {dtype}", info.dtype));
        }
        Ok(Some(file.bytes(info)))
    }
    let codes_bytes = part(file, Some(&m.codes), Dtype::U8)
        .map_err(bad)?
        .unwrap_or(&[]);
    let (code_lengths, index_lengths) = match m.entropy.as_deref() {
        None => (None, None),
        Some("huffman") => (
            Some(
                part(file, m.code_lengths.as_deref(), Dtype::U8)
                    .map_err(bad)?
                    .ok_or_else(|| bad("`entropy: huffman` without `code_lengths`".into()))?,
            ),
            part(file, m.index_lengths.as_deref(), Dtype::U8).map_err(bad)?,
        ),
        Some(other) => return Err(bad(format!("unknown entropy coding {other:?}"))),
    };
    let mask = part(file, m.mask.as_deref(), Dtype::U8).map_err(bad)?;
    let index = part(file, m.index.as_deref(), Dtype::U8).map_err(bad)?;
    let present: Option<Vec<bool>> = match (mask, index, m.nonzero) {
        (None, None, _) => None,
        (Some(_), Some(_), _) => return Err(bad("both `mask` and `index`".into())),
        (_, _, None) => return Err(bad("`mask` or `index` without `nonzero`".into())),
        (Some(mask), None, Some(nonzero)) => {
            if mask.len() != numel.div_ceil(8) {
                return Err(bad(format!(
                    "mask of {} bytes for {numel} weights",
                    mask.len()
                )));
            }
            let present: Vec<bool> = (0..numel)
                .map(|i| mask[i / 8] >> (i % 8) & 1 == 1)
                .collect();
            let kept = present.iter().filter(|p| **p).count();
            if kept != nonzero {
                return Err(bad(format!(
                    "mask keeps {kept} weights, metadata says {nonzero}"
                )));
            }
            Some(present)
        }
        (None, Some(index), Some(nonzero)) => {
            let (Some(bits @ 1..=8), Some(entries)) = (m.index_bits, m.index_entries) else {
                return Err(bad(
                    "`index` needs `index_bits` (1 to 8) and `index_entries`".into(),
                ));
            };
            let gaps = match &index_lengths {
                Some(lengths) => {
                    if lengths.len() != 1 << bits {
                        return Err(bad(format!(
                            "{} index code lengths for {bits}-bit entries",
                            lengths.len()
                        )));
                    }
                    huffman::decode(index, lengths, entries).map_err(|e| bad(e.to_string()))?
                }
                None => unpack_bits(index, bits, entries).map_err(|e| bad(e.to_string()))?,
            };
            Some(index_positions(gaps, bits, nonzero, numel).map_err(bad)?)
        }
    };
    // Fixed-width or Huffman-coded codes, `n` of them.
    let unpack = |n: usize| match &code_lengths {
        Some(lengths) => {
            if lengths.len() != 1 << m.bits {
                return Err(bad(format!(
                    "{} code lengths for {}-bit codes",
                    lengths.len(),
                    m.bits
                )));
            }
            huffman::decode(codes_bytes, lengths, n).map_err(|e| bad(e.to_string()))
        }
        None => unpack_bits(codes_bytes, m.bits, n).map_err(|e| bad(e.to_string())),
    };
    let codes = match (&present, m.nonzero) {
        (Some(present), Some(nonzero)) => {
            let packed = unpack(nonzero)?;
            let mut full = vec![0u8; numel];
            let mut next = packed.into_iter();
            for (c, _) in full.iter_mut().zip(present).filter(|(_, p)| **p) {
                *c = next.next().unwrap_or(0);
            }
            full
        }
        _ => unpack(numel)?,
    };
    let f32s = |b: Option<&[u8]>| -> Result<Vec<f32>> {
        b.map_or(Ok(vec![]), |b| {
            crate::compress::formats::safetensors::decode_f32(name, Dtype::F32, b)
        })
    };
    let params = Params {
        bits: m.bits,
        scheme,
        block_len: m.block_len,
        scales: f32s(part(file, m.scale.as_deref(), Dtype::F32).map_err(bad)?)?,
        zero_points: part(file, m.zero_point.as_deref(), Dtype::U8)
            .map_err(bad)?
            .unwrap_or(&[])
            .to_vec(),
        codebook: f32s(part(file, m.codebook.as_deref(), Dtype::F32).map_err(bad)?)?,
    };
    let mut values = vec![0f32; numel];
    params
        .dequantize(&codes, &mut values)
        .map_err(|e| bad(e.to_string()))?;
    if let Some(present) = present {
        for (v, _) in values.iter_mut().zip(present).filter(|(_, p)| !*p) {
            *v = 0.0;
        }
    }
    round_to_dtype(&mut values, m.dtype);
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::formats::safetensors::serialize;
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::AtomicBool;

    /// `method` on every tensor of `input` (seed 1, no metadata): the file's bytes and the
    /// reports.
    fn quantize_all(
        input: &SafetensorsFile,
        method: Method,
        packed: bool,
        entropy: Entropy,
    ) -> (Vec<u8>, Vec<QuantReport>) {
        let progress = |_: f64, _: &str| {};
        let cancel = AtomicBool::new(false);
        let ctx = Ctx::new(&progress, &cancel);
        let selected: Vec<String> = input
            .header()
            .tensors
            .iter()
            .map(|t| t.name.clone())
            .collect();
        let job = QuantizeFile {
            selected: &selected,
            quantizer: &Quantizer {
                method,
                importance: Default::default(),
            },
            seed: 1,
            packed,
            metadata: &BTreeMap::new(),
            precomputed: None,
            entropy,
        };
        let mut out = Vec::new();
        let reports = quantize_file(input, &job, &mut out, &ctx).unwrap();
        (out, reports)
    }

    /// A safetensors file holding one F32 tensor, opened.
    fn one_tensor_file(
        dir: &std::path::Path,
        name: &str,
        shape: &[usize],
        values: &[f32],
    ) -> SafetensorsFile {
        let bytes = serialize(
            &BTreeMap::new(),
            &[(
                TensorSpec::new(name, Dtype::F32, shape.to_vec()),
                &encode_f32(values)[..],
            )],
        )
        .unwrap();
        open_bytes(dir, name, &bytes)
    }

    /// `bytes` written to `{dir}/{name}.safetensors` and opened.
    fn open_bytes(dir: &std::path::Path, name: &str, bytes: &[u8]) -> SafetensorsFile {
        let path = dir.join(format!("{name}.safetensors"));
        std::fs::write(&path, bytes).unwrap();
        SafetensorsFile::open(&path).unwrap()
    }

    fn randn(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect()
    }

    /// A small model file: two weights, a bias, an F16 weight and an integer tensor.
    fn model(dir: &std::path::Path) -> SafetensorsFile {
        let w1 = encode_f32(&randn(8 * 64, 1));
        let w2 = encode_f32(&randn(4 * 128, 2));
        let b = encode_f32(&randn(8, 3));
        let h: Vec<u8> = randn(16 * 64, 4)
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect();
        let ids = crate::compress::formats::safetensors::encode_i64(&[0, 1, 2]);
        let bytes = serialize(
            &BTreeMap::new(),
            &[
                (
                    TensorSpec::new("fc1.weight", Dtype::F32, vec![8, 64]),
                    &w1[..],
                ),
                (TensorSpec::new("fc1.bias", Dtype::F32, vec![8]), &b[..]),
                (
                    TensorSpec::new("fc2.weight", Dtype::F32, vec![4, 2, 64]),
                    &w2[..],
                ),
                (
                    TensorSpec::new("emb.weight", Dtype::F16, vec![16, 64]),
                    &h[..],
                ),
                (TensorSpec::new("ids", Dtype::I64, vec![3]), &ids[..]),
            ],
        )
        .unwrap();
        let path = dir.join("in.safetensors");
        std::fs::write(&path, bytes).unwrap();
        SafetensorsFile::open(&path).unwrap()
    }

    fn run(
        input: &SafetensorsFile,
        method: &Method,
        packed: bool,
        dir: &std::path::Path,
    ) -> (SafetensorsFile, Vec<QuantReport>, u64) {
        let progress = |_: f64, _: &str| {};
        let cancel = AtomicBool::new(false);
        let ctx = Ctx::new(&progress, &cancel);
        let selected: Vec<String> = ["fc1.weight", "fc2.weight", "emb.weight", "ids"]
            .map(String::from)
            .to_vec();
        let mut meta = BTreeMap::new();
        meta.insert("whittle.job".to_string(), "{}".to_string());
        let mut bytes = Vec::new();
        let reports = quantize_file(
            input,
            &QuantizeFile {
                selected: &selected,
                quantizer: &Quantizer {
                    method: *method,
                    importance: Default::default(),
                },
                seed: 5,
                packed,
                metadata: &meta,
                precomputed: None,
                entropy: Default::default(),
            },
            &mut bytes,
            &ctx,
        )
        .unwrap();
        let path = dir.join(format!("{packed:?}-{}.safetensors", method.name()));
        std::fs::write(&path, &bytes).unwrap();
        (
            SafetensorsFile::open(&path).unwrap(),
            reports,
            bytes.len() as u64,
        )
    }

    fn methods() -> Vec<Method> {
        let g = Granularity::PerGroup { group_size: 32 };
        vec![
            Method::Uniform {
                bits: 8,
                symmetric: true,
                granularity: Granularity::PerChannel,
                search: false,
            },
            Method::Uniform {
                bits: 4,
                symmetric: false,
                granularity: g,
                search: true,
            },
            Method::Uniform {
                bits: 3,
                symmetric: true,
                granularity: Granularity::PerTensor,
                search: false,
            },
            Method::Kmeans {
                clusters: 5,
                init: KmeansInit::KmeansPlusPlus,
                max_iterations: 50,
                tolerance: 1e-6,
            },
            Method::Log2 { bits: 5 },
            Method::Nf4 { group_size: 64 },
        ]
    }

    #[test]
    fn bit_packing_round_trips_for_every_width() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        for bits in 1..=8u8 {
            for n in [0usize, 1, 7, 8, 9, 1001] {
                let codes: Vec<u8> = (0..n).map(|_| rng.gen::<u8>() >> (8 - bits)).collect();
                let packed = pack_bits(&codes, bits);
                assert_eq!(packed.len(), (n * bits as usize).div_ceil(8));
                assert_eq!(
                    unpack_bits(&packed, bits, n).unwrap(),
                    codes,
                    "bits {bits} n {n}"
                );
            }
        }
        // LSB-first: codes 1, 2, 3 at 2 bits → 0b11_10_01.
        assert_eq!(pack_bits(&[1, 2, 3], 2), [0b0011_1001]);
        assert_eq!(pack_bits(&[0xA, 0x5, 0xF], 4), [0x5A, 0x0F]);
        assert!(unpack_bits(&[0, 0, 0], 4, 3).is_err());
        assert!(unpack_bits(&[0], 4, 3).is_err());
        assert!(unpack_bits(&[0], 9, 1).is_err());
    }

    #[test]
    fn packed_decodes_to_the_dequantized_file_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let input = model(dir.path());
        for method in methods() {
            let (dense, rd, _) = run(&input, &method, false, dir.path());
            let (packed, rp, packed_len) = run(&input, &method, true, dir.path());
            assert_eq!(rd, rp, "{method:?}: reports differ between formats");
            let names: Vec<&str> = rp.iter().map(|r| r.tensor.as_str()).collect();
            assert_eq!(names, ["fc1.weight", "fc2.weight", "emb.weight"]);
            let decoded = decode_packed(&packed).unwrap();
            let plain = decode_packed(&dense).unwrap();
            assert_eq!(decoded.len(), 5);
            for (a, b) in decoded.iter().zip(&plain) {
                assert_eq!((&a.name, &a.shape), (&b.name, &b.shape));
                let bits_a: Vec<u32> = a.values.iter().map(|v| v.to_bits()).collect();
                let bits_b: Vec<u32> = b.values.iter().map(|v| v.to_bits()).collect();
                assert_eq!(bits_a, bits_b, "{method:?}: {}", a.name);
            }
            // Untouched tensors are byte-identical; ids stays I64.
            let bias = packed.get("fc1.bias").unwrap();
            assert_eq!(
                packed.bytes(bias),
                input.bytes(input.get("fc1.bias").unwrap())
            );
            assert_eq!(packed.get("ids").unwrap().dtype, Dtype::I64);
            assert_eq!(dense.get("emb.weight").unwrap().dtype, Dtype::F16);
            // Reported packed bytes are what the file holds.
            let header = packed.header();
            let q_bytes: u64 = header
                .tensors
                .iter()
                .filter(|t| t.name.contains(".q"))
                .map(|t| t.nbytes() as u64)
                .sum();
            assert_eq!(q_bytes, rp.iter().map(|r| r.packed_bytes).sum::<u64>());
            assert_eq!(packed_len, (header.data_start + header.data_len()) as u64);
            let r = &rp[0];
            assert_eq!(r.bits_per_weight, r.packed_bytes as f64 * 8.0 / 512.0);
            assert_eq!(r.dense_bytes, 8 * 64 * 4);
            assert!(r.mse > 0.0 && r.sqnr_db.unwrap() > 5.0, "{method:?} {r:?}");
            assert_eq!(
                packed
                    .header()
                    .metadata
                    .get("whittle.job")
                    .map(String::as_str),
                Some("{}")
            );
        }
    }

    #[test]
    fn pruned_tensors_are_packed_with_a_mask_or_relative_index_and_decode_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        // Exact zeros, as after magnitude pruning. 80% zeros in gaps of 4: a 3-bit relative
        // index (77 bytes) beats the mask (128). 60% zeros in gaps of 3 and 0: the mask does.
        type Case = (&'static str, fn(usize) -> bool, usize);
        let cases: [Case; 2] = [
            ("qindex", |i| i % 5 == 0, 205),
            ("qmask", |i| i % 5 == 0 || i % 5 == 4, 409),
        ];
        for (kind, keep, nonzero) in cases {
            let mut w = randn(16 * 64, 9);
            for (i, v) in w.iter_mut().enumerate() {
                if !keep(i) {
                    *v = 0.0;
                }
            }
            let input = one_tensor_file(dir.path(), "fc.weight", &[16, 64], &w);
            for method in methods() {
                let mut out = [Vec::new(), Vec::new()];
                let mut reports = Vec::new();
                for (k, packed) in [false, true].into_iter().enumerate() {
                    let (bytes, r) = quantize_all(&input, method, packed, Entropy::None);
                    out[k] = bytes;
                    reports.push(r);
                }
                assert_eq!(reports[0], reports[1]);
                let files: Vec<SafetensorsFile> = out
                    .iter()
                    .enumerate()
                    .map(|(k, b)| open_bytes(dir.path(), &k.to_string(), b))
                    .collect();
                let positions = files[1].get(&format!("fc.weight.{kind}")).unwrap();
                let meta: QuantMeta =
                    serde_json::from_str(&files[1].header().metadata[METADATA_KEY]).unwrap();
                let m = &meta.tensors["fc.weight"];
                assert_eq!(m.nonzero, Some(nonzero));
                if kind == "qmask" {
                    assert_eq!(positions.shape, [128]);
                    assert_eq!(m.index, None);
                } else {
                    // One 3-bit entry per non-zero: gap 0 first, then gaps of 4.
                    assert_eq!((m.index_bits, m.index_entries), (Some(3), Some(205)));
                    assert_eq!(positions.shape, [(205 * 3usize).div_ceil(8)]);
                    let gaps = unpack_bits(files[1].bytes(positions), 3, 205).unwrap();
                    assert_eq!(gaps[..3], [0, 4, 4]);
                    assert_eq!(m.mask, None);
                }
                let codes = files[1].get("fc.weight.qcodes").unwrap();
                let bits = method.bits() as usize;
                assert_eq!(codes.shape, [(nonzero * bits).div_ceil(8)], "{method:?}");
                let dense = decode_packed(&files[0]).unwrap();
                let packed = decode_packed(&files[1]).unwrap();
                let a: Vec<u32> = dense[0].values.iter().map(|v| v.to_bits()).collect();
                let b: Vec<u32> = packed[0].values.iter().map(|v| v.to_bits()).collect();
                assert_eq!(a, b, "{method:?}");
                assert!(packed[0]
                    .values
                    .iter()
                    .zip(&w)
                    .all(|(q, x)| (*x == 0.0) == (*q == 0.0) || *x != 0.0));
                let q_bytes: u64 = files[1]
                    .header()
                    .tensors
                    .iter()
                    .map(|t| t.nbytes() as u64)
                    .sum();
                assert_eq!(q_bytes, reports[1][0].packed_bytes, "{method:?}");
            }
        }
    }

    #[test]
    fn huffman_entropy_shrinks_pruned_shared_weights_and_decodes_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        // 90% zeros at irregular places, Gaussian non-zeros: peaked k-means codes and
        // skewed index gaps, as after Deep Compression's pruning and weight sharing.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let w: Vec<f32> = (0..64 * 256)
            .map(|_| {
                let (u, v): (f32, f32) = (rng.gen::<f32>().max(1e-9), rng.gen());
                let g = (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos();
                if rng.gen::<f32>() < 0.9 {
                    0.0
                } else {
                    g
                }
            })
            .collect();
        let input = one_tensor_file(dir.path(), "fc.weight", &[64, 256], &w);
        let kmeans = Method::Kmeans {
            clusters: 32,
            init: KmeansInit::Linear,
            max_iterations: 30,
            tolerance: 1e-6,
        };
        let int4 = Method::Uniform {
            bits: 4,
            symmetric: true,
            granularity: Granularity::PerChannel,
            search: false,
        };
        for method in [kmeans, int4] {
            let mut out = [Vec::new(), Vec::new(), Vec::new()];
            let mut reports = Vec::new();
            let runs = [
                (false, Entropy::Huffman),
                (true, Entropy::None),
                (true, Entropy::Huffman),
            ];
            for (k, (packed, entropy)) in runs.into_iter().enumerate() {
                let (bytes, r) = quantize_all(&input, method, packed, entropy);
                out[k] = bytes;
                reports.push(r);
            }
            let files: Vec<SafetensorsFile> = out
                .iter()
                .enumerate()
                .map(|(k, b)| open_bytes(dir.path(), &k.to_string(), b))
                .collect();
            let meta = |f: &SafetensorsFile| -> QuantMeta {
                serde_json::from_str(&f.header().metadata[METADATA_KEY]).unwrap()
            };
            assert_eq!(meta(&files[1]).version, 2);
            let m = meta(&files[2]);
            assert_eq!(m.version, 3);
            let t = &m.tensors["fc.weight"];
            assert_eq!(t.entropy.as_deref(), Some("huffman"));
            let lengths = files[2].get("fc.weight.qcodes_lengths").unwrap();
            assert_eq!(lengths.shape, [1usize << t.bits]);
            // The same values from all three files, bit for bit.
            let decoded: Vec<Vec<u32>> = files
                .iter()
                .map(|f| {
                    decode_packed(f).unwrap()[0]
                        .values
                        .iter()
                        .map(|v| v.to_bits())
                        .collect()
                })
                .collect();
            assert_eq!(decoded[0], decoded[1], "{method:?}");
            assert_eq!(decoded[0], decoded[2], "{method:?}");
            // Reports: stored sizes are the file's tensors; entropy coding saved bytes.
            let stored = |f: &SafetensorsFile| -> u64 {
                f.header().tensors.iter().map(|t| t.nbytes() as u64).sum()
            };
            assert_eq!(reports[1][0].packed_bytes, stored(&files[1]));
            assert_eq!(reports[2][0].packed_bytes, stored(&files[2]));
            let e = reports[2][0].entropy.clone().unwrap();
            assert_eq!(e.fixed_bytes, reports[1][0].packed_bytes);
            assert_eq!(e.huffman_bytes, reports[2][0].packed_bytes);
            assert!(e.huffman_bytes < e.fixed_bytes, "{method:?}: {e:?}");
            assert!(e.index_bits_huffman < e.index_bits_fixed, "{e:?}");
            assert!(e.code_bits_huffman < e.code_bits_fixed, "{e:?}");
            assert_eq!(e.codes, w.iter().filter(|v| **v != 0.0).count() as u64);
            assert_eq!(reports[0][0].mse, reports[2][0].mse);
            assert!(reports[1][0].entropy.is_none());
        }
    }

    #[test]
    fn damaged_huffman_streams_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let w: Vec<f32> = (0..512)
            .map(|i| if i % 7 == 0 { (i % 5) as f32 } else { 0.0 })
            .collect();
        let input = one_tensor_file(dir.path(), "w", &[8, 64], &w);
        let kmeans = Method::Kmeans {
            clusters: 4,
            init: KmeansInit::Linear,
            max_iterations: 10,
            tolerance: 1e-6,
        };
        let (out, _) = quantize_all(&input, kmeans, true, Entropy::Huffman);
        let good = SafetensorsFile::open(&{
            let p = dir.path().join("good.safetensors");
            std::fs::write(&p, &out).unwrap();
            p
        })
        .unwrap();
        decode_packed(&good).unwrap();
        // Over-subscribe the code lengths (every symbol 1 bit): refused, not a panic.
        let lengths = good.get("w.qcodes_lengths").unwrap();
        let start = out.len() - good.header().data_len() + lengths.data_offsets.0;
        let mut bad = out.clone();
        for b in &mut bad[start..start + 4] {
            *b = 1;
        }
        let p = dir.path().join("bad.safetensors");
        std::fs::write(&p, &bad).unwrap();
        let err = decode_packed(&SafetensorsFile::open(&p).unwrap()).unwrap_err();
        assert!(err.to_string().contains("Kraft"), "{err}");
    }

    #[test]
    fn relative_index_chooses_its_width_and_encodes_long_gaps_with_fillers() {
        // Non-zeros at 0, 1, 40 and 300 of 400, 8-bit codes: gaps 0, 0, 38, 259.
        let mut w = vec![0f32; 400];
        for i in [0, 1, 40, 300] {
            w[i] = 1.0;
        }
        let p = Positions::choose(&w, 8);
        // 3 bits (F = 7): 4 + 5 + 37 fillers = 46 entries, 18 bytes; 4 bits (F = 15):
        // 4 + 2 + 17 = 23 entries, 12 bytes; 5 bits (F = 31): 4 + 1 + 8 = 13 entries, 9
        // bytes; 6 bits: 4 + 0 + 4 = 8 entries, 6 bytes; 7 bits: 4 + 2 = 6 entries, 6 bytes
        // (a tie: the narrower wins); 8 bits: 5 entries, 5 bytes. The mask takes 50.
        assert_eq!(
            p,
            Positions::Index {
                nonzero: 4,
                bits: 8,
                entries: 5
            }
        );
        let bytes = p.encode(&w);
        assert_eq!(bytes, [0, 0, 38, 255, 4]);
        let present = index_positions(unpack_bits(&bytes, 8, 5).unwrap(), 8, 4, 400).unwrap();
        let at: Vec<usize> = (0..400).filter(|&i| present[i]).collect();
        assert_eq!(at, [0, 1, 40, 300]);
        for bits in 1..=7u8 {
            let full = (1usize << bits) - 1;
            let entries = 4 + [0usize, 0, 38, 259].iter().map(|g| g / full).sum::<usize>();
            let p = Positions::Index {
                nonzero: 4,
                bits,
                entries,
            };
            let bytes = p.encode(&w);
            assert_eq!(bytes.len(), (entries * bits as usize).div_ceil(8), "{bits}");
            let present =
                index_positions(unpack_bits(&bytes, bits, entries).unwrap(), bits, 4, 400).unwrap();
            assert_eq!((0..400).filter(|&i| present[i]).collect::<Vec<_>>(), at);
        }
        // Damaged indices are refused, not decoded past the tensor.
        assert!(index_positions(vec![0, 0, 38, 255, 200], 8, 4, 400).is_err());
        assert!(index_positions(vec![0, 0, 38, 255, 4], 8, 5, 400).is_err());
        // All zeros or all non-zeros: nothing to locate or nothing to skip.
        assert_eq!(
            Positions::choose(&[0.0; 64], 4),
            Positions::Index {
                nonzero: 0,
                bits: 1,
                entries: 0
            }
        );
        assert_eq!(Positions::choose(&[1.0; 64], 4), Positions::Dense);
    }

    #[test]
    fn packed_layout_is_as_documented() {
        let dir = tempfile::tempdir().unwrap();
        let input = model(dir.path());
        let m = Method::Uniform {
            bits: 4,
            symmetric: false,
            granularity: Granularity::PerGroup { group_size: 32 },
            search: false,
        };
        let (packed, reports, _) = run(&input, &m, true, dir.path());
        let h = packed.header();
        let codes = h.get("fc1.weight.qcodes").unwrap();
        assert_eq!(
            (codes.dtype, codes.shape.clone()),
            (Dtype::U8, vec![8 * 64 / 2])
        );
        assert_eq!(h.get("fc1.weight.qscale").unwrap().shape, vec![8, 2]);
        assert_eq!(h.get("fc1.weight.qzero").unwrap().dtype, Dtype::U8);
        assert_eq!(h.get("fc2.weight.qscale").unwrap().shape, vec![4, 4]);
        assert!(h.get("fc1.weight").is_none() && h.get("fc1.weight.qcodebook").is_none());
        let meta: serde_json::Value =
            serde_json::from_str(h.metadata.get(METADATA_KEY).unwrap()).unwrap();
        assert_eq!(meta["format"], "whittle.packed");
        assert_eq!(meta["version"], 2);
        let t = &meta["tensors"]["fc2.weight"];
        assert_eq!(t["shape"], serde_json::json!([4, 2, 64]));
        assert_eq!(t["dtype"], "F32");
        assert_eq!(t["scheme"], "affine");
        assert_eq!(t["group_size"], 32);
        assert_eq!(t["block_len"], 32);
        assert_eq!(t["zero_point"], "fc2.weight.qzero");
        // 4 bits + (32 scale bits + 8 zero bits) / 32 weights.
        assert_eq!(reports[0].bits_per_weight, 4.0 + 40.0 / 32.0);
        // int8 symmetric: codes offset by 128, per-channel scales.
        let m = methods()[0];
        let (packed, _, _) = run(&input, &m, true, dir.path());
        let codes = packed.bytes(packed.get("fc1.weight.qcodes").unwrap());
        let scales = packed
            .to_f32(packed.get("fc1.weight.qscale").unwrap())
            .unwrap();
        let w = input.to_f32(input.get("fc1.weight").unwrap()).unwrap();
        let want = (w[3] * (1.0 / scales[0])).round_ties_even() as i32 + 128;
        assert_eq!(i32::from(codes[3]), want);
    }

    #[test]
    fn refusals_happen_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let input = model(dir.path());
        let progress = |_: f64, _: &str| {};
        let cancel = AtomicBool::new(false);
        let ctx = Ctx::new(&progress, &cancel);
        let m = Method::Nf4 { group_size: 48 };
        let mut out = Vec::new();
        let e = quantize_file(
            &input,
            &QuantizeFile {
                selected: &["fc1.weight".into()],
                quantizer: &Quantizer {
                    method: m,
                    importance: Default::default(),
                },
                seed: 0,
                packed: true,
                metadata: &BTreeMap::new(),
                precomputed: None,
                entropy: Default::default(),
            },
            &mut out,
            &ctx,
        )
        .unwrap_err();
        assert_eq!(e.field(), Some("group_size"));
        assert!(out.is_empty());
        let m = Method::Uniform {
            bits: 9,
            symmetric: true,
            granularity: Granularity::PerChannel,
            search: false,
        };
        assert!(quantize_file(
            &input,
            &QuantizeFile {
                selected: &[],
                quantizer: &Quantizer {
                    method: m,
                    importance: Default::default()
                },
                seed: 0,
                packed: true,
                metadata: &BTreeMap::new(),
                precomputed: None,
                entropy: Default::default(),
            },
            &mut out,
            &ctx,
        )
        .is_err());
        cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        let m = methods()[0];
        let e = quantize_file(
            &input,
            &QuantizeFile {
                selected: &["fc1.weight".into()],
                quantizer: &Quantizer {
                    method: m,
                    importance: Default::default(),
                },
                seed: 0,
                packed: true,
                metadata: &BTreeMap::new(),
                precomputed: None,
                entropy: Default::default(),
            },
            &mut out,
            &ctx,
        )
        .unwrap_err();
        assert_eq!(e.code().as_str(), "cancelled");
    }

    #[test]
    fn damaged_packed_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let input = model(dir.path());
        let (packed, _, _) = run(&input, &methods()[0], true, dir.path());
        let mut meta = packed.header().metadata.clone();
        let json = meta[METADATA_KEY].replace("\"bits\":8", "\"bits\":4");
        meta.insert(METADATA_KEY.into(), json);
        let tensors: Vec<(TensorSpec, Vec<u8>)> = packed
            .header()
            .tensors
            .iter()
            .map(|t| {
                (
                    TensorSpec::new(t.name.clone(), t.dtype, t.shape.clone()),
                    packed.bytes(t).to_vec(),
                )
            })
            .collect();
        let pairs: Vec<(TensorSpec, &[u8])> =
            tensors.iter().map(|(s, b)| (s.clone(), &b[..])).collect();
        let path = dir.path().join("bad.safetensors");
        std::fs::write(&path, serialize(&meta, &pairs).unwrap()).unwrap();
        let e = decode_packed(&SafetensorsFile::open(&path).unwrap()).unwrap_err();
        assert!(
            matches!(e, Error::InvalidSafetensors(m) if m.contains("fc1.weight") && m.contains("code_offset"))
        );
    }
}
