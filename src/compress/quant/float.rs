//! `quantize` with `method: float`: casting selected tensors to f16 or bf16, streamed tensor by
//! tensor so peak memory is bounded by the largest tensor, not the model; and the error
//! statistics every quantizer reports ([`ErrorStats`]).

use std::collections::{BTreeMap, HashSet};
use std::io::Write;

use half::{bf16, f16};
use serde::Serialize;

use crate::compress::formats::safetensors::{
    write_safetensors, Dtype, SafetensorsFile, TensorSpec,
};
use crate::compress::progress::Ctx;
use crate::compress::Result;

/// Target of float quantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatDtype {
    /// IEEE 754 half precision.
    F16,
    /// bfloat16 (f32's exponent, 7-bit mantissa).
    Bf16,
}

impl FloatDtype {
    /// API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }

    fn dtype(self) -> Dtype {
        match self {
            Self::F16 => Dtype::F16,
            Self::Bf16 => Dtype::BF16,
        }
    }
}

/// Weight-level figures for one tensor.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TensorReport {
    /// Tensor name.
    pub tensor: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Whether the operation changed it.
    pub changed: bool,
    /// Dtype before.
    pub dtype_before: String,
    /// Dtype after.
    pub dtype_after: String,
    /// Bytes before.
    pub bytes_before: u64,
    /// Bytes after.
    pub bytes_after: u64,
    /// Largest |w − ŵ|.
    pub max_abs_error: f64,
    /// Mean squared error.
    pub mse: f64,
    /// Signal-to-quantization-noise ratio, dB (`null` when the error is zero).
    pub sqnr_db: Option<f64>,
}

/// Cast the tensors named in `selected` to `target`, copy the rest unchanged, and write a
/// safetensors file with `metadata` to `out`. Returns one report per tensor, in file order.
pub fn quantize_float(
    input: &SafetensorsFile,
    selected: &HashSet<String>,
    target: FloatDtype,
    metadata: &BTreeMap<String, String>,
    out: &mut dyn Write,
    ctx: &Ctx,
) -> Result<Vec<TensorReport>> {
    let tensors = &input.header().tensors;
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dtype: if selected.contains(&t.name) && t.dtype.is_float() {
                target.dtype()
            } else {
                t.dtype
            },
            shape: t.shape.clone(),
        })
        .collect();
    let mut reports = Vec::with_capacity(tensors.len());
    let total = tensors.len().max(1) as f64;
    write_safetensors(out, metadata, &specs, |i, w| {
        ctx.check()?;
        let info = &tensors[i];
        let spec = &specs[i];
        let mut report = TensorReport {
            tensor: info.name.clone(),
            shape: info.shape.clone(),
            changed: false,
            dtype_before: info.dtype.as_str().to_string(),
            dtype_after: spec.dtype.as_str().to_string(),
            bytes_before: info.nbytes() as u64,
            bytes_after: info.nbytes() as u64,
            max_abs_error: 0.0,
            mse: 0.0,
            sqnr_db: None,
        };
        if spec.dtype == info.dtype {
            w.write_all(input.bytes(info))?;
        } else {
            let values = input.to_f32(info)?;
            let (bytes, stats) = cast(&values, target);
            w.write_all(&bytes)?;
            report.changed = true;
            report.bytes_after = bytes.len() as u64;
            report.max_abs_error = stats.max_abs;
            report.mse = stats.mse();
            report.sqnr_db = stats.sqnr_db();
        }
        reports.push(report);
        ctx.report(
            (i + 1) as f64 / total,
            &format!("tensor {}/{}", i + 1, tensors.len()),
        );
        Ok(())
    })?;
    Ok(reports)
}

/// Running error statistics of a reconstruction.
#[derive(Debug, Default, Clone, Copy)]
pub struct ErrorStats {
    /// Σ w².
    pub signal: f64,
    /// Σ (w − ŵ)².
    pub noise: f64,
    /// max |w − ŵ|.
    pub max_abs: f64,
    /// Number of elements.
    pub count: u64,
}

impl ErrorStats {
    /// Account for one original / reconstructed pair.
    #[inline]
    pub fn add(&mut self, w: f32, q: f32) {
        let (w, q) = (w as f64, q as f64);
        let e = w - q;
        self.signal += w * w;
        self.noise += e * e;
        self.max_abs = self.max_abs.max(e.abs());
        self.count += 1;
    }

    /// [`ErrorStats::add`] for every pair of `values` and `back`, in 8 independent lanes so
    /// the loop vectorises (same f64 arithmetic; the sums in another order).
    pub fn add_slices(&mut self, values: &[f32], back: &[f32]) {
        const LANES: usize = 8;
        let (mut signal, mut noise, mut max) = ([0f64; LANES], [0f64; LANES], [0f64; LANES]);
        let (w_chunks, q_chunks) = (values.chunks_exact(LANES), back.chunks_exact(LANES));
        let (w_rest, q_rest) = (w_chunks.remainder(), q_chunks.remainder());
        for (w, q) in w_chunks.zip(q_chunks) {
            for i in 0..LANES {
                let (w, q) = (f64::from(w[i]), f64::from(q[i]));
                let e = w - q;
                signal[i] += w * w;
                noise[i] += e * e;
                max[i] = max[i].max(e.abs());
            }
        }
        self.signal += signal.iter().sum::<f64>();
        self.noise += noise.iter().sum::<f64>();
        self.max_abs = max.iter().fold(self.max_abs, |m, &v| m.max(v));
        self.count += (values.len() - w_rest.len()) as u64;
        for (&w, &q) in w_rest.iter().zip(q_rest) {
            self.add(w, q);
        }
    }

    /// Adds the statistics of another part of the same tensor.
    pub fn merge(&mut self, other: &ErrorStats) {
        self.signal += other.signal;
        self.noise += other.noise;
        self.max_abs = self.max_abs.max(other.max_abs);
        self.count += other.count;
    }

    /// Mean squared error.
    pub fn mse(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.noise / self.count as f64
        }
    }

    /// 10·log10(signal / noise); `None` when there is no noise.
    pub fn sqnr_db(&self) -> Option<f64> {
        (self.noise > 0.0).then(|| 10.0 * (self.signal / self.noise).log10())
    }
}

fn cast(values: &[f32], target: FloatDtype) -> (Vec<u8>, ErrorStats) {
    let mut stats = ErrorStats::default();
    let mut bytes = Vec::with_capacity(values.len() * 2);
    for &v in values {
        let (b, back) = match target {
            FloatDtype::F16 => {
                let h = f16::from_f32(v);
                (h.to_le_bytes(), h.to_f32())
            }
            FloatDtype::Bf16 => {
                let h = bf16::from_f32(v);
                (h.to_le_bytes(), h.to_f32())
            }
        };
        bytes.extend_from_slice(&b);
        stats.add(v, back);
    }
    (bytes, stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_cast_is_exact_for_representable_values_and_reports_error_otherwise() {
        let (bytes, stats) = cast(&[1.0, -2.5, 0.0], FloatDtype::F16);
        assert_eq!(bytes.len(), 6);
        assert_eq!(stats.max_abs, 0.0);
        assert_eq!(stats.sqnr_db(), None);
        let (_, stats) = cast(&[0.1], FloatDtype::F16);
        // 0.1 in f16 is 0.0999755859375.
        assert!((stats.max_abs - (0.1f32 as f64 - 0.0999755859375)).abs() < 1e-9);
        assert!(stats.sqnr_db().unwrap() > 60.0);
    }

    #[test]
    fn bf16_keeps_range_but_loses_mantissa() {
        let (bytes, stats) = cast(&[1.0e30, 3.0], FloatDtype::Bf16);
        assert_eq!(bytes.len(), 4);
        assert_eq!(bf16::from_le_bytes([bytes[2], bytes[3]]).to_f32(), 3.0);
        assert!(stats.max_abs / 1.0e30 < 1.0 / 128.0);
    }
}
