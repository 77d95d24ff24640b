//! The `whittle` binary as a client, end to end against a real server on a socket: uploads,
//! `jobs submit --wait` with JSON lines when piped, exit codes, errors on stderr.

use std::process::Command;

use serde_json::{json, Value};

use crate::helpers::*;

/// Serves `t`'s app on a free port with one worker; the base URL.
async fn serve(t: &TestApp) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let router = t.router.clone();
    tokio::spawn(async move { axum::serve(listener, router).await });
    let token = t.app.state.live.shutdown().clone();
    t.app.spawn_workers(1, &token);
    url
}

/// Runs the binary with `args` against `url`; (exit code, stdout, stderr).
async fn whittle(url: &str, args: &[&str]) -> (i32, String, String) {
    let (url, args): (String, Vec<String>) = (
        url.to_string(),
        args.iter().map(|a| a.to_string()).collect(),
    );
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_whittle"))
            .args(&args)
            .env("WHITTLE_URL", url)
            .env_remove("WHITTLE_API_KEY")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

async fn the_cli_uploads_submits_waits_and_exits_by_outcome(t: TestApp) {
    let url = serve(&t).await;
    let dir = t.data_dir();
    // A model folder and a text dataset from disk.
    let folder = dir.join("tiny-llama");
    std::fs::create_dir_all(&folder).unwrap();
    let fixture = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/transformers/tiny-llama");
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(fixture.join(f), folder.join(f)).unwrap();
    }
    let (code, out, err) = whittle(
        &url,
        &[
            "models",
            "upload",
            folder.to_str().unwrap(),
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let model: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (model["name"].as_str(), model["family"].as_str()),
        (Some("tiny-llama"), Some("llama"))
    );
    let jsonl = dir.join("texts.jsonl");
    std::fs::write(
        &jsonl,
        "{\"text\": \"the cat sat on the mat.\"}\n{\"text\": \"a quick brown fox.\"}\n",
    )
    .unwrap();
    let (code, out, err) = whittle(&url, &["datasets", "upload", jsonl.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    let data: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        data["format"], "jsonl",
        "the format comes from the extension"
    );

    // submit --wait, piped: JSON lines, the last one the finished job; exit 0.
    let spec = dir.join("job.json");
    std::fs::write(
        &spec,
        json!({"model_id": model["id"], "steps": [{"op": "quantize", "method": "uniform", "bits": 8}],
               "eval": {"dataset_id": data["id"], "context": 16}})
        .to_string(),
    )
    .unwrap();
    let (code, out, err) =
        whittle(&url, &["jobs", "submit", spec.to_str().unwrap(), "--wait"]).await;
    assert_eq!(code, 0, "{err}\n{out}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["event"], "submitted");
    assert!(lines.iter().any(|l| l["event"] == "progress"), "{out}");
    let last = lines.last().unwrap();
    assert_eq!(
        (last["event"].as_str(), last["data"]["state"].as_str()),
        (Some("done"), Some("succeeded"))
    );
    let job_id = last["data"]["id"].as_str().unwrap().to_string();
    let (code, out, _) = whittle(&url, &["jobs", "metrics", &job_id, "--output", "json"]).await;
    assert_eq!(code, 0);
    let metrics: Value = serde_json::from_str(&out).unwrap();
    assert!(metrics["final"]["perplexity"].as_f64().unwrap() > 1.0);
    let (code, out, _) = whittle(
        &url,
        &["jobs", "list", "--state", "succeeded", "--output", "table"],
    )
    .await;
    assert_eq!(code, 0);
    assert!(out.contains(&job_id) && out.contains("quantize"), "{out}");

    // Downloads: the output model's weights, and an artifact.
    let model_out = last["data"]["result"]["model_id"].as_str().unwrap();
    let path = dir.join("out.safetensors");
    let (code, _, err) = whittle(
        &url,
        &[
            "models",
            "download",
            model_out,
            "-o",
            path.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let served = t.get(&format!("/v1/models/{model_out}/content")).await;
    assert_eq!(std::fs::read(&path).unwrap(), served.body.to_vec());

    // An empty spec on standard input: a usage error.
    let (code, _, err) = whittle(&url, &["jobs", "submit", "-", "--wait"]).await;
    assert_eq!(code, 2, "an empty spec is a usage error: {err}");
    // A 4xx: exit 2 with the problem on stderr.
    std::fs::write(&spec, json!({"model_id": model["id"], "steps": [{"op": "quantize", "method": "uniform", "bits": 99}]}).to_string()).unwrap();
    let (code, out, err) = whittle(&url, &["jobs", "submit", spec.to_str().unwrap()]).await;
    assert_eq!(code, 2, "{out}");
    assert!(
        err.contains("422 validation_failed") && err.contains("bits"),
        "{err}"
    );
    let (code, _, err) = whittle(
        &url,
        &["jobs", "get", "01a2438b-0000-7000-8000-000000000000"],
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("404"), "{err}");
    // No server: exit 3.
    let (code, _, err) = whittle("http://127.0.0.1:9", &["models", "list"]).await;
    assert_eq!(code, 3, "{err}");
    // A cancelled job while waiting: exit 1.
    std::fs::write(
        &spec,
        json!({"model_id": model["id"], "steps": [{"op": "quantize", "method": "float", "dtype": "f16"}]}).to_string(),
    )
    .unwrap();
    t.app.state.live.shutdown().cancel(); // stop the worker: the job stays queued
    let (code, out, _) = whittle(
        &url,
        &["jobs", "submit", spec.to_str().unwrap(), "--output", "json"],
    )
    .await;
    assert_eq!(code, 0);
    let queued: Value = serde_json::from_str(&out).unwrap();
    let id = queued["id"].as_str().unwrap();
    let (code, _, _) = whittle(&url, &["jobs", "cancel", id]).await;
    assert_eq!(code, 0);
    let (code, _, err) = whittle(&url, &["jobs", "watch", id]).await;
    assert_eq!(code, 1, "a cancelled job: {err}");
}

/// `whittle keys`: the first key made on the database, the next ones over the API with it;
/// requests without a key exit 2 with the server's 401; a revoked key stops working.
async fn the_cli_manages_api_keys(backend: Backend) {
    let Some(t) = TestApp::with(backend, |c| {
        c.auth = Some(whittle::config::AuthChoice::Keys)
    })
    .await
    else {
        return;
    };
    let url = serve(&t).await;
    let data_dir = t.data_dir().display().to_string();
    let local = [
        "--data-dir",
        data_dir.as_str(),
        "--database-url",
        t.database_url.as_str(),
    ];
    let mut args = vec![
        "keys", "create", "--name", "root", "--scope", "admin", "--output", "json",
    ];
    args.extend(local);
    let (code, out, err) = whittle(&url, &args).await;
    assert_eq!(code, 0, "{err}");
    let root: Value = serde_json::from_str(&out).unwrap();
    let admin = root["secret"].as_str().unwrap().to_string();
    assert!(admin.starts_with("wh_"), "{out}");

    let (code, _, err) = whittle(&url, &["models", "list"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("401 unauthenticated"), "{err}");
    let (code, out, err) = whittle(
        &url,
        &[
            "--api-key",
            &admin,
            "keys",
            "create",
            "--name",
            "ci",
            "--scope",
            "read",
            "--tenant",
            "team-a",
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let ci: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (ci["tenant"].as_str(), ci["scope"].as_str()),
        (Some("team-a"), Some("read"))
    );
    let reader = ci["secret"].as_str().unwrap();
    let (code, out, err) = whittle(
        &url,
        &["--api-key", reader, "models", "list", "--output", "json"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["items"],
        json!([])
    );
    let (code, _, err) = whittle(&url, &["--api-key", reader, "keys", "list"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("403 forbidden"), "{err}");
    let (code, out, _) = whittle(
        &url,
        &["--api-key", &admin, "keys", "list", "--output", "json"],
    )
    .await;
    assert_eq!(code, 0);
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), 2);
    assert!(!out.contains(reader) && !out.contains(&admin));
    let id = ci["id"].as_str().unwrap();
    let mut args = vec!["keys", "revoke", id];
    args.extend(local);
    let (code, _, err) = whittle(&url, &args).await;
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = whittle(&url, &["--api-key", reader, "models", "list"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("401"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_manages_api_keys_on_sqlite() {
    the_cli_manages_api_keys(Backend::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_manages_api_keys_on_postgres() {
    the_cli_manages_api_keys(Backend::Postgres).await
}

on_both_backends!(the_cli_uploads_submits_waits_and_exits_by_outcome);
