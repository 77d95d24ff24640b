//! Test harness: an app on a fresh SQLite file or a fresh Postgres database, requests through
//! the router, fixtures built in code, and a worker driven one job at a time.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;
use whittle::app::App;
use whittle::compress::formats::safetensors::{self as tensors, Dtype, TensorSpec};
use whittle::config::Config;
use whittle::db::jobs::JobState;
use whittle::ids::JobId;

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A running app (no socket) with its own data directory and database.
pub struct TestApp {
    pub app: App,
    pub router: axum::Router,
    pub dir: tempfile::TempDir,
    pub database_url: String,
}

/// A response, fully read.
pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: bytes::Bytes,
}

impl TestResponse {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Assert a problem+json error with this status and code.
    #[track_caller]
    pub fn assert_problem(&self, status: u16, code: &str) -> Value {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text());
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json")
        );
        let body = self.json();
        assert_eq!(body["code"], code, "body: {body}");
        assert_eq!(body["status"], status);
        body
    }
}

/// The Postgres URL tests use, if configured. In CI it always is.
pub fn postgres_url() -> Option<String> {
    std::env::var("WHITTLE_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
}

impl TestApp {
    pub async fn sqlite() -> Self {
        Self::with(Backend::Sqlite, |_| {})
            .await
            .expect("sqlite is always available")
    }

    /// `None` (and a note on stderr) when `WHITTLE_TEST_DATABASE_URL` is not set.
    pub async fn postgres() -> Option<Self> {
        Self::with(Backend::Postgres, |_| {}).await
    }

    pub async fn with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> Option<Self> {
        let dir = tempfile::tempdir().expect("temp dir");
        let database_url = match backend {
            Backend::Sqlite => format!("sqlite://{}/whittle.db?mode=rwc", dir.path().display()),
            Backend::Postgres => {
                let Some(base) = postgres_url() else {
                    eprintln!(
                        "WHITTLE_TEST_DATABASE_URL is not set: skipping the Postgres variant"
                    );
                    return None;
                };
                fresh_postgres_database(&base).await
            }
        };
        let mut config = Config::for_data_dir(dir.path().to_path_buf());
        config.database_url = Some(database_url.clone());
        config.lease_seconds = 30;
        tweak(&mut config);
        Some(Self::open(config, dir, database_url).await)
    }

    async fn open(config: Config, dir: tempfile::TempDir, database_url: String) -> Self {
        let mut app = App::open(config).await.expect("app opens");
        // Retries are immediate in tests, so a retried job can be run at once.
        app.state.queue.backoff_base = Duration::ZERO;
        let router = app.router();
        Self {
            app,
            router,
            dir,
            database_url,
        }
    }

    /// Close and reopen on the same database and data directory (a server restart).
    pub async fn restart(self) -> Self {
        let config = (*self.app.state.config).clone();
        self.app.state.db.close().await;
        drop(self.router);
        Self::open(config, self.dir, self.database_url).await
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    pub async fn request(&self, req: Request<Body>) -> TestResponse {
        let res = self
            .router
            .clone()
            .oneshot(req)
            .await
            .expect("router is infallible");
        let status = res.status();
        let headers = res.headers().clone();
        let body = res.into_body().collect().await.expect("body").to_bytes();
        TestResponse {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, uri: &str) -> TestResponse {
        self.request(Request::get(uri).body(Body::empty()).unwrap())
            .await
    }

    pub async fn get_with(&self, uri: &str, headers: &[(&str, &str)]) -> TestResponse {
        let mut b = Request::get(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.request(b.body(Body::empty()).unwrap()).await
    }

    pub async fn delete(&self, uri: &str) -> TestResponse {
        self.request(Request::delete(uri).body(Body::empty()).unwrap())
            .await
    }

    pub async fn post_json(&self, uri: &str, body: &Value) -> TestResponse {
        self.post_json_with(uri, body, &[]).await
    }

    pub async fn post_json_with(
        &self,
        uri: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> TestResponse {
        let mut b = Request::post(uri).header(header::CONTENT_TYPE, "application/json");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.request(b.body(Body::from(body.to_string())).unwrap())
            .await
    }

    pub async fn post_bytes(&self, uri: &str, content_type: &str, bytes: Vec<u8>) -> TestResponse {
        self.request(
            Request::post(uri)
                .header(header::CONTENT_TYPE, content_type)
                .body(Body::from(bytes))
                .unwrap(),
        )
        .await
    }

    pub async fn post_multipart(&self, uri: &str, parts: &[Part<'_>]) -> TestResponse {
        let (content_type, body) = multipart(parts);
        self.post_bytes(uri, &content_type, body).await
    }

    /// Upload safetensors bytes; asserts 201 and returns the model body.
    pub async fn upload_model(&self, bytes: Vec<u8>) -> Value {
        let res = self
            .post_bytes("/v1/models?name=test", "application/octet-stream", bytes)
            .await;
        assert_eq!(res.status, StatusCode::CREATED, "{}", res.text());
        res.json()
    }

    /// Submit a job; asserts 202 and returns the job body.
    pub async fn submit(&self, body: Value) -> Value {
        let res = self.post_json("/v1/jobs", &body).await;
        assert_eq!(res.status, StatusCode::ACCEPTED, "{}", res.text());
        res.json()
    }

    /// Job `id`'s first attempt "dies" after its first checkpoint: a worker claims and runs
    /// it until a checkpoint is saved (within `timeout`), its lease then lapses, the queue
    /// rescues the job and the attempt ends with `LeaseLost`. Returns the second attempt's
    /// claim (asserted to be attempt 2), for the caller to run.
    pub async fn kill_after_first_checkpoint(
        &self,
        id: JobId,
        timeout: Duration,
    ) -> whittle::db::jobs::JobRecord {
        use whittle::ids::now_micros;
        let q = self.app.state.queue.clone();
        let first = q
            .claim("doomed", Duration::from_secs(30), now_micros())
            .await
            .unwrap()
            .unwrap();
        let doomed = self.app.worker("doomed");
        let attempt = tokio::spawn(async move { doomed.run_claimed(first).await });
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let row = whittle::db::jobs::get(&self.app.state.db, id)
                .await
                .unwrap()
                .unwrap();
            if row.checkpoint.is_some() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint was saved"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let later = now_micros() + 60_000_000;
        assert_eq!(q.rescue(later).await.unwrap(), vec![(id, JobState::Queued)]);
        assert!(matches!(
            attempt.await.unwrap(),
            Err(whittle::queue::Error::LeaseLost)
        ));
        let second = q
            .claim("survivor", Duration::from_secs(30), later + 1)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(second.attempt, 2);
        second
    }

    /// Run one claimable job to its end with an in-process worker.
    pub async fn run_one(&self) -> Option<(JobId, JobState)> {
        self.app
            .worker("test-worker")
            .run_next()
            .await
            .expect("worker iteration")
    }

    /// Files under the store's blob and temp directories.
    pub fn stored_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for sub in ["blobs", "tmp"] {
            walk(&self.data_dir().join(sub), &mut out);
        }
        out
    }
}

fn walk(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
}

async fn fresh_postgres_database(base: &str) -> String {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(base).await.unwrap_or_else(|e| {
        panic!("WHITTLE_TEST_DATABASE_URL is set but Postgres is unreachable: {e}")
    });
    let name = format!("whittle_test_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(&format!("create database {name}"))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let (prefix, _) = base.rsplit_once('/').expect("database URL has a path");
    format!("{prefix}/{name}")
}

/// One multipart part: (name, filename, bytes).
pub struct Part<'a> {
    pub name: &'a str,
    pub filename: Option<&'a str>,
    pub bytes: Vec<u8>,
}

pub fn multipart(parts: &[Part<'_>]) -> (String, Vec<u8>) {
    let boundary = "whittle-test-boundary-7d1f";
    let mut body = Vec::new();
    for p in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match p.filename {
            Some(f) => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n", p.name).as_bytes(),
            ),
            None => body.extend_from_slice(format!("Content-Disposition: form-data; name=\"{}\"\r\n\r\n", p.name).as_bytes()),
        }
        body.extend_from_slice(&p.bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// The architecture of a tiny MLP: 4 → 8 → 3.
pub fn tiny_arch() -> Value {
    json!({"kind": "sequential", "input_shape": [4], "layers": [
        {"type": "linear", "name": "fc1", "in_features": 4, "out_features": 8},
        {"type": "relu"},
        {"type": "linear", "name": "fc2", "in_features": 8, "out_features": 3}
    ]})
}

/// Deterministic pseudo-random values in [-1, 1).
pub fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f64 / u32::MAX as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

/// Safetensors bytes of the tiny MLP (weights matching [`tiny_arch`]), with metadata.
pub fn tiny_model_with(metadata: BTreeMap<String, String>) -> Vec<u8> {
    let shapes: [(&str, Vec<usize>); 4] = [
        ("fc1.weight", vec![8, 4]),
        ("fc1.bias", vec![8]),
        ("fc2.weight", vec![3, 8]),
        ("fc2.bias", vec![3]),
    ];
    let data: Vec<(TensorSpec, Vec<u8>)> = shapes
        .iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n = shape.iter().product();
            (
                TensorSpec::new(*name, Dtype::F32, shape.clone()),
                tensors::encode_f32(&values(n, i as u32 + 1)),
            )
        })
        .collect();
    let refs: Vec<(TensorSpec, &[u8])> = data
        .iter()
        .map(|(s, b)| (s.clone(), b.as_slice()))
        .collect();
    tensors::serialize(&metadata, &refs).expect("serialize fixture")
}

/// The tiny MLP without architecture metadata.
pub fn tiny_model() -> Vec<u8> {
    tiny_model_with(BTreeMap::new())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A float job over `model_id`.
pub fn f16_job(model_id: &str) -> Value {
    json!({"model_id": model_id, "steps": [{"op": "quantize", "method": "float", "dtype": "f16"}]})
}

/// POST each job body; each must be refused with 422 `code` and an error at `pointer`.
pub async fn assert_job_refusals(
    t: &TestApp,
    cases: impl IntoIterator<Item = (Value, &str, &str)>,
) {
    for (body, pointer, code) in cases {
        let problem = t
            .post_json("/v1/jobs", &body)
            .await
            .assert_problem(422, code);
        let pointers: Vec<&str> = problem["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["pointer"].as_str().unwrap())
            .collect();
        assert!(pointers.contains(&pointer), "{body}: {problem}");
    }
}

/// Upload a safetensors dataset named `digits`; its id.
pub async fn upload_dataset(t: &TestApp, bytes: Vec<u8>) -> String {
    let res = t
        .post_bytes(
            "/v1/datasets?name=digits",
            "application/octet-stream",
            bytes,
        )
        .await;
    assert_eq!(res.status, 201, "{}", res.text());
    res.json()["id"].as_str().unwrap().to_string()
}

/// A model freshly initialised from `arch` with `seed`; its id.
pub async fn fresh_model(t: &TestApp, arch: Value, seed: u64) -> String {
    let res = t
        .post_json(
            "/v1/models",
            &json!({"architecture": arch, "init": {"seed": seed}}),
        )
        .await;
    assert_eq!(res.status, 201, "{}", res.text());
    res.json()["id"].as_str().unwrap().to_string()
}

/// Asserts that `value` conforms to the schema `components/schemas/{name}` of the served
/// OpenAPI document (JSON Schema 2020-12, as OpenAPI 3.1 uses), listing every violation.
#[track_caller]
pub fn assert_schema(name: &str, value: &Value) {
    use std::sync::OnceLock;
    static COMPONENTS: OnceLock<Value> = OnceLock::new();
    let components = COMPONENTS.get_or_init(|| {
        let doc: Value =
            serde_yaml::from_str(whittle::http::OPENAPI_YAML).expect("openapi.yaml parses");
        doc["components"].clone()
    });
    assert!(
        components["schemas"].get(name).is_some(),
        "openapi.yaml has no schema {name}"
    );
    let schema = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": format!("#/components/schemas/{name}"),
        "components": components,
    });
    let validator = jsonschema::validator_for(&schema)
        .unwrap_or_else(|e| panic!("schema {name} does not compile: {e}"));
    let errors: Vec<String> = validator
        .iter_errors(value)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "response does not match schema {name}:\n{}\n{}",
        errors.join("\n"),
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}
