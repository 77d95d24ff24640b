//! Metadata storage: models, datasets, jobs, job events and artifacts, in SQLite (embedded
//! default) or PostgreSQL (production, and the queue for many workers).
//!
//! Both backends sit behind one type, [`Db`], built on sqlx's `Any` driver: the SQL is written
//! once in a portable subset (`$n` parameters, text/bigint columns) and the few places where the
//! backends differ (the `SKIP LOCKED` claim, `LISTEN/NOTIFY`) branch on [`Backend`]. The same
//! contract tests run against both. This module does no HTTP and no compute.

pub mod artifacts;
pub mod datasets;
pub mod events;
pub mod jobs;
pub mod keys;
pub mod models;
pub mod webhooks;

use std::str::FromStr;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

/// Which database a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite (one file, WAL); a single process or several on one machine.
    Sqlite,
    /// PostgreSQL; any number of servers and workers.
    Postgres,
}

/// Why a database operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The driver failed (connection, constraint, syntax).
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    /// Migrations failed to apply.
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored JSON column did not parse (corruption or a schema bug).
    #[error("stored JSON in {column} is invalid: {source}")]
    Json {
        /// Which column.
        column: &'static str,
        /// The parse error.
        source: serde_json::Error,
    },
    /// The URL names an unsupported database.
    #[error("unsupported database URL (expected postgres:// or sqlite://): {0}")]
    UnsupportedUrl(String),
}

impl Error {
    /// Whether the database could not be reached (no connection within the acquire timeout,
    /// a refused or broken connection): the request may succeed later, so the API answers
    /// 503 with `Retry-After` rather than 500.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Sqlx(e) => {
                matches!(
                    e,
                    sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_)
                ) || matches!(e, sqlx::Error::Database(d) if d.code().is_some_and(|c| {
                    // Postgres: 57P01 admin shutdown, 57P03 cannot connect now, 08xxx connection;
                    // SQLite: 5 SQLITE_BUSY, 6 SQLITE_LOCKED (extended codes keep them in the
                    // low byte).
                    c.starts_with("08")
                        || c == "57P01"
                        || c == "57P02"
                        || c == "57P03"
                        || (c.len() <= 4 && c.parse::<u32>().is_ok_and(|n| matches!(n & 0xff, 5 | 6)))
                }))
            }
            _ => false,
        }
    }
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Pool settings (`WHITTLE_DB_POOL_SIZE`, `WHITTLE_DB_ACQUIRE_TIMEOUT_MS`).
#[derive(Debug, Clone, Copy)]
pub struct PoolOptions {
    /// Most connections held.
    pub max_connections: u32,
    /// Longest a request waits for a connection before it fails (503 in the API).
    pub acquire_timeout: std::time::Duration,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            max_connections: 16,
            acquire_timeout: std::time::Duration::from_secs(3),
        }
    }
}

/// A connection pool plus the backend it speaks to.
#[derive(Debug, Clone)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
    url: String,
}

static POSTGRES_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

impl Db {
    /// Connect to `url` (`postgres://…` or `sqlite://…`) with the default pool settings.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, PoolOptions::default()).await
    }

    /// Connect to `url` with these pool settings.
    pub async fn connect_with(url: &str, pool: PoolOptions) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            return Err(Error::UnsupportedUrl(redact(url)));
        };
        let mut options = AnyPoolOptions::new()
            .max_connections(pool.max_connections.max(1))
            .acquire_timeout(pool.acquire_timeout);
        if backend == Backend::Sqlite {
            if let Some(dir) = sqlite_dir(url) {
                std::fs::create_dir_all(dir).map_err(sqlx::Error::Io)?;
            }
            options = options.after_connect(|conn, _| {
                Box::pin(async move {
                    // WAL lets readers proceed during a write; busy_timeout makes concurrent
                    // writers wait instead of failing with SQLITE_BUSY.
                    sqlx::query("pragma journal_mode = wal")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("pragma busy_timeout = 10000")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("pragma foreign_keys = on")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("pragma synchronous = normal")
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            });
        }
        let pool = options.connect(url).await?;
        Ok(Self {
            pool,
            backend,
            url: url.to_string(),
        })
    }

    /// Apply pending migrations for this backend.
    pub async fn migrate(&self) -> Result<()> {
        match self.backend {
            Backend::Postgres => POSTGRES_MIGRATOR.run(&self.pool).await?,
            Backend::Sqlite => SQLITE_MIGRATOR.run(&self.pool).await?,
        }
        Ok(())
    }

    /// The pool, for modules that issue their own queries (the queue).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Which backend this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The URL this pool connected to (for LISTEN connections).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A trivial round trip, for `/readyz`.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("select 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Close every connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// The directory part of a `sqlite://path/file.db?…` URL, to create it on first start.
fn sqlite_dir(url: &str) -> Option<std::path::PathBuf> {
    let path = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let path = path.split('?').next()?;
    if path.is_empty() || path == ":memory:" {
        return None;
    }
    std::path::Path::new(path).parent().map(|p| p.to_path_buf())
}

/// A URL with any password removed, safe to log or show.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// Parse a JSON text column.
pub(crate) fn json_col(row: &AnyRow, column: &'static str) -> Result<serde_json::Value> {
    let text: String = row.try_get(column)?;
    serde_json::from_str(&text).map_err(|source| Error::Json { column, source })
}

/// Parse a nullable JSON text column.
pub(crate) fn json_col_opt(
    row: &AnyRow,
    column: &'static str,
) -> Result<Option<serde_json::Value>> {
    let text: Option<String> = row.try_get(column)?;
    text.map(|t| serde_json::from_str(&t).map_err(|source| Error::Json { column, source }))
        .transpose()
}

/// Parse an id column into its newtype.
pub(crate) fn id_col<T: FromStr>(row: &AnyRow, column: &'static str) -> Result<T> {
    let text: String = row.try_get(column)?;
    text.parse().map_err(|_| {
        Error::Sqlx(sqlx::Error::Decode(
            format!("column {column} holds an invalid id: {text}").into(),
        ))
    })
}

/// Clamp a page size to the contract's bounds (default 50, max 500).
pub fn page_limit(limit: Option<i64>) -> i64 {
    limit.unwrap_or(50).clamp(1, 500)
}
