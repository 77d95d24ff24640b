//! GGUF that llama.cpp runs, for `llama`-family folder models (API.md "GGUF that llama.cpp
//! runs"): the inverse of [`super::gguf_import`]. The export renames the Hugging Face tensors
//! to llama.cpp's names (`token_embd.weight`, `blk.N.attn_q.weight`, …), permutes the rows of
//! the query and key projections the way llama.cpp's converter does, and writes the
//! hyper-parameters (`general.architecture` `llama`, `llama.block_count`, …) and the
//! tokenizer (`tokenizer.ggml.*`, from `tokenizer.json`) as typed metadata.
//!
//! Tokenizers: byte-level BPE (`gpt2`: GPT-2, Llama 3, SmolLM, Qwen) with its merges, and
//! SentencePiece-style BPE with byte fallback (`llama`), whose scores llama.cpp merges by are
//! derived from the merge ranks (earlier merge, higher score).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;

use serde_json::Value;

use super::gguf::MetaValue;
use super::safetensors::{write_safetensors, SafetensorsFile, TensorInfo, TensorSpec};
use crate::compress::{Error, Result};

/// What a llama export needs besides the weights.
#[derive(Debug, Clone)]
pub struct LlamaGguf {
    /// Typed metadata: hyper-parameters and tokenizer.
    pub metadata: Vec<(String, MetaValue)>,
    /// Hugging Face tensor name → llama.cpp name, for every tensor written.
    pub names: BTreeMap<String, String>,
    /// Heads of the tensors whose rows are permuted (query: attention heads, key: KV heads).
    pub permuted: HashMap<String, usize>,
    /// What the export left out or approximated, in words.
    pub notes: Vec<String>,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::Unsupported(format!("GGUF export for llama.cpp: {}", msg.into()))
}

fn uint(config: &Value, key: &str) -> Option<u64> {
    config.get(key).and_then(Value::as_u64)
}

/// The llama.cpp name of a Hugging Face llama tensor; `None` for tensors llama.cpp derives.
fn gguf_name(hf: &str) -> Result<Option<String>> {
    let direct = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(d) = direct {
        return Ok(Some(d.into()));
    }
    if hf.ends_with("rotary_emb.inv_freq") {
        return Ok(None);
    }
    let unknown = || invalid(format!("tensor `{hf}` has no llama.cpp counterpart"));
    let rest = hf.strip_prefix("model.layers.").ok_or_else(unknown)?;
    let (block, part) = rest.split_once('.').ok_or_else(unknown)?;
    let block: usize = block.parse().map_err(|_| unknown())?;
    let (module, kind) = part.rsplit_once('.').ok_or_else(unknown)?;
    let name = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return Err(unknown()),
    };
    Ok(Some(format!("blk.{block}.{name}.{kind}")))
}

/// Plans the export of a llama model with `config` (its `config.json`), `tensors` and, when
/// it has them, `tokenizer` (`tokenizer.json`) and `tokenizer_config`.
pub fn plan(
    config: &Value,
    tensors: &[TensorInfo],
    tokenizer: Option<&Value>,
    name: &str,
) -> Result<LlamaGguf> {
    let need =
        |key: &str| uint(config, key).ok_or_else(|| invalid(format!("config.json has no `{key}`")));
    let hidden = need("hidden_size")?;
    let heads = need("num_attention_heads")?;
    let kv = uint(config, "num_key_value_heads").unwrap_or(heads);
    let layers = need("num_hidden_layers")?;
    let ffn = need("intermediate_size")?;
    let head_dim = uint(config, "head_dim").unwrap_or(hidden / heads.max(1));
    let theta = config
        .get("rope_theta")
        .or_else(|| config.pointer("/rope_parameters/rope_theta"))
        .and_then(Value::as_f64)
        .unwrap_or(10_000.0);
    let eps = config
        .get("rms_norm_eps")
        .and_then(Value::as_f64)
        .unwrap_or(1e-6);
    let context = uint(config, "max_position_embeddings").unwrap_or(2048);
    let vocab = tensors
        .iter()
        .find(|t| t.name == "model.embed_tokens.weight")
        .and_then(|t| t.shape.first().copied())
        .ok_or_else(|| invalid("the model has no model.embed_tokens.weight"))?;
    let scaling = config
        .get("rope_scaling")
        .filter(|v| !v.is_null())
        .or_else(|| {
            config
                .get("rope_parameters")
                .filter(|p| p.get("rope_type").and_then(Value::as_str) != Some("default"))
        });
    let u32_of = |v: u64| u32::try_from(v).map_err(|_| invalid(format!("{v} does not fit u32")));
    let mut metadata = vec![
        (
            "general.architecture".to_string(),
            MetaValue::Str("llama".into()),
        ),
        ("general.name".to_string(), MetaValue::Str(name.to_string())),
        (
            "llama.block_count".to_string(),
            MetaValue::U32(u32_of(layers)?),
        ),
        (
            "llama.context_length".to_string(),
            MetaValue::U32(u32_of(context)?),
        ),
        (
            "llama.embedding_length".to_string(),
            MetaValue::U32(u32_of(hidden)?),
        ),
        (
            "llama.feed_forward_length".to_string(),
            MetaValue::U32(u32_of(ffn)?),
        ),
        (
            "llama.attention.head_count".to_string(),
            MetaValue::U32(u32_of(heads)?),
        ),
        (
            "llama.attention.head_count_kv".to_string(),
            MetaValue::U32(u32_of(kv)?),
        ),
        (
            "llama.rope.freq_base".to_string(),
            MetaValue::F32(theta as f32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".to_string(),
            MetaValue::F32(eps as f32),
        ),
        (
            "llama.rope.dimension_count".to_string(),
            MetaValue::U32(u32_of(head_dim)?),
        ),
        (
            "llama.vocab_size".to_string(),
            MetaValue::U32(u32_of(vocab as u64)?),
        ),
    ];
    if head_dim * heads != hidden {
        metadata.push((
            "llama.attention.key_length".into(),
            MetaValue::U32(u32_of(head_dim)?),
        ));
        metadata.push((
            "llama.attention.value_length".into(),
            MetaValue::U32(u32_of(head_dim)?),
        ));
    }
    if let Some(s) = scaling {
        let kind = s
            .get("rope_type")
            .or_else(|| s.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("");
        match kind {
            "linear" => {
                let factor = s.get("factor").and_then(Value::as_f64).unwrap_or(1.0);
                metadata.push((
                    "llama.rope.scaling.type".into(),
                    MetaValue::Str("linear".into()),
                ));
                metadata.push((
                    "llama.rope.scaling.factor".into(),
                    MetaValue::F32(factor as f32),
                ));
            }
            other => {
                return Err(invalid(format!(
                    "RoPE scaling `{other}` is not exported (linear is)"
                )))
            }
        }
    }

    let mut names = BTreeMap::new();
    let mut permuted = HashMap::new();
    let mut notes = Vec::new();
    for t in tensors {
        match gguf_name(&t.name)? {
            Some(g) => {
                if t.name.contains("self_attn.q_proj.") {
                    permuted.insert(t.name.clone(), heads as usize);
                } else if t.name.contains("self_attn.k_proj.") {
                    permuted.insert(t.name.clone(), kv as usize);
                }
                names.insert(t.name.clone(), g);
            }
            None => notes.push(format!("`{}` left out (llama.cpp derives it)", t.name)),
        }
    }
    match tokenizer {
        Some(t) => metadata.extend(tokenizer_metadata(t, config, vocab, &mut notes)?),
        None => notes.push("no tokenizer.json: the file has no tokenizer metadata".into()),
    }
    Ok(LlamaGguf {
        metadata,
        names,
        permuted,
        notes,
    })
}

/// llama.cpp's row permutation of a query / key projection: within each head of `d` rows,
/// Hugging Face row `j·(d/2) + i` becomes row `2i + j`. Whole rows of `row_bytes` move.
pub fn permute_rows(bytes: &[u8], rows: usize, heads: usize, row_bytes: usize) -> Result<Vec<u8>> {
    if heads == 0
        || !rows.is_multiple_of(heads)
        || !(rows / heads).is_multiple_of(2)
        || bytes.len() != rows * row_bytes
    {
        return Err(invalid(format!(
            "{rows} rows do not split into {heads} heads of an even width"
        )));
    }
    let d = rows / heads;
    let mut out = vec![0u8; bytes.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for j in 0..2 {
                let from = h * d + j * (d / 2) + i;
                let to = h * d + 2 * i + j;
                out[to * row_bytes..(to + 1) * row_bytes]
                    .copy_from_slice(&bytes[from * row_bytes..(from + 1) * row_bytes]);
            }
        }
    }
    Ok(out)
}

/// Writes `input` renamed and permuted as `plan` says (bytes otherwise unchanged, any dtype),
/// in llama.cpp's order, with `metadata`: the file the GGUF writer then reads.
pub fn prepare(
    input: &SafetensorsFile,
    plan: &LlamaGguf,
    metadata: &BTreeMap<String, String>,
    out: &mut dyn Write,
) -> Result<()> {
    let infos: Vec<&TensorInfo> = input
        .header()
        .tensors
        .iter()
        .filter(|t| plan.names.contains_key(&t.name))
        .collect();
    let specs: Vec<TensorSpec> = infos
        .iter()
        .map(|t| TensorSpec::new(plan.names[&t.name].clone(), t.dtype, t.shape.clone()))
        .collect();
    write_safetensors(out, metadata, &specs, |i, w| {
        let t = infos[i];
        let bytes = input.bytes(t);
        match plan.permuted.get(&t.name) {
            Some(&heads) => {
                let rows = t.shape.first().copied().unwrap_or(0);
                let row_bytes = bytes.len() / rows.max(1);
                w.write_all(&permute_rows(bytes, rows, heads, row_bytes)?)?;
            }
            None => w.write_all(bytes)?,
        }
        Ok(())
    })?;
    Ok(())
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.*` metadata of a `tokenizer.json`.
fn tokenizer_metadata(
    t: &Value,
    config: &Value,
    vocab_size: usize,
    notes: &mut Vec<String>,
) -> Result<Vec<(String, MetaValue)>> {
    let model = &t["model"];
    if model["type"] != "BPE" {
        return Err(invalid(format!(
            "a {} tokenizer is not exported (BPE is)",
            model["type"]
        )));
    }
    let byte_fallback = model["byte_fallback"].as_bool().unwrap_or(false);
    let pre = &t["pre_tokenizer"];
    let byte_level = pre.to_string().contains("\"ByteLevel\"");
    let kind = match (byte_level, byte_fallback) {
        (true, _) => "gpt2",
        (false, true) => "llama",
        _ => {
            return Err(invalid(
                "a BPE tokenizer that is neither byte-level nor byte-fallback is not exported",
            ))
        }
    };
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    if let Some(v) = model["vocab"].as_object() {
        for (tok, id) in v {
            if let Some(i) = id.as_u64().map(|i| i as usize).filter(|&i| i < vocab_size) {
                tokens[i] = Some(tok.clone());
            }
        }
    }
    let mut types = vec![1i32; vocab_size];
    for a in t["added_tokens"].as_array().into_iter().flatten() {
        let Some(i) = a["id"]
            .as_u64()
            .map(|i| i as usize)
            .filter(|&i| i < vocab_size)
        else {
            continue;
        };
        tokens[i] = a["content"].as_str().map(str::to_string);
        types[i] = if a["special"].as_bool().unwrap_or(false) {
            3
        } else {
            4
        };
    }
    let missing = tokens.iter().filter(|t| t.is_none()).count();
    if missing > 0 {
        notes.push(format!(
            "{missing} ids have no token in tokenizer.json; written as [PAD<id>] (as llama.cpp's converter does)"
        ));
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
        .collect();
    let merges: Vec<String> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Value::String(s) => Some(s.clone()),
            Value::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
            _ => None,
        })
        .collect();
    let id_of = |name: &str| tokens.iter().position(|t| t == name);
    // The special tokens: config ids, else the post-processor's.
    let template = t["post_processor"]["single"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let special = |pos: usize| -> Option<String> {
        template
            .get(pos)
            .and_then(|e| e["SpecialToken"]["id"].as_str())
            .map(str::to_string)
    };
    let first_special = special(0);
    let last_special = template.len().checked_sub(1).and_then(special);
    let add_bos = first_special.is_some();
    let add_eos = template.len() > 1 && last_special.is_some();
    let bos = uint(config, "bos_token_id")
        .map(|v| v as usize)
        .or_else(|| first_special.as_deref().and_then(id_of));
    let eos = uint(config, "eos_token_id")
        .map(|v| v as usize)
        .or_else(|| last_special.as_deref().and_then(id_of));
    let mut out = vec![(
        "tokenizer.ggml.model".to_string(),
        MetaValue::Str(kind.into()),
    )];
    if kind == "gpt2" {
        let pre_name = if pre
            .to_string()
            .contains(&serde_json::to_string(LLAMA3_SPLIT).unwrap_or_default())
        {
            "llama-bpe"
        } else if pre
            .to_string()
            .contains(&serde_json::to_string(QWEN2_SPLIT).unwrap_or_default())
        {
            "qwen2"
        } else {
            // llama.cpp's name for the plain GPT-2 split (`gpt2` is the tokenizer model).
            "gpt-2"
        };
        out.push(("tokenizer.ggml.pre".into(), MetaValue::Str(pre_name.into())));
        out.push(("tokenizer.ggml.tokens".into(), MetaValue::Strs(tokens)));
        out.push(("tokenizer.ggml.token_type".into(), MetaValue::I32s(types)));
        out.push(("tokenizer.ggml.merges".into(), MetaValue::Strs(merges)));
    } else {
        // SentencePiece: byte tokens are type 6, the unknown token 2; llama.cpp merges the
        // pair whose result scores highest, so a token scores minus the rank of its merge.
        let mut rank: HashMap<String, usize> = HashMap::new();
        for (r, m) in merges.iter().enumerate() {
            rank.entry(m.replacen(' ', "", 1)).or_insert(r);
        }
        let unk = model["unk_token"]
            .as_str()
            .map(str::to_string)
            .or_else(|| Some("<unk>".into()));
        let mut scores = Vec::with_capacity(tokens.len());
        for (i, tok) in tokens.iter().enumerate() {
            let is_byte = tok.len() == 6 && tok.starts_with("<0x") && tok.ends_with('>');
            if is_byte {
                types[i] = 6;
            } else if Some(tok) == unk.as_ref() {
                types[i] = 2;
            }
            scores.push(rank.get(tok).map_or(0.0, |&r| -(r as f32) - 1.0));
        }
        let unk_id = unk.as_deref().and_then(id_of);
        out.push((
            "tokenizer.ggml.pre".into(),
            MetaValue::Str("default".into()),
        ));
        out.push(("tokenizer.ggml.tokens".into(), MetaValue::Strs(tokens)));
        out.push(("tokenizer.ggml.scores".into(), MetaValue::F32s(scores)));
        out.push(("tokenizer.ggml.token_type".into(), MetaValue::I32s(types)));
        if let Some(u) = unk_id {
            out.push((
                "tokenizer.ggml.unknown_token_id".into(),
                MetaValue::U32(u as u32),
            ));
        }
        notes.push("SentencePiece scores are derived from the merge ranks".into());
    }
    if let Some(b) = bos {
        out.push((
            "tokenizer.ggml.bos_token_id".into(),
            MetaValue::U32(b as u32),
        ));
    }
    if let Some(e) = eos {
        out.push((
            "tokenizer.ggml.eos_token_id".into(),
            MetaValue::U32(e as u32),
        ));
    }
    if let Some(p) = uint(config, "pad_token_id") {
        out.push((
            "tokenizer.ggml.padding_token_id".into(),
            MetaValue::U32(p as u32),
        ));
    }
    out.push((
        "tokenizer.ggml.add_bos_token".into(),
        MetaValue::Bool(add_bos),
    ));
    out.push((
        "tokenizer.ggml.add_eos_token".into(),
        MetaValue::Bool(add_eos),
    ));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_inverts_the_import_unpermute() {
        let (heads, d, cols) = (3usize, 4usize, 2usize);
        let rows = heads * d;
        let values: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let bytes = super::super::safetensors::encode_f32(&values);
        let permuted = permute_rows(&bytes, rows, heads, cols * 4).unwrap();
        let back: Vec<f32> = permuted
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let back = super::super::gguf_import::unpermute_rows(&back, rows, heads).unwrap();
        assert_eq!(back, values);
        assert_ne!(permuted, bytes);
    }

    #[test]
    fn names_map_to_llama_cpp() {
        assert_eq!(
            gguf_name("model.layers.7.mlp.down_proj.weight")
                .unwrap()
                .unwrap(),
            "blk.7.ffn_down.weight"
        );
        assert_eq!(
            gguf_name("model.embed_tokens.weight").unwrap().unwrap(),
            "token_embd.weight"
        );
        assert_eq!(
            gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq").unwrap(),
            None
        );
        assert!(gguf_name("model.layers.0.mystery.weight").is_err());
    }
}
