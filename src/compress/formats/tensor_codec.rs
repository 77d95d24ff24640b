//! Tensor element codecs: safetensors' little-endian bytes of every dtype to f32 / i64 and
//! back (re-exported by [`super::safetensors`], where callers find them).

use super::safetensors::Dtype;
use crate::compress::{Error, Result};

/// The bytes of an F32 tensor as `&[f32]` without copying, when they are 4-byte aligned in
/// the map (safetensors writers align them) and the machine is little-endian.
pub fn f32_view(dtype: Dtype, bytes: &[u8]) -> Option<&[f32]> {
    if dtype != Dtype::F32 || cfg!(target_endian = "big") {
        return None;
    }
    // SAFETY: every bit pattern is a valid f32, and `align_to` only reinterprets the
    // aligned middle of the slice; we use it only when that middle is the whole slice.
    let (head, mid, tail) = unsafe { bytes.align_to::<f32>() };
    (head.is_empty() && tail.is_empty()).then_some(mid)
}

/// Decodes little-endian float bytes of `dtype` into `f32`. Works on unaligned input.
/// `name` only labels the error.
pub fn decode_f32(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    fn chunks<const N: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        bytes.chunks_exact(N).map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            a
        })
    }
    Ok(match dtype {
        Dtype::F32 => chunks::<4>(bytes).map(f32::from_le_bytes).collect(),
        Dtype::F64 => chunks::<8>(bytes)
            .map(|b| f64::from_le_bytes(b) as f32)
            .collect(),
        Dtype::F16 => chunks::<2>(bytes)
            .map(|b| half::f16::from_le_bytes(b).to_f32())
            .collect(),
        Dtype::BF16 => chunks::<2>(bytes)
            .map(|b| half::bf16::from_le_bytes(b).to_f32())
            .collect(),
        Dtype::F8E5M2 => bytes
            .iter()
            .map(|&b| half::f16::from_bits(u16::from(b) << 8).to_f32())
            .collect(),
        Dtype::F8E4M3 => bytes.iter().map(|&b| f8_e4m3_to_f32(b)).collect(),
        other => {
            return Err(Error::UnsupportedDtype {
                tensor: name.to_owned(),
                dtype: other.as_str().to_owned(),
                expected: "a floating-point dtype".to_owned(),
            })
        }
    })
}

/// Decodes one F8_E4M3 ("fn": bias 7, no infinities, S.1111.111 is NaN) value.
fn f8_e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((b >> 3) & 0x0f);
    let man = f32::from(b & 0x07);
    if exp == 0x0f && b & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    }
}

/// Decodes little-endian integer (or BOOL) bytes of `dtype` into `i64`. Works on unaligned
/// input. `name` only labels the error.
pub fn decode_i64(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<i64>> {
    fn chunks<const N: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        bytes.chunks_exact(N).map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            a
        })
    }
    Ok(match dtype {
        Dtype::Bool | Dtype::U8 => bytes.iter().map(|&b| i64::from(b)).collect(),
        Dtype::I8 => bytes.iter().map(|&b| i64::from(b as i8)).collect(),
        Dtype::I16 => chunks::<2>(bytes)
            .map(|b| i64::from(i16::from_le_bytes(b)))
            .collect(),
        Dtype::U16 => chunks::<2>(bytes)
            .map(|b| i64::from(u16::from_le_bytes(b)))
            .collect(),
        Dtype::I32 => chunks::<4>(bytes)
            .map(|b| i64::from(i32::from_le_bytes(b)))
            .collect(),
        Dtype::U32 => chunks::<4>(bytes)
            .map(|b| i64::from(u32::from_le_bytes(b)))
            .collect(),
        Dtype::I64 => chunks::<8>(bytes).map(i64::from_le_bytes).collect(),
        Dtype::U64 => chunks::<8>(bytes)
            .map(|b| {
                let v = u64::from_le_bytes(b);
                i64::try_from(v).map_err(|_| Error::UnsupportedDtype {
                    tensor: name.to_owned(),
                    dtype: format!("U64 (value {v})"),
                    expected: "values that fit in I64".to_owned(),
                })
            })
            .collect::<Result<_>>()?,
        other => {
            return Err(Error::UnsupportedDtype {
                tensor: name.to_owned(),
                dtype: other.as_str().to_owned(),
                expected: "an integer dtype".to_owned(),
            })
        }
    })
}

/// Little-endian bytes of `values` (the F32 payload of a safetensors tensor).
pub fn encode_f32(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// `values` encoded as little-endian `dtype` (F32, F64, F16 or BF16; values are rounded to
/// the nearest representable one).
pub fn encode_as(dtype: Dtype, values: &[f32]) -> Result<Vec<u8>> {
    Ok(match dtype {
        Dtype::F32 => encode_f32(values),
        Dtype::F64 => values
            .iter()
            .flat_map(|v| f64::from(*v).to_le_bytes())
            .collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        other => {
            return Err(Error::UnsupportedDtype {
                tensor: String::new(),
                dtype: other.as_str().to_owned(),
                expected: "F32, F64, F16 or BF16 for a rewritten tensor".to_owned(),
            })
        }
    })
}

/// Little-endian bytes of `values` (the I64 payload of a safetensors tensor).
pub fn encode_i64(values: &[i64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}
