//! The `whittle` binary as a client of a Whittle server (API.md "Clients"): models, datasets,
//! jobs and artifacts over HTTP, with live progress from a job's event stream on a terminal
//! and JSON lines when piped.
//!
//! Exit codes: 0 success, 1 the job failed or was cancelled, 2 usage or a 4xx answer, 3 a
//! server error (5xx) or the network; 130 when interrupted while waiting.
//!
//! This module talks to the server only through the REST API; it shares no code path with the
//! server side but the binary.

mod output;
mod watch;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{json, Value};

pub use output::Output;

/// Options of every client command.
#[derive(Debug, Clone, Args)]
pub struct ClientOptions {
    /// The server.
    #[arg(
        long,
        env = "WHITTLE_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// An API key (sent as `Authorization: Bearer`).
    #[arg(long, env = "WHITTLE_API_KEY", global = true, hide_env_values = true)]
    pub api_key: Option<String>,
    /// Output format (default: a table on a terminal, JSON otherwise).
    #[arg(long, value_enum, global = true)]
    pub output: Option<OutputFormat>,
}

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// JSON (one document; JSON lines while watching).
    Json,
    /// Human-readable tables.
    Table,
}

/// `whittle models …`.
#[derive(Debug, Clone, Subcommand)]
pub enum ModelsCmd {
    /// Upload a safetensors or GGUF file, or a Hugging Face model folder.
    Upload {
        /// The file or folder.
        path: PathBuf,
        /// The model's name (default: the file or folder name).
        #[arg(long)]
        name: Option<String>,
    },
    /// List models.
    List {
        /// Page size.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Show one model.
    Get {
        /// Model id.
        id: String,
    },
    /// Download a model's weights (or, with `--archive`, its whole folder as a tar).
    Download {
        /// Model id.
        id: String,
        /// Where to write it.
        #[arg(short, long)]
        output_file: PathBuf,
        /// The whole folder as a tar.
        #[arg(long)]
        archive: bool,
    },
}

/// `whittle datasets …`.
#[derive(Debug, Clone, Subcommand)]
pub enum DatasetsCmd {
    /// Upload a dataset file (safetensors, csv, text, jsonl) or an MNIST IDX pair.
    Upload {
        /// The file (IDX: the images file).
        path: PathBuf,
        /// Its format (default: from the extension: .safetensors, .csv, .txt, .jsonl).
        #[arg(long)]
        format: Option<String>,
        /// The dataset's name (default: the file name).
        #[arg(long)]
        name: Option<String>,
        /// IDX: the labels file.
        #[arg(long)]
        labels: Option<PathBuf>,
        /// CSV: the label column (name or index).
        #[arg(long)]
        label_column: Option<String>,
    },
    /// List datasets.
    List {
        /// Page size.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Show one dataset.
    Get {
        /// Dataset id.
        id: String,
    },
}

/// `whittle jobs …`.
#[derive(Debug, Clone, Subcommand)]
pub enum JobsCmd {
    /// Submit a job spec (a JSON file, or `-` for standard input).
    Submit {
        /// The spec.
        spec: String,
        /// Follow the job until it ends (live progress on a terminal).
        #[arg(long)]
        wait: bool,
        /// With `--wait`: on Ctrl-C, ask the server to cancel the job.
        #[arg(long)]
        cancel_on_interrupt: bool,
        /// An Idempotency-Key (a retried submission returns the first job).
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Validate and plan only (`?dry_run=true`).
        #[arg(long)]
        dry_run: bool,
    },
    /// Show one job.
    Get {
        /// Job id.
        id: String,
    },
    /// List jobs.
    List {
        /// Only jobs in this state.
        #[arg(long)]
        state: Option<String>,
        /// Only jobs with this label (`key:value`).
        #[arg(long)]
        label: Option<String>,
        /// Page size.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Follow a job until it ends.
    Watch {
        /// Job id.
        id: String,
        /// On Ctrl-C, ask the server to cancel the job.
        #[arg(long)]
        cancel_on_interrupt: bool,
    },
    /// Cancel a job.
    Cancel {
        /// Job id.
        id: String,
    },
    /// A job's log.
    Logs {
        /// Job id.
        id: String,
    },
    /// A job's metrics.
    Metrics {
        /// Job id.
        id: String,
    },
}

/// `whittle artifacts …`.
#[derive(Debug, Clone, Subcommand)]
pub enum ArtifactsCmd {
    /// Download an artifact.
    Download {
        /// Artifact id.
        id: String,
        /// Where to write it.
        #[arg(short, long)]
        output_file: PathBuf,
    },
}

/// `whittle keys …`: with `--api-key` (an admin key) over the API; without, on the database
/// of the local configuration (`--data-dir` / `DATABASE_URL`), which is how the first key of a
/// server is made.
#[derive(Debug, Clone, Subcommand)]
pub enum KeysCmd {
    /// Create a key and print it (it is shown once).
    Create {
        /// Who or what the key is for.
        #[arg(long)]
        name: String,
        /// `read` (GET), `write` (also uploads, jobs, cancel, delete) or `admin` (every tenant,
        /// and keys).
        #[arg(long)]
        scope: String,
        /// The tenant the key acts in (default: `default`).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// List keys (never their secrets).
    List {
        /// Page size.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Revoke a key: requests with it are refused at once.
    Revoke {
        /// Key id.
        id: String,
    },
}

/// A client command.
#[derive(Debug, Clone)]
pub enum ClientCommand {
    /// `models …`.
    Models(ModelsCmd),
    /// `datasets …`.
    Datasets(DatasetsCmd),
    /// `jobs …`.
    Jobs(JobsCmd),
    /// `artifacts …`.
    Artifacts(ArtifactsCmd),
    /// `keys …` over the API.
    Keys(KeysCmd),
    /// `healthcheck`: `GET /readyz`.
    Healthcheck,
}

/// Why a command failed, and its exit code.
#[derive(Debug)]
pub enum Failure {
    /// Bad arguments or a 4xx answer (exit 2).
    Usage(String),
    /// The job ended failed or cancelled (exit 1).
    Job(String),
    /// A 5xx answer or no answer (exit 3).
    Server(String),
    /// Ctrl-C while waiting (exit 130).
    Interrupted,
}

impl Failure {
    /// The process exit code.
    pub fn code(&self) -> i32 {
        match self {
            Failure::Job(_) => 1,
            Failure::Usage(_) => 2,
            Failure::Server(_) => 3,
            Failure::Interrupted => 130,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Usage(m) | Failure::Job(m) | Failure::Server(m) => f.write_str(m),
            Failure::Interrupted => f.write_str("interrupted"),
        }
    }
}

type Res<T> = Result<T, Failure>;

/// An HTTP client of one server.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Client {
    /// A client of the server at `opts.url`.
    pub fn new(opts: &ClientOptions) -> Res<Client> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("whittle-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Failure::Usage(format!("building the HTTP client: {e}")))?;
        Ok(Client {
            http,
            base: opts.url.trim_end_matches('/').to_string(),
            key: opts.api_key.clone(),
        })
    }

    fn req(&self, method: Method, path: &str) -> RequestBuilder {
        let rb = self.http.request(method, format!("{}{path}", self.base));
        match &self.key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        }
    }

    /// Sends `rb`; a 4xx is [`Failure::Usage`] with the problem's detail, a 5xx or no
    /// answer [`Failure::Server`].
    async fn send(&self, rb: RequestBuilder) -> Res<reqwest::Response> {
        let res = rb
            .send()
            .await
            .map_err(|e| Failure::Server(format!("no answer from {}: {e}", self.base)))?;
        let status = res.status();
        if status.is_success() {
            return Ok(res);
        }
        let body = res.text().await.unwrap_or_default();
        let problem: Value = serde_json::from_str(&body).unwrap_or(json!({"detail": body}));
        let mut msg = format!(
            "{} {}: {}",
            status.as_u16(),
            problem["code"]
                .as_str()
                .unwrap_or(status.canonical_reason().unwrap_or("")),
            problem["detail"].as_str().unwrap_or("")
        );
        for e in problem["errors"].as_array().into_iter().flatten().skip(1) {
            msg.push_str(&format!(
                "\n  {}: {}",
                e["pointer"].as_str().unwrap_or(""),
                e["detail"].as_str().unwrap_or("")
            ));
        }
        Err(if status.is_client_error() {
            Failure::Usage(msg)
        } else {
            Failure::Server(msg)
        })
    }

    async fn json(&self, rb: RequestBuilder) -> Res<Value> {
        let res = self.send(rb).await?;
        if res.status() == StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        res.json()
            .await
            .map_err(|e| Failure::Server(format!("the answer is not JSON: {e}")))
    }

    /// `GET path` as JSON.
    pub async fn get(&self, path: &str) -> Res<Value> {
        self.json(self.req(Method::GET, path)).await
    }

    /// The events of a job (`text/event-stream`).
    async fn events(&self, job: &str) -> Res<reqwest::Response> {
        self.send(
            self.req(Method::GET, &format!("/v1/jobs/{job}/events"))
                .header("accept", "text/event-stream"),
        )
        .await
    }
}

/// Runs a client command; the exit code.
pub async fn run(cmd: ClientCommand, opts: ClientOptions) -> i32 {
    let tty = std::io::stdout().is_terminal();
    let out = Output::new(opts.output.unwrap_or(if tty {
        OutputFormat::Table
    } else {
        OutputFormat::Json
    }));
    let result = match Client::new(&opts) {
        Ok(client) => dispatch(&client, cmd, &out, tty).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => 0,
        Err(f) => {
            if !matches!(f, Failure::Interrupted) {
                eprintln!("whittle: {f}");
            }
            f.code()
        }
    }
}

async fn dispatch(c: &Client, cmd: ClientCommand, out: &Output, tty: bool) -> Res<()> {
    match cmd {
        ClientCommand::Models(m) => match m {
            ModelsCmd::Upload { path, name } => {
                let model = upload_model(c, &path, name, tty).await?;
                out.object("model", &model);
            }
            ModelsCmd::List { limit } => out.list(
                "models",
                &c.get(&format!("/v1/models?limit={limit}")).await?,
            ),
            ModelsCmd::Get { id } => {
                out.object("model", &c.get(&format!("/v1/models/{id}")).await?)
            }
            ModelsCmd::Download {
                id,
                output_file,
                archive,
            } => {
                let what = if archive { "archive" } else { "content" };
                download(c, &format!("/v1/models/{id}/{what}"), &output_file, tty).await?;
            }
        },
        ClientCommand::Datasets(d) => match d {
            DatasetsCmd::Upload {
                path,
                format,
                name,
                labels,
                label_column,
            } => {
                let ds = upload_dataset(c, &path, format, name, labels, label_column, tty).await?;
                out.object("dataset", &ds);
            }
            DatasetsCmd::List { limit } => out.list(
                "datasets",
                &c.get(&format!("/v1/datasets?limit={limit}")).await?,
            ),
            DatasetsCmd::Get { id } => {
                out.object("dataset", &c.get(&format!("/v1/datasets/{id}")).await?)
            }
        },
        ClientCommand::Jobs(j) => jobs(c, j, out, tty).await?,
        ClientCommand::Artifacts(ArtifactsCmd::Download { id, output_file }) => {
            download(c, &format!("/v1/artifacts/{id}/content"), &output_file, tty).await?;
        }
        ClientCommand::Healthcheck => {
            let ready = c.get("/readyz").await?;
            if !out.is_json() {
                eprintln!("ready: {ready}");
            } else {
                out.line(&ready);
            }
        }
        ClientCommand::Keys(k) => match k {
            KeysCmd::Create {
                name,
                scope,
                tenant,
            } => {
                let body = json!({"name": name, "scope": scope, "tenant": tenant});
                let key = c.json(c.req(Method::POST, "/v1/keys").json(&body)).await?;
                out.new_key(&key);
            }
            KeysCmd::List { limit } => {
                out.list("keys", &c.get(&format!("/v1/keys?limit={limit}")).await?);
            }
            KeysCmd::Revoke { id } => {
                c.json(c.req(Method::DELETE, &format!("/v1/keys/{id}")))
                    .await?;
                eprintln!("revoked {id}");
            }
        },
    }
    Ok(())
}

async fn jobs(c: &Client, cmd: JobsCmd, out: &Output, tty: bool) -> Res<()> {
    match cmd {
        JobsCmd::Submit {
            spec,
            wait,
            cancel_on_interrupt,
            idempotency_key,
            dry_run,
        } => {
            let text = if spec == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                    .map_err(|e| Failure::Usage(format!("reading the spec from stdin: {e}")))?;
                s
            } else {
                std::fs::read_to_string(&spec)
                    .map_err(|e| Failure::Usage(format!("reading {spec}: {e}")))?
            };
            let body: Value = serde_json::from_str(&text)
                .map_err(|e| Failure::Usage(format!("{spec} is not JSON: {e}")))?;
            let path = if dry_run {
                "/v1/jobs?dry_run=true"
            } else {
                "/v1/jobs"
            };
            let mut rb = c.req(Method::POST, path).json(&body);
            if let Some(k) = idempotency_key {
                rb = rb.header("idempotency-key", k);
            }
            let job = c.json(rb).await?;
            if dry_run || !wait {
                out.object(if dry_run { "plan" } else { "job" }, &job);
                return Ok(());
            }
            if !tty || out.is_json() {
                out.line(&json!({"event": "submitted", "data": job}));
            } else {
                eprintln!("job {} submitted", job["id"].as_str().unwrap_or(""));
            }
            let id = job["id"].as_str().unwrap_or_default().to_string();
            watch::follow(c, &id, out, tty, cancel_on_interrupt).await?;
        }
        JobsCmd::Get { id } => out.object("job", &c.get(&format!("/v1/jobs/{id}")).await?),
        JobsCmd::List {
            state,
            label,
            limit,
        } => {
            let mut q = format!("/v1/jobs?limit={limit}");
            if let Some(s) = state {
                q.push_str(&format!("&state={s}"));
            }
            if let Some(l) = label {
                q.push_str(&format!("&label={}", urlencode(&l)));
            }
            out.list("jobs", &c.get(&q).await?);
        }
        JobsCmd::Watch {
            id,
            cancel_on_interrupt,
        } => watch::follow(c, &id, out, tty, cancel_on_interrupt).await?,
        JobsCmd::Cancel { id } => {
            let job = c
                .json(c.req(Method::POST, &format!("/v1/jobs/{id}/cancel")))
                .await?;
            out.object("job", &job);
        }
        JobsCmd::Logs { id } => {
            let res = c
                .send(c.req(Method::GET, &format!("/v1/jobs/{id}/logs")))
                .await?;
            let text = res
                .text()
                .await
                .map_err(|e| Failure::Server(format!("reading the log: {e}")))?;
            print!("{text}");
        }
        JobsCmd::Metrics { id } => {
            let m = c.get(&format!("/v1/jobs/{id}/metrics")).await?;
            out.metrics(&m);
        }
    }
    Ok(())
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A progress bar of `total` bytes (hidden when not on a terminal).
fn bytes_bar(total: u64, tty: bool, what: &str) -> ProgressBar {
    if !tty {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// A file as a request body that advances `bar` as it is read.
async fn file_body(path: &Path, bar: ProgressBar) -> Res<reqwest::Body> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| Failure::Usage(format!("opening {}: {e}", path.display())))?;
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20).inspect(move |chunk| {
        if let Ok(c) = chunk {
            bar.inc(c.len() as u64);
        }
    });
    Ok(reqwest::Body::wrap_stream(stream))
}

fn file_len(path: &Path) -> Res<u64> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))
}

fn stem(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().to_string())
        .map(|n| {
            for ext in [".safetensors", ".gguf", ".jsonl", ".csv", ".txt"] {
                if let Some(s) = n.strip_suffix(ext) {
                    return s.to_string();
                }
            }
            n
        })
        .unwrap_or_else(|| "model".into())
}

/// `POST query` with the file at `path` as the raw body, showing bytes and throughput.
async fn upload_file(c: &Client, query: &str, path: &Path, tty: bool) -> Res<Value> {
    let len = file_len(path)?;
    let bar = bytes_bar(len, tty, "uploading");
    let body = file_body(path, bar.clone()).await?;
    let res = c
        .json(
            c.req(Method::POST, query)
                .header("content-type", "application/octet-stream")
                .header("content-length", len)
                .body(body),
        )
        .await;
    bar.finish_and_clear();
    res
}

async fn upload_model(c: &Client, path: &Path, name: Option<String>, tty: bool) -> Res<Value> {
    let name = name.unwrap_or_else(|| stem(path));
    let query = format!("/v1/models?name={}", urlencode(&name));
    if path.is_dir() {
        // A folder: one multipart part per file, named by its path in the folder.
        let mut files = Vec::new();
        collect_files(path, path, &mut files)?;
        let total: u64 = files.iter().map(|(_, _, n)| n).sum();
        let bar = bytes_bar(total, tty, &format!("uploading {} files", files.len()));
        let mut form = reqwest::multipart::Form::new();
        for (full, rel, len) in files {
            let body = file_body(&full, bar.clone()).await?;
            let part = reqwest::multipart::Part::stream_with_length(body, len)
                .file_name(rel)
                .mime_str("application/octet-stream")
                .map_err(|e| Failure::Usage(e.to_string()))?;
            form = form.part("file", part);
        }
        let res = c.json(c.req(Method::POST, &query).multipart(form)).await;
        bar.finish_and_clear();
        return res;
    }
    upload_file(c, &query, path, tty).await
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, String, u64)>) -> Res<()> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Failure::Usage(format!("reading {}: {e}", dir.display())))?;
    let mut entries: Vec<_> = entries.filter_map(|e| e.ok()).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let meta = std::fs::symlink_metadata(&p)
            .map_err(|err| Failure::Usage(format!("{}: {err}", p.display())))?;
        if meta.is_dir() {
            // Hidden folders (.git, .cache) are not part of a model.
            if !e.file_name().to_string_lossy().starts_with('.') {
                collect_files(root, &p, out)?;
            }
        } else if meta.is_file() {
            let rel = p
                .strip_prefix(root)
                .map(|r| r.to_string_lossy().replace('\\', "/"))
                .unwrap_or_default();
            if !rel.starts_with('.') {
                out.push((p, rel, meta.len()));
            }
        }
    }
    Ok(())
}

async fn upload_dataset(
    c: &Client,
    path: &Path,
    format: Option<String>,
    name: Option<String>,
    labels: Option<PathBuf>,
    label_column: Option<String>,
    tty: bool,
) -> Res<Value> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let format = match (format, labels.is_some()) {
        (Some(f), _) => f,
        (None, true) => "idx".into(),
        (None, false) => match ext.as_str() {
            "safetensors" => "safetensors".into(),
            "csv" => "csv".into(),
            "txt" | "text" => "text".into(),
            "jsonl" | "ndjson" => "jsonl".into(),
            _ => {
                return Err(Failure::Usage(format!(
                    "cannot tell the format of {} from its extension: give --format",
                    path.display()
                )))
            }
        },
    };
    let name = name.unwrap_or_else(|| stem(path));
    let mut query = format!(
        "/v1/datasets?name={}&format={}",
        urlencode(&name),
        urlencode(&format)
    );
    if let Some(l) = label_column {
        query.push_str(&format!("&label_column={}", urlencode(&l)));
    }
    if format == "idx" {
        let labels = labels.ok_or_else(|| Failure::Usage("IDX needs --labels FILE".into()))?;
        let (li, ll) = (file_len(path)?, file_len(&labels)?);
        let bar = bytes_bar(li + ll, tty, "uploading");
        let form = reqwest::multipart::Form::new()
            .part(
                "images",
                reqwest::multipart::Part::stream_with_length(
                    file_body(path, bar.clone()).await?,
                    li,
                )
                .file_name("images"),
            )
            .part(
                "labels",
                reqwest::multipart::Part::stream_with_length(
                    file_body(&labels, bar.clone()).await?,
                    ll,
                )
                .file_name("labels"),
            );
        let res = c.json(c.req(Method::POST, &query).multipart(form)).await;
        bar.finish_and_clear();
        return res;
    }
    upload_file(c, &query, path, tty).await
}

async fn download(c: &Client, path: &str, to: &Path, tty: bool) -> Res<()> {
    use tokio::io::AsyncWriteExt;
    let res = c.send(c.req(Method::GET, path)).await?;
    let bar = bytes_bar(res.content_length().unwrap_or(0), tty, "downloading");
    let tmp = to.with_extension("part");
    let mut file = tokio::fs::File::create(&tmp)
        .await
        .map_err(|e| Failure::Usage(format!("creating {}: {e}", tmp.display())))?;
    let mut stream = res.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Failure::Server(format!("download interrupted: {e}")))?;
        file.write_all(&chunk)
            .await
            .map_err(|e| Failure::Usage(format!("writing {}: {e}", tmp.display())))?;
        bar.inc(chunk.len() as u64);
    }
    file.flush()
        .await
        .map_err(|e| Failure::Usage(format!("writing {}: {e}", tmp.display())))?;
    drop(file);
    std::fs::rename(&tmp, to)
        .map_err(|e| Failure::Usage(format!("writing {}: {e}", to.display())))?;
    bar.finish_and_clear();
    if tty {
        eprintln!("wrote {}", to.display());
    }
    Ok(())
}
