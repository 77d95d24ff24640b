//! GGUF's block codec: rows of floats into a type's blocks (candle's quantizers, and ours
//! for q4_0) with the error of their decoding, given codes into blocks (`encode_blocks`),
//! blocks back into floats, and the round trip a type makes of a tensor. The file layout
//! around the blocks is [`super::gguf`]'s; the block types themselves ([`GgufType`]) are
//! here, so the codec needs nothing from the file layer.

use std::fmt;
use std::str::FromStr;

use candle_core::quantized::k_quants::GgmlType;
use candle_core::quantized::GgmlDType;

use super::gguf_q4_0::{q4_0_blocks, Q4_0_BLOCK, Q4_0_BYTES};
use super::safetensors::{decode_f32, f32_view, Dtype};
use crate::compress::quant::float::ErrorStats;
use crate::compress::{Error, Result};

/// Values candle quantizes per call inside a chunk (256 KiB of f32).
const PIECE_ELEMS: usize = 1 << 16;

/// A GGUF block-quantization type (the `type` parameter of the `gguf` format).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgufType {
    /// 8-bit, blocks of 32 with one f16 scale (8.5 bits/weight).
    Q8_0,
    /// 4-bit symmetric, blocks of 32 (4.5 bits/weight).
    Q4_0,
    /// 4-bit with offset, blocks of 32 (5 bits/weight).
    Q4_1,
    /// 5-bit symmetric, blocks of 32 (5.5 bits/weight).
    Q5_0,
    /// 5-bit with offset, blocks of 32 (6 bits/weight).
    Q5_1,
    /// k-quant 2-bit, super-blocks of 256 (2.625 bits/weight).
    Q2K,
    /// k-quant 3-bit, super-blocks of 256 (3.4375 bits/weight).
    Q3K,
    /// k-quant 4-bit, super-blocks of 256 (4.5 bits/weight).
    Q4K,
    /// k-quant 5-bit, super-blocks of 256 (5.5 bits/weight).
    Q5K,
    /// k-quant 6-bit, super-blocks of 256 (6.5625 bits/weight).
    Q6K,
}

impl GgufType {
    /// Every type, in the order of the API documentation.
    pub const ALL: [GgufType; 10] = [
        GgufType::Q8_0,
        GgufType::Q4_0,
        GgufType::Q4_1,
        GgufType::Q5_0,
        GgufType::Q5_1,
        GgufType::Q2K,
        GgufType::Q3K,
        GgufType::Q4K,
        GgufType::Q5K,
        GgufType::Q6K,
    ];

    /// API spelling (`q8_0`, `q4_k`, …), also llama.cpp's lower-cased type name.
    pub fn as_str(self) -> &'static str {
        match self {
            GgufType::Q8_0 => "q8_0",
            GgufType::Q4_0 => "q4_0",
            GgufType::Q4_1 => "q4_1",
            GgufType::Q5_0 => "q5_0",
            GgufType::Q5_1 => "q5_1",
            GgufType::Q2K => "q2_k",
            GgufType::Q3K => "q3_k",
            GgufType::Q4K => "q4_k",
            GgufType::Q5K => "q5_k",
            GgufType::Q6K => "q6_k",
        }
    }

    /// Values per block: 32, or 256 for the k-quants. Rows must be a multiple of it.
    pub fn block_size(self) -> usize {
        self.ggml_dtype().block_size()
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.ggml_dtype().type_size()
    }

    /// Storage cost in bits per weight (block bytes × 8 / block size).
    pub fn bits_per_weight(self) -> f64 {
        (self.block_bytes() * 8) as f64 / self.block_size() as f64
    }

    /// Whether this is a k-quant (256-value super-blocks).
    pub fn is_k_quant(self) -> bool {
        self.block_size() == 256
    }

    /// The type llama-quantize falls back to for rows a k-quant's 256-value blocks do not
    /// divide: q4_k → q5_0, q5_k → q5_1, q6_k → q8_0, and q2_k / q3_k → q4_0 (llama.cpp
    /// uses iq4_nl there, a type Whittle does not write). `None` for the 32-block types.
    pub fn fallback(self) -> Option<GgufType> {
        match self {
            GgufType::Q2K | GgufType::Q3K => Some(GgufType::Q4_0),
            GgufType::Q4K => Some(GgufType::Q5_0),
            GgufType::Q5K => Some(GgufType::Q5_1),
            GgufType::Q6K => Some(GgufType::Q8_0),
            _ => None,
        }
    }

    /// The type a row of `row` values is stored as: this type when its blocks divide the
    /// row, else its [`GgufType::fallback`] when that one's do; `None` when nothing fits.
    pub fn for_row(self, row: usize) -> Option<GgufType> {
        if row > 0 && row.is_multiple_of(self.block_size()) {
            return Some(self);
        }
        self.fallback()
            .filter(|f| row > 0 && row.is_multiple_of(f.block_size()))
    }

    /// candle's type.
    pub fn ggml_dtype(self) -> GgmlDType {
        match self {
            GgufType::Q8_0 => GgmlDType::Q8_0,
            GgufType::Q4_0 => GgmlDType::Q4_0,
            GgufType::Q4_1 => GgmlDType::Q4_1,
            GgufType::Q5_0 => GgmlDType::Q5_0,
            GgufType::Q5_1 => GgmlDType::Q5_1,
            GgufType::Q2K => GgmlDType::Q2K,
            GgufType::Q3K => GgmlDType::Q3K,
            GgufType::Q4K => GgmlDType::Q4K,
            GgufType::Q5K => GgmlDType::Q5K,
            GgufType::Q6K => GgmlDType::Q6K,
        }
    }

    /// The ggml type id in a GGUF tensor info (`GGML_TYPE_*`).
    pub(super) fn ggml_type_id(self) -> u32 {
        match self {
            GgufType::Q4_0 => 2,
            GgufType::Q4_1 => 3,
            GgufType::Q5_0 => 6,
            GgufType::Q5_1 => 7,
            GgufType::Q8_0 => 8,
            GgufType::Q2K => 10,
            GgufType::Q3K => 11,
            GgufType::Q4K => 12,
            GgufType::Q5K => 13,
            GgufType::Q6K => 14,
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_MOSTLY_*`).
    pub(super) fn llama_file_type(self) -> u32 {
        match self {
            GgufType::Q4_0 => 2,
            GgufType::Q4_1 => 3,
            GgufType::Q8_0 => 7,
            GgufType::Q5_0 => 8,
            GgufType::Q5_1 => 9,
            GgufType::Q2K => 10,
            GgufType::Q3K => 11,
            GgufType::Q4K => 14,
            GgufType::Q5K => 16,
            GgufType::Q6K => 18,
        }
    }
}

impl fmt::Display for GgufType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for GgufType {
    type Err = Error;

    /// Parses the API spelling; anything else is an [`Error::InvalidParameter`] at `/type`.
    fn from_str(s: &str) -> Result<Self> {
        GgufType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| Error::InvalidParameter {
                field: "type".into(),
                detail: format!(
                    "unknown GGUF type {s:?}; expected one of {}",
                    GgufType::ALL.map(GgufType::as_str).join(", ")
                ),
            })
    }
}

/// Quantizes whole rows with candle's block quantizers into `out` (cleared first) and
/// measures the error of candle's own decoding of them. Works in pieces of about
/// [`PIECE_ELEMS`] values with buffers reused across pieces; calls the block functions
/// directly (no `Tensor` / `QTensor` round trip, which copied every value four times).
pub(super) fn quantize_rows(
    name: &str,
    dtype: Dtype,
    bytes: &[u8],
    row: usize,
    ty: GgufType,
    imatrix: Option<&[f32]>,
    out: &mut Vec<u8>,
) -> Result<ErrorStats> {
    use candle_core::quantized::k_quants as k;
    // Importance weights reach k-quant tensors only (the plan attaches them to those): candle
    // has the weighted fit for k-quants alone.
    let quantize = match ty {
        GgufType::Q8_0 => quantize_rows_as::<k::BlockQ8_0>,
        GgufType::Q4_0 => quantize_rows_q4_0,
        GgufType::Q4_1 => quantize_rows_as::<k::BlockQ4_1>,
        GgufType::Q5_0 => quantize_rows_as::<k::BlockQ5_0>,
        GgufType::Q5_1 => quantize_rows_as::<k::BlockQ5_1>,
        GgufType::Q2K => quantize_rows_as::<k::BlockQ2K>,
        GgufType::Q3K => quantize_rows_as::<k::BlockQ3K>,
        GgufType::Q4K => quantize_rows_as::<k::BlockQ4K>,
        GgufType::Q5K => quantize_rows_as::<k::BlockQ5K>,
        GgufType::Q6K => quantize_rows_as::<k::BlockQ6K>,
    };
    if imatrix.is_some() && !ty.is_k_quant() {
        return Err(Error::Internal(format!(
            "importance weights for {}, which has no weighted fit",
            ty.as_str()
        )));
    }
    quantize(name, dtype, bytes, row, imatrix, out)
}

/// [`quantize_rows`] for one block type `B`; with `imatrix` (one weight per row element, k-quants
/// only) candle's importance-weighted block fit.
fn quantize_rows_as<B: GgmlType>(
    name: &str,
    dtype: Dtype,
    bytes: &[u8],
    row: usize,
    imatrix: Option<&[f32]>,
    out: &mut Vec<u8>,
) -> Result<ErrorStats> {
    out.clear();
    let mut stats = ErrorStats::default();
    let row_bytes = row * dtype.size_in_bytes();
    let piece_rows = (PIECE_ELEMS / row).max(1);
    let (mut blocks, mut back) = (Vec::<B>::new(), Vec::<f32>::new());
    for_each_f32_piece(name, dtype, bytes, piece_rows * row_bytes, |values| {
        // `check_gguf` made every row a whole number of blocks.
        debug_assert_eq!(values.len() % B::BLCK_SIZE, 0);
        blocks.clear();
        blocks.resize(values.len() / B::BLCK_SIZE, B::zeros());
        match imatrix {
            Some(w) => B::from_float_imatrix(values, &mut blocks, w, row),
            None => B::from_float(values, &mut blocks),
        }
        back.resize(values.len(), 0.0);
        B::to_float(&blocks, &mut back);
        stats.add_slices(values, &back);
        out.extend_from_slice(block_bytes(&blocks));
    })?;
    Ok(stats)
}

/// Calls `f` on `bytes` (whole rows of `dtype`) as f32, `piece_bytes` at a time: viewed in
/// place when they are f32, decoded into a buffer otherwise.
fn for_each_f32_piece(
    name: &str,
    dtype: Dtype,
    bytes: &[u8],
    piece_bytes: usize,
    mut f: impl FnMut(&[f32]),
) -> Result<()> {
    for piece in bytes.chunks(piece_bytes) {
        match f32_view(dtype, piece) {
            Some(values) => f(values),
            None => f(&decode_f32(name, dtype, piece)?),
        }
    }
    Ok(())
}

/// q4_0 written here instead of by candle's `BlockQ4_0::from_float`: the same arithmetic, so
/// the same bytes (tested against candle), but without the branch per value in the search for
/// the largest magnitude, so it vectorises; and the error statistics come from the codes while
/// the block is still in registers instead of from a second pass that decodes every block.
/// q4_0 is the type most often asked for, and this is what made it faster than llama.cpp's
/// `llama-quantize` rather than 23% slower (CHANGELOG).
pub(super) fn quantize_rows_q4_0(
    name: &str,
    dtype: Dtype,
    bytes: &[u8],
    _row: usize,
    _imatrix: Option<&[f32]>,
    out: &mut Vec<u8>,
) -> Result<ErrorStats> {
    out.clear();
    let mut stats = ErrorStats::default();
    // Rows are whole blocks (`check_gguf`) and PIECE_ELEMS is a multiple of the block size, so
    // pieces hold whole blocks.
    for_each_f32_piece(
        name,
        dtype,
        bytes,
        PIECE_ELEMS * dtype.size_in_bytes(),
        |values| {
            debug_assert_eq!(values.len() % Q4_0_BLOCK, 0);
            let start = out.len();
            out.resize(start + values.len() / Q4_0_BLOCK * Q4_0_BYTES, 0);
            let (signal, noise, max) = q4_0_blocks(values, &mut out[start..]);
            stats.signal += signal;
            stats.noise += noise;
            stats.max_abs = stats.max_abs.max(f64::from(max));
            stats.count += values.len() as u64;
        },
    )?;
    Ok(stats)
}

/// GGUF blocks of 32 from integer levels (row-major, one scale per 32 levels, and one
/// minimum per 32 for q4_1 / q5_1): q8_0 stores the level, q4_0 / q5_0 the level + 8 / + 16,
/// q4_1 / q5_1 the level itself (0..15 / 0..31); decoded by llama.cpp as `d·(q − 8)`, `d·q + m`,
/// …, with `d` and `m` the f16 of the given scale and minimum (give f16 values to decode
/// exactly). Levels out of the type's range are an error.
pub fn encode_blocks(
    ty: GgufType,
    levels: &[i32],
    scales: &[f32],
    mins: &[f32],
) -> Result<Vec<u8>> {
    use half::f16;
    let affine = matches!(ty, GgufType::Q4_1 | GgufType::Q5_1);
    let (bias, top) = match ty {
        GgufType::Q8_0 => (0, 255),
        GgufType::Q4_0 => (8, 15),
        GgufType::Q5_0 => (16, 31),
        GgufType::Q4_1 => (0, 15),
        GgufType::Q5_1 => (0, 31),
        other => {
            return Err(Error::Internal(format!(
                "{other} blocks are not written from levels"
            )))
        }
    };
    let blocks = levels.len() / 32;
    if !levels.len().is_multiple_of(32)
        || scales.len() != blocks
        || (affine && mins.len() != blocks)
    {
        return Err(Error::Internal(format!(
            "{} levels, {} scales, {} minimums for {ty} blocks of 32",
            levels.len(),
            scales.len(),
            mins.len()
        )));
    }
    let mut out = Vec::with_capacity(blocks * ty.block_bytes());
    for (b, chunk) in levels.chunks_exact(32).enumerate() {
        let q: Vec<u32> = chunk
            .iter()
            .map(|&l| {
                let v = if ty == GgufType::Q8_0 {
                    l + 128
                } else {
                    l + bias
                } as i64;
                if (0..=top).contains(&v) {
                    Ok(if ty == GgufType::Q8_0 {
                        (l as i8) as u8 as u32
                    } else {
                        v as u32
                    })
                } else {
                    Err(Error::Internal(format!("level {l} does not fit {ty}")))
                }
            })
            .collect::<Result<_>>()?;
        out.extend_from_slice(&f16::from_f32(scales[b]).to_le_bytes());
        if affine {
            out.extend_from_slice(&f16::from_f32(mins[b]).to_le_bytes());
        }
        if ty == GgufType::Q8_0 {
            out.extend(q.iter().map(|&v| v as u8));
            continue;
        }
        if matches!(ty, GgufType::Q5_0 | GgufType::Q5_1) {
            let mut qh = 0u32;
            for (j, &v) in q.iter().enumerate() {
                qh |= ((v >> 4) & 1) << j;
            }
            out.extend_from_slice(&qh.to_le_bytes());
        }
        for j in 0..16 {
            out.push(((q[j] & 0xF) | ((q[j + 16] & 0xF) << 4)) as u8);
        }
    }
    Ok(out)
}

/// Decodes `n` values of `ty` blocks (the bytes as a GGUF file holds them) with candle's
/// decoders, as llama.cpp reads them.
pub fn decode_blocks(ty: GgufType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    use candle_core::quantized::k_quants as k;
    fn go<B: GgmlType>(bytes: &[u8], n: usize) -> Result<Vec<f32>> {
        let count = n / B::BLCK_SIZE;
        if bytes.len() != count * std::mem::size_of::<B>() || !n.is_multiple_of(B::BLCK_SIZE) {
            return Err(Error::Internal(format!(
                "{} bytes for {n} values of {:?}",
                bytes.len(),
                B::DTYPE
            )));
        }
        let mut blocks = vec![B::zeros(); count];
        // SAFETY: candle's block types are plain `#[repr(C)]` integers, f16s and byte arrays
        // (see `block_bytes`), valid for any bit pattern; the lengths match (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                blocks.as_mut_ptr().cast::<u8>(),
                bytes.len(),
            );
        }
        let mut out = vec![0f32; n];
        B::to_float(&blocks, &mut out);
        Ok(out)
    }
    match ty {
        GgufType::Q8_0 => go::<k::BlockQ8_0>(bytes, n),
        GgufType::Q4_0 => go::<k::BlockQ4_0>(bytes, n),
        GgufType::Q4_1 => go::<k::BlockQ4_1>(bytes, n),
        GgufType::Q5_0 => go::<k::BlockQ5_0>(bytes, n),
        GgufType::Q5_1 => go::<k::BlockQ5_1>(bytes, n),
        GgufType::Q2K => go::<k::BlockQ2K>(bytes, n),
        GgufType::Q3K => go::<k::BlockQ3K>(bytes, n),
        GgufType::Q4K => go::<k::BlockQ4K>(bytes, n),
        GgufType::Q5K => go::<k::BlockQ5K>(bytes, n),
        GgufType::Q6K => go::<k::BlockQ6K>(bytes, n),
    }
}

/// `values` (whole rows of `row` values) stored as `ty` and decoded again: what a reader of
/// the file computes with. `imatrix` (one weight per row element) weights a k-quant's block
/// fit as in the file; the other types ignore it.
pub fn roundtrip(
    values: &[f32],
    row: usize,
    ty: GgufType,
    imatrix: Option<&[f32]>,
) -> Result<Vec<f32>> {
    use candle_core::quantized::k_quants as k;
    fn go<B: GgmlType>(values: &[f32], row: usize, imatrix: Option<&[f32]>) -> Vec<f32> {
        let mut blocks = vec![B::zeros(); values.len() / B::BLCK_SIZE];
        match imatrix {
            Some(w) if w.len() == row => B::from_float_imatrix(values, &mut blocks, w, row),
            _ => B::from_float(values, &mut blocks),
        }
        let mut back = vec![0.0; values.len()];
        B::to_float(&blocks, &mut back);
        back
    }
    if row == 0 || !row.is_multiple_of(ty.block_size()) || !values.len().is_multiple_of(row) {
        return Err(Error::Internal(format!(
            "{ty} needs whole rows of a multiple of {} values (rows of {row}, {} values)",
            ty.block_size(),
            values.len()
        )));
    }
    let imatrix = imatrix.filter(|_| ty.is_k_quant());
    Ok(match ty {
        GgufType::Q8_0 => go::<k::BlockQ8_0>(values, row, imatrix),
        GgufType::Q4_0 => go::<k::BlockQ4_0>(values, row, imatrix),
        GgufType::Q4_1 => go::<k::BlockQ4_1>(values, row, imatrix),
        GgufType::Q5_0 => go::<k::BlockQ5_0>(values, row, imatrix),
        GgufType::Q5_1 => go::<k::BlockQ5_1>(values, row, imatrix),
        GgufType::Q2K => go::<k::BlockQ2K>(values, row, imatrix),
        GgufType::Q3K => go::<k::BlockQ3K>(values, row, imatrix),
        GgufType::Q4K => go::<k::BlockQ4K>(values, row, imatrix),
        GgufType::Q5K => go::<k::BlockQ5K>(values, row, imatrix),
        GgufType::Q6K => go::<k::BlockQ6K>(values, row, imatrix),
    })
}

/// The bytes of ggml blocks as GGUF stores them.
pub(super) fn block_bytes<B: GgmlType>(blocks: &[B]) -> &[u8] {
    assert_eq!(
        std::mem::size_of::<B>(),
        B::DTYPE.type_size(),
        "{:?} block layout",
        B::DTYPE
    );
    // SAFETY: candle's block types are `#[repr(C)]` structs of integers, f16s and integer
    // arrays with no padding (the assert checks the size against ggml's block size), so
    // every byte is initialised; the slice borrows `blocks` for its whole lifetime. This is
    // how candle itself serialises them (`QTensor::data`).
    unsafe {
        std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), std::mem::size_of_val(blocks))
    }
}
