//! Transformers through the service: text datasets, evaluation of bert and llama folder
//! models against their input (figures equal to `transformers`' on the committed fixtures,
//! tests/fixtures/transformers/text-eval.json), saved outputs, and the refusals of what the
//! engine does not run.

use std::path::PathBuf;

use serde_json::{json, Value};
use whittle::db::jobs::JobState;

use crate::helpers::*;

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/transformers")
        .join(name)
}

pub(crate) fn reference() -> Value {
    serde_json::from_slice(&std::fs::read(fixture_dir("text-eval.json")).unwrap()).unwrap()
}

/// Uploads the fixture folder `name` (its config, tokenizer and weights; `skip` left out).
pub(crate) async fn upload_fixture(t: &TestApp, name: &str, skip: &[&str]) -> Value {
    let files: Vec<(String, Vec<u8>)> = ["config.json", "tokenizer.json", "model.safetensors"]
        .iter()
        .filter(|f| !skip.contains(f))
        .map(|f| {
            (
                f.to_string(),
                std::fs::read(fixture_dir(name).join(f)).unwrap(),
            )
        })
        .collect();
    let parts: Vec<Part> = files
        .iter()
        .map(|(path, bytes)| Part {
            name: "file",
            filename: Some(path),
            bytes: bytes.clone(),
        })
        .collect();
    let res = t
        .post_multipart(&format!("/v1/models?name={name}"), &parts)
        .await;
    assert_eq!(res.status, 201, "{}", res.text());
    res.json()
}

pub(crate) async fn upload_text(t: &TestApp, content_type: &str, body: &[u8]) -> Value {
    let res = t
        .post_bytes("/v1/datasets?name=text", content_type, body.to_vec())
        .await;
    assert_eq!(res.status, 201, "{}", res.text());
    let body = res.json();
    assert_schema("Dataset", &body);
    body
}

async fn run_to_end(t: &TestApp, body: Value) -> (Value, Value) {
    let job = t.submit(body).await;
    let (_, state) = t.run_one().await.unwrap();
    let id = job["id"].as_str().unwrap();
    let job = t.get(&format!("/v1/jobs/{id}")).await.json();
    assert_eq!(state, JobState::Succeeded, "{job}");
    let metrics = t.get(&format!("/v1/jobs/{id}/metrics")).await.json();
    assert_schema("Job", &job);
    assert_schema("Metrics", &metrics);
    (job, metrics)
}

fn close(got: &Value, want: &Value, rel: f64) {
    let (g, w) = (got.as_f64().unwrap(), want.as_f64().unwrap());
    assert!((g - w).abs() <= rel * w.abs(), "{g} vs {w}");
}

async fn text_datasets_upload_and_refuse(t: TestApp) {
    let d = upload_text(
        &t,
        "text/plain",
        b"first document\nstill first\n\n\nsecond one\n",
    )
    .await;
    assert_eq!(d["format"], "text");
    assert_eq!(d["samples"], 2);
    assert_eq!(d["documents"], 2);
    assert_eq!(
        d["bytes"],
        "first document\nstill first".len() + "second one".len()
    );
    assert_eq!(d["labelled"], false);
    let jsonl = reference()["jsonl"].as_str().unwrap().to_string();
    let d = upload_text(&t, "application/jsonl", jsonl.as_bytes()).await;
    assert_eq!(
        (d["format"].as_str(), d["documents"].as_u64()),
        (Some("jsonl"), Some(8))
    );
    assert_eq!(d["labelled"], true);
    assert_eq!(d["num_classes"], 3);
    // The same upload through multipart with an explicit format.
    let res = t
        .post_multipart(
            "/v1/datasets",
            &[
                Part {
                    name: "format",
                    filename: None,
                    bytes: b"jsonl".to_vec(),
                },
                Part {
                    name: "file",
                    filename: Some("d.jsonl"),
                    bytes: jsonl.into_bytes(),
                },
            ],
        )
        .await;
    assert_eq!(res.status, 201, "{}", res.text());
    // Tensor datasets say they are not text.
    let tensor = t
        .get(&format!(
            "/v1/datasets/{}",
            upload_dataset(&t, tiny_dataset()).await
        ))
        .await
        .json();
    assert_eq!(
        (tensor["documents"].clone(), tensor["labelled"].clone()),
        (Value::Null, json!(true))
    );

    let before = t.stored_files();
    for (body, ct, says) in [
        (&b"{\"label\": 1}\n"[..], "application/jsonl", "no `text`"),
        (
            b"{\"text\": \"a\", \"extra\": 1}\n",
            "application/jsonl",
            "unknown key",
        ),
        (
            b"{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\"}\n",
            "application/jsonl",
            "every line or none",
        ),
        (b"\n\n  \n", "text/plain", "no documents"),
        (&[0xff, 0xfe, 0x00], "text/plain", "UTF-8"),
    ] {
        let res = t.post_bytes("/v1/datasets", ct, body.to_vec()).await;
        let p = res.assert_problem(422, "invalid_dataset");
        assert!(p["detail"].as_str().unwrap().contains(says), "{p}");
    }
    t.post_bytes(
        "/v1/datasets?format=poetry",
        "application/octet-stream",
        b"x".to_vec(),
    )
    .await
    .assert_problem(422, "invalid_dataset_format");
    assert_eq!(t.stored_files(), before, "refusals store nothing");
}

/// A labelled tensor dataset (for the refusals).
fn tiny_dataset() -> Vec<u8> {
    use whittle::compress::formats::safetensors::{self as st, Dtype, TensorSpec};
    let x = st::encode_f32(&values(4 * 64, 3));
    let y = st::encode_i64(&[0, 1, 2, 3]);
    st::serialize(
        &Default::default(),
        &[
            (TensorSpec::new("x", Dtype::F32, vec![4, 64]), &x),
            (TensorSpec::new("y", Dtype::I64, vec![4]), &y),
        ],
    )
    .unwrap()
}

async fn llama_evaluation_matches_transformers(t: TestApp) {
    let want = reference();
    let model = upload_fixture(&t, "tiny-llama", &[]).await;
    assert_eq!(model["family"], "llama");
    let data = upload_text(
        &t,
        "application/jsonl",
        want["jsonl"].as_str().unwrap().as_bytes(),
    )
    .await;
    let (model_id, data_id) = (model["id"].as_str().unwrap(), data["id"].as_str().unwrap());
    let eval = json!({"dataset_id": data_id, "context": 16, "stride": 8});

    // An evaluate step alone: the output is the input, the figures are transformers'.
    let (job, metrics) = run_to_end(
        &t,
        json!({"model_id": model_id, "eval": eval,
               "steps": [{"op": "evaluate", "dataset_id": data_id, "context": 16, "stride": 8,
                          "save_outputs": true}]}),
    )
    .await;
    let llama = &want["llama"];
    let baseline = &metrics["baseline"];
    close(
        &baseline["perplexity"],
        &llama["reference_perplexity"],
        1e-5,
    );
    assert_eq!(baseline["tokens"], llama["tokens"]);
    assert_eq!(baseline["windows"], llama["windows"]);
    let fin = &metrics["final"];
    close(&fin["perplexity"], &llama["reference_perplexity"], 1e-5);
    assert_eq!(fin["top1_agreement"], 1.0);
    assert!(
        fin["kl_divergence"]["max"].as_f64().unwrap() < 1e-6,
        "{fin}"
    );
    assert!(fin["tokens_per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(job["eval"]["max_tokens"], 65536);
    let step = &metrics["steps"][0]["summary"];
    close(&step["perplexity"], &llama["reference_perplexity"], 1e-5);
    // The saved outputs are an artifact holding every scored token's NLL.
    let artifacts = &job["result"]["artifacts"];
    let outputs: Vec<&Value> = artifacts
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "outputs")
        .collect();
    assert_eq!(outputs.len(), 1, "{artifacts}");
    let bytes = t
        .get(&format!(
            "/v1/artifacts/{}/content",
            outputs[0]["id"].as_str().unwrap()
        ))
        .await
        .body;
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.tensor("token_nll").unwrap().shape(),
        [llama["tokens"].as_u64().unwrap() as usize]
    );
    assert_eq!(st.tensor("last_logits").unwrap().shape()[1], 320);

    // A weight-only op on the folder, evaluated against the input in the same pass.
    let (_, metrics) = run_to_end(
        &t,
        json!({"model_id": model_id, "eval": eval,
               "steps": [{"op": "quantize", "method": "uniform", "bits": 4, "granularity": "per_channel"}]}),
    )
    .await;
    let fin = &metrics["final"];
    close(
        &metrics["baseline"]["perplexity"],
        &llama["reference_perplexity"],
        1e-5,
    );
    let kl = fin["kl_divergence"]["mean"].as_f64().unwrap();
    assert!(kl > 1e-5, "4-bit weights change the outputs: {fin}");
    let agree = fin["top1_agreement"].as_f64().unwrap();
    assert!(agree > 0.3 && agree < 1.0, "{fin}");
    assert_eq!(fin["agreement_with_baseline"], fin["top1_agreement"]);
    assert!(fin["delta_p"]["mean"].is_number());
}

async fn bert_evaluation_reports_cosines(t: TestApp) {
    let want = reference();
    let model = upload_fixture(&t, "tiny-bert-cls", &[]).await;
    let data = upload_text(
        &t,
        "application/jsonl",
        want["jsonl"].as_str().unwrap().as_bytes(),
    )
    .await;
    let (_, metrics) = run_to_end(
        &t,
        json!({"model_id": model["id"], "eval": {"dataset_id": data["id"]},
               "steps": [{"op": "quantize", "method": "uniform", "bits": 8, "granularity": "per_channel"}]}),
    )
    .await;
    let bert = &want["bert"];
    close(
        &metrics["baseline"]["accuracy"],
        &bert["classifier"]["accuracy"],
        1e-9,
    );
    close(
        &metrics["baseline"]["loss"],
        &bert["classifier"]["loss"],
        1e-5,
    );
    assert_eq!(metrics["baseline"]["documents"], 8);
    let fin = &metrics["final"];
    let cos = fin["embedding_cosine"]["min"].as_f64().unwrap();
    assert!(
        cos > 0.99 && cos < 1.0,
        "int8 per channel barely moves the embeddings: {fin}"
    );
    assert!(fin["similarity_spearman"].as_f64().unwrap() > 0.9, "{fin}");
    assert!(fin["accuracy"].is_number());
}

async fn what_the_engine_does_not_run_is_refused(t: TestApp) {
    let want = reference();
    let jsonl = want["jsonl"].as_str().unwrap().as_bytes().to_vec();
    let text = upload_text(&t, "application/jsonl", &jsonl).await;
    let text_id = text["id"].as_str().unwrap().to_string();
    let tensor_id = upload_dataset(&t, tiny_dataset()).await;
    let llama = upload_fixture(&t, "tiny-llama", &[]).await;
    let llama_id = llama["id"].as_str().unwrap();
    let untokenized = upload_fixture(&t, "tiny-llama", &["tokenizer.json"]).await;
    let sequential_id = fresh_model(&t, tiny_arch(), 0).await;
    let sequential_id = sequential_id.as_str();
    // A folder of a family the engine does not run.
    let gpt2 = {
        let w = std::fs::read(fixture_dir("tiny-llama").join("model.safetensors")).unwrap();
        let res = t
            .post_multipart(
                "/v1/models",
                &[
                    Part {
                        name: "file",
                        filename: Some("config.json"),
                        bytes: br#"{"model_type": "gpt2"}"#.to_vec(),
                    },
                    Part {
                        name: "file",
                        filename: Some("model.safetensors"),
                        bytes: w,
                    },
                ],
            )
            .await;
        assert_eq!(res.status, 201, "{}", res.text());
        res.json()
    };
    assert_eq!(gpt2["family"], Value::Null);
    let before = t.get("/v1/jobs").await.json()["items"]
        .as_array()
        .unwrap()
        .len();
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            json!({"model_id": llama_id, "eval": {"dataset_id": tensor_id}, "steps": [{"op": "prune", "sparsity": 0.5}]}),
            "dataset_shape_mismatch",
            "/eval/dataset_id",
        ),
        (
            json!({"model_id": llama_id, "eval": {"dataset_id": text_id, "context": 4096}, "steps": [{"op": "prune", "sparsity": 0.5}]}),
            "validation_failed",
            "/eval/context",
        ),
        (
            json!({"model_id": llama_id, "eval": {"dataset_id": text_id, "context": 16, "stride": 32}, "steps": [{"op": "prune", "sparsity": 0.5}]}),
            "validation_failed",
            "/eval/stride",
        ),
        (
            json!({"model_id": untokenized["id"], "steps": [{"op": "evaluate", "dataset_id": text_id}]}),
            "tokenizer_required",
            "/steps/0/dataset_id",
        ),
        (
            json!({"model_id": llama_id, "steps": [{"op": "prune", "sparsity": 0.5, "schedule": {"iterations": 2, "finetune": {"dataset_id": text_id}}}]}),
            "unsupported_family",
            "/steps/0/schedule/finetune/op",
        ),
        (
            json!({"model_id": gpt2["id"], "steps": [{"op": "evaluate", "dataset_id": text_id}]}),
            "unsupported_family",
            "/steps/0/op",
        ),
        (
            json!({"model_id": sequential_id, "eval": {"dataset_id": text_id}, "steps": [{"op": "prune", "sparsity": 0.5}]}),
            "dataset_shape_mismatch",
            "/eval/dataset_id",
        ),
        (
            json!({"model_id": sequential_id, "eval": {"dataset_id": tensor_id, "context": 16}, "steps": [{"op": "prune", "sparsity": 0.5}]}),
            "validation_failed",
            "/eval/context",
        ),
    ];
    for (body, code, pointer) in cases {
        let res = t.post_json("/v1/jobs", &body).await;
        let p = res.assert_problem(422, code);
        let errors = p["errors"].as_array().unwrap();
        assert!(
            errors
                .iter()
                .any(|e| e["pointer"] == pointer && e["code"] == code),
            "{body}: {p}"
        );
    }
    assert_eq!(
        t.get("/v1/jobs").await.json()["items"]
            .as_array()
            .unwrap()
            .len(),
        before,
        "no refused job is stored"
    );
    // Weight-only ops still work on the family the engine does not run.
    let (job, _) = run_to_end(
        &t,
        json!({"model_id": gpt2["id"], "steps": [{"op": "quantize", "method": "uniform", "bits": 8}]}),
    )
    .await;
    assert_eq!(job["state"], "succeeded");
}

async fn transformer_defaults_select_the_block_linear_layers(t: TestApp) {
    let model = upload_fixture(&t, "tiny-llama", &[]).await;
    let data = upload_text(&t, "text/plain", b"one document\n\nanother one").await;
    let res = t
        .post_json(
            "/v1/jobs?dry_run=true",
            &json!({"model_id": model["id"], "eval": {"dataset_id": data["id"]},
                    "steps": [{"op": "quantize", "method": "uniform", "bits": 8}]}),
        )
        .await;
    assert_eq!(res.status, 200, "{}", res.text());
    let plan = res.json();
    let step = &plan["steps"][0];
    assert_eq!(
        step["step"]["include"],
        json!([
            "model.layers.*.self_attn.*_proj.weight",
            "model.layers.*.mlp.*_proj.weight"
        ])
    );
    let tensors: Vec<&str> = step["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(tensors.len(), 2 * 7, "{tensors:?}");
    assert!(tensors
        .iter()
        .all(|n| n.starts_with("model.layers.") && !n.contains("norm")));
    // Evaluating holds both networks' f32 weights.
    let weights: u64 = model["parameters"].as_u64().unwrap() * 4;
    assert!(
        plan["estimated_peak_memory_bytes"].as_u64().unwrap() > 2 * weights,
        "{plan}"
    );
    assert_eq!(
        plan["eval"]["context"], 128,
        "capped at max_position_embeddings"
    );
    // The job runs on exactly those tensors: embeddings and norms are untouched.
    let (job, _) = run_to_end(
        &t,
        json!({"model_id": model["id"], "steps": [{"op": "quantize", "method": "uniform", "bits": 4}]}),
    )
    .await;
    let out = t
        .get(&format!(
            "/v1/models/{}/content",
            job["result"]["model_id"].as_str().unwrap()
        ))
        .await;
    let before = std::fs::read(fixture_dir("tiny-llama").join("model.safetensors")).unwrap();
    let (a, b) = (
        safetensors::SafeTensors::deserialize(&before).unwrap(),
        safetensors::SafeTensors::deserialize(&out.body).unwrap(),
    );
    for name in [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
    ] {
        assert_eq!(
            a.tensor(name).unwrap().data(),
            b.tensor(name).unwrap().data(),
            "{name}"
        );
    }
    assert_ne!(
        a.tensor("model.layers.0.mlp.up_proj.weight")
            .unwrap()
            .data(),
        b.tensor("model.layers.0.mlp.up_proj.weight")
            .unwrap()
            .data()
    );
}

async fn gguf_uploads_become_folder_models(t: TestApp) {
    let gguf_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
    let bytes = std::fs::read(gguf_dir.join("tiny-llama-bpe.gguf")).unwrap();
    let res = t
        .post_bytes(
            "/v1/models?name=tiny",
            "application/octet-stream",
            bytes.clone(),
        )
        .await;
    assert_eq!(res.status, 201, "{}", res.text());
    let model = res.json();
    assert_schema("Model", &model);
    assert_eq!(model["family"], "llama");
    assert_eq!(model["config"]["num_key_value_heads"], 2);
    assert_eq!(model["config"]["tie_word_embeddings"], true);
    let paths: Vec<&str> = model["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    let id = model["id"].as_str().unwrap();
    let weights = t.get(&format!("/v1/models/{id}/content")).await;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&weights.body).unwrap();
    let source: Value =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["whittle.source"]).unwrap();
    assert_eq!(source["sha256"], sha256_hex(&bytes));
    // The imported model runs: an evaluation on text.
    let data = upload_text(
        &t,
        "text/plain",
        b"the cat sat on the mat.\n\na quick brown fox.",
    )
    .await;
    let (_, metrics) = run_to_end(
        &t,
        json!({"model_id": id, "steps": [{"op": "evaluate", "dataset_id": data["id"], "context": 16}]}),
    )
    .await;
    assert!(
        metrics["steps"][0]["summary"]["perplexity"]
            .as_f64()
            .unwrap()
            > 1.0
    );
    // The same file as a multipart part named *.gguf.
    let res = t
        .post_multipart(
            "/v1/models",
            &[Part {
                name: "file",
                filename: Some("tiny.gguf"),
                bytes: bytes.clone(),
            }],
        )
        .await;
    assert_eq!(res.status, 201, "{}", res.text());
    assert_eq!(res.json()["name"], "tiny");
    assert_eq!(
        res.json()["sha256"],
        model["sha256"],
        "the import is deterministic"
    );

    // Refusals store nothing.
    let before = t.stored_files();
    let models_before = t.get("/v1/models").await.json()["items"]
        .as_array()
        .unwrap()
        .len();
    let mut other = bytes.clone();
    let at = other.windows(5).position(|w| w == b"llama").unwrap();
    other[at..at + 5].copy_from_slice(b"gpt_2");
    let p = t
        .post_bytes("/v1/models", "application/octet-stream", other)
        .await
        .assert_problem(422, "unsupported_family");
    assert!(
        p["detail"].as_str().unwrap().contains("supported: llama"),
        "{p}"
    );
    t.post_bytes(
        "/v1/models",
        "application/octet-stream",
        bytes[..bytes.len() - 100].to_vec(),
    )
    .await
    .assert_problem(422, "invalid_model_folder");
    t.post_bytes(
        "/v1/models",
        "application/octet-stream",
        b"GGUF\x03\x00\x00\x00".to_vec(),
    )
    .await
    .assert_problem(422, "invalid_model_folder");
    assert_eq!(t.stored_files(), before);
    assert_eq!(
        t.get("/v1/models").await.json()["items"]
            .as_array()
            .unwrap()
            .len(),
        models_before
    );
}

async fn llama_gguf_exports_are_what_llama_cpp_reads(t: TestApp) {
    let model = upload_fixture(&t, "tiny-llama", &[]).await;
    let data = upload_text(
        &t,
        "application/jsonl",
        reference()["jsonl"].as_str().unwrap().as_bytes(),
    )
    .await;
    let eval = json!({"dataset_id": data["id"], "context": 16, "stride": 8});
    // q4_k on rows of 32 and 64 values: every block-linear tensor falls back to q5_0.
    let (job, metrics) = run_to_end(
        &t,
        json!({"model_id": model["id"], "eval": eval,
               "steps": [{"op": "quantize", "method": "gguf", "type": "q4_k"}]}),
    )
    .await;
    let summary = &metrics["steps"][0]["summary"];
    assert_eq!(summary["architecture"], "llama");
    let fallbacks = summary["fallbacks"].as_array().unwrap();
    assert_eq!(fallbacks.len(), 14, "{summary}");
    assert!(fallbacks.iter().all(|f| f["type"] == "q5_0"));
    assert!(metrics["steps"][0]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["tensor"] == "model.layers.0.self_attn.q_proj.weight"));
    let gguf_art = job["result"]["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["kind"] == "gguf")
        .unwrap()
        .clone();
    let gguf = t
        .get(&format!(
            "/v1/artifacts/{}/content",
            gguf_art["id"].as_str().unwrap()
        ))
        .await
        .body;
    // llama.cpp's layout: its names, its hyper-parameters, the tokenizer.
    for key in [
        &b"general.architecture"[..],
        b"llama.block_count",
        b"llama.attention.head_count_kv",
        b"tokenizer.ggml.tokens",
        b"tokenizer.ggml.merges",
        b"blk.1.attn_q.weight",
        b"token_embd.weight",
    ] {
        assert!(
            gguf.windows(key.len()).any(|w| w == key),
            "{}",
            String::from_utf8_lossy(key)
        );
    }
    let hf_name = b"model.layers.0.self_attn.q_proj.weight";
    assert!(
        !gguf.windows(hf_name.len()).any(|w| w == hf_name),
        "Hugging Face names are gone"
    );
    // Imported back (as transformers would load it), it is the job's output model: the same
    // weights (the permutation undone), the same tokenizer, the same perplexity.
    let res = t
        .post_bytes(
            "/v1/models?name=back",
            "application/octet-stream",
            gguf.to_vec(),
        )
        .await;
    assert_eq!(res.status, 201, "{}", res.text());
    let back = res.json();
    let out = t
        .get(&format!(
            "/v1/models/{}/content",
            job["result"]["model_id"].as_str().unwrap()
        ))
        .await
        .body;
    let back_w = t
        .get(&format!(
            "/v1/models/{}/content",
            back["id"].as_str().unwrap()
        ))
        .await
        .body;
    let (a, b) = (
        safetensors::SafeTensors::deserialize(&out).unwrap(),
        safetensors::SafeTensors::deserialize(&back_w).unwrap(),
    );
    for (name, view) in a.tensors() {
        assert_eq!(view.data(), b.tensor(&name).unwrap().data(), "{name}");
    }
    assert_eq!(back["config"]["num_key_value_heads"], 2);
    assert_eq!(back["config"]["tie_word_embeddings"], true);
    let (_, m2) = run_to_end(
        &t,
        json!({"model_id": back["id"], "steps": [{"op": "evaluate", "dataset_id": data["id"], "context": 16, "stride": 8}]}),
    )
    .await;
    close(
        &m2["steps"][0]["summary"]["perplexity"],
        &metrics["final"]["perplexity"],
        1e-6,
    );
}

/// Three classes of sentences a tiny encoder tells apart by their words.
fn labelled_sentences() -> Vec<u8> {
    let topics = [
        [
            "the cat sat on the mat",
            "a dog ran to the door",
            "the cat and the dog",
        ],
        [
            "tea with milk and sugar",
            "bread and milk for tea",
            "sugar in the tea",
        ],
        [
            "rain fell all night",
            "the wind and the rain",
            "a cold night of rain",
        ],
    ];
    let mut out = String::new();
    for (label, docs) in topics.iter().enumerate() {
        for d in docs {
            out.push_str(&json!({"text": d, "label": label}).to_string());
            out.push('\n');
        }
    }
    out.into_bytes()
}

async fn transformers_finetune_as_classifiers_and_language_models(t: TestApp) {
    let bert = upload_fixture(&t, "tiny-bert", &[]).await;
    let bert_id = bert["id"].as_str().unwrap();
    let labelled = upload_text(&t, "application/jsonl", &labelled_sentences()).await;
    let labelled_id = labelled["id"].as_str().unwrap();
    // A bert encoder gains a classifier and learns it end to end.
    let (job, metrics) = run_to_end(
        &t,
        json!({"model_id": bert_id, "eval": {"dataset_id": labelled_id},
               "steps": [{"op": "finetune", "dataset_id": labelled_id, "epochs": 20,
                          "batch_size": 3, "optimizer": {"name": "adamw", "lr": 0.003},
                          "head": {"num_classes": 3}, "grad_clip": 1.0, "seed": 3,
                          "freeze": ["embeddings.word_embeddings.*"]}]}),
    )
    .await;
    assert_eq!(job["steps"][0]["head"]["layer"], "classifier");
    // The new head can have its own learning rate before it exists.
    let res = t
        .post_json(
            "/v1/jobs?dry_run=true",
            &json!({"model_id": bert_id, "steps": [{"op": "finetune", "dataset_id": labelled_id,
                    "head": {"num_classes": 3},
                    "layer_lr": {"classifier.*": 10.0, "pooler.*": 10.0}}]}),
        )
        .await;
    assert_eq!(res.status, 200, "{}", res.text());
    let step = &metrics["steps"][0];
    assert_eq!(step["summary"]["objective"], "classification");
    let epochs = step["epochs"].as_array().unwrap();
    assert_eq!(epochs.len(), 20);
    let loss = |e: &Value| e["train_loss"].as_f64().unwrap();
    assert!(loss(&epochs[19]) < 0.5 * loss(&epochs[0]), "{step}");
    // The output is a classifier: its accuracy is measured, the embeddings still compared.
    let fin = &metrics["final"];
    assert_eq!(fin["accuracy"], 1.0, "{fin}");
    assert!(metrics["baseline"]["accuracy"].is_null(), "{metrics}");
    assert!(fin["embedding_cosine"]["min"].is_number(), "{fin}");
    // ... a folder model whose config and tensors are transformers' BertForSequenceClassification.
    let out_id = job["result"]["model_id"].as_str().unwrap();
    let out = t.get(&format!("/v1/models/{out_id}")).await.json();
    assert_eq!(out["family"], "bert");
    assert_eq!(
        out["config"]["architectures"][0],
        "BertForSequenceClassification"
    );
    assert_eq!(out["config"]["id2label"]["2"], "LABEL_2");
    let config: Value = t
        .get(&format!("/v1/models/{out_id}/files/config.json"))
        .await
        .json();
    assert_eq!(config, out["config"]);
    let tensors = out["tensors"].as_array().unwrap();
    let shape = |n: &str| {
        tensors
            .iter()
            .find(|t| t["name"] == n)
            .map(|t| t["shape"].clone())
    };
    assert_eq!(shape("classifier.weight"), Some(json!([3, 32])));
    assert_eq!(shape("bert.pooler.dense.weight"), Some(json!([32, 32])));
    assert!(shape("embeddings.word_embeddings.weight").is_none());
    assert_eq!(
        out["files"].as_array().unwrap().len(),
        bert["files"].as_array().unwrap().len()
    );
    // The frozen embeddings kept their bytes.
    let weights = |id: String| {
        let t = &t;
        async move {
            t.get(&format!("/v1/models/{id}/files/model.safetensors"))
                .await
                .body
        }
    };
    let (a, b) = (
        weights(bert_id.to_string()).await,
        weights(out_id.to_string()).await,
    );
    let (a, b) = (
        safetensors::SafeTensors::deserialize(&a).unwrap(),
        safetensors::SafeTensors::deserialize(&b).unwrap(),
    );
    assert_eq!(
        a.tensor("embeddings.word_embeddings.weight")
            .unwrap()
            .data(),
        b.tensor("bert.embeddings.word_embeddings.weight")
            .unwrap()
            .data()
    );
    assert_ne!(
        a.tensor("encoder.layer.1.output.dense.weight")
            .unwrap()
            .data(),
        b.tensor("bert.encoder.layer.1.output.dense.weight")
            .unwrap()
            .data()
    );
    // The classifier trains on: its own head, no `head` needed.
    let (_, again) = run_to_end(
        &t,
        json!({"model_id": out_id, "steps": [{"op": "finetune", "dataset_id": labelled_id,
               "epochs": 1, "batch_size": 3, "validation": {"dataset_id": labelled_id}}]}),
    )
    .await;
    assert_eq!(
        again["steps"][0]["epochs"][0]["val_accuracy"], 1.0,
        "{again}"
    );

    // A llama model learns its text with the language-model loss: perplexity falls.
    let llama = upload_fixture(&t, "tiny-llama", &[]).await;
    let text = upload_text(
        &t,
        "text/plain",
        b"the cat sat on the mat.\n\nthe cat sat on the mat again.\n\nthe mat sat on the cat.",
    )
    .await;
    let text_id = text["id"].as_str().unwrap();
    let (_, metrics) = run_to_end(
        &t,
        json!({"model_id": llama["id"], "eval": {"dataset_id": text_id, "context": 16},
               "steps": [{"op": "finetune", "dataset_id": text_id, "epochs": 8, "batch_size": 2,
                          "optimizer": {"name": "adamw", "lr": 0.01}, "seed": 1,
                          "validation": {"dataset_id": text_id}}]}),
    )
    .await;
    let step = &metrics["steps"][0];
    assert_eq!(step["summary"]["objective"], "causal_lm");
    let (before, after) = (
        metrics["baseline"]["perplexity"].as_f64().unwrap(),
        metrics["final"]["perplexity"].as_f64().unwrap(),
    );
    assert!(after < 0.5 * before, "{before} → {after}");
    assert!(
        step["epochs"][7]["val_accuracy"].as_f64().unwrap() > 0.5,
        "{step}"
    );

    // Refused before anything runs.
    let unlabelled = text_id;
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            json!({"op": "finetune", "dataset_id": text_id, "head": {"num_classes": 2}}),
            "validation_failed",
            "/steps/0/head",
        ),
        (
            json!({"op": "finetune", "dataset_id": labelled_id}),
            "validation_failed",
            "/steps/0/head",
        ),
        (
            json!({"op": "finetune", "dataset_id": unlabelled, "head": {"num_classes": 2}}),
            "dataset_unlabeled",
            "/steps/0/dataset_id",
        ),
        (
            json!({"op": "finetune", "dataset_id": labelled_id, "head": {"layer": "fc", "num_classes": 3}}),
            "validation_failed",
            "/steps/0/head/layer",
        ),
        (
            json!({"op": "finetune", "dataset_id": labelled_id, "head": {"num_classes": 2}}),
            "labels_out_of_range",
            "/steps/0/dataset_id",
        ),
        (
            json!({"op": "finetune", "dataset_id": labelled_id, "head": {"num_classes": 3}, "freeze": ["decoder.*"]}),
            "validation_failed",
            "/steps/0/freeze/0",
        ),
    ];
    for (i, (step, code, pointer)) in cases.into_iter().enumerate() {
        // The first case is a llama model's; the others a bert model's.
        let model = if i == 0 { &llama["id"] } else { &bert["id"] };
        let body = json!({"model_id": model, "steps": [step]});
        let res = t.post_json("/v1/jobs", &body).await;
        let p = res.assert_problem(422, code);
        assert!(
            p["errors"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["pointer"] == pointer && e["code"] == code),
            "{body}: {p}"
        );
    }
}

async fn transformers_distill_into_students_built_from_the_teacher(t: TestApp) {
    let llama = upload_fixture(&t, "tiny-llama", &[]).await;
    let text = upload_text(
        &t,
        "text/plain",
        b"the cat sat on the mat.\n\nthe dog sat on the rug.\n\na cat and a dog sat on a mat.\n\nthe rain fell on the mat and the rug.",
    )
    .await;
    let text_id = text["id"].as_str().unwrap();
    // A one-block llama student from block 1, distilled on the per-token distributions, then
    // quantized: the second step sees the student's tensors.
    let (job, metrics) = run_to_end(
        &t,
        json!({"model_id": llama["id"], "eval": {"dataset_id": text_id, "context": 16},
               "steps": [{"op": "distill", "dataset_id": text_id,
                          "student": {"from_teacher": {"layers": [1]}}, "epochs": 15,
                          "batch_size": 2, "optimizer": {"name": "adamw", "lr": 0.01},
                          "alpha": 1.0, "temperature": 1.0, "seed": 2, "baseline": true,
                          "validation": {"dataset_id": text_id}},
                         {"op": "quantize", "method": "uniform", "bits": 8, "granularity": "per_channel"}]}),
    )
    .await;
    assert_eq!(
        job["steps"][0]["student"]["from_teacher"]["layers"],
        json!([1])
    );
    let s = &metrics["steps"][0]["summary"];
    assert_eq!(s["loss"], "logits");
    assert_eq!(s["student_layers"], json!([1]));
    assert!(s["parameter_ratio"].as_f64().unwrap() > 1.0, "{s}");
    let kl = |v: &Value| v["kl_divergence"]["mean"].as_f64().unwrap();
    assert!(kl(&s["student"]) < 0.5 * kl(&s["untrained"]), "{s}");
    assert!(s["baseline"]["perplexity"].is_number(), "{s}");
    assert!(
        s["validation"]["agreement_with_teacher"].as_f64().unwrap()
            > s["validation"]["baseline_agreement_with_teacher"]
                .as_f64()
                .unwrap(),
        "{s}"
    );
    // The student is a one-block folder model; the quantize step selected its block only.
    let layers: Vec<&str> = metrics["steps"][1]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["tensor"].as_str().unwrap_or_else(|| panic!("{l}")))
        .collect();
    assert!(
        !layers.is_empty() && layers.iter().all(|l| l.starts_with("model.layers.0.")),
        "{layers:?}"
    );
    let out_id = job["result"]["model_id"].as_str().unwrap();
    let out = t.get(&format!("/v1/models/{out_id}")).await.json();
    assert_eq!(out["config"]["num_hidden_layers"], 1);
    assert!(out["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| !t["name"].as_str().unwrap().starts_with("model.layers.1.")));
    assert!(metrics["final"]["kl_divergence"]["mean"].as_f64().unwrap() < kl(&s["untrained"]));

    // That uploaded one-block model as the student of a second distillation, matched on
    // hidden states: its block stands in for the teacher's last.
    let (job, metrics) = run_to_end(
        &t,
        json!({"model_id": llama["id"], "eval": {"dataset_id": text_id, "context": 16},
               "steps": [{"op": "distill", "dataset_id": text_id, "loss": "hidden",
                          "student": {"model_id": out_id}, "epochs": 3, "batch_size": 2,
                          "optimizer": {"name": "adamw", "lr": 0.001}, "seed": 2}]}),
    )
    .await;
    let s = &metrics["steps"][0]["summary"];
    assert_eq!(s["loss"], "hidden", "{s}");
    assert_eq!(s["student_model_id"], out_id, "{s}");
    assert_eq!(
        s["hidden_pairs"],
        json!([{"student": "model.layers.0", "teacher": "model.layers.1"}])
    );
    assert!(
        s["temperature"].is_null() && s["student_layers"].is_null(),
        "{s}"
    );
    let kd = &metrics["steps"][0]["kd_epochs"];
    assert!(
        kd[0]["soft_loss"].is_null() && kd[0]["feature_loss"].is_number(),
        "{kd}"
    );
    let second = job["result"]["model_id"].as_str().unwrap();
    let second = t.get(&format!("/v1/models/{second}")).await.json();
    assert_eq!(second["config"]["num_hidden_layers"], 1);

    // A one-block bert encoder matched on sentence embeddings (MSE).
    let bert = upload_fixture(&t, "tiny-bert", &[]).await;
    let labelled = upload_text(&t, "application/jsonl", &labelled_sentences()).await;
    let labelled_id = labelled["id"].as_str().unwrap();
    let (_, metrics) = run_to_end(
        &t,
        json!({"model_id": bert["id"], "eval": {"dataset_id": labelled_id},
               "steps": [{"op": "distill", "dataset_id": labelled_id, "loss": "embeddings",
                          "distance": "mse", "student": {"from_teacher": {"layers": [0]}},
                          "epochs": 10, "batch_size": 3, "optimizer": {"name": "adamw", "lr": 0.01},
                          "validation": {"dataset_id": labelled_id}}]}),
    )
    .await;
    let s = &metrics["steps"][0]["summary"];
    assert_eq!(
        (s["loss"].as_str(), s["distance"].as_str()),
        (Some("embeddings"), Some("mse"))
    );
    assert!(s["alpha"].is_null(), "{s}");
    let cos = |v: &Value| v["embedding_cosine"]["mean"].as_f64().unwrap();
    assert!(cos(&s["student"]) > cos(&s["untrained"]), "{s}");
    assert!(
        s["validation"]["embedding_cosine"].as_f64().unwrap() > 0.9,
        "{s}"
    );

    // The same student matched on its block's hidden states (no projection: equal widths),
    // with the baseline an encoder has without a teacher: SimCSE on the text alone.
    let (_, metrics) = run_to_end(
        &t,
        json!({"model_id": bert["id"], "eval": {"dataset_id": labelled_id},
               "steps": [{"op": "distill", "dataset_id": labelled_id, "loss": "hidden",
                          "projection": false, "baseline": true,
                          "student": {"from_teacher": {"layers": [0]}},
                          "epochs": 10, "batch_size": 3, "optimizer": {"name": "adamw", "lr": 0.01},
                          "validation": {"dataset_id": labelled_id}}]}),
    )
    .await;
    let s = &metrics["steps"][0]["summary"];
    assert_eq!(
        (s["loss"].as_str(), s["projection"].as_bool()),
        (Some("hidden"), Some(false)),
        "{s}"
    );
    assert_eq!(
        s["hidden_pairs"],
        json!([{"student": "encoder.layer.0", "teacher": "encoder.layer.1"}])
    );
    assert!(cos(&s["student"]) > cos(&s["untrained"]), "{s}");
    assert!(s["baseline"]["similarity_spearman"].is_number(), "{s}");
    assert!(
        s["validation"]["baseline_embedding_cosine"].is_number()
            && s["validation"]["baseline_agreement_with_teacher"].is_null(),
        "{s}"
    );
    assert_eq!(s["baseline_epochs"].as_array().unwrap().len(), 10, "{s}");

    // A narrower one-block student drawn from the teacher's config learns its hidden states
    // through the projection; its embeddings are not comparable with the teacher's.
    let config = json!({"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2,
                        "intermediate_size": 24});
    let (job, metrics) = run_to_end(
        &t,
        json!({"model_id": bert["id"], "eval": {"dataset_id": labelled_id},
               "steps": [{"op": "distill", "dataset_id": labelled_id, "loss": "hidden",
                          "student": {"config": config}, "epochs": 10, "batch_size": 3,
                          "optimizer": {"name": "adamw", "lr": 0.01},
                          "validation": {"dataset_id": labelled_id}}]}),
    )
    .await;
    let s = &metrics["steps"][0]["summary"];
    assert_eq!(s["student_config"], config, "{s}");
    assert!(s["student"].is_null() && s["untrained"].is_null(), "{s}");
    let kd = metrics["steps"][0]["kd_epochs"].as_array().unwrap();
    let f = |e: &Value| e["feature_loss"].as_f64().unwrap();
    assert!(f(&kd[9]) < 0.5 * f(&kd[0]), "{kd:?}");
    let drawn = job["result"]["model_id"].as_str().unwrap();
    let drawn = t.get(&format!("/v1/models/{drawn}")).await.json();
    assert_eq!(
        (
            drawn["config"]["hidden_size"].as_u64(),
            drawn["config"]["num_hidden_layers"].as_u64()
        ),
        (Some(16), Some(1))
    );
    assert!(drawn["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["name"] == "encoder.layer.0.intermediate.dense.weight"
            && t["shape"] == json!([24, 16])));
    // The teacher's pooler is drawn too, at the student's width (transformers' BertModel).
    assert!(drawn["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["name"] == "pooler.dense.weight" && t["shape"] == json!([16, 16])));

    // QAT on the student's language-model loss: 4-bit weights trained in the loop read the
    // text better than the same weights rounded after training.
    let student_id = out_id;
    let quantize = json!({"op": "quantize", "method": "uniform", "bits": 4,
                          "granularity": "per_channel", "symmetric": true});
    let mut qat = quantize.clone();
    qat["qat"] = json!({"dataset_id": text_id, "epochs": 10, "batch_size": 2, "seed": 1,
                        "optimizer": {"name": "adamw", "lr": 0.003}});
    let eval = json!({"dataset_id": text_id, "context": 16});
    let (_, ptq) = run_to_end(
        &t,
        json!({"model_id": student_id, "eval": eval, "steps": [quantize]}),
    )
    .await;
    let (_, trained) = run_to_end(
        &t,
        json!({"model_id": student_id, "eval": eval, "steps": [qat]}),
    )
    .await;
    assert_eq!(
        trained["steps"][0]["qat"]["mode"], "fake_quant_ste",
        "{trained}"
    );
    let ppl = |m: &Value| m["final"]["perplexity"].as_f64().unwrap();
    assert!(
        ppl(&trained) < ppl(&ptq),
        "QAT {} vs PTQ {}",
        ppl(&trained),
        ppl(&ptq)
    );

    // Refused before anything runs.
    let sequential = json!(fresh_model(&t, tiny_arch(), 0).await);
    let classifier = upload_fixture(&t, "tiny-bert-cls", &[]).await;
    let distill = |extra: Value| {
        let mut step = json!({"op": "distill", "dataset_id": text_id,
                              "student": {"from_teacher": {"layers": [0]}}});
        for (k, v) in extra.as_object().unwrap() {
            step[k] = v.clone();
        }
        step
    };
    let cases: Vec<(&Value, Value, &str, &str)> = vec![
        (
            &llama["id"],
            distill(json!({"student": {"from_teacher": {"layers": [2]}}})),
            "validation_failed",
            "/steps/0/student/from_teacher/layers/0",
        ),
        (
            &llama["id"],
            distill(json!({"student": {"from_teacher": {"layers": [1, 1]}}})),
            "validation_failed",
            "/steps/0/student/from_teacher/layers/1",
        ),
        (
            &llama["id"],
            distill(json!({"student": {"architecture": tiny_arch()}})),
            "unsupported_operation",
            "/steps/0/student",
        ),
        (
            &llama["id"],
            distill(json!({"student": {"model_id": bert["id"]}})),
            "validation_failed",
            "/steps/0/student/model_id",
        ),
        (
            &llama["id"],
            distill(json!({"student": {"model_id": sequential}})),
            "validation_failed",
            "/steps/0/student/model_id",
        ),
        (
            &llama["id"],
            distill(json!({"projection": false})),
            "validation_failed",
            "/steps/0/projection",
        ),
        (
            &bert["id"],
            distill(json!({"loss": "hidden", "projection": false,
                           "student": {"config": {"hidden_size": 16, "num_attention_heads": 2}}})),
            "validation_failed",
            "/steps/0/projection",
        ),
        (
            &bert["id"],
            distill(json!({"student": {"config": {"hidden_size": 16, "num_attention_heads": 2}}})),
            "validation_failed",
            "/steps/0/student/config",
        ),
        (
            &bert["id"],
            distill(json!({"student": {"config": {"hidden_size": 30}}})),
            "validation_failed",
            "/steps/0/student/config/num_attention_heads",
        ),
        (
            &bert["id"],
            distill(json!({"student": {"config": {"vocab_size": 10}}})),
            "validation_failed",
            "/steps/0/student/config/vocab_size",
        ),
        (
            &llama["id"],
            distill(json!({"student": {"config": {"num_key_value_heads": 3}}})),
            "validation_failed",
            "/steps/0/student/config/num_key_value_heads",
        ),
        (
            &sequential,
            json!({"op": "distill", "dataset_id": text_id,
                   "student": {"config": {"num_hidden_layers": 1}}}),
            "validation_failed",
            "/steps/0/student/config",
        ),
        (
            &sequential,
            json!({"op": "distill", "dataset_id": text_id, "loss": "hidden",
                   "student": {"architecture": tiny_arch()}}),
            "validation_failed",
            "/steps/0/loss",
        ),
        (
            &llama["id"],
            distill(json!({"loss": "embeddings"})),
            "validation_failed",
            "/steps/0/loss",
        ),
        (
            &llama["id"],
            distill(json!({"distance": "mse"})),
            "validation_failed",
            "/steps/0/distance",
        ),
        (
            &bert["id"],
            distill(json!({"loss": "logits"})),
            "validation_failed",
            "/steps/0/loss",
        ),
        (
            &sequential,
            distill(json!({})),
            "validation_failed",
            "/steps/0/student/from_teacher",
        ),
        (
            &classifier["id"],
            distill(json!({"alpha": 0.5})),
            "dataset_unlabeled",
            "/steps/0/dataset_id",
        ),
        (
            &sequential,
            json!({"op": "distill", "dataset_id": text_id, "loss": "embeddings",
                   "student": {"architecture": tiny_arch()}}),
            "validation_failed",
            "/steps/0/loss",
        ),
        (
            &bert["id"],
            json!({"op": "quantize", "method": "uniform", "bits": 4,
                   "qat": {"dataset_id": labelled_id}}),
            "validation_failed",
            "/steps/0/qat",
        ),
    ];
    for (model, step, code, pointer) in cases {
        let body = json!({"model_id": model, "steps": [step]});
        let res = t.post_json("/v1/jobs", &body).await;
        assert_eq!(res.status, 422, "{body}: {}", res.text());
        let p = res.json();
        assert!(
            p["errors"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["pointer"] == pointer && e["code"] == code),
            "{body}: {p}"
        );
    }
}

on_both_backends!(
    transformers_distill_into_students_built_from_the_teacher,
    transformers_finetune_as_classifiers_and_language_models,
    llama_gguf_exports_are_what_llama_cpp_reads,
    gguf_uploads_become_folder_models,
    transformer_defaults_select_the_block_linear_layers,
    text_datasets_upload_and_refuse,
    llama_evaluation_matches_transformers,
    bert_evaluation_reports_cosines,
    what_the_engine_does_not_run_is_refused,
);

/// Training a transformer is sized before it is queued: the dry run's estimate grows with the
/// batch, and a batch that cannot fit is refused at its step (finetune, distill, QAT).
#[tokio::test]
async fn transformer_training_is_sized_before_it_runs() {
    let t = TestApp::with(Backend::Sqlite, |c| c.job_memory_bytes = Some(1 << 30))
        .await
        .unwrap();
    let llama = upload_fixture(&t, "tiny-llama", &[]).await;
    let doc = "the cat sat on the mat and looked at the door. ".repeat(8);
    let text = upload_text(&t, "text/plain", format!("{doc}\n\n{doc}").as_bytes()).await;
    let finetune = |batch: usize| {
        json!({"model_id": llama["id"], "steps": [{"op": "finetune", "dataset_id": text["id"],
               "batch_size": batch}]})
    };
    let planned = |body: Value| {
        let t = &t;
        async move {
            let res = t.post_json("/v1/jobs?dry_run=true", &body).await;
            assert_eq!(res.status, 200, "{}", res.text());
            res.json()["estimated_peak_memory_bytes"].as_u64().unwrap()
        }
    };
    let small = planned(finetune(2)).await;
    let large = planned(finetune(64)).await;
    assert!(small > 0 && large > 4 * small, "{small} {large}");
    let distill = json!({"model_id": llama["id"], "steps": [{"op": "distill", "dataset_id": text["id"],
        "student": {"from_teacher": {"layers": [0]}}, "batch_size": 65536}]});
    let qat = json!({"model_id": llama["id"], "steps": [{"op": "quantize", "method": "uniform",
        "bits": 4, "qat": {"dataset_id": text["id"], "batch_size": 65536}}]});
    for body in [finetune(65536), distill, qat] {
        let p = t
            .post_json("/v1/jobs", &body)
            .await
            .assert_problem(422, "memory_limit_exceeded");
        assert_eq!(p["errors"][0]["pointer"], "/steps/0", "{body}: {p}");
    }
    // A new head's weights count: a million classes of 32 wide are half a GB to train.
    let bert = upload_fixture(&t, "tiny-bert", &[]).await;
    let labelled = upload_text(&t, "application/jsonl", &labelled_sentences()).await;
    let headed = |classes: usize| {
        json!({"model_id": bert["id"], "steps": [{"op": "finetune", "dataset_id": labelled["id"],
               "batch_size": 2, "head": {"num_classes": classes}}]})
    };
    let (few, many) = (planned(headed(3)).await, planned(headed(1_000_000)).await);
    assert!(many - few > 500 << 20, "{few} {many}");
    // An encoder's SimCSE baseline runs each batch twice: its activations count twice.
    let encoder_distill = |baseline: bool| {
        json!({"model_id": bert["id"], "steps": [{"op": "distill", "dataset_id": labelled["id"],
               "student": {"from_teacher": {"layers": [0]}}, "batch_size": 64,
               "baseline": baseline}]})
    };
    let (alone, twice) = (
        planned(encoder_distill(false)).await,
        planned(encoder_distill(true)).await,
    );
    assert!(twice > alone, "{alone} {twice}");
    // What fits is accepted.
    let res = t.post_json("/v1/jobs", &finetune(2)).await;
    assert_eq!(res.status, 202, "{}", res.text());
}
