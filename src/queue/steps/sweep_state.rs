//! What a calibrated step has done so far, saved after a block so that a rescued job resumes
//! at the next block: the compressed weights, the layer reports, and GPTQ's codes (packed)
//! or GGUF blocks when the step writes them. A safetensors file: `w.{name}` (f32 values),
//! `c.{name}` / `s.{name}` / `z.{name}` (codes, scales, zero-points), `e.{name}` (GGUF
//! blocks), the rest as JSON under [`METADATA_KEY`].

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};

use crate::compress::formats::gguf::GgufType;
use crate::compress::formats::safetensors::{self, Dtype, TensorSpec};
use crate::compress::quant::{Params, Quantized, Scheme};
use crate::compress::{Error, Result};

/// Where the state's JSON is kept in the file's metadata.
pub const METADATA_KEY: &str = "whittle.calibration_checkpoint";

/// The state of a calibrated step's sweep.
#[derive(Debug, Default)]
pub struct SweepState {
    /// Blocks done.
    pub blocks: usize,
    /// Layer reports, in order.
    pub layers: Vec<Value>,
    /// Compressed weights by name (row-major values).
    pub changed: HashMap<String, Vec<f32>>,
    /// GPTQ's codes (for `packed`).
    pub codes: HashMap<String, Quantized>,
    /// GGUF blocks (for `gguf`).
    pub encoded: HashMap<String, (GgufType, Vec<u8>)>,
}

fn bad(detail: impl std::fmt::Display) -> Error {
    Error::Internal(format!("unreadable calibration checkpoint: {detail}"))
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

impl SweepState {
    /// The state as a safetensors file, streamed into `out` tensor by tensor (the weights of
    /// a large model are not copied whole).
    pub fn write_to(&self, out: &mut dyn std::io::Write) -> Result<u64> {
        // (spec, source) in file order; sources are encoded as they are written.
        enum Source<'a> {
            F32(&'a [f32]),
            U8(&'a [u8]),
        }
        let mut parts: Vec<(TensorSpec, Source<'_>)> = Vec::new();
        let mut sorted: Vec<&String> = self.changed.keys().collect();
        sorted.sort();
        let mut codes = serde_json::Map::new();
        let mut encoded = serde_json::Map::new();
        let spec = |name: String, dtype: Dtype, n: usize| TensorSpec::new(name, dtype, vec![n]);
        for name in sorted {
            let v = &self.changed[name];
            parts.push((
                spec(format!("w.{name}"), Dtype::F32, v.len()),
                Source::F32(v),
            ));
            if let Some(q) = self.codes.get(name) {
                let p = &q.params;
                parts.push((
                    spec(format!("c.{name}"), Dtype::U8, q.codes.len()),
                    Source::U8(&q.codes),
                ));
                parts.push((
                    spec(format!("s.{name}"), Dtype::F32, p.scales.len()),
                    Source::F32(&p.scales),
                ));
                parts.push((
                    spec(format!("z.{name}"), Dtype::U8, p.zero_points.len()),
                    Source::U8(&p.zero_points),
                ));
                codes.insert(
                    name.clone(),
                    json!({"bits": p.bits, "block_len": p.block_len,
                           "affine": p.scheme == Scheme::Affine}),
                );
            }
            if let Some((ty, blocks)) = self.encoded.get(name) {
                parts.push((
                    spec(format!("e.{name}"), Dtype::U8, blocks.len()),
                    Source::U8(blocks),
                ));
                encoded.insert(name.clone(), json!(ty.as_str()));
            }
        }
        let meta = json!({"version": 1, "blocks": self.blocks, "layers": self.layers,
                          "codes": codes, "encoded": encoded});
        let metadata = BTreeMap::from([(METADATA_KEY.to_string(), meta.to_string())]);
        let specs: Vec<TensorSpec> = parts.iter().map(|(s, _)| s.clone()).collect();
        safetensors::write_safetensors(out, &metadata, &specs, |i, w| {
            match parts[i].1 {
                Source::F32(v) => w.write_all(&safetensors::encode_f32(v))?,
                Source::U8(b) => w.write_all(b)?,
            }
            Ok(())
        })
    }

    /// [`SweepState::write_to`] into memory.
    #[cfg(test)]
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.write_to(&mut out)?;
        Ok(out)
    }

    /// Parses what [`SweepState::write_to`] wrote.
    pub fn from_bytes(bytes: &[u8]) -> Result<SweepState> {
        let header = safetensors::parse_header(bytes, bytes.len() as u64)?;
        let meta: Value = header
            .metadata
            .get(METADATA_KEY)
            .ok_or_else(|| bad(format!("no {METADATA_KEY}")))
            .and_then(|t| serde_json::from_str(t).map_err(bad))?;
        if meta["version"] != 1 {
            return Err(bad(format!("version {}", meta["version"])));
        }
        let mut data: HashMap<&str, &[u8]> = HashMap::new();
        for t in &header.tensors {
            let (a, b) = (
                header.data_start + t.data_offsets.0,
                header.data_start + t.data_offsets.1,
            );
            data.insert(
                t.name.as_str(),
                bytes.get(a..b).ok_or_else(|| bad(&t.name))?,
            );
        }
        let mut state = SweepState {
            blocks: meta["blocks"].as_u64().ok_or_else(|| bad("blocks"))? as usize,
            layers: meta["layers"].as_array().cloned().unwrap_or_default(),
            ..Default::default()
        };
        for (key, values) in &data {
            if let Some(name) = key.strip_prefix("w.") {
                state.changed.insert(name.to_string(), f32s(values));
            }
        }
        for (name, p) in meta["codes"].as_object().into_iter().flatten() {
            let get = |prefix: &str| {
                data.get(format!("{prefix}.{name}").as_str())
                    .copied()
                    .ok_or_else(|| bad(format!("{prefix}.{name}")))
            };
            let params = Params {
                bits: p["bits"].as_u64().ok_or_else(|| bad("bits"))? as u8,
                scheme: if p["affine"] == true {
                    Scheme::Affine
                } else {
                    Scheme::Symmetric
                },
                block_len: p["block_len"].as_u64().ok_or_else(|| bad("block_len"))? as usize,
                scales: f32s(get("s")?),
                zero_points: get("z")?.to_vec(),
                codebook: Vec::new(),
            };
            let dequantized = state
                .changed
                .get(name)
                .cloned()
                .ok_or_else(|| bad(format!("no weights of {name}")))?;
            state.codes.insert(
                name.clone(),
                Quantized {
                    codes: get("c")?.to_vec(),
                    params,
                    dequantized,
                },
            );
        }
        for (name, ty) in meta["encoded"].as_object().into_iter().flatten() {
            let ty: GgufType = ty.as_str().unwrap_or("").parse().map_err(bad)?;
            let blocks = data
                .get(format!("e.{name}").as_str())
                .ok_or_else(|| bad(format!("e.{name}")))?;
            state.encoded.insert(name.clone(), (ty, blocks.to_vec()));
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_survives_its_file() {
        let mut s = SweepState {
            blocks: 3,
            layers: vec![json!({"layer": "a.weight", "output_error": 0.25})],
            ..Default::default()
        };
        s.changed
            .insert("a.weight".into(), vec![1.0, -2.5, 3.0, 0.0]);
        s.changed.insert("b.weight".into(), vec![0.5; 64]);
        s.codes.insert(
            "a.weight".into(),
            Quantized {
                codes: vec![1, 2, 3, 4],
                params: Params {
                    bits: 3,
                    scheme: Scheme::Affine,
                    block_len: 2,
                    scales: vec![0.5, 0.25],
                    zero_points: vec![3, 4],
                    codebook: Vec::new(),
                },
                dequantized: vec![1.0, -2.5, 3.0, 0.0],
            },
        );
        s.encoded
            .insert("b.weight".into(), (GgufType::Q4_0, vec![7u8; 36]));
        let back = SweepState::from_bytes(&s.to_bytes().unwrap()).unwrap();
        assert_eq!(back.blocks, 3);
        assert_eq!(back.layers, s.layers);
        assert_eq!(back.changed, s.changed);
        let (a, b) = (&back.codes["a.weight"], &s.codes["a.weight"]);
        assert_eq!(a.codes, b.codes);
        assert_eq!(a.params, b.params);
        assert_eq!(a.dequantized, b.dequantized);
        assert_eq!(back.encoded, s.encoded);
        assert!(SweepState::from_bytes(b"not a file").is_err());
    }
}
