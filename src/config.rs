//! Command line and environment configuration (`WHITTLE_*`), with documented defaults.
//!
//! Every option can be given as a flag or an environment variable; `whittle --help` lists them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// `whittle [OPTIONS] [COMMAND]` — with no command, `serve`.
#[derive(Debug, Parser)]
#[command(
    name = "whittle",
    version,
    about = "Make neural networks smaller and cheaper, over HTTP."
)]
pub struct Cli {
    /// What to run (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options shared by every command.
    #[command(flatten)]
    pub common: Config,
    /// Options of the client commands (`models`, `datasets`, `jobs`, `artifacts`).
    #[command(flatten)]
    pub client: crate::client::ClientOptions,
}

/// The sub-commands of the binary.
#[derive(Debug, Subcommand, Clone)]
pub enum Command {
    /// Serve the REST API (and run `--workers` in-process job workers).
    Serve,
    /// Run job workers only (no HTTP), sharing the database and blob store with the servers.
    Worker,
    /// Apply database migrations and exit.
    Migrate,
    /// Print the OpenAPI document and exit.
    Openapi,
    /// Client: upload, list, get and download models.
    #[command(subcommand)]
    Models(crate::client::ModelsCmd),
    /// Client: upload and list datasets.
    #[command(subcommand)]
    Datasets(crate::client::DatasetsCmd),
    /// Client: submit, follow, list, cancel jobs; their logs and metrics.
    #[command(subcommand)]
    Jobs(crate::client::JobsCmd),
    /// Client: download artifacts.
    #[command(subcommand)]
    Artifacts(crate::client::ArtifactsCmd),
    /// Exit 0 when the server at `--url` is ready (`GET /readyz` answers 200), else non-zero:
    /// for a container's HEALTHCHECK.
    Healthcheck,
    /// API keys: over the API with `--api-key` (an admin key), else on the local database.
    #[command(subcommand)]
    Keys(crate::client::KeysCmd),
}

/// Runtime configuration shared by `serve`, `worker` and `migrate`.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address the HTTP server listens on.
    #[arg(
        long,
        env = "WHITTLE_BIND",
        default_value = "127.0.0.1:8080",
        global = true
    )]
    pub bind: String,

    /// Directory for the blob store (and the SQLite database when no URL is given).
    #[arg(
        long,
        env = "WHITTLE_DATA_DIR",
        default_value = "./data",
        global = true
    )]
    pub data_dir: PathBuf,

    /// Database URL: `postgres://…` or `sqlite://…`. Default: `sqlite://<data-dir>/whittle.db`.
    #[arg(long, env = "DATABASE_URL", global = true)]
    pub database_url: Option<String>,

    /// Where blobs live: `file:///path` (default: `<data-dir>`), or an object store —
    /// `s3://bucket/prefix` (credentials, region and endpoint from the standard `AWS_*`
    /// variables, e.g. `AWS_ENDPOINT_URL`), `gs://…`, `az://…`.
    #[arg(long, env = "WHITTLE_BLOB_URL", global = true)]
    pub blob_url: Option<String>,

    /// With an object store: most bytes of blobs kept in the local cache (`<data-dir>/cache`)
    /// for compute; least recently used go first.
    #[arg(long, env = "WHITTLE_CACHE_BYTES", default_value_t = 8 << 30, global = true)]
    pub cache_bytes: u64,

    /// Largest accepted upload (model or dataset), in bytes.
    #[arg(long, env = "WHITTLE_MAX_UPLOAD_BYTES", default_value_t = 16 * 1024 * 1024 * 1024, global = true)]
    pub max_upload_bytes: u64,

    /// Job workers to run (in `serve`, in-process; 0 serves the API only).
    #[arg(long, env = "WHITTLE_WORKERS", default_value_t = 1, global = true)]
    pub workers: usize,

    /// Lease length in seconds; a worker renews it every third of it (heartbeat).
    #[arg(
        long,
        env = "WHITTLE_LEASE_SECONDS",
        default_value_t = 30,
        global = true
    )]
    pub lease_seconds: u64,

    /// Longest a worker waits between queue polls when no wake-up arrives, in milliseconds.
    #[arg(
        long,
        env = "WHITTLE_POLL_INTERVAL_MS",
        default_value_t = 2000,
        global = true
    )]
    pub poll_interval_ms: u64,

    /// On shutdown, how long running jobs may go on before they are released back to the queue.
    #[arg(
        long,
        env = "WHITTLE_SHUTDOWN_GRACE_SECONDS",
        default_value_t = 10,
        global = true
    )]
    pub shutdown_grace_seconds: u64,

    /// Threads every compute kernel may use (candle's pool included); default: the cores.
    #[arg(long, env = "WHITTLE_THREADS", global = true)]
    pub threads: Option<usize>,

    /// Largest estimated memory a job may need; a job estimated above it is refused at
    /// submission (422 `memory_limit_exceeded`), as is a model initialised above it. Default:
    /// half the machine's memory.
    #[arg(long, env = "WHITTLE_JOB_MEMORY_BYTES", global = true)]
    pub job_memory_bytes: Option<u64>,

    /// Authentication: `keys` (every /v1 request needs an API key) or `none`. Default: `none`
    /// when bound to a loopback address, `keys` otherwise.
    #[arg(long, env = "WHITTLE_AUTH", value_enum, global = true)]
    pub auth: Option<AuthChoice>,

    /// Allow `--auth none` on an address other than loopback (anyone who can reach it may do
    /// anything; a warning is logged).
    #[arg(long, env = "WHITTLE_INSECURE_NO_AUTH", global = true)]
    pub insecure_no_auth: bool,

    /// Serve `/metrics` (with `/healthz` and `/readyz`) on this address instead of the API's;
    /// `worker` processes serve it only when this is set.
    #[arg(long, env = "WHITTLE_METRICS_BIND", global = true)]
    pub metrics_bind: Option<String>,

    /// The key(s) signing webhooks (Standard Webhooks: `whsec_` + base64, or any string of 16+
    /// characters); several, space-separated, while rotating (each signs). Without it, jobs
    /// with a `webhook_url` are refused.
    #[arg(
        long,
        env = "WHITTLE_WEBHOOK_SECRET",
        global = true,
        hide_env_values = true
    )]
    pub webhook_secret: Option<String>,

    /// Let webhooks reach loopback, private, link-local (cloud metadata) and other non-public
    /// addresses; refused by default, so that tenants cannot make the server call its own
    /// network.
    #[arg(long, env = "WHITTLE_WEBHOOK_ALLOW_PRIVATE", global = true)]
    pub webhook_allow_private: bool,

    /// Delete finished jobs (with their events, logs and artifacts) this many days after
    /// they ended; checked every 15 minutes by `serve`. Default: keep them.
    #[arg(long, env = "WHITTLE_RETENTION_DAYS", global = true)]
    pub retention_days: Option<u64>,

    /// Most HTTP connections served at once; past it new ones wait in the listen backlog.
    #[arg(
        long,
        env = "WHITTLE_MAX_CONNECTIONS",
        default_value_t = 2048,
        global = true
    )]
    pub max_connections: usize,

    /// Seconds a client may take to send a request's headers, and a connection may stay idle
    /// between requests, before it is closed.
    #[arg(
        long,
        env = "WHITTLE_HEADER_TIMEOUT_SECONDS",
        default_value_t = 15,
        global = true
    )]
    pub header_timeout_seconds: u64,

    /// Most database connections a process holds.
    #[arg(
        long,
        env = "WHITTLE_DB_POOL_SIZE",
        default_value_t = 16,
        global = true
    )]
    pub db_pool_size: u32,

    /// Longest a request waits for a database connection, in milliseconds; past it the API
    /// answers 503 `database_unavailable` with `Retry-After`.
    #[arg(
        long,
        env = "WHITTLE_DB_ACQUIRE_TIMEOUT_MS",
        default_value_t = 3000,
        global = true
    )]
    pub db_acquire_timeout_ms: u64,

    /// Log format: `text` or `json`. Filter with `RUST_LOG` (default `info`).
    #[arg(
        long,
        env = "WHITTLE_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    pub log_format: String,
}

/// `--auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthChoice {
    /// API keys (`Authorization: Bearer wh_…`).
    Keys,
    /// No authentication.
    None,
}

impl Config {
    /// The authentication in force, or why the configuration is refused: `none` on an address
    /// other than loopback needs `--insecure-no-auth`.
    pub fn auth_mode(&self) -> anyhow::Result<crate::http::auth::AuthMode> {
        use crate::http::auth::AuthMode;
        let loopback = is_loopback(&self.bind);
        match (self.auth, loopback) {
            (Some(AuthChoice::Keys), _) => Ok(AuthMode::Keys),
            (Some(AuthChoice::None), true) | (None, true) => Ok(AuthMode::None),
            (None, false) if !self.insecure_no_auth => Ok(AuthMode::Keys),
            (Some(AuthChoice::None), false) | (None, false) => {
                if self.insecure_no_auth {
                    tracing::warn!(bind = %self.bind, "authentication is off on a non-loopback address (--insecure-no-auth): anyone who can reach it may read, change and delete everything");
                    Ok(AuthMode::None)
                } else {
                    anyhow::bail!(
                        "WHITTLE_AUTH=none on {} (not a loopback address) would let anyone who can reach it do anything; add --insecure-no-auth (WHITTLE_INSECURE_NO_AUTH=true) to mean it, or use keys",
                        self.bind
                    )
                }
            }
        }
    }

    /// The HTTP connection limits in force.
    pub fn http_limits(&self) -> crate::http::server::Limits {
        crate::http::server::Limits {
            max_connections: self.max_connections.max(1),
            header_timeout: std::time::Duration::from_secs(self.header_timeout_seconds.max(1)),
            shutdown_grace: std::time::Duration::from_secs(self.shutdown_grace_seconds.max(1)),
        }
    }

    /// The database pool settings in force.
    pub fn pool_options(&self) -> crate::db::PoolOptions {
        crate::db::PoolOptions {
            max_connections: self.db_pool_size,
            acquire_timeout: std::time::Duration::from_millis(self.db_acquire_timeout_ms.max(1)),
        }
    }

    /// The database URL in force: the configured one or the embedded SQLite default.
    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}/whittle.db?mode=rwc", self.data_dir.display()),
        }
    }

    /// The job memory limit in force: the configured one, else half of `MemTotal` (8 GiB
    /// where the machine's memory cannot be read).
    pub fn job_memory_limit(&self) -> u64 {
        // Read once: every submit asks, and the machine's memory does not change.
        static HALF_OF_MEMORY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        self.job_memory_bytes.unwrap_or_else(|| {
            *HALF_OF_MEMORY.get_or_init(|| {
                std::fs::read_to_string("/proc/meminfo")
                    .ok()
                    .and_then(|m| {
                        let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
                        line.split_whitespace().nth(1)?.parse::<u64>().ok()
                    })
                    .map_or(8 << 30, |kb| kb * 1024 / 2)
            })
        })
    }

    /// A configuration for tests and embedding: everything default except the data directory.
    pub fn for_data_dir(data_dir: PathBuf) -> Self {
        Cli::parse_from(["whittle", "--data-dir", &data_dir.display().to_string()]).common
    }
}

/// Whether a bind address (`127.0.0.1:8080`, `[::1]:80`, `localhost:8080`) is loopback only.
pub fn is_loopback(bind: &str) -> bool {
    if let Ok(addr) = bind.parse::<std::net::SocketAddr>() {
        return addr.ip().is_loopback();
    }
    let host = bind.rsplit_once(':').map_or(bind, |(h, _)| h);
    host.eq_ignore_ascii_case("localhost")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::auth::AuthMode;

    fn config(args: &[&str]) -> Config {
        let mut all = vec!["whittle"];
        all.extend_from_slice(args);
        Cli::parse_from(all).common
    }

    #[test]
    fn auth_defaults_to_none_on_loopback_and_keys_elsewhere() {
        assert!(
            is_loopback("127.0.0.1:8080") && is_loopback("[::1]:1") && is_loopback("localhost:80")
        );
        assert!(
            !is_loopback("0.0.0.0:8080")
                && !is_loopback("10.1.2.3:80")
                && !is_loopback("example.com:80")
        );
        assert_eq!(
            config(&["--bind", "127.0.0.1:8080"]).auth_mode().unwrap(),
            AuthMode::None
        );
        assert_eq!(
            config(&["--bind", "0.0.0.0:8080"]).auth_mode().unwrap(),
            AuthMode::Keys
        );
        assert_eq!(
            config(&["--bind", "127.0.0.1:1", "--auth", "keys"])
                .auth_mode()
                .unwrap(),
            AuthMode::Keys
        );
        let refused = config(&["--bind", "0.0.0.0:8080", "--auth", "none"]).auth_mode();
        assert!(refused
            .unwrap_err()
            .to_string()
            .contains("--insecure-no-auth"));
        assert_eq!(
            config(&[
                "--bind",
                "0.0.0.0:8080",
                "--auth",
                "none",
                "--insecure-no-auth"
            ])
            .auth_mode()
            .unwrap(),
            AuthMode::None
        );
    }
}
