//! `tokenizer.json` rebuilt from a GGUF file's `tokenizer.ggml.*` metadata, as Hugging Face
//! `transformers` (5.x, `integrations/gguf`) rebuilds it, so the token ids equal the ones
//! `AutoTokenizer.from_pretrained(dir, gguf_file=…)` gives:
//!
//! - `gpt2` vocabularies (byte-level BPE: GPT-2, Llama 3, SmolLM, Qwen): the tokens as the
//!   vocabulary (a token outside the byte alphabet is respelled from its UTF-8 bytes), the
//!   file's merges, the byte-level pre-tokenizer — with the split regex of the
//!   `tokenizer.ggml.pre` families transformers knows (Llama 3, Qwen 2) — and decoder.
//! - `llama` vocabularies (SentencePiece BPE: Llama 1/2, Mistral, TinyLlama): byte fallback,
//!   a `▁` prepended to the text, merges from the file or, when it has none, derived from the
//!   token scores (every split of a token into two tokens, best score first).
//!
//! Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain
//! added tokens; the post-processor adds BOS (and EOS) as `tokenizer.ggml.add_bos_token`
//! (`add_eos_token`) say, BOS by default for `llama` vocabularies.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value as GgufValue;
use serde_json::{json, Map, Value};

use crate::compress::{Error, Result};

/// The tokenizer files of an imported model.
#[derive(Debug, Clone)]
pub struct Vocab {
    /// `tokenizer.json`.
    pub tokenizer: Value,
    /// `tokenizer_config.json`.
    pub tokenizer_config: Value,
}

const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split regex transformers uses for a `tokenizer.ggml.pre` value, when it has one.
fn split_regex(pre: &str) -> Option<&'static str> {
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => Some(LLAMA3_SPLIT),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => Some(QWEN2_SPLIT),
        _ => None,
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidModelFolder(format!("GGUF tokenizer: {}", msg.into()))
}

fn strings(v: &GgufValue, key: &str) -> Result<Vec<String>> {
    v.to_vec()
        .map_err(|_| invalid(format!("`{key}` is not an array")))?
        .iter()
        .map(|s| {
            s.to_string()
                .cloned()
                .map_err(|_| invalid(format!("`{key}` holds a non-string")))
        })
        .collect()
}

fn ints(v: &GgufValue, key: &str) -> Result<Vec<i64>> {
    v.to_vec()
        .map_err(|_| invalid(format!("`{key}` is not an array")))?
        .iter()
        .map(|x| match x {
            GgufValue::I32(i) => Ok(i64::from(*i)),
            other => uint_of(other)
                .and_then(|u| i64::try_from(u).ok())
                .ok_or_else(|| invalid(format!("`{key}` holds a non-integer"))),
        })
        .collect()
}

fn floats(v: &GgufValue, key: &str) -> Result<Vec<f64>> {
    v.to_vec()
        .map_err(|_| invalid(format!("`{key}` is not an array")))?
        .iter()
        .map(|x| match x {
            GgufValue::F32(f) => Ok(f64::from(*f)),
            GgufValue::F64(f) => Ok(*f),
            _ => Err(invalid(format!("`{key}` holds a non-float"))),
        })
        .collect()
}

/// GPT-2's byte alphabet: each byte's printable stand-in (`bytes_to_unicode`).
fn byte_alphabet() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        out[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap_or('\0')
        };
    }
    out
}

fn added_token(id: usize, content: &str, special: bool) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false,
           "rstrip": false, "normalized": false, "special": special})
}

/// The post-processor adding BOS / EOS around each sequence.
fn post_processor(bos: Option<(&str, usize)>, eos: Option<(&str, usize)>) -> Value {
    let special = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let mut single = Vec::new();
    if let Some((b, _)) = bos {
        single.push(special(b, 0));
    }
    single.push(seq("A", 0));
    if let Some((e, _)) = eos {
        single.push(special(e, 0));
    }
    let mut pair = Vec::new();
    pair.extend(single.iter().cloned());
    if let Some((b, _)) = bos {
        pair.push(special(b, 1));
    }
    pair.push(seq("B", 1));
    if let Some((e, _)) = eos {
        pair.push(special(e, 1));
    }
    let mut tokens = Map::new();
    for (t, id) in bos.into_iter().chain(eos) {
        tokens.insert(t.into(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": tokens})
}

/// Merges implied by a vocabulary and its scores (transformers' `generate_merges`): every
/// split of every token into two tokens of the vocabulary, ordered by the token's score, then
/// by the lengths of the halves, best first; ties keep vocabulary order.
fn merges_from_scores(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut score_of: Vec<(&str, f64)> = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, (t, &s)) in tokens.iter().zip(scores).enumerate() {
        index.insert(t, i);
        match seen.get(t.as_str()) {
            Some(&at) => score_of[at].1 = s,
            None => {
                seen.insert(t, score_of.len());
                score_of.push((t, s));
            }
        }
    }
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for (token, score) in score_of {
        let mut local: Vec<(&str, &str, f64)> = token
            .char_indices()
            .skip(1)
            .map(|(at, _)| (&token[..at], &token[at..]))
            .filter(|(l, r)| index.contains_key(l) && index.contains_key(r))
            .map(|(l, r)| (l, r, score))
            .collect();
        local.sort_by_key(|(l, r, _)| (index[l], index[r]));
        merges.extend(local);
    }
    let len = |s: &str| s.chars().count();
    merges.sort_by(|a, b| {
        b.2.total_cmp(&a.2)
            .then(len(b.0).cmp(&len(a.0)))
            .then(len(b.1).cmp(&len(a.1)))
    });
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect()
}

/// The tokenizer a GGUF file's metadata describes; `None` when it has no vocabulary.
pub fn from_metadata(meta: &HashMap<String, GgufValue>) -> Result<Option<Vocab>> {
    let Some(tokens_v) = meta.get("tokenizer.ggml.tokens") else {
        return Ok(None);
    };
    let tokens = strings(tokens_v, "tokenizer.ggml.tokens")?;
    if tokens.is_empty() {
        return Err(invalid("the vocabulary is empty"));
    }
    let model = match meta.get("tokenizer.ggml.model") {
        Some(v) => v
            .to_string()
            .map_err(|_| invalid("`tokenizer.ggml.model` is not a string"))?
            .clone(),
        None => return Err(invalid("the file has tokens but no `tokenizer.ggml.model`")),
    };
    let types = match meta.get("tokenizer.ggml.token_type") {
        Some(v) => ints(v, "tokenizer.ggml.token_type")?,
        None => vec![1; tokens.len()],
    };
    let scores = meta
        .get("tokenizer.ggml.scores")
        .map(|v| floats(v, "tokenizer.ggml.scores"))
        .transpose()?;
    let merges = meta
        .get("tokenizer.ggml.merges")
        .map(|v| strings(v, "tokenizer.ggml.merges"))
        .transpose()?;
    let flag = |key: &str| match meta.get(key) {
        Some(GgufValue::Bool(b)) => Some(*b),
        _ => None,
    };
    let id = |key: &str| {
        meta.get(key)
            .and_then(uint_of)
            .and_then(|v| usize::try_from(v).ok())
            .filter(|&v| v < tokens.len())
    };
    let (bos_id, eos_id) = (
        id("tokenizer.ggml.bos_token_id"),
        id("tokenizer.ggml.eos_token_id"),
    );
    let (unk_id, pad_id) = (
        id("tokenizer.ggml.unknown_token_id"),
        id("tokenizer.ggml.padding_token_id"),
    );
    let add_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(model == "llama");
    let add_eos = flag("tokenizer.ggml.add_eos_token").unwrap_or(false);
    let pre = meta
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();

    let split_merge = |m: &String| -> (String, String) {
        match m.split_once(' ') {
            Some((a, b)) => (a.to_string(), b.to_string()),
            None => (m.clone(), String::new()),
        }
    };
    let (vocab_tokens, merge_pairs, mut tokenizer) = match model.as_str() {
        "gpt2" => {
            let alphabet = byte_alphabet();
            let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
            let spelled: Vec<String> = tokens
                .iter()
                .map(|t| {
                    if in_alphabet(t) {
                        t.clone()
                    } else {
                        t.bytes().map(|b| alphabet[b as usize]).collect()
                    }
                })
                .collect();
            let pairs = match (&merges, &scores) {
                (Some(m), _) => m.iter().map(split_merge).collect(),
                (None, Some(s)) => merges_from_scores(&tokens, s),
                (None, None) => {
                    return Err(invalid("a byte-level vocabulary without merges or scores"))
                }
            };
            let pre_tokenizer = match split_regex(&pre) {
                Some(r) => json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}),
                None => {
                    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
                }
            };
            let tokenizer = json!({
                "normalizer": null,
                "pre_tokenizer": pre_tokenizer,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null,
                          "continuing_subword_prefix": "", "end_of_word_suffix": "",
                          "fuse_unk": false, "byte_fallback": false, "ignore_merges": false},
            });
            (spelled, pairs, tokenizer)
        }
        "llama" => {
            let pairs = match (&merges, &scores) {
                (Some(m), _) => m.iter().map(split_merge).collect(),
                (None, Some(s)) => merges_from_scores(&tokens, s),
                (None, None) => {
                    return Err(invalid(
                        "a SentencePiece vocabulary without merges or scores",
                    ))
                }
            };
            let tokenizer = json!({
                "normalizer": null,
                "pre_tokenizer": {"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false},
                "decoder": {"type": "Sequence", "decoders": [
                    {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                    {"type": "ByteFallback"},
                    {"type": "Fuse"},
                    {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
                "model": {"type": "BPE", "dropout": null, "unk_token": null,
                          "continuing_subword_prefix": null, "end_of_word_suffix": null,
                          "fuse_unk": true, "byte_fallback": true, "ignore_merges": false},
            });
            (tokens.clone(), pairs, tokenizer)
        }
        other => {
            return Err(invalid(format!(
                "`tokenizer.ggml.model` = `{other}` is not rebuilt; supported: gpt2, llama"
            )))
        }
    };
    let mut vocab = Map::new();
    for (i, t) in vocab_tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(i));
    }
    tokenizer["model"]["vocab"] = Value::Object(vocab);
    tokenizer["model"]["merges"] = json!(merge_pairs
        .iter()
        .map(|(a, b)| json!([a, b]))
        .collect::<Vec<_>>());

    let alphabet = byte_alphabet();
    let byte_level = model == "gpt2";
    let mut added = Vec::new();
    for (i, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
        let spellable = !byte_level || t.chars().all(|c| alphabet.contains(&c));
        let special = ty == CONTROL && spellable;
        let special = special || (!byte_level && Some(i) == unk_id);
        if special {
            added.push(added_token(i, t, true));
        } else if ty == USER_DEFINED && spellable {
            added.push(added_token(i, t, false));
        }
    }
    let name = |i: Option<usize>| i.map(|i| tokens[i].clone());
    let bos = bos_id.filter(|_| add_bos).map(|i| (tokens[i].as_str(), i));
    let eos = eos_id.filter(|_| add_eos).map(|i| (tokens[i].as_str(), i));
    let mut out =
        json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": added});
    for key in ["normalizer", "pre_tokenizer"] {
        out[key] = tokenizer[key].take();
    }
    out["post_processor"] = post_processor(bos, eos);
    for key in ["decoder", "model"] {
        out[key] = tokenizer[key].take();
    }
    let mut config = json!({
        "bos_token": name(bos_id),
        "eos_token": name(eos_id),
        "unk_token": name(unk_id),
        "pad_token": name(pad_id),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    if let Some(Ok(t)) = meta.get("tokenizer.chat_template").map(|v| v.to_string()) {
        config["chat_template"] = json!(t);
    }
    Ok(Some(Vocab {
        tokenizer: out,
        tokenizer_config: config,
    }))
}

/// A GGUF integer value as u64 (`None` for negative numbers and other types).
pub(super) fn uint_of(v: &GgufValue) -> Option<u64> {
    match v {
        GgufValue::U8(x) => Some(u64::from(*x)),
        GgufValue::U16(x) => Some(u64::from(*x)),
        GgufValue::U32(x) => Some(u64::from(*x)),
        GgufValue::U64(x) => Some(*x),
        GgufValue::I8(x) => u64::try_from(*x).ok(),
        GgufValue::I16(x) => u64::try_from(*x).ok(),
        GgufValue::I32(x) => u64::try_from(*x).ok(),
        GgufValue::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let a = byte_alphabet();
        assert_eq!(a[b'a' as usize], 'a');
        assert_eq!(a[b' ' as usize], '\u{120}', "space is Ġ");
        assert_eq!(a[b'\n' as usize], '\u{10a}', "newline is Ċ");
        let mut sorted = a.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 256, "a bijection");
    }

    #[test]
    fn merges_from_scores_follow_generate_merges() {
        let tokens: Vec<String> = ["a", "b", "ab", "c", "abc", "bc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let scores = [0.0, 0.0, -1.0, 0.0, -0.5, -2.0];
        let m = merges_from_scores(&tokens, &scores);
        // abc (-0.5): ab+c (len 2,1) before a+bc (len 1,2); then ab (-1); then bc (-2).
        let want = [("ab", "c"), ("a", "bc"), ("a", "b"), ("b", "c")];
        let got: Vec<(&str, &str)> = m.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(got, want);
    }
}
