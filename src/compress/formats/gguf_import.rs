//! GGUF import: a llama.cpp GGUF file becomes a Hugging Face model folder (API.md "Model
//! folders and families"): `model.safetensors` with every tensor dequantized to f32 under its
//! Hugging Face name, `config.json` from the GGUF hyper-parameters, and `tokenizer.json`
//! rebuilt from `tokenizer.ggml.*` ([`super::gguf_vocab`]) — what Hugging Face `transformers`
//! builds when it loads the same file with `gguf_file=`.
//!
//! llama.cpp's converter permutes the rows of the query and key projections (it interleaves
//! the two halves of each head's rotary dimensions); the import undoes it. Tensors are read,
//! dequantized (candle's ggml decoders, the same f32 arithmetic as gguf-py) and written one at
//! a time, so memory holds one tensor, not the model. Only the `llama` architecture is
//! imported (it covers Llama, Mistral-style and SmolLM models); others are refused naming it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Write};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value as GgufValue};
use candle_core::Device;
use serde_json::{json, Map, Value};

use super::gguf_vocab::{self, uint_of};
use super::safetensors::{encode_f32, write_safetensors, Dtype, TensorSpec};
use crate::compress::{Error, Result};

/// The GGUF architectures imported.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

/// Whether `bytes` start like a GGUF file.
pub fn is_gguf(bytes: &[u8]) -> bool {
    bytes.starts_with(b"GGUF")
}

/// The folder files an import produced besides the weights.
#[derive(Debug, Clone)]
pub struct Imported {
    /// `config.json`.
    pub config: Value,
    /// `tokenizer.json`, when the file describes its tokenizer.
    pub tokenizer: Option<Value>,
    /// `tokenizer_config.json` (special tokens, `add_bos_token`, the chat template).
    pub tokenizer_config: Option<Value>,
    /// `generation_config.json`.
    pub generation_config: Value,
    /// Tensors written.
    pub tensors: usize,
    /// What the import left out or changed, in words (e.g. a dropped `rope_freqs`).
    pub notes: Vec<String>,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidModelFolder(format!("GGUF import: {}", msg.into()))
}

/// A metadata reader over the file's key-value pairs.
struct Meta<'a> {
    map: &'a std::collections::HashMap<String, GgufValue>,
    arch: String,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&GgufValue> {
        self.map.get(key)
    }

    fn arch_key(&self, key: &str) -> String {
        format!("{}.{key}", self.arch)
    }

    fn uint(&self, key: &str) -> Result<Option<u64>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        uint_of(v)
            .map(Some)
            .ok_or_else(|| invalid(format!("`{key}` is not a non-negative integer")))
    }

    fn float(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::F32(v)) => Ok(Some(f64::from(*v))),
            Some(GgufValue::F64(v)) => Ok(Some(*v)),
            Some(_) => Err(invalid(format!("`{key}` is not a float"))),
        }
    }

    fn required(&self, key: &str) -> Result<usize> {
        let full = self.arch_key(key);
        let v = self
            .uint(&full)?
            .ok_or_else(|| invalid(format!("the file has no `{full}`")))?;
        usize::try_from(v)
            .ok()
            .filter(|&v| v > 0 && v < (1 << 31))
            .ok_or_else(|| invalid(format!("`{full}` = {v} is out of range")))
    }
}

/// Hugging Face name of a llama.cpp tensor name; `None` for tensors transformers drops.
fn hf_name(gguf: &str, blocks: usize) -> Result<Option<String>> {
    let direct = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        "rope_freqs.weight" => return Ok(None),
        _ => None,
    };
    if let Some(n) = direct {
        return Ok(Some(n.to_string()));
    }
    let unknown = || {
        invalid(format!(
            "tensor `{gguf}` has no Hugging Face llama counterpart"
        ))
    };
    let rest = gguf.strip_prefix("blk.").ok_or_else(unknown)?;
    let (block, rest) = rest.split_once('.').ok_or_else(unknown)?;
    let block: usize = block.parse().map_err(|_| unknown())?;
    if block >= blocks {
        return Err(invalid(format!(
            "tensor `{gguf}` belongs to block {block}, but the file declares {blocks} blocks"
        )));
    }
    let (part, kind) = rest.rsplit_once('.').ok_or_else(unknown)?;
    if part == "attn_rot_embd" {
        return Ok(None);
    }
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return Err(unknown()),
    };
    if kind != "weight" && kind != "bias" {
        return Err(unknown());
    }
    Ok(Some(format!("model.layers.{block}.{hf}.{kind}")))
}

/// The position of a Hugging Face llama tensor in a state dict (embeddings, blocks in order,
/// final norm, head), for writing the file in the order `transformers` saves it.
fn order_key(name: &str) -> (usize, usize, String) {
    const IN_BLOCK: [&str; 9] = [
        "input_layernorm",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "post_attention_layernorm",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ];
    if name.starts_with("model.embed_tokens") {
        return (0, 0, name.into());
    }
    if let Some(rest) = name.strip_prefix("model.layers.") {
        if let Some((b, part)) = rest.split_once('.') {
            let pos = IN_BLOCK
                .iter()
                .position(|p| part.starts_with(p))
                .unwrap_or(IN_BLOCK.len());
            return (1 + b.parse::<usize>().unwrap_or(0), pos, part.into());
        }
    }
    if name.starts_with("model.norm") {
        return (usize::MAX - 1, 0, name.into());
    }
    (usize::MAX, 0, name.into())
}

/// Undoes llama.cpp's row permutation of a query or key projection: within each of `heads`
/// heads, GGUF row `2i + j` is Hugging Face row `j·(d/2) + i` (`d` = rows per head).
pub fn unpermute_rows(values: &[f32], rows: usize, heads: usize) -> Result<Vec<f32>> {
    if heads == 0
        || !rows.is_multiple_of(heads)
        || !(rows / heads).is_multiple_of(2)
        || !values.len().is_multiple_of(rows)
    {
        return Err(invalid(format!(
            "{rows} rows do not split into {heads} heads of an even width"
        )));
    }
    let cols = values.len() / rows;
    let d = rows / heads;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for j in 0..2 {
                let from = h * d + 2 * i + j;
                let to = h * d + j * (d / 2) + i;
                out[to * cols..(to + 1) * cols]
                    .copy_from_slice(&values[from * cols..(from + 1) * cols]);
            }
        }
    }
    Ok(out)
}

/// Imports the GGUF file at `path`: writes the f32 safetensors weights (with `metadata`) to
/// `weights` and returns the folder's other files. Refuses (nothing useful written) files
/// that are not GGUF, architectures other than [`SUPPORTED_ARCHITECTURES`], and tensors that
/// do not fit the declared hyper-parameters.
pub fn import_gguf(
    path: &Path,
    metadata: &BTreeMap<String, String>,
    weights: &mut dyn Write,
) -> Result<Imported> {
    // candle's reader checks every length against the file; a hostile header that still
    // trips an arithmetic panic (e.g. an alignment of 0) is refused, not a crash.
    let content = std::panic::catch_unwind(|| -> Result<Content> {
        let mut reader = BufReader::new(File::open(path)?);
        Content::read(&mut reader).map_err(|e| invalid(format!("not a readable GGUF file: {e}")))
    })
    .map_err(|_| invalid("the GGUF header is malformed"))??;
    let arch = match content.metadata.get("general.architecture") {
        Some(GgufValue::String(s)) => s.clone(),
        _ => return Err(invalid("the file has no `general.architecture`")),
    };
    if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
        return Err(Error::UnsupportedFamily(format!(
            "GGUF architecture `{arch}` is not imported; supported: {}",
            SUPPORTED_ARCHITECTURES.join(", ")
        )));
    }
    let meta = Meta {
        map: &content.metadata,
        arch,
    };
    let blocks = meta.required("block_count")?;
    let hidden = meta.required("embedding_length")?;
    let ffn = meta.required("feed_forward_length")?;
    let heads = meta.required("attention.head_count")?;
    let kv_heads = match meta.uint(&meta.arch_key("attention.head_count_kv"))? {
        Some(v) => usize::try_from(v).unwrap_or(0),
        None => heads,
    };
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(invalid(format!(
            "{heads} query heads do not share {kv_heads} key/value heads evenly"
        )));
    }
    let head_dim = match meta.uint(&meta.arch_key("attention.key_length"))? {
        Some(v) => usize::try_from(v).unwrap_or(0),
        None => match meta.uint(&meta.arch_key("rope.dimension_count"))? {
            Some(v) => usize::try_from(v).unwrap_or(0),
            None => hidden / heads,
        },
    };
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(invalid(format!("a head width of {head_dim} is not even")));
    }

    // Every tensor, under its Hugging Face name, in state-dict order.
    let mut plan: Vec<(String, String, Vec<usize>)> = Vec::new();
    let mut notes = Vec::new();
    for (name, info) in &content.tensor_infos {
        match hf_name(name, blocks)? {
            Some(hf) => plan.push((hf, name.clone(), info.shape.dims().to_vec())),
            None => notes.push(format!(
                "`{name}` was left out (transformers derives it from the config)"
            )),
        }
    }
    plan.sort_by_key(|p| order_key(&p.0));
    let embed = plan
        .iter()
        .find(|p| p.0 == "model.embed_tokens.weight")
        .ok_or_else(|| invalid("the file has no `token_embd.weight`"))?;
    if embed.2.len() != 2 || embed.2[1] != hidden {
        return Err(invalid(format!(
            "`token_embd.weight` has shape {:?}, not [vocab, {hidden}]",
            embed.2
        )));
    }
    let vocab = embed.2[0];
    let tied = !plan.iter().any(|p| p.0 == "lm_head.weight");
    let q_rows = heads * head_dim;
    let kv_rows = kv_heads * head_dim;
    for (hf, gguf, shape) in &plan {
        let want: Option<Vec<usize>> = if hf.ends_with("q_proj.weight") {
            Some(vec![q_rows, hidden])
        } else if hf.ends_with("k_proj.weight") || hf.ends_with("v_proj.weight") {
            Some(vec![kv_rows, hidden])
        } else if hf.ends_with("o_proj.weight") {
            Some(vec![hidden, q_rows])
        } else if hf.ends_with("gate_proj.weight") || hf.ends_with("up_proj.weight") {
            Some(vec![ffn, hidden])
        } else if hf.ends_with("down_proj.weight") {
            Some(vec![hidden, ffn])
        } else if hf.ends_with("layernorm.weight") || hf == "model.norm.weight" {
            Some(vec![hidden])
        } else if hf == "lm_head.weight" {
            Some(vec![vocab, hidden])
        } else {
            None
        };
        if let Some(w) = want {
            if &w != shape {
                return Err(invalid(format!(
                    "`{gguf}` has shape {shape:?}; the hyper-parameters say {w:?}"
                )));
            }
        }
    }

    // The weights, one tensor at a time.
    let specs: Vec<TensorSpec> = plan
        .iter()
        .map(|(hf, _, shape)| TensorSpec::new(hf.clone(), Dtype::F32, shape.clone()))
        .collect();
    let mut reader = BufReader::new(File::open(path)?);
    let mut meta_out = metadata.clone();
    meta_out
        .entry("format".into())
        .or_insert_with(|| "pt".into());
    write_safetensors(weights, &meta_out, &specs, |i, w| {
        let (hf, gguf, shape) = &plan[i];
        let q = content
            .tensor(&mut reader, gguf, &Device::Cpu)
            .map_err(|e| invalid(format!("tensor `{gguf}`: {e}")))?;
        let mut values = q
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .map_err(|e| invalid(format!("tensor `{gguf}`: {e}")))?;
        if values.iter().any(|v| !v.is_finite()) {
            return Err(invalid(format!("tensor `{gguf}` holds non-finite values")));
        }
        let rows = shape[0];
        if hf.contains("self_attn.q_proj.") {
            values = unpermute_rows(&values, rows, heads)?;
        } else if hf.contains("self_attn.k_proj.") {
            values = unpermute_rows(&values, rows, kv_heads)?;
        }
        w.write_all(&encode_f32(&values))?;
        Ok(())
    })?;

    let config = config_json(
        &meta,
        ConfigShape {
            blocks,
            hidden,
            ffn,
            heads,
            kv_heads,
            head_dim,
            vocab,
            tied,
            attention_bias: plan.iter().any(|p| p.0.ends_with("q_proj.bias")),
        },
    )?;
    let (tokenizer, tokenizer_config) = match gguf_vocab::from_metadata(&content.metadata)? {
        Some(t) => (Some(t.tokenizer), Some(t.tokenizer_config)),
        None => (None, None),
    };
    let mut generation = Map::new();
    for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
        if let Some(v) = config.get(key).filter(|v| !v.is_null()) {
            generation.insert(key.into(), v.clone());
        }
    }
    Ok(Imported {
        config,
        tokenizer,
        tokenizer_config,
        generation_config: Value::Object(generation),
        tensors: plan.len(),
        notes,
    })
}

struct ConfigShape {
    blocks: usize,
    hidden: usize,
    ffn: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    tied: bool,
    attention_bias: bool,
}

/// `config.json` of the imported model, as `transformers` derives it from the metadata.
fn config_json(meta: &Meta, s: ConfigShape) -> Result<Value> {
    let eps = meta
        .float(&meta.arch_key("attention.layer_norm_rms_epsilon"))?
        .unwrap_or(1e-5);
    let theta = meta
        .float(&meta.arch_key("rope.freq_base"))?
        .unwrap_or(10_000.0);
    let context = meta.uint(&meta.arch_key("context_length"))?.unwrap_or(2048);
    let token_id = |key: &str| -> Result<Value> {
        Ok(meta
            .uint(&format!("tokenizer.ggml.{key}"))?
            .map_or(Value::Null, |v| json!(v)))
    };
    let mut config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": s.hidden,
        "intermediate_size": s.ffn,
        "num_hidden_layers": s.blocks,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "max_position_embeddings": context,
        "vocab_size": s.vocab,
        "tie_word_embeddings": s.tied,
        "attention_bias": s.attention_bias,
        "mlp_bias": false,
        "bos_token_id": token_id("bos_token_id")?,
        "eos_token_id": token_id("eos_token_id")?,
        "pad_token_id": token_id("padding_token_id")?,
        "unk_token_id": token_id("unknown_token_id")?,
        "torch_dtype": "float32",
        // transformers 5 reads `rope_parameters`, 4.x `rope_theta` and `rope_scaling`.
        "rope_parameters": {"rope_theta": theta, "rope_type": "default"},
    });
    if let Some(GgufValue::String(kind)) = meta.get(&meta.arch_key("rope.scaling.type")) {
        if kind != "none" {
            let factor = meta
                .float(&meta.arch_key("rope.scaling.factor"))?
                .unwrap_or(1.0);
            config["rope_scaling"] = json!({"rope_type": kind, "factor": factor});
            config["rope_parameters"] =
                json!({"rope_theta": theta, "rope_type": kind, "factor": factor});
        }
    }
    Ok(config)
}

/// The named tensors of a GGUF file, dequantized to f32 with candle's decoders (what a
/// GGUF reader would compute from the file).
pub fn dequantize_tensors(
    path: &std::path::Path,
    names: &[String],
) -> Result<std::collections::HashMap<String, Vec<f32>>> {
    use candle_core::quantized::gguf_file;
    let mut file = std::io::BufReader::new(std::fs::File::open(path)?);
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| Error::Internal(format!("reading back our GGUF file: {e}")))?;
    let device = candle_core::Device::Cpu;
    let mut out = std::collections::HashMap::new();
    for name in names {
        let q = content
            .tensor(&mut file, name, &device)
            .map_err(|e| Error::Internal(format!("GGUF tensor {name}: {e}")))?;
        let values = q.dequantize(&device)?.flatten_all()?.to_vec1::<f32>()?;
        out.insert(name.clone(), values);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face_and_sort_as_a_state_dict() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight", 4).unwrap().as_deref(),
            Some("model.layers.3.self_attn.q_proj.weight")
        );
        assert_eq!(hf_name("rope_freqs.weight", 4).unwrap(), None);
        assert!(
            hf_name("blk.4.attn_q.weight", 4).is_err(),
            "beyond the blocks"
        );
        assert!(hf_name("blk.0.mystery.weight", 4).is_err());
        assert!(hf_name("something", 4).is_err());
        let mut names = vec![
            "model.norm.weight",
            "model.layers.10.mlp.up_proj.weight",
            "model.layers.2.self_attn.q_proj.weight",
            "model.layers.2.input_layernorm.weight",
            "model.embed_tokens.weight",
        ];
        names.sort_by_key(|n| order_key(n));
        assert_eq!(
            names,
            [
                "model.embed_tokens.weight",
                "model.layers.2.input_layernorm.weight",
                "model.layers.2.self_attn.q_proj.weight",
                "model.layers.10.mlp.up_proj.weight",
                "model.norm.weight"
            ]
        );
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(heads, 2, d/2, cols).swapaxes(1, 2).reshape(w.shape).
        let (heads, d, cols) = (2usize, 4usize, 3usize);
        let rows = heads * d;
        let hf: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..heads {
            for two in 0..2 {
                for i in 0..d / 2 {
                    let from = h * d + two * (d / 2) + i; // [h, two, i]
                    let to = h * d + i * 2 + two; // [h, i, two]
                    gguf[to * cols..(to + 1) * cols]
                        .copy_from_slice(&hf[from * cols..(from + 1) * cols]);
                }
            }
        }
        assert_eq!(unpermute_rows(&gguf, rows, heads).unwrap(), hf);
        assert!(unpermute_rows(&gguf, rows, 3).is_err());
    }
}

/// The tiny GGUF files of `tests/fixtures/gguf/` (made by `scripts/make_gguf_fixtures.py`
/// with llama.cpp's `gguf` writer) imported as `transformers` loads them.
#[cfg(test)]
mod fixtures {
    use sha2::{Digest, Sha256};

    use super::*;
    use crate::compress::engine::data::{Document, TextEncoder};
    use crate::compress::engine::Mode;
    use crate::compress::formats::safetensors::SafetensorsFile;

    fn dir() -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf")
    }

    fn check(name: &str) {
        let all: Value =
            serde_json::from_slice(&std::fs::read(dir().join("expected.json")).unwrap()).unwrap();
        let want = &all["files"][name];
        let out = tempfile::NamedTempFile::new().unwrap();
        let imported = {
            let mut w = std::fs::File::create(out.path()).unwrap();
            import_gguf(
                &dir().join(format!("{name}.gguf")),
                &BTreeMap::new(),
                &mut w,
            )
            .unwrap()
        };
        for (key, v) in want["config"].as_object().unwrap() {
            let got = &imported.config[key];
            match (got.as_f64(), v.as_f64()) {
                (Some(a), Some(b)) => {
                    assert!((a - b).abs() <= 1e-9 * b.abs(), "{name} {key}: {a} vs {b}")
                }
                _ => assert_eq!(got, v, "{name} {key}"),
            }
        }
        // Every tensor bit for bit.
        let file = SafetensorsFile::open(out.path()).unwrap();
        let tensors = want["tensors"].as_object().unwrap();
        assert_eq!(file.header().tensors.len(), tensors.len(), "{name}");
        for (hf, t) in tensors {
            let info = file.get(hf).unwrap_or_else(|| panic!("{name}: no {hf}"));
            assert_eq!(json!(info.shape), t["shape"], "{hf}");
            let sha = hex::encode(Sha256::digest(file.bytes(info)));
            assert_eq!(sha, t["sha256_f32le"].as_str().unwrap(), "{name}: {hf}");
        }
        // The tokenizer is transformers' rebuild (but for one token transformers adds that the
        // model has no embedding for), and gives its ids.
        let mut reference: Value = serde_json::from_slice(
            &std::fs::read(dir().join(format!("{name}.tokenizer.json"))).unwrap(),
        )
        .unwrap();
        let vocab = imported.config["vocab_size"].as_u64().unwrap();
        if let Some(added) = reference["added_tokens"].as_array_mut() {
            added.retain(|t| t["id"].as_u64().unwrap() < vocab);
        }
        let ours = imported.tokenizer.unwrap();
        for key in [
            "added_tokens",
            "normalizer",
            "pre_tokenizer",
            "post_processor",
            "decoder",
            "model",
        ] {
            assert_eq!(ours[key], reference[key], "{name} {key}");
        }
        let enc = TextEncoder::from_bytes(ours.to_string().as_bytes()).unwrap();
        for t in want["texts"].as_array().unwrap() {
            let doc = Document {
                text: t["text"].as_str().unwrap().into(),
                pair: None,
            };
            let ids: Vec<u32> = t["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(
                enc.encode(&doc, 1 << 20).unwrap().ids,
                ids,
                "{name}: {:?}",
                doc.text
            );
        }
        // The imported folder runs as transformers runs the GGUF.
        let net = crate::compress::engine::families::load(&imported.config, &file, None).unwrap();
        let expected = SafetensorsFile::open(dir().join("expected.safetensors")).unwrap();
        let ids_info = expected.get(&format!("{name}.input_ids")).unwrap();
        let ids: Vec<u32> = expected
            .to_i64(ids_info)
            .unwrap()
            .into_iter()
            .map(|v| v as u32)
            .collect();
        let n = ids.len();
        let batch = crate::compress::engine::data::Batch {
            x: candle_core::Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap(),
            mask: None,
            segments: None,
            y: None,
            labels: None,
            len: 1,
            indices: vec![0],
        };
        let got = net
            .forward(&batch, Mode::Eval)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want_logits = expected
            .to_f32(expected.get(&format!("{name}.logits")).unwrap())
            .unwrap();
        assert_eq!(got.len(), want_logits.len());
        let diff = got
            .iter()
            .zip(&want_logits)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "{name}: logits differ by {diff}");
    }

    #[test]
    fn byte_level_bpe_gguf_imports_as_transformers_loads_it() {
        check("tiny-llama-bpe");
    }

    #[test]
    fn sentencepiece_gguf_imports_as_transformers_loads_it() {
        check("tiny-spm");
    }

    #[test]
    fn bad_files_are_refused_not_panicked_on() {
        let good = std::fs::read(dir().join("tiny-spm.gguf")).unwrap();
        let mut cases: Vec<(Vec<u8>, &str)> = vec![
            (b"GGUF".to_vec(), "readable"),
            (good[..good.len() / 2].to_vec(), "tensor"),
            (b"GGUF\x03\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff\x00\x00\x00\x00\x00\x00\x00\x00".to_vec(), "readable"),
        ];
        // Another architecture is refused, naming the supported one.
        let other = {
            let mut b = good.clone();
            let at = b.windows(5).position(|w| w == b"llama").unwrap();
            b[at..at + 5].copy_from_slice(b"gpt_2");
            b
        };
        cases.push((other, "supported: llama"));
        for (bytes, says) in cases {
            let tmp = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(tmp.path(), &bytes).unwrap();
            let e = import_gguf(tmp.path(), &BTreeMap::new(), &mut Vec::new()).unwrap_err();
            assert!(e.to_string().contains(says), "{e}");
        }
    }
}

/// Checks against the real SmolLM2-135M GGUF and the figures `transformers` computed from it
/// (`scripts/fetch_transformers.sh`, then `scripts/smollm2_reference.py`); run with
/// `cargo test --release -- --ignored smollm2_import`.
#[cfg(test)]
mod smollm2 {
    use super::*;

    #[test]
    #[ignore = "needs target/fixtures/smollm2 (scripts/fetch_transformers.sh)"]
    fn smollm2_import_matches_transformers() {
        let root =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/fixtures/smollm2");
        let expected: Value =
            serde_json::from_slice(&std::fs::read(root.join("reference/expected.json")).unwrap())
                .unwrap();
        let out = tempfile::NamedTempFile::new().unwrap();
        let started = std::time::Instant::now();
        let imported = {
            let mut w = std::io::BufWriter::new(std::fs::File::create(out.path()).unwrap());
            let i = import_gguf(
                &root.join("SmolLM2-135M-Instruct.Q4_1.gguf"),
                &BTreeMap::new(),
                &mut w,
            )
            .unwrap();
            w.flush().unwrap();
            i
        };
        eprintln!("import: {:.2} s", started.elapsed().as_secs_f64());
        assert_eq!(imported.tensors, 272);
        for key in [
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "vocab_size",
            "tie_word_embeddings",
            "bos_token_id",
            "eos_token_id",
        ] {
            assert_eq!(imported.config[key], expected["config"][key], "{key}");
        }
        let file = super::super::safetensors::SafetensorsFile::open(out.path()).unwrap();
        for (name, stats) in expected["tensor_stats"].as_object().unwrap() {
            if stats.get("tied_to").is_some() {
                assert!(file.get(name).is_none(), "{name} is tied, not stored");
                continue;
            }
            let t = file.get(name).unwrap_or_else(|| panic!("{name}"));
            let v = file.to_f32(t).unwrap();
            let sum: f64 = v.iter().map(|&x| f64::from(x)).sum();
            let first: Vec<f64> = v[..8.min(v.len())].iter().map(|&x| f64::from(x)).collect();
            let want: Vec<f64> = stats["first8"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            assert_eq!(first, want, "{name} first values");
            let want_sum = stats["sum"].as_f64().unwrap();
            assert!(
                (sum - want_sum).abs() <= 1e-6 * stats["abs_sum"].as_f64().unwrap(),
                "{name}: {sum} vs {want_sum}"
            );
        }
        // The rebuilt tokenizer is transformers' and tokenizes like it.
        let reference: Value =
            serde_json::from_slice(&std::fs::read(root.join("reference/tokenizer.json")).unwrap())
                .unwrap();
        let ours = imported.tokenizer.unwrap();
        for key in [
            "added_tokens",
            "normalizer",
            "pre_tokenizer",
            "post_processor",
            "decoder",
        ] {
            assert_eq!(ours[key], reference[key], "{key}");
        }
        assert_eq!(ours["model"]["merges"], reference["model"]["merges"]);
        assert_eq!(ours["model"]["vocab"], reference["model"]["vocab"]);
        let enc =
            crate::compress::engine::data::TextEncoder::from_bytes(ours.to_string().as_bytes())
                .unwrap();
        for doc in expected["wisdom_first3"].as_array().unwrap() {
            let d = crate::compress::engine::data::Document {
                text: doc["text"].as_str().unwrap().into(),
                pair: None,
            };
            let want: Vec<u32> = doc["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(enc.encode(&d, 1 << 20).unwrap().ids, want);
        }
    }
}
