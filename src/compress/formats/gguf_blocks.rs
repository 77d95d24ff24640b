//! GGUF's block codec: rows of floats into a type's blocks (candle's quantizers, and ours
//! for q4_0) with the error of their decoding, given codes into blocks (`encode_blocks`),
//! blocks back into floats, and the round trip a type makes of a tensor. The file layout
//! around the blocks is [`super::gguf`]'s.

use candle_core::quantized::k_quants::GgmlType;

use super::gguf::{GgufType, PIECE_ELEMS};
use super::gguf_q4_0::{q4_0_blocks, Q4_0_BLOCK, Q4_0_BYTES};
use super::safetensors::{decode_f32, f32_view, Dtype};
use crate::compress::quant::float::ErrorStats;
use crate::compress::{Error, Result};

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
