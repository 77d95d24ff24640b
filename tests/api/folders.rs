//! Hugging Face model folders: multipart (one part per file) and tar uploads, sharded
//! weights merged, path and content refusals that store nothing, downloads of one file and
//! of the whole folder, and jobs on a folder model producing folder models.

use std::collections::BTreeMap;
use std::io::Read;

use serde_json::{json, Value};
use whittle::compress::formats::safetensors::{self as tensors, Dtype, TensorSpec};
use whittle::db::jobs::JobState;

use crate::helpers::*;

const CONFIG: &str = r#"{"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1}"#;
const TOKENIZER: &str = r###"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
 "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
 "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
           "max_input_chars_per_word": 100, "vocab": {"[UNK]": 0}}}"###;

/// A safetensors file of the named f32 tensors (values from `values`).
fn weights(tensors_: &[(&str, Vec<usize>)]) -> Vec<u8> {
    let data: Vec<(TensorSpec, Vec<u8>)> = tensors_
        .iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n = shape.iter().product();
            (
                TensorSpec::new(*name, Dtype::F32, shape.clone()),
                tensors::encode_f32(&values(n, i as u32 + 7)),
            )
        })
        .collect();
    let refs: Vec<(TensorSpec, &[u8])> = data
        .iter()
        .map(|(s, b)| (s.clone(), b.as_slice()))
        .collect();
    tensors::serialize(&BTreeMap::new(), &refs).unwrap()
}

fn bert_weights() -> Vec<u8> {
    weights(&[
        ("encoder.layer.0.attention.self.query.weight", vec![8, 8]),
        ("encoder.layer.0.attention.self.query.bias", vec![8]),
        ("embeddings.word_embeddings.weight", vec![16, 8]),
    ])
}

fn part<'a>(path: &'a str, bytes: &[u8]) -> Part<'a> {
    Part {
        name: "file",
        filename: Some(path),
        bytes: bytes.to_vec(),
    }
}

/// A tar archive of `(path, bytes)` entries, under `prefix` when given.
fn tar_of(entries: &[(&str, &[u8])], prefix: Option<&str>) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, bytes) in entries {
        let mut h = tar::Header::new_ustar();
        let full = match prefix {
            Some(p) => format!("{p}/{path}"),
            None => path.to_string(),
        };
        h.set_path(&full).unwrap();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append(&h, *bytes).unwrap();
    }
    b.into_inner().unwrap()
}

/// The files of a tar archive, by path.
fn untar(bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut a = tar::Archive::new(bytes);
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            (path, data)
        })
        .collect()
}

async fn upload_folder(t: &TestApp, parts: &[Part<'_>]) -> Value {
    let res = t.post_multipart("/v1/models?name=tiny-bert", parts).await;
    assert_eq!(res.status, 201, "{}", res.text());
    let body = res.json();
    assert_schema("Model", &body);
    body
}

async fn a_multipart_folder_is_a_model_with_its_files(t: TestApp) {
    let w = bert_weights();
    let model = upload_folder(
        &t,
        &[
            part("config.json", CONFIG.as_bytes()),
            part("tokenizer.json", TOKENIZER.as_bytes()),
            part("model.safetensors", &w),
            part(
                "1_Pooling/config.json",
                b"{\"pooling_mode_mean_tokens\": true}",
            ),
        ],
    )
    .await;
    assert_eq!(model["family"], "bert");
    assert_eq!(model["config"]["hidden_size"], 8);
    assert_eq!(model["architecture"], Value::Null);
    assert_eq!(model["sha256"], sha256_hex(&w));
    let files: BTreeMap<String, Value> = model["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["path"].as_str().unwrap().to_string(), f.clone()))
        .collect();
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        [
            "1_Pooling/config.json",
            "config.json",
            "model.safetensors",
            "tokenizer.json"
        ]
    );
    assert_eq!(
        files["tokenizer.json"]["sha256"],
        sha256_hex(TOKENIZER.as_bytes())
    );
    assert_eq!(files["model.safetensors"]["size_bytes"], w.len());
    let id = model["id"].as_str().unwrap();

    // One file, with ETag and Range; the weights equal /content.
    let res = t
        .get(&format!("/v1/models/{id}/files/tokenizer.json"))
        .await;
    assert_eq!(res.status, 200);
    assert_eq!(res.text(), TOKENIZER);
    assert_eq!(res.header("content-type"), Some("application/json"));
    let res = t
        .get(&format!("/v1/models/{id}/files/1_Pooling/config.json"))
        .await;
    assert_eq!(res.status, 200, "nested paths are served");
    let res = t
        .get_with(
            &format!("/v1/models/{id}/files/config.json"),
            &[("range", "bytes=0-13")],
        )
        .await;
    assert_eq!(res.status, 206);
    assert_eq!(res.text(), &CONFIG[..14]);
    let weights_file = t
        .get(&format!("/v1/models/{id}/files/model.safetensors"))
        .await;
    let content = t.get(&format!("/v1/models/{id}/content")).await;
    assert_eq!(weights_file.body, content.body);
    t.get(&format!("/v1/models/{id}/files/vocab.txt"))
        .await
        .assert_problem(404, "file_not_found");

    // The whole folder as a tar.
    let res = t.get(&format!("/v1/models/{id}/archive")).await;
    assert_eq!(res.status, 200);
    assert_eq!(res.header("content-type"), Some("application/x-tar"));
    assert_eq!(
        res.header("content-length")
            .unwrap()
            .parse::<usize>()
            .unwrap(),
        res.body.len()
    );
    let archive = untar(&res.body);
    assert_eq!(archive.len(), 4);
    assert_eq!(archive["model.safetensors"], w);
    assert_eq!(archive["config.json"], CONFIG.as_bytes());

    // A weight-only job on a folder model produces a folder model with the same companions.
    let job = t
        .submit(json!({"model_id": id, "steps": [{"op": "prune", "sparsity": 0.5}]}))
        .await;
    let (_, state) = t.run_one().await.unwrap();
    assert_eq!(state, JobState::Succeeded);
    let job = t
        .get(&format!("/v1/jobs/{}", job["id"].as_str().unwrap()))
        .await
        .json();
    let out = t
        .get(&format!(
            "/v1/models/{}",
            job["result"]["model_id"].as_str().unwrap()
        ))
        .await
        .json();
    assert_schema("Model", &out);
    assert_eq!(out["family"], "bert");
    assert_eq!(out["config"], model["config"]);
    let out_files: Vec<&str> = out["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        out_files,
        [
            "1_Pooling/config.json",
            "config.json",
            "model.safetensors",
            "tokenizer.json"
        ]
    );
    assert_eq!(out["files"][3]["sha256"], files["tokenizer.json"]["sha256"]);
    assert_ne!(out["sha256"], model["sha256"]);
    let out_weights = out["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "model.safetensors")
        .unwrap()
        .clone();
    assert_eq!(out_weights["sha256"], out["sha256"]);
}

async fn a_tar_folder_and_sharded_weights(t: TestApp) {
    let w = bert_weights();
    let tar = tar_of(
        &[
            ("config.json", CONFIG.as_bytes()),
            ("model.safetensors", &w),
        ],
        Some("all-MiniLM-tiny"),
    );
    let res = t
        .post_bytes("/v1/models?name=tarred", "application/x-tar", tar)
        .await;
    assert_eq!(res.status, 201, "{}", res.text());
    let model = res.json();
    assert_eq!(model["files"].as_array().unwrap().len(), 2, "{model}");
    assert_eq!(model["sha256"], sha256_hex(&w));

    // Two shards and their index become one model.safetensors holding every tensor.
    let s1 = weights(&[("a.weight", vec![4, 4]), ("a.bias", vec![4])]);
    let s2 = weights(&[("b.weight", vec![2, 4])]);
    let index = json!({"metadata": {"total_size": 0}, "weight_map": {
        "a.weight": "model-00001-of-00002.safetensors", "a.bias": "model-00001-of-00002.safetensors",
        "b.weight": "model-00002-of-00002.safetensors"}})
    .to_string();
    let model = upload_folder(
        &t,
        &[
            part("config.json", br#"{"model_type": "llama"}"#),
            part("model.safetensors.index.json", index.as_bytes()),
            part("model-00002-of-00002.safetensors", &s2),
            part("model-00001-of-00002.safetensors", &s1),
        ],
    )
    .await;
    assert_eq!(model["family"], "llama");
    let names: Vec<&str> = model["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a.weight", "a.bias", "b.weight"]);
    let paths: Vec<&str> = model["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["config.json", "model.safetensors"]);
    let content = t
        .get(&format!(
            "/v1/models/{}/content",
            model["id"].as_str().unwrap()
        ))
        .await;
    let st = safetensors::SafeTensors::deserialize(&content.body).unwrap();
    let a = tensors::SafetensorsFile::open({
        let p = t.data_dir().join("shard1.safetensors");
        std::fs::write(&p, &s1).unwrap();
        p
    })
    .unwrap();
    assert_eq!(
        st.tensor("a.weight").unwrap().data(),
        a.bytes(a.get("a.weight").unwrap()),
        "shard bytes are kept as they are"
    );
}

async fn bad_folders_are_refused_and_nothing_is_stored(t: TestApp) {
    let w = bert_weights();
    let before = t.stored_files();
    let cases: Vec<(Vec<Part>, u16, &str, &str)> = vec![
        (
            vec![part("tokenizer.json", b"{}"), part("model.safetensors", &w)],
            422,
            "invalid_model_folder",
            "config.json",
        ),
        (
            vec![
                part("config.json", b"{not json"),
                part("model.safetensors", &w),
            ],
            422,
            "invalid_model_folder",
            "not valid JSON",
        ),
        (
            vec![
                part("config.json", b"[1, 2]"),
                part("model.safetensors", &w),
            ],
            422,
            "invalid_model_folder",
            "JSON object",
        ),
        (
            vec![
                part("config.json", CONFIG.as_bytes()),
                part("tokenizer.json", TOKENIZER.as_bytes()),
            ],
            422,
            "invalid_model_folder",
            "no weights",
        ),
        (
            vec![
                part("config.json", CONFIG.as_bytes()),
                part("tokenizer.json", b"{\"model\": 3}"),
                part("model.safetensors", &w),
            ],
            422,
            "invalid_model_folder",
            "tokenizers library",
        ),
        (
            vec![
                part("config.json", CONFIG.as_bytes()),
                part("pytorch_model.bin", b"pickle"),
            ],
            422,
            "invalid_model_folder",
            "pickle",
        ),
        (
            vec![
                part("config.json", CONFIG.as_bytes()),
                part("../model.safetensors", &w),
            ],
            422,
            "invalid_model_folder",
            "..",
        ),
        (
            vec![
                part("config.json", CONFIG.as_bytes()),
                part("/etc/model.safetensors", &w),
            ],
            422,
            "invalid_model_folder",
            "absolute",
        ),
        (
            vec![
                part("config.json", CONFIG.as_bytes()),
                part("config.json", CONFIG.as_bytes()),
                part("model.safetensors", &w),
            ],
            422,
            "invalid_model_folder",
            "twice",
        ),
        (
            vec![
                part("config.json", CONFIG.as_bytes()),
                part("model.safetensors", b"not safetensors"),
            ],
            422,
            "invalid_safetensors",
            "",
        ),
        (
            vec![
                part("config.json", CONFIG.as_bytes()),
                part(
                    "model.safetensors.index.json",
                    br#"{"weight_map": {"x": "model-00001-of-00002.safetensors"}}"#,
                ),
            ],
            422,
            "invalid_model_folder",
            "lacks",
        ),
        (
            vec![
                part("config.json", CONFIG.as_bytes()),
                part("model.safetensors", &w),
                Part {
                    name: "architecture",
                    filename: None,
                    bytes: tiny_arch().to_string().into_bytes(),
                },
            ],
            400,
            "malformed_multipart",
            "architecture",
        ),
    ];
    for (parts, status, code, says) in cases {
        let res = t.post_multipart("/v1/models", &parts).await;
        let problem = res.assert_problem(status, code);
        assert!(
            problem["detail"].as_str().unwrap().contains(says),
            "{code}: {problem}"
        );
    }
    // Tars: a link, a path escaping the folder, not a tar at all.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_path("config.json").unwrap();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_link_name("/etc/passwd").unwrap();
    h.set_size(0);
    h.set_cksum();
    b.append(&h, &b""[..]).unwrap();
    let link = b.into_inner().unwrap();
    let mut escape = tar_of(
        &[
            ("config.json", CONFIG.as_bytes()),
            ("model.safetensors", &w),
        ],
        None,
    );
    // Rewrite the second entry's name to `../x` in place (the tar crate refuses to write it).
    let at = escape
        .windows(17)
        .position(|w| w == b"model.safetensors")
        .unwrap();
    escape[at..at + 17].copy_from_slice(b"../odel.safetenso");
    let header = &mut escape[at..at + 512];
    header[148..156].copy_from_slice(b"        ");
    let sum: u32 = header.iter().map(|&b| b as u32).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    for (body, says) in [(link, "link"), (escape, ".."), (b"hello".to_vec(), "")] {
        let res = t.post_bytes("/v1/models", "application/x-tar", body).await;
        let problem = res.assert_problem(422, "invalid_model_folder");
        assert!(
            problem["detail"].as_str().unwrap().contains(says),
            "{problem}"
        );
    }
    assert_eq!(
        t.stored_files(),
        before,
        "a refused folder leaves nothing behind"
    );
    assert_eq!(
        t.get("/v1/models").await.json()["items"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
}

on_both_backends!(
    a_multipart_folder_is_a_model_with_its_files,
    a_tar_folder_and_sharded_weights,
    bad_folders_are_refused_and_nothing_is_stored,
);
