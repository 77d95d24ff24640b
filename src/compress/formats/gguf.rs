//! GGUF export: the `gguf` quantization format (`type`: q8_0 … q6_k) with llama.cpp's block
//! quantizers as implemented by `candle_core::quantized`.
//!
//! The file is written here, not by candle's `gguf_file::write` (which emits version 2 and
//! needs the whole model in memory): the data offsets of every tensor are known from the
//! shapes alone, so the header (version 3, alignment 32) goes first and the tensor data is
//! streamed after it, tensor by tensor and row chunk by row chunk. Peak memory is a few
//! tens of MiB regardless of the model's size, and the writer needs no `Seek`.
//!
//! What goes into the file:
//! - **Selected float tensors** are quantized to the requested type. A GGUF/ggml tensor's
//!   `ne[0]` is its innermost dimension, i.e. the *last* safetensors dimension, so blocks
//!   run along rows of the last dimension; [`check_gguf`] refuses rows whose length is not a
//!   multiple of the block size (Whittle does not pad).
//! - **Every other float tensor** is stored losslessly when GGUF can hold it: F32 as F32,
//!   F16 as F16, BF16 as BF16 (byte copies); F64 and the F8 types become F32 (F8 exactly,
//!   F64 rounded, with the error reported).
//! - **Integer and BOOL tensors** (e.g. `position_ids`) become F32 when every value is exact
//!   in f32 (|v| ≤ 2²⁴), otherwise they are left out with a report entry of type `skipped`.
//!   GGUF has I8…I64 types, but candle's reader rejects files that use them, and F32 keeps
//!   the file readable by candle, gguf-py and llama.cpp alike.
//! - Tensor names are unchanged; the ggml dimensions are the safetensors shape reversed, so
//!   readers that reverse back (candle, gguf-py's `tensor.shape[::-1]`) see the original
//!   shape. A scalar is written as a 1-D tensor of one element (ggml has no 0-D tensors).
//! - Metadata: every `metadata` entry as a GGUF string (`whittle.architecture`,
//!   `whittle.job`, …), plus `general.alignment` (u32 32), `general.quantization_version`
//!   (u32 2, as llama.cpp's quantizer writes) and `general.file_type` (u32, llama.cpp's
//!   `LLAMA_FTYPE_MOSTLY_*` for the type; `_S` variants for q3_k/q4_k/q5_k). Those three keys
//!   are ours: entries of `metadata` with the same names are not written.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;

use serde::Serialize;

use crate::compress::formats::safetensors::{encode_f32, Dtype, SafetensorsFile, TensorInfo};
use crate::compress::parallel::{par_map, threads};
use crate::compress::progress::Ctx;
use crate::compress::quant::float::ErrorStats;
use crate::compress::{Error, Result};

/// GGUF format version written.
pub const GGUF_VERSION: u32 = 3;
/// Alignment of the data section and of every tensor's data, in bytes (GGUF's default).
pub const GGUF_ALIGNMENT: u64 = 32;
/// Longest tensor name llama.cpp accepts, in bytes (`GGML_MAX_NAME` − 1 for the NUL).
pub const GGUF_MAX_NAME_LEN: usize = 63;
/// Most dimensions a ggml tensor can have (`GGML_MAX_DIMS`).
pub const GGUF_MAX_DIMS: usize = 4;

use super::gguf_blocks::quantize_rows;
pub use super::gguf_blocks::{decode_blocks, encode_blocks, roundtrip, GgufType};

const GGUF_MAGIC: &[u8; 4] = b"GGUF";
/// GGUF metadata value types used here.
const GGUF_VALUE_U32: u32 = 4;
const GGUF_VALUE_STRING: u32 = 8;
/// ggml tensor types of the unquantized tensors.
const GGML_TYPE_F32: u32 = 0;
const GGML_TYPE_F16: u32 = 1;
const GGML_TYPE_BF16: u32 = 30;
/// Metadata keys written by [`write_gguf`] itself.
const RESERVED_KEYS: [&str; 3] = [
    "general.alignment",
    "general.quantization_version",
    "general.file_type",
];
/// Elements each thread quantizes per chunk (16 MiB of f32): bounds memory, keeps the
/// cancel check and progress reports frequent.
const CHUNK_ELEMS: usize = 1 << 22;
/// Largest integer magnitude every integer up to which f32 represents exactly.
const F32_EXACT_INT: i64 = 1 << 24;

/// A typed GGUF metadata value (the writer's own keys and a model family's hyper-parameters
/// and tokenizer; other metadata is written as strings).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// `UINT32`.
    U32(u32),
    /// `INT32`.
    I32(i32),
    /// `FLOAT32`.
    F32(f32),
    /// `BOOL`.
    Bool(bool),
    /// `STRING`.
    Str(String),
    /// `ARRAY` of `STRING`.
    Strs(Vec<String>),
    /// `ARRAY` of `INT32`.
    I32s(Vec<i32>),
    /// `ARRAY` of `FLOAT32`.
    F32s(Vec<f32>),
}

const GGUF_VALUE_I32: u32 = 5;
const GGUF_VALUE_F32: u32 = 6;
const GGUF_VALUE_BOOL: u32 = 7;
const GGUF_VALUE_ARRAY: u32 = 9;

impl MetaValue {
    fn put(&self, h: &mut Vec<u8>) {
        let ty = |h: &mut Vec<u8>, t: u32| h.extend_from_slice(&t.to_le_bytes());
        match self {
            MetaValue::U32(v) => {
                ty(h, GGUF_VALUE_U32);
                h.extend_from_slice(&v.to_le_bytes());
            }
            MetaValue::I32(v) => {
                ty(h, GGUF_VALUE_I32);
                h.extend_from_slice(&v.to_le_bytes());
            }
            MetaValue::F32(v) => {
                ty(h, GGUF_VALUE_F32);
                h.extend_from_slice(&v.to_le_bytes());
            }
            MetaValue::Bool(v) => {
                ty(h, GGUF_VALUE_BOOL);
                h.push(u8::from(*v));
            }
            MetaValue::Str(v) => {
                ty(h, GGUF_VALUE_STRING);
                put_str(h, v);
            }
            MetaValue::Strs(items) => {
                ty(h, GGUF_VALUE_ARRAY);
                ty(h, GGUF_VALUE_STRING);
                h.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for v in items {
                    put_str(h, v);
                }
            }
            MetaValue::I32s(items) => {
                ty(h, GGUF_VALUE_ARRAY);
                ty(h, GGUF_VALUE_I32);
                h.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for v in items {
                    h.extend_from_slice(&v.to_le_bytes());
                }
            }
            MetaValue::F32s(items) => {
                ty(h, GGUF_VALUE_ARRAY);
                ty(h, GGUF_VALUE_F32);
                h.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for v in items {
                    h.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
}

/// What [`write_gguf`] did with one tensor.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GgufReport {
    /// Tensor name (unchanged in the GGUF file).
    pub tensor: String,
    /// Shape in safetensors order (the GGUF dims are this reversed).
    pub shape: Vec<usize>,
    /// Storage type in the file: a [`GgufType`] spelling, `f32`, `f16`, `bf16`, or
    /// `skipped` (not in the file; see `note`).
    #[serde(rename = "type")]
    pub gguf_type: String,
    /// Mean squared error of the stored values against the input (0 when lossless).
    pub mse: f64,
    /// Signal-to-quantization-noise ratio in dB (`null` when the error is zero).
    pub sqnr_db: Option<f64>,
    /// Largest |w − ŵ|.
    pub max_abs_error: f64,
    /// Bytes of the tensor's data × 8 / elements (0 for an empty or skipped tensor).
    pub bits_per_weight: f64,
    /// Bytes of the tensor's data in the file, padding excluded.
    pub bytes: u64,
    /// Why the tensor was converted or left out, when it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Whether its blocks were fitted with importance weights (k-quants only).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub importance: bool,
}

/// Refuses a `gguf` quantization the file cannot take, before any work is done:
/// a selected float tensor whose rows (last dimension) are not a multiple of the block size
/// is an [`Error::InvalidParameter`] at `/type`; a tensor with more than
/// [`GGUF_MAX_DIMS`] dimensions or a name longer than [`GGUF_MAX_NAME_LEN`] bytes (limits
/// of llama.cpp's reader) is [`Error::Unsupported`]. Selected non-float tensors and names
/// not in `tensors` are ignored, as [`write_gguf`] ignores them.
pub fn check_gguf(tensors: &[TensorInfo], selected: &[String], ty: GgufType) -> Result<()> {
    let selected: HashSet<&str> = selected.iter().map(String::as_str).collect();
    for t in tensors {
        if t.name.len() > GGUF_MAX_NAME_LEN {
            return Err(Error::Unsupported(format!(
                "tensor name {:?} is {} bytes long; GGUF readers (llama.cpp) accept at most {GGUF_MAX_NAME_LEN}",
                t.name,
                t.name.len()
            )));
        }
        if t.shape.len() > GGUF_MAX_DIMS {
            return Err(Error::Unsupported(format!(
                "tensor {:?} has {} dimensions (shape {:?}); GGUF tensors have at most {GGUF_MAX_DIMS}",
                t.name,
                t.shape.len(),
                t.shape
            )));
        }
        if selected.contains(t.name.as_str()) && t.dtype.is_float() {
            check_rows(t, ty)?;
        }
    }
    Ok(())
}

/// The block-size rule for one selected tensor, with a message saying what would work.
fn check_rows(t: &TensorInfo, ty: GgufType) -> Result<()> {
    let block = ty.block_size();
    let Some(&row) = t.shape.last() else {
        return Err(Error::InvalidParameter {
            field: "type".into(),
            detail: format!(
                "tensor {:?} is a scalar; {ty} quantizes rows in blocks of {block} values. \
                 Add it to `skip` to keep it in float.",
                t.name
            ),
        });
    };
    if ty.for_row(row).is_some() {
        return Ok(());
    }
    Err(Error::InvalidParameter {
        field: "type".into(),
        detail: format!(
            "tensor {:?} (shape {:?}) has rows of {row} values, not a multiple of {ty}'s block \
             size {block}{}: no GGUF type fits it (all blocks are 32 or 256 values); add the \
             tensor to `skip` to keep it in float. Whittle does not pad tensors.",
            t.name,
            t.shape,
            match ty.fallback() {
                Some(f) => format!(" nor of its fallback {f}'s 32"),
                None => String::new(),
            }
        ),
    })
}

/// How one tensor is stored.
#[derive(Debug, Clone, PartialEq)]
enum Storage {
    /// Block-quantized.
    Quant(GgufType),
    /// The input's bytes, unchanged (F32, F16, BF16), with this ggml type id.
    Copy(u32),
    /// Float converted to F32 (F64, F8).
    FloatToF32,
    /// Integer / BOOL converted to F32 exactly.
    IntToF32,
    /// Not written; the reason.
    Skip(String),
}

/// One tensor's place in the file.
struct Plan<'a> {
    info: &'a TensorInfo,
    storage: Storage,
    /// Importance weights of a k-quant tensor, one per row element.
    imatrix: Option<&'a [f32]>,
    /// The tensor's blocks, already encoded.
    encoded: Option<&'a [u8]>,
    /// Data bytes, padding excluded.
    nbytes: u64,
    /// Offset from the start of the data section.
    offset: u64,
}

impl Plan<'_> {
    fn type_name(&self) -> &'static str {
        match &self.storage {
            Storage::Quant(ty) => ty.as_str(),
            Storage::Copy(GGML_TYPE_F16) => "f16",
            Storage::Copy(GGML_TYPE_BF16) => "bf16",
            Storage::Copy(_) | Storage::FloatToF32 | Storage::IntToF32 => "f32",
            Storage::Skip(_) => "skipped",
        }
    }

    fn ggml_type_id(&self) -> u32 {
        match &self.storage {
            Storage::Quant(ty) => ty.ggml_type_id(),
            Storage::Copy(id) => *id,
            Storage::FloatToF32 | Storage::IntToF32 | Storage::Skip(_) => GGML_TYPE_F32,
        }
    }

    /// ggml dims: the shape reversed, innermost first; `[1]` for a scalar.
    fn ggml_dims(&self) -> Vec<u64> {
        if self.info.shape.is_empty() {
            vec![1]
        } else {
            self.info.shape.iter().rev().map(|&d| d as u64).collect()
        }
    }
}

/// Decides the storage of one tensor (see the module documentation).
fn plan_storage(
    input: &SafetensorsFile,
    info: &TensorInfo,
    selected: bool,
    ty: GgufType,
) -> Storage {
    match info.dtype {
        d if selected && d.is_float() => {
            let row = info.shape.last().copied().unwrap_or(0);
            Storage::Quant(ty.for_row(row).unwrap_or(ty))
        }
        Dtype::F32 => Storage::Copy(GGML_TYPE_F32),
        Dtype::F16 => Storage::Copy(GGML_TYPE_F16),
        Dtype::BF16 => Storage::Copy(GGML_TYPE_BF16),
        d if d.is_float() => Storage::FloatToF32,
        _ => match input.to_i64(info) {
            Ok(v) if v.iter().all(|x| x.abs() <= F32_EXACT_INT) => Storage::IntToF32,
            Ok(_) => Storage::Skip(format!(
                "{} values beyond ±2^24 are not exact in f32, and GGUF integer types are not \
                 read by every reader",
                info.dtype
            )),
            Err(e) => Storage::Skip(e.to_string()),
        },
    }
}

fn data_bytes(info: &TensorInfo, storage: &Storage) -> u64 {
    let n = info.numel() as u64;
    match storage {
        Storage::Quant(ty) => n / ty.block_size() as u64 * ty.block_bytes() as u64,
        Storage::Copy(GGML_TYPE_F16) | Storage::Copy(GGML_TYPE_BF16) => n * 2,
        Storage::Copy(_) | Storage::FloatToF32 | Storage::IntToF32 => n * 4,
        Storage::Skip(_) => 0,
    }
}

fn align(n: u64) -> u64 {
    n.div_ceil(GGUF_ALIGNMENT) * GGUF_ALIGNMENT
}

/// Zero bytes taking a section of `len` bytes to the next alignment boundary.
fn pad(out: &mut dyn Write, len: u64) -> Result<()> {
    out.write_all(&[0u8; GGUF_ALIGNMENT as usize][..(align(len) - len) as usize])?;
    Ok(())
}

/// Writes a GGUF v3 file to `out`: the tensors named in `selected` quantized to `ty`, every
/// other tensor as described in the module documentation, `metadata` as string values.
/// Runs [`check_gguf`] first. Returns one report per input tensor, in file order
/// (skipped tensors included). Streams: `out` receives the header, then each tensor's data
/// as it is produced; give it a `BufWriter` when it is a file. On an error or cancellation
/// `out` holds a partial file the caller must discard.
pub fn write_gguf(
    input: &SafetensorsFile,
    selected: &[String],
    ty: GgufType,
    metadata: &BTreeMap<String, String>,
    out: &mut dyn Write,
    ctx: &Ctx,
) -> Result<Vec<GgufReport>> {
    let meta = Metadata {
        strings: metadata,
        typed: &[],
        importance: None,
        types: None,
        encoded: None,
    };
    write_gguf_chunked(input, selected, ty, meta, out, ctx, CHUNK_ELEMS)
}

/// What a file carries besides the tensors' values: string metadata entries, typed ones
/// that take precedence, and importance weights (one per row element, llama.cpp's imatrix)
/// that the k-quant types weight their block fits with.
#[derive(Debug, Clone, Copy)]
pub struct GgufExtras<'a> {
    /// String metadata.
    pub strings: &'a BTreeMap<String, String>,
    /// Typed metadata (a family's hyper-parameters and tokenizer).
    pub typed: &'a [(String, MetaValue)],
    /// Importance weights by tensor name; used by k-quant types (candle implements the
    /// weighted fit for those only).
    pub importance: Option<&'a HashMap<String, Vec<f32>>>,
    /// Per-tensor types of selected tensors (mixed precision), in place of the file's type
    /// for the tensors named; each must fit its tensor's rows ([`GgufType::for_row`] of
    /// itself). The file's type still names the file (`general.file_type`).
    pub types: Option<&'a HashMap<String, GgufType>>,
    /// Blocks already encoded for selected tensors (GPTQ's codes), written as they are, with
    /// their type; each must hold the tensor's values in that type's block layout.
    pub encoded: Option<&'a HashMap<String, (GgufType, Vec<u8>)>>,
}

type Metadata<'a> = GgufExtras<'a>;

/// [`write_gguf`] with `extras`: typed metadata written first (a family's hyper-parameters
/// and tokenizer: `general.architecture`, `llama.block_count`, `tokenizer.ggml.tokens`, …;
/// string keys that `typed` also sets are left out), and importance weights for k-quants.
pub fn write_gguf_typed(
    input: &SafetensorsFile,
    selected: &[String],
    ty: GgufType,
    extras: GgufExtras<'_>,
    out: &mut dyn Write,
    ctx: &Ctx,
) -> Result<Vec<GgufReport>> {
    write_gguf_chunked(input, selected, ty, extras, out, ctx, CHUNK_ELEMS)
}

/// [`write_gguf`] with a chosen number of elements per thread and chunk (tests use tiny
/// chunks to exercise the row splitting).
fn write_gguf_chunked(
    input: &SafetensorsFile,
    selected: &[String],
    ty: GgufType,
    metadata: Metadata,
    out: &mut dyn Write,
    ctx: &Ctx,
    chunk_elems: usize,
) -> Result<Vec<GgufReport>> {
    let tensors = &input.header().tensors;
    let type_of = |name: &str| {
        metadata
            .encoded
            .and_then(|e| e.get(name).map(|(t, _)| *t))
            .or_else(|| metadata.types.and_then(|t| t.get(name).copied()))
            .unwrap_or(ty)
    };
    if metadata.types.is_none() && metadata.encoded.is_none() {
        check_gguf(tensors, selected, ty)?;
    } else {
        let of_type = |t: GgufType| -> Vec<String> {
            selected
                .iter()
                .filter(|n| type_of(n) == t)
                .cloned()
                .collect()
        };
        for t in GgufType::ALL {
            check_gguf(tensors, &of_type(t), t)?;
        }
    }
    let selected: HashSet<&str> = selected.iter().map(String::as_str).collect();
    let mut plans = Vec::with_capacity(tensors.len());
    let mut offset = 0u64;
    for info in tensors {
        let chosen = type_of(&info.name);
        let storage = plan_storage(input, info, selected.contains(info.name.as_str()), chosen);
        let nbytes = data_bytes(info, &storage);
        let row = info.shape.last().copied().unwrap_or(0);
        let imatrix = match storage {
            Storage::Quant(t) if t.is_k_quant() => metadata
                .importance
                .and_then(|m| m.get(&info.name))
                .map(Vec::as_slice)
                .filter(|w| w.len() == row),
            _ => None,
        };
        let encoded = match storage {
            Storage::Quant(_) => metadata
                .encoded
                .and_then(|e| e.get(&info.name))
                .map(|(_, b)| b.as_slice()),
            _ => None,
        };
        if let Some(b) = encoded {
            if b.len() as u64 != nbytes {
                return Err(Error::Internal(format!(
                    "{}: {} encoded bytes, {nbytes} expected",
                    info.name,
                    b.len()
                )));
            }
        }
        plans.push(Plan {
            info,
            storage,
            imatrix,
            encoded,
            nbytes,
            offset,
        });
        offset += align(nbytes);
    }
    let header = render_header(&plans, ty, metadata);
    out.write_all(&header)?;
    pad(out, header.len() as u64)?;

    let total: f64 = tensors
        .iter()
        .map(|t| t.numel() as f64)
        .sum::<f64>()
        .max(1.0);
    let mut done = 0f64;
    let mut reports = Vec::with_capacity(plans.len());
    for plan in &plans {
        ctx.check()?;
        let stats = write_tensor(input, plan, out, ctx, chunk_elems, |elems_done| {
            ctx.report(
                (done + elems_done as f64) / total,
                &format!("{} ({})", plan.info.name, plan.type_name()),
            )
        })?;
        pad(out, plan.nbytes)?;
        done += plan.info.numel() as f64;
        reports.push(report(plan, &stats, type_of(&plan.info.name)));
    }
    out.flush()?;
    ctx.report(1.0, "done");
    Ok(reports)
}

fn report(plan: &Plan, stats: &ErrorStats, ty: GgufType) -> GgufReport {
    let numel = plan.info.numel();
    GgufReport {
        tensor: plan.info.name.clone(),
        shape: plan.info.shape.clone(),
        gguf_type: plan.type_name().to_string(),
        mse: stats.mse(),
        sqnr_db: stats.sqnr_db(),
        max_abs_error: stats.max_abs,
        bits_per_weight: if numel == 0 || plan.nbytes == 0 {
            0.0
        } else {
            plan.nbytes as f64 * 8.0 / numel as f64
        },
        bytes: plan.nbytes,
        note: match &plan.storage {
            Storage::Skip(why) => Some(format!("left out of the GGUF file: {why}")),
            Storage::IntToF32 => Some(format!("{} stored as f32 (exact)", plan.info.dtype)),
            Storage::FloatToF32 => Some(format!("{} stored as f32", plan.info.dtype)),
            Storage::Quant(q) if *q != ty => Some(format!(
                "{q} instead of {ty}: rows of {} values do not fill {ty}'s blocks of {} (llama-quantize's fallback)",
                plan.info.shape.last().copied().unwrap_or(0),
                ty.block_size()
            )),
            Storage::Quant(_) | Storage::Copy(_) => None,
        },
        importance: plan.imatrix.is_some(),
    }
}

/// Header, metadata and tensor infos (without the padding before the data).
fn render_header(plans: &[Plan], ty: GgufType, metadata: Metadata) -> Vec<u8> {
    let typed: Vec<&(String, MetaValue)> = metadata
        .typed
        .iter()
        .filter(|(k, _)| !RESERVED_KEYS.contains(&k.as_str()))
        .collect();
    let user: Vec<(&String, &String)> = metadata
        .strings
        .iter()
        .filter(|(k, _)| !RESERVED_KEYS.contains(&k.as_str()))
        .filter(|(k, _)| !typed.iter().any(|(t, _)| t == *k))
        .collect();
    let written: Vec<&Plan> = plans
        .iter()
        .filter(|p| !matches!(p.storage, Storage::Skip(_)))
        .collect();
    let mut h = Vec::new();
    h.extend_from_slice(GGUF_MAGIC);
    h.extend_from_slice(&GGUF_VERSION.to_le_bytes());
    h.extend_from_slice(&(written.len() as u64).to_le_bytes());
    h.extend_from_slice(&((typed.len() + user.len() + RESERVED_KEYS.len()) as u64).to_le_bytes());
    let ours = [
        GGUF_ALIGNMENT as u32,
        2, // GGML_QNT_VERSION
        ty.llama_file_type(),
    ];
    for (key, value) in RESERVED_KEYS.iter().zip(ours) {
        put_str(&mut h, key);
        h.extend_from_slice(&GGUF_VALUE_U32.to_le_bytes());
        h.extend_from_slice(&value.to_le_bytes());
    }
    for (key, value) in typed {
        put_str(&mut h, key);
        value.put(&mut h);
    }
    for (key, value) in user {
        put_str(&mut h, key);
        h.extend_from_slice(&GGUF_VALUE_STRING.to_le_bytes());
        put_str(&mut h, value);
    }
    for plan in written {
        put_str(&mut h, &plan.info.name);
        let dims = plan.ggml_dims();
        h.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            h.extend_from_slice(&d.to_le_bytes());
        }
        h.extend_from_slice(&plan.ggml_type_id().to_le_bytes());
        h.extend_from_slice(&plan.offset.to_le_bytes());
    }
    h
}

/// A GGUF string: u64 length, UTF-8 bytes, no terminator.
fn put_str(h: &mut Vec<u8>, s: &str) {
    h.extend_from_slice(&(s.len() as u64).to_le_bytes());
    h.extend_from_slice(s.as_bytes());
}

/// Writes one tensor's data (no padding); returns its error statistics.
fn write_tensor(
    input: &SafetensorsFile,
    plan: &Plan,
    out: &mut dyn Write,
    ctx: &Ctx,
    chunk_elems: usize,
    progress: impl Fn(usize),
) -> Result<ErrorStats> {
    let info = plan.info;
    let mut stats = ErrorStats::default();
    match &plan.storage {
        Storage::Skip(_) => {}
        Storage::Copy(_) => {
            out.write_all(input.bytes(info))?;
            stats.count = info.numel() as u64;
        }
        Storage::FloatToF32 => {
            out.write_all(&encode_f32(&input.to_f32(info)?))?;
            stats = float_to_f32_stats(input, info);
        }
        Storage::IntToF32 => {
            for v in input.to_i64(info)? {
                out.write_all(&(v as f32).to_le_bytes())?;
            }
            stats.count = info.numel() as u64;
        }
        Storage::Quant(ty) => match plan.encoded {
            Some(bytes) => {
                let decoded = decode_blocks(*ty, bytes, info.numel())?;
                stats.add_slices(&input.to_f32(info)?, &decoded);
                out.write_all(bytes)?;
            }
            None => {
                stats = write_quantized(input, plan, *ty, out, ctx, chunk_elems, progress)?;
            }
        },
    }
    Ok(stats)
}

/// Error of F64/F8 → F32, measured against the exact source values.
fn float_to_f32_stats(input: &SafetensorsFile, info: &TensorInfo) -> ErrorStats {
    let mut stats = ErrorStats::default();
    if info.dtype == Dtype::F64 {
        for c in input.bytes(info).chunks_exact(8) {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            let w = f64::from_le_bytes(b);
            let e = w - (w as f32) as f64;
            stats.signal += w * w;
            stats.noise += e * e;
            stats.max_abs = stats.max_abs.max(e.abs());
            stats.count += 1;
        }
    } else {
        // F8 values are exact in f32.
        stats.count = info.numel() as u64;
    }
    stats
}

/// Quantizes a tensor in chunks of rows, each chunk split over the thread budget; writes the
/// block bytes in row order (ggml blocks never straddle rows, so row chunks concatenate).
fn write_quantized(
    input: &SafetensorsFile,
    plan: &Plan,
    ty: GgufType,
    out: &mut dyn Write,
    ctx: &Ctx,
    chunk_elems: usize,
    progress: impl Fn(usize),
) -> Result<ErrorStats> {
    let info = plan.info;
    let imatrix = plan.imatrix;
    let row = info.shape.last().copied().unwrap_or(1);
    let mut stats = ErrorStats::default();
    if info.numel() == 0 || row == 0 {
        return Ok(stats);
    }
    let rows = info.numel() / row;
    let bytes = input.bytes(info);
    let row_bytes = row * info.dtype.size_in_bytes();
    if bytes.len() != rows * row_bytes {
        return Err(Error::Internal(format!(
            "tensor {:?}: {} data bytes for {rows} rows of {row_bytes}",
            info.name,
            bytes.len()
        )));
    }
    let threads = threads();
    let per_thread = (chunk_elems / row).max(1);
    // Reused across chunks: fresh multi-MiB buffers cost a page fault per 4 KiB.
    let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); threads];
    let mut r0 = 0;
    while r0 < rows {
        ctx.check()?;
        let r1 = (r0 + threads * per_thread).min(rows);
        let part = (r1 - r0).div_ceil(threads);
        let slice = |a: usize, b: usize| &bytes[a * row_bytes..b * row_bytes];
        let jobs: Vec<(usize, usize, &mut Vec<u8>)> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, buf)| (r0 + i * part, (r0 + (i + 1) * part).min(r1), buf))
            .filter(|(a, b, _)| a < b)
            .collect();
        let used = jobs.len();
        let results = par_map(jobs, |(a, b, buf)| {
            quantize_rows(&info.name, info.dtype, slice(a, b), row, ty, imatrix, buf)
        });
        for (result, buf) in results.into_iter().zip(&bufs[..used]) {
            stats.merge(&result?);
            out.write_all(buf)?;
        }
        progress(r1 * row);
        r0 = r1;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::super::gguf_blocks::{block_bytes, quantize_rows_q4_0};
    use candle_core::quantized::k_quants::GgmlType;
    use std::io::Cursor;
    use std::sync::atomic::AtomicBool;

    use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};
    use half::{bf16, f16};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::compress::formats::safetensors::{serialize, TensorSpec};

    fn info(name: &str, dtype: Dtype, shape: &[usize]) -> TensorInfo {
        let n: usize = shape.iter().product();
        TensorInfo {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            data_offsets: (0, n * dtype.size_in_bytes()),
        }
    }

    fn randn(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| (0..4).map(|_| rng.gen_range(-1.0f32..1.0)).sum::<f32>() * 0.05)
            .collect()
    }

    /// Writes tensors to a temporary safetensors file and opens it.
    fn open(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> SafetensorsFile {
        let owned: Vec<(TensorSpec, &[u8])> = tensors
            .iter()
            .map(|(n, d, s, b)| (TensorSpec::new(*n, *d, s.clone()), b.as_slice()))
            .collect();
        let bytes = serialize(&BTreeMap::new(), &owned).unwrap();
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), bytes).unwrap();
        SafetensorsFile::open(tmp.path()).unwrap()
    }

    fn write(
        file: &SafetensorsFile,
        selected: &[&str],
        ty: GgufType,
        meta: &BTreeMap<String, String>,
        chunk: usize,
    ) -> Result<(Vec<u8>, Vec<GgufReport>)> {
        let cancel = AtomicBool::new(false);
        let progress = |_: f64, _: &str| {};
        let ctx = Ctx::new(&progress, &cancel);
        let sel: Vec<String> = selected.iter().map(|s| s.to_string()).collect();
        let mut out = Vec::new();
        let meta = Metadata {
            strings: meta,
            typed: &[],
            importance: None,
            types: None,
            encoded: None,
        };
        let reports = write_gguf_chunked(file, &sel, ty, meta, &mut out, &ctx, chunk)?;
        Ok((out, reports))
    }

    fn read_tensor(bytes: &[u8], content: &Content, name: &str) -> (Vec<usize>, Vec<f32>) {
        let q = content
            .tensor(&mut Cursor::new(bytes), name, &Device::Cpu)
            .unwrap();
        let dims = q.shape().dims().to_vec();
        let values = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
        (dims, values.to_vec1::<f32>().unwrap())
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        encode_f32(v)
    }

    #[test]
    fn types_parse_round_trip_and_have_llama_block_layouts() {
        for ty in GgufType::ALL {
            assert_eq!(ty.as_str().parse::<GgufType>().unwrap(), ty);
        }
        let layout: Vec<(usize, usize)> = GgufType::ALL
            .iter()
            .map(|t| (t.block_size(), t.block_bytes()))
            .collect();
        assert_eq!(
            layout,
            [
                (32, 34),
                (32, 18),
                (32, 20),
                (32, 22),
                (32, 24),
                (256, 84),
                (256, 110),
                (256, 144),
                (256, 176),
                (256, 210)
            ]
        );
        assert_eq!(GgufType::Q8_0.bits_per_weight(), 8.5);
        assert_eq!(GgufType::Q4K.bits_per_weight(), 4.5);
        assert_eq!(GgufType::Q6K.bits_per_weight(), 6.5625);
        let e = "q4_k_m".parse::<GgufType>().unwrap_err();
        assert_eq!(e.code().as_str(), "validation_failed");
        assert_eq!(e.field(), Some("type"));
        assert!(e.to_string().contains("\"q4_k_m\""), "{e}");
    }

    #[test]
    fn check_refuses_rows_that_do_not_fill_blocks_and_says_what_fits() {
        let fc1 = [info("fc1.weight", Dtype::F32, &[300, 784])];
        let wide = [info("wide.weight", Dtype::F32, &[10, 800])];
        let sel = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();

        let e = check_gguf(&fc1, &sel(&["fc1.weight"]), GgufType::Q4K).unwrap_err();
        assert_eq!(e.code().as_str(), "validation_failed");
        assert_eq!(e.field(), Some("type"));
        let msg = e.to_string();
        for part in [
            "\"fc1.weight\"",
            "784",
            "256",
            "q4_k",
            "skip",
            "does not pad",
        ] {
            assert!(msg.contains(part), "{part} missing in {msg}");
        }
        // 784 is not a multiple of 32 either: the fallback does not fit.
        assert!(
            msg.contains("no GGUF type fits") && msg.contains("q5_0"),
            "{msg}"
        );
        let e = check_gguf(&fc1, &sel(&["fc1.weight"]), GgufType::Q8_0).unwrap_err();
        assert!(e.to_string().contains("784") && e.to_string().contains(" 32"));

        // 800 = 25 × 32: a k-quant falls back to a 32-block type (as llama-quantize does).
        check_gguf(&wide, &sel(&["wide.weight"]), GgufType::Q6K).unwrap();
        assert_eq!(GgufType::Q6K.for_row(800), Some(GgufType::Q8_0));
        assert_eq!(GgufType::Q4K.for_row(576), Some(GgufType::Q5_0));
        assert_eq!(GgufType::Q5K.for_row(576), Some(GgufType::Q5_1));
        assert_eq!(GgufType::Q3K.for_row(576), Some(GgufType::Q4_0));
        assert_eq!(GgufType::Q4K.for_row(1024), Some(GgufType::Q4K));
        assert_eq!(GgufType::Q4K.for_row(784), None);
        assert_eq!(GgufType::Q8_0.for_row(800), Some(GgufType::Q8_0));
        check_gguf(&wide, &sel(&["wide.weight"]), GgufType::Q8_0).unwrap();
        check_gguf(&wide, &sel(&["wide.weight"]), GgufType::Q4_1).unwrap();

        // Unselected or non-float tensors are not checked; 1024-wide rows fit everything.
        check_gguf(&fc1, &[], GgufType::Q4K).unwrap();
        let ids = info("ids", Dtype::I64, &[1, 7]);
        check_gguf(&[ids], &sel(&["ids"]), GgufType::Q4K).unwrap();
        let big = [info("big", Dtype::BF16, &[3, 1024])];
        for ty in GgufType::ALL {
            check_gguf(&big, &sel(&["big"]), ty).unwrap();
        }

        let scalar = info("scale", Dtype::F32, &[]);
        let e = check_gguf(&[scalar], &sel(&["scale"]), GgufType::Q8_0).unwrap_err();
        assert!(e.to_string().contains("scalar"), "{e}");
    }

    #[test]
    fn check_refuses_what_llama_cpp_cannot_read() {
        let five = info("conv3d.weight", Dtype::F32, &[2, 2, 2, 2, 32]);
        let e = check_gguf(&[five], &[], GgufType::Q8_0).unwrap_err();
        assert_eq!(e.code().as_str(), "unsupported_operation");
        assert!(e.to_string().contains("5 dimensions"), "{e}");
        let long = info(&"x".repeat(64), Dtype::F32, &[32]);
        let e = check_gguf(&[long], &[], GgufType::Q8_0).unwrap_err();
        assert!(e.to_string().contains("64 bytes"), "{e}");
        check_gguf(
            &[info(&"x".repeat(63), Dtype::F32, &[32])],
            &[],
            GgufType::Q8_0,
        )
        .unwrap();
    }

    /// The file of the round-trip tests: one quantizable weight, float tensors of every
    /// kept dtype, exact and inexact integers.
    fn mixed_model() -> (SafetensorsFile, Vec<f32>) {
        let w = randn(64 * 512, 1);
        let bias: Vec<f32> = randn(64, 2);
        let half: Vec<u8> = [0.5f32, -1.25, 3.0, 0.1]
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect();
        let brain: Vec<u8> = [0.5f32, -7.0]
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect();
        let f64s: Vec<u8> = [0.1f64, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let pos: Vec<u8> = (0i64..8).flat_map(|v| v.to_le_bytes()).collect();
        let huge: Vec<u8> = [1i64 << 40, 1]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let file = open(&[
            ("fc.weight", Dtype::F32, vec![64, 512], f32_bytes(&w)),
            ("fc.bias", Dtype::F32, vec![64], f32_bytes(&bias)),
            ("norm.f16", Dtype::F16, vec![2, 2], half),
            ("norm.bf16", Dtype::BF16, vec![2], brain),
            ("double", Dtype::F64, vec![2], f64s),
            ("position_ids", Dtype::I64, vec![1, 8], pos),
            ("huge_ids", Dtype::I64, vec![2], huge),
        ]);
        (file, w)
    }

    #[test]
    fn every_type_round_trips_through_candles_reader_with_the_reported_error() {
        let (file, w) = mixed_model();
        for ty in GgufType::ALL {
            let (bytes, reports) =
                write(&file, &["fc.weight"], ty, &BTreeMap::new(), CHUNK_ELEMS).unwrap();
            let content = Content::read(&mut Cursor::new(&bytes)).unwrap();
            assert!(matches!(content.magic, VersionedMagic::GgufV3));
            let (dims, back) = read_tensor(&bytes, &content, "fc.weight");
            assert_eq!(dims, [64, 512]);
            let mut stats = ErrorStats::default();
            for (&a, &b) in w.iter().zip(&back) {
                stats.add(a, b);
            }
            let r = &reports[0];
            assert_eq!(
                (r.tensor.as_str(), r.gguf_type.as_str()),
                ("fc.weight", ty.as_str())
            );
            assert_eq!(r.shape, [64, 512]);
            assert_eq!(r.max_abs_error, stats.max_abs, "{ty}");
            // q4_0 sums each block's squares in f32 (`q4_0_block`).
            let tol = if ty == GgufType::Q4_0 { 1e-6 } else { 1e-9 };
            assert!((r.mse - stats.mse()).abs() <= tol * stats.mse(), "{ty}");
            let sqnr = r.sqnr_db.unwrap();
            assert!((sqnr - stats.sqnr_db().unwrap()).abs() < 10.0 * tol, "{ty}");
            assert_eq!(
                r.bytes,
                (64 * 512 / ty.block_size() * ty.block_bytes()) as u64
            );
            assert_eq!(r.bits_per_weight, ty.bits_per_weight());
            // More bits, less noise: a loose floor per type (gaussian weights).
            let floor = match ty {
                GgufType::Q2K => 5.0,
                GgufType::Q3K => 10.0,
                GgufType::Q4_0 | GgufType::Q4_1 | GgufType::Q4K => 15.0,
                GgufType::Q5_0 | GgufType::Q5_1 | GgufType::Q5K => 21.0,
                GgufType::Q6K => 27.0,
                GgufType::Q8_0 => 35.0,
            };
            assert!(sqnr > floor, "{ty}: {sqnr} dB");
        }
    }

    #[test]
    fn unselected_tensors_are_kept_exactly_and_integers_converted_or_skipped() {
        let (file, _) = mixed_model();
        let (bytes, reports) = write(
            &file,
            &["fc.weight"],
            GgufType::Q8_0,
            &BTreeMap::new(),
            1 << 22,
        )
        .unwrap();
        let content = Content::read(&mut Cursor::new(&bytes)).unwrap();
        let types: Vec<(&str, &str)> = reports
            .iter()
            .map(|r| (r.tensor.as_str(), r.gguf_type.as_str()))
            .collect();
        assert_eq!(
            types,
            [
                ("fc.weight", "q8_0"),
                ("fc.bias", "f32"),
                ("norm.f16", "f16"),
                ("norm.bf16", "bf16"),
                ("double", "f32"),
                ("position_ids", "f32"),
                ("huge_ids", "skipped"),
            ]
        );
        assert_eq!(content.tensor_infos.len(), 6);
        assert!(!content.tensor_infos.contains_key("huge_ids"));
        assert!(reports[6].note.as_ref().unwrap().contains("2^24"));
        assert_eq!((reports[6].bytes, reports[6].bits_per_weight), (0, 0.0));

        let bias = file.to_f32(file.get("fc.bias").unwrap()).unwrap();
        assert_eq!(read_tensor(&bytes, &content, "fc.bias"), (vec![64], bias));
        let (dims, half) = read_tensor(&bytes, &content, "norm.f16");
        assert_eq!(
            (dims, half),
            (
                vec![2, 2],
                vec![0.5, -1.25, 3.0, f16::from_f32(0.1).to_f32()]
            )
        );
        assert_eq!(
            read_tensor(&bytes, &content, "norm.bf16"),
            (vec![2], vec![0.5, -7.0])
        );
        assert_eq!(
            read_tensor(&bytes, &content, "position_ids"),
            (vec![1, 8], (0..8).map(|v| v as f32).collect())
        );
        assert_eq!(read_tensor(&bytes, &content, "double").1, [0.1f32, 2.0]);
        let d = &reports[4];
        assert_eq!(d.max_abs_error, (0.1f64 - 0.1f32 as f64).abs());
        for r in &reports[1..4] {
            assert_eq!((r.mse, r.max_abs_error, r.sqnr_db), (0.0, 0.0, None));
        }
        assert_eq!(reports[2].bits_per_weight, 16.0);
        assert_eq!(reports[1].bytes, 256);
    }

    #[test]
    fn ggml_dims_are_the_shape_reversed_and_rows_stay_rows() {
        // Row i holds i + j/100: a transposed reading would mix rows.
        let w: Vec<f32> = (0..3 * 64)
            .map(|k| (k / 64) as f32 + (k % 64) as f32 / 100.0)
            .collect();
        let file = open(&[("w", Dtype::F32, vec![3, 64], f32_bytes(&w))]);
        let (bytes, _) = write(&file, &["w"], GgufType::Q8_0, &BTreeMap::new(), 1 << 22).unwrap();
        // The tensor info right after the header and three u32 KVs: name, n_dims, ne[0], ne[1].
        let header_len = 4 + 4 + 8 + 8;
        let kvs: usize = RESERVED_KEYS.iter().map(|k| 8 + k.len() + 4 + 4).sum();
        let at = header_len + kvs + 8 + 1;
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap());
        assert_eq!(&bytes[at - 1..at], b"w");
        assert_eq!((u32_at(at), u64_at(at + 4), u64_at(at + 12)), (2, 64, 3));
        assert_eq!(u32_at(at + 20), 8); // GGML_TYPE_Q8_0
        let content = Content::read(&mut Cursor::new(&bytes)).unwrap();
        assert_eq!(content.tensor_data_offset % GGUF_ALIGNMENT, 0);
        let (dims, back) = read_tensor(&bytes, &content, "w");
        assert_eq!(dims, [3, 64]);
        for (k, (a, b)) in w.iter().zip(&back).enumerate() {
            assert!((a - b).abs() < 0.02, "element {k}: {a} vs {b}");
        }
    }

    #[test]
    fn two_threads_and_row_chunks_give_the_bytes_of_one_whole_tensor_quantization() {
        let w = randn(601 * 256, 3);
        let file = open(&[("w", Dtype::F32, vec![601, 256], f32_bytes(&w))]);
        let whole = Tensor::from_slice(&w, (601, 256), &Device::Cpu).unwrap();
        for ty in GgufType::ALL {
            let expected = QTensor::quantize(&whole, ty.ggml_dtype()).unwrap();
            let expected = expected.data().unwrap();
            // 256 elements per thread: 300 chunks of 2 rows and a last single row; 700: 2 rows
            // per thread; the default: one chunk of 301 + 300 rows, each in pieces of 256 rows.
            for chunk in [256, 700, 1 << 22] {
                let (bytes, r) = write(&file, &["w"], ty, &BTreeMap::new(), chunk).unwrap();
                let content = Content::read(&mut Cursor::new(&bytes)).unwrap();
                let start = content.tensor_data_offset as usize;
                assert_eq!(
                    &bytes[start..start + expected.len()],
                    &expected[..],
                    "{ty} {chunk}"
                );
                assert_eq!(r[0].bytes as usize, expected.len());
            }
        }
    }

    #[test]
    fn own_q4_0_gives_candles_bytes_on_awkward_blocks_and_the_error_of_its_decoding() {
        use candle_core::quantized::k_quants::BlockQ4_0;
        let candle = |w: &[f32]| {
            let mut blocks = vec![BlockQ4_0::zeros(); w.len() / 32];
            BlockQ4_0::from_float(w, &mut blocks);
            let mut back = vec![0f32; w.len()];
            BlockQ4_0::to_float(&blocks, &mut back);
            let mut stats = ErrorStats::default();
            for (&a, &b) in w.iter().zip(&back) {
                stats.add(a, b);
            }
            (block_bytes(&blocks).to_vec(), stats)
        };
        let ours = |w: &[f32]| {
            let mut out = Vec::new();
            let stats =
                quantize_rows_q4_0("w", Dtype::F32, &f32_bytes(w), 32, None, &mut out).unwrap();
            (out, stats)
        };
        // Blocks of random values whose first four are replaced by awkward ones.
        let awkward: [[f32; 4]; 7] = [
            [1.0, -1.0, 1.0, -1.0],  // equal magnitudes: the first one's sign wins
            [-1.0, 1.0, 0.5, -0.25], // the largest magnitude is negative
            [1e-40, -3e-40, 2e-41, 0.0],
            [3.0, 3.0, -3.0, 0.0],
            [0.1, 0.1, 0.1, 0.1],
            [f32::NAN, 1.0, -2.0, 0.0],
            [1e6, -1.0, 0.5, 2.0], // d overflows f16
        ];
        let mut w = randn(32 * (64 + awkward.len()), 9);
        for (b, vals) in awkward.iter().enumerate() {
            w[b * 32..b * 32 + 4].copy_from_slice(vals);
        }
        // Blocks of zeros, with and without signs: d is -0.0, as candle writes it.
        w.extend([0.0; 32]);
        w.extend((0..32).map(|i| if i % 3 == 0 { -0.0 } else { 0.0 }));
        assert_eq!(ours(&w).0, candle(&w).0);
        // The statistics, on the blocks whose error is finite.
        let finite = &w[..5 * 32]
            .iter()
            .chain(&w[7 * 32..])
            .copied()
            .collect::<Vec<_>>();
        let (_, got) = ours(finite);
        let (_, want) = candle(finite);
        assert_eq!(got.count, want.count);
        assert_eq!(got.max_abs.to_bits(), want.max_abs.to_bits());
        for (g, e) in [(got.signal, want.signal), (got.noise, want.noise)] {
            assert!((g - e).abs() <= 1e-6 * e, "{g} vs {e}");
        }
    }

    #[test]
    fn metadata_goes_in_as_strings_next_to_the_general_keys() {
        let file = open(&[("w", Dtype::F32, vec![2, 32], f32_bytes(&randn(64, 4)))]);
        let meta: BTreeMap<String, String> = [
            ("whittle.architecture", "{\"kind\":\"sequential\"}"),
            ("whittle.job", "{\"id\":\"j1\",\"seed\":7}"),
            ("general.alignment", "64"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let (bytes, _) = write(&file, &["w"], GgufType::Q4_0, &meta, 1 << 22).unwrap();
        let content = Content::read(&mut Cursor::new(&bytes)).unwrap();
        let m = &content.metadata;
        assert_eq!(m.len(), 5);
        let s = |k: &str| m[k].to_string().unwrap().clone();
        assert_eq!(s("whittle.architecture"), "{\"kind\":\"sequential\"}");
        assert_eq!(s("whittle.job"), "{\"id\":\"j1\",\"seed\":7}");
        assert!(matches!(m["general.alignment"], Value::U32(32)));
        assert!(matches!(m["general.file_type"], Value::U32(2)));
        assert!(matches!(m["general.quantization_version"], Value::U32(2)));
        assert_eq!(&bytes[..8], b"GGUF\x03\x00\x00\x00");
    }

    #[test]
    fn cancellation_stops_before_writing_data_and_reports_serialize_with_type() {
        let file = open(&[("w", Dtype::F32, vec![2, 32], f32_bytes(&randn(64, 5)))]);
        let cancel = AtomicBool::new(true);
        let progress = |_: f64, _: &str| {};
        let ctx = Ctx::new(&progress, &cancel);
        let mut out = Vec::new();
        let sel = vec!["w".to_string()];
        let e = write_gguf(
            &file,
            &sel,
            GgufType::Q8_0,
            &BTreeMap::new(),
            &mut out,
            &ctx,
        );
        assert!(matches!(e, Err(Error::Cancelled)));

        let (_, reports) = write(&file, &["w"], GgufType::Q8_0, &BTreeMap::new(), 1 << 22).unwrap();
        let json = serde_json::to_value(&reports[0]).unwrap();
        assert_eq!(json["type"], "q8_0");
        assert_eq!(json["shape"], serde_json::json!([2, 32]));
        assert_eq!(json["bytes"], 68);
        assert!(json.get("note").is_none());
    }
}
