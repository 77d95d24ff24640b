//! Hugging Face model folders: which paths a folder may hold, where its weights are (one
//! `model.safetensors`, or shards named by `model.safetensors.index.json`, merged here into
//! one file so every operation reads a single safetensors), its `config.json`, and the
//! model family the config names.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Write;

use serde_json::Value;

use super::safetensors::{write_safetensors, SafetensorsFile, TensorSpec};
use crate::compress::engine::Family;
use crate::compress::{Error, Result};

/// The folder's configuration file.
pub const CONFIG: &str = "config.json";
/// The tokenizer of a folder (the `tokenizers` library's format).
pub const TOKENIZER: &str = "tokenizer.json";
/// The index of a sharded checkpoint.
pub const INDEX: &str = "model.safetensors.index.json";
/// The single weights file (what shards are merged into).
pub const WEIGHTS: &str = "model.safetensors";
/// Longest accepted path (what a plain ustar header holds, so folders download as tar).
pub const MAX_PATH: usize = 100;

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidModelFolder(msg.into())
}

/// Checks a path inside a folder: relative, `/`-separated, no `.` / `..` / empty segments,
/// no backslash or control characters, at most [`MAX_PATH`] bytes. Returns it without a
/// leading `./`.
pub fn check_path(path: &str) -> Result<String> {
    let trimmed = path.strip_prefix("./").unwrap_or(path);
    let why = if trimmed.is_empty() {
        Some("is empty")
    } else if trimmed.len() > MAX_PATH {
        Some("is longer than 100 bytes")
    } else if trimmed.starts_with('/') {
        Some("is absolute")
    } else if trimmed.contains('\\') {
        Some("contains a backslash (use `/`)")
    } else if trimmed.chars().any(char::is_control) {
        Some("contains a control character")
    } else if trimmed
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        Some("has an empty, `.` or `..` segment (paths must stay inside the folder)")
    } else {
        None
    };
    match why {
        Some(why) => Err(invalid(format!("the path {path:?} {why}"))),
        None => Ok(trimmed.to_string()),
    }
}

/// Where a folder's weights are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Weights {
    /// One `model.safetensors`.
    Single,
    /// Shards, in the order to merge them (the index's files, sorted).
    Shards(Vec<String>),
}

/// Decides where the weights of a folder holding `paths` are; `index` is the parsed
/// `model.safetensors.index.json` when the folder has one. Refuses a folder without
/// safetensors weights, an index naming files the folder lacks, and safetensors files that
/// are neither the single weights file nor shards of the index.
pub fn weights_of(paths: &[String], index: Option<&Value>) -> Result<Weights> {
    let present: HashSet<&str> = paths.iter().map(String::as_str).collect();
    let safetensors: BTreeSet<&str> = paths
        .iter()
        .map(String::as_str)
        .filter(|p| p.ends_with(".safetensors"))
        .collect();
    if present.contains(WEIGHTS) {
        if let Some(extra) = safetensors.iter().find(|p| **p != WEIGHTS) {
            return Err(invalid(format!(
                "the folder holds both {WEIGHTS} and {extra:?}: give one weights file, or shards with {INDEX}"
            )));
        }
        return Ok(Weights::Single);
    }
    let Some(index) = index else {
        if present
            .iter()
            .any(|p| p.ends_with(".bin") || p.ends_with(".pt"))
        {
            return Err(invalid(
                "the folder holds PyTorch pickle weights; only safetensors weights are accepted \
                 (save with `save_pretrained(dir, safe_serialization=True)`)",
            ));
        }
        return Err(invalid(format!(
            "the folder holds no weights: expected {WEIGHTS}, or shards with {INDEX}"
        )));
    };
    let map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid(format!("{INDEX} has no `weight_map` object")))?;
    let mut shards = BTreeSet::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            invalid(format!(
                "{INDEX}: tensor {tensor:?} maps to {file}, not a file name"
            ))
        })?;
        shards.insert(check_path(file)?);
    }
    if shards.is_empty() {
        return Err(invalid(format!("{INDEX} names no shard")));
    }
    let missing: Vec<&String> = shards
        .iter()
        .filter(|s| !present.contains(s.as_str()))
        .collect();
    if !missing.is_empty() {
        return Err(invalid(format!(
            "{INDEX} names shards the folder lacks: {missing:?}"
        )));
    }
    if let Some(extra) = safetensors.iter().find(|p| !shards.contains(**p)) {
        return Err(invalid(format!(
            "{extra:?} is not a shard named by {INDEX}"
        )));
    }
    Ok(Weights::Shards(shards.into_iter().collect()))
}

/// Parses a small JSON file of the folder (`config.json`, the index), which must be an object.
pub fn parse_json_object(path: &str, bytes: &[u8]) -> Result<Value> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| invalid(format!("{path} is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(invalid(format!("{path} must be a JSON object")));
    }
    Ok(value)
}

/// The family a `config.json` names (`model_type`, else `architectures`), when the engine runs
/// it; `None` for other models (weight-only operations still work on them).
pub fn family_of(config: &Value) -> Option<Family> {
    let model_type = config.get("model_type").and_then(Value::as_str);
    let architectures: Vec<&str> = config
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    match model_type {
        Some("bert") => Some(Family::Bert),
        Some("llama") => Some(Family::Llama),
        Some(_) => None,
        None => architectures.iter().find_map(|a| {
            if a.starts_with("Bert") {
                Some(Family::Bert)
            } else if a.starts_with("Llama") {
                Some(Family::Llama)
            } else {
                None
            }
        }),
    }
}

/// Merges `shards` into one safetensors file with `metadata`: every tensor once, in shard
/// order then file order, bytes unchanged. Refuses a tensor that two shards hold. Returns
/// the bytes written.
pub fn merge_shards(
    shards: &[(String, SafetensorsFile)],
    metadata: &BTreeMap<String, String>,
    out: &mut dyn Write,
) -> Result<u64> {
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    let mut specs = Vec::new();
    let mut sources = Vec::new();
    for (path, file) in shards {
        for t in &file.header().tensors {
            if let Some(first) = seen.insert(&t.name, path) {
                return Err(invalid(format!(
                    "tensor {:?} is in both {first:?} and {path:?}",
                    t.name
                )));
            }
            specs.push(TensorSpec::new(t.name.clone(), t.dtype, t.shape.clone()));
            sources.push((file, t));
        }
    }
    write_safetensors(out, metadata, &specs, |i, w| {
        let (file, info) = sources[i];
        w.write_all(file.bytes(info))?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::formats::safetensors::{encode_f32, serialize, Dtype};
    use serde_json::json;

    #[test]
    fn paths_stay_inside_the_folder() {
        assert_eq!(check_path("config.json").unwrap(), "config.json");
        assert_eq!(check_path("./tokenizer.json").unwrap(), "tokenizer.json");
        assert_eq!(
            check_path("1_Pooling/config.json").unwrap(),
            "1_Pooling/config.json"
        );
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "a\\b",
            "a/./b",
            "x\u{7}",
            &"a".repeat(101),
        ] {
            let e = check_path(bad).unwrap_err();
            assert_eq!(e.code().as_str(), "invalid_model_folder", "{bad:?}");
        }
    }

    #[test]
    fn weights_are_one_file_or_the_index_shards() {
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            weights_of(&p(&["config.json", WEIGHTS]), None).unwrap(),
            Weights::Single
        );
        let index = json!({"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}});
        let both = p(&[
            "config.json",
            INDEX,
            "model-00002-of-00002.safetensors",
            "model-00001-of-00002.safetensors",
        ]);
        assert_eq!(
            weights_of(&both, Some(&index)).unwrap(),
            Weights::Shards(p(&[
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]))
        );
        let one = p(&["config.json", INDEX, "model-00001-of-00002.safetensors"]);
        assert!(weights_of(&one, Some(&index))
            .unwrap_err()
            .to_string()
            .contains("lacks"));
        assert!(weights_of(&p(&["config.json"]), None)
            .unwrap_err()
            .to_string()
            .contains("no weights"));
        assert!(weights_of(&p(&["pytorch_model.bin"]), None)
            .unwrap_err()
            .to_string()
            .contains("pickle"));
        assert!(weights_of(&p(&[WEIGHTS, "extra.safetensors"]), None).is_err());
        assert!(weights_of(&p(&[INDEX]), Some(&json!({"weight_map": {}}))).is_err());
    }

    #[test]
    fn families_come_from_the_config() {
        assert_eq!(
            family_of(&json!({"model_type": "bert"})),
            Some(Family::Bert)
        );
        assert_eq!(
            family_of(&json!({"model_type": "llama"})),
            Some(Family::Llama)
        );
        assert_eq!(
            family_of(&json!({"architectures": ["LlamaForCausalLM"]})),
            Some(Family::Llama)
        );
        assert_eq!(family_of(&json!({"model_type": "gpt2"})), None);
        assert!(parse_json_object("config.json", b"[1]").is_err());
        assert!(parse_json_object("config.json", b"{nope").is_err());
    }

    #[test]
    fn shards_merge_into_one_file() {
        let dir = tempfile_dir();
        let shard = |name: &str, tensors: &[(&str, Vec<f32>)]| {
            let data: Vec<(TensorSpec, Vec<u8>)> = tensors
                .iter()
                .map(|(n, v)| {
                    (
                        TensorSpec::new(*n, Dtype::F32, vec![v.len()]),
                        encode_f32(v),
                    )
                })
                .collect();
            let refs: Vec<(TensorSpec, &[u8])> = data
                .iter()
                .map(|(s, b)| (s.clone(), b.as_slice()))
                .collect();
            let path = dir.join(name);
            std::fs::write(&path, serialize(&BTreeMap::new(), &refs).unwrap()).unwrap();
            (name.to_string(), SafetensorsFile::open(&path).unwrap())
        };
        let a = shard("a.safetensors", &[("x", vec![1.0, 2.0]), ("y", vec![3.0])]);
        let b = shard("b.safetensors", &[("z", vec![4.0; 3])]);
        let mut out = Vec::new();
        merge_shards(&[a, b], &BTreeMap::new(), &mut out).unwrap();
        let merged = dir.join("merged.safetensors");
        std::fs::write(&merged, &out).unwrap();
        let m = SafetensorsFile::open(&merged).unwrap();
        let names: Vec<&str> = m.header().tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["x", "y", "z"]);
        assert_eq!(m.to_f32(m.get("z").unwrap()).unwrap(), vec![4.0; 3]);
        let c = shard("c.safetensors", &[("x", vec![0.0])]);
        let a = shard("a.safetensors", &[("x", vec![1.0])]);
        assert!(merge_shards(&[a, c], &BTreeMap::new(), &mut Vec::new()).is_err());
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("whittle-hf-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
