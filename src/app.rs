//! Wiring: open the database and blob store, run migrations, start the HTTP server and the
//! workers, and shut everything down gracefully on SIGINT / SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::db::{self, Backend, Db};
use crate::http::{self, AppState};
use crate::queue::worker::{Worker, WorkerConfig};
use crate::queue::{Queue, NOTIFY_CHANNEL};
use crate::store::{LocalStore, Store};

/// An opened application: database (migrated), blob store, queue.
#[derive(Clone)]
pub struct App {
    /// The state every handler shares.
    pub state: AppState,
}

impl App {
    /// Connect to the database, apply migrations and open the blob store.
    pub async fn open(config: Config) -> anyhow::Result<Self> {
        let url = config.database_url();
        let auth = config.auth_mode()?;
        if let Some(s) = &config.webhook_secret {
            crate::queue::webhooks::Secret::parse_list(s)
                .map_err(|e| anyhow::anyhow!("WHITTLE_WEBHOOK_SECRET: {e}"))?;
        }
        let db = Db::connect_with(&url, config.pool_options())
            .await
            .with_context(|| format!("connecting to the database at {}", db::redact(&url)))?;
        db.migrate().await.context("applying database migrations")?;
        let store: Store =
            match config.blob_url.as_deref() {
                None => Arc::new(LocalStore::open(&config.data_dir).with_context(|| {
                    format!("opening the blob store under {}", config.data_dir.display())
                })?),
                Some(url) if url.starts_with("file://") => {
                    let dir = std::path::PathBuf::from(url.trim_start_matches("file://"));
                    Arc::new(LocalStore::open(&dir).with_context(|| {
                        format!("opening the blob store under {}", dir.display())
                    })?)
                }
                Some(url) => Arc::new(
                    crate::store::ObjectBlobStore::open(
                        url,
                        &config.data_dir.join("cache"),
                        config.cache_bytes,
                    )
                    .with_context(|| format!("opening the blob store at {url}"))?,
                ),
            };
        let queue = Queue::new(db.clone());
        let shutdown = CancellationToken::new();
        let live = http::live::EventHub::start(db.clone(), shutdown.clone());
        Ok(Self {
            state: AppState {
                db,
                store,
                queue,
                config: Arc::new(config),
                prometheus: crate::telemetry::prometheus(),
                live,
                auth,
            },
        })
    }

    /// The HTTP router.
    pub fn router(&self) -> axum::Router {
        http::router(self.state.clone())
    }

    /// A worker over this app's queue and store.
    pub fn worker(&self, name: &str) -> Worker {
        let c = &self.state.config;
        Worker::new(
            self.state.queue.clone(),
            self.state.store.clone(),
            name,
            WorkerConfig {
                lease: Duration::from_secs(c.lease_seconds.max(3)),
                poll_interval: Duration::from_millis(c.poll_interval_ms.max(10)),
                shutdown_grace: Duration::from_secs(c.shutdown_grace_seconds),
            },
        )
    }

    /// Delete blobs that no model, dataset or artifact references and that were last written
    /// more than `min_age` ago, and temp files older than a day. The age guard keeps a blob
    /// that is being uploaded again (renamed into place, row not yet inserted) or that a
    /// running job just wrote; deletes therefore free disk space with a delay. Returns the
    /// number of blobs removed.
    pub async fn collect_garbage(&self, min_age: Duration) -> anyhow::Result<usize> {
        let store = self.state.store.clone();
        let blobs = tokio::task::spawn_blocking(move || store.list()).await??;
        let cutoff = std::time::SystemTime::now() - min_age;
        let mut removed = 0;
        for (sha, modified) in blobs {
            if modified <= cutoff && !db::models::blob_referenced(&self.state.db, &sha).await? {
                self.state.store.delete(sha.as_str()).await?;
                removed += 1;
            }
        }
        let store = self.state.store.clone();
        let day_ago = std::time::SystemTime::now() - Duration::from_secs(24 * 3600);
        tokio::task::spawn_blocking(move || store.remove_stale_temps(day_ago)).await??;
        Ok(removed)
    }

    /// Delete the finished jobs older than `WHITTLE_RETENTION_DAYS` (none when unset); the
    /// number deleted. Their blobs go with the next garbage collection.
    pub async fn apply_retention(&self) -> anyhow::Result<u64> {
        let Some(days) = self.state.config.retention_days else {
            return Ok(0);
        };
        // Clamped: an absurd period must not wrap into the future and delete everything.
        let days = days.min(100 * 366) as i64;
        let cutoff = crate::ids::now_micros() - days * 86_400_000_000;
        Ok(db::jobs::delete_finished_before(&self.state.db, cutoff).await?)
    }

    /// Serve `/metrics` on `WHITTLE_METRICS_BIND` until `shutdown`, when it is set.
    pub async fn serve_metrics(
        &self,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
        let Some(bind) = self.state.config.metrics_bind.clone() else {
            return Ok(None);
        };
        let listener = tokio::net::TcpListener::bind(&bind)
            .await
            .with_context(|| format!("binding the metrics address {bind}"))?;
        info!(address = %bind, "serving /metrics");
        let router = http::ops::metrics_router(self.state.clone());
        let token = shutdown.clone();
        Ok(Some(tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move { token.cancelled().await })
                .await;
        })))
    }

    /// Send due webhooks every second until `shutdown`, when a secret is configured.
    pub fn spawn_webhook_sender(
        &self,
        shutdown: &CancellationToken,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let secrets = self.state.config.webhook_secret.as_deref()?;
        let secrets = crate::queue::webhooks::Secret::parse_list(secrets).ok()?;
        let sender = crate::queue::webhooks::Sender::new(
            self.state.db.clone(),
            secrets,
            self.state.config.webhook_allow_private,
        );
        Some(tokio::spawn(
            sender.run(Duration::from_secs(1), shutdown.clone()),
        ))
    }

    /// Start `n` workers and, on Postgres, the LISTEN task that wakes them.
    pub fn spawn_workers(
        &self,
        n: usize,
        shutdown: &CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut handles = Vec::new();
        if n > 0 && self.state.db.backend() == Backend::Postgres {
            handles.push(tokio::spawn(listen_for_jobs(
                self.state.queue.clone(),
                shutdown.clone(),
            )));
        }
        let base = format!("{}-{}", hostname(), std::process::id());
        for i in 0..n {
            let worker = self.worker(&format!("{base}-{i}"));
            handles.push(tokio::spawn(worker.run(shutdown.clone())));
        }
        handles
    }
}

/// `whittle serve`: the API plus `--workers` in-process workers.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let bind = config.bind.clone();
    let workers = config.workers;
    let app = App::open(config).await?;
    // Cancelled on SIGINT / SIGTERM: workers stop claiming, live event streams end.
    let shutdown = app.state.live.shutdown().clone();
    let mut handles = app.spawn_workers(workers, &shutdown);
    handles.push(tokio::spawn(collect_garbage_periodically(
        app.clone(),
        shutdown.clone(),
    )));
    if let Some(h) = app.serve_metrics(&shutdown).await? {
        handles.push(h);
    }
    handles.extend(app.spawn_webhook_sender(&shutdown));
    let listener = tokio::net::TcpListener::bind(&bind)
        .await
        .with_context(|| format!("binding {bind}"))?;
    info!(
        address = %bind,
        database = %db::redact(app.state.db.url()),
        workers,
        "whittle is serving; try GET /healthz"
    );
    let token = shutdown.clone();
    let limits = app.state.config.http_limits();
    http::server::serve(listener, app.router(), limits, async move {
        wait_for_signal().await;
        info!("shutting down: no new jobs are claimed; running jobs get the grace period");
        token.cancel();
    })
    .await;
    shutdown.cancel();
    for h in handles {
        let _ = h.await;
    }
    app.state.db.close().await;
    Ok(())
}

/// `whittle worker`: workers only, until a signal.
pub async fn worker(config: Config) -> anyhow::Result<()> {
    let workers = config.workers.max(1);
    let app = App::open(config).await?;
    let shutdown = CancellationToken::new();
    let mut handles = app.spawn_workers(workers, &shutdown);
    if let Some(h) = app.serve_metrics(&shutdown).await? {
        handles.push(h);
    }
    handles.extend(app.spawn_webhook_sender(&shutdown));
    info!(workers, database = %db::redact(app.state.db.url()), "whittle worker running");
    wait_for_signal().await;
    info!("shutting down workers");
    shutdown.cancel();
    for h in handles {
        let _ = h.await;
    }
    app.state.db.close().await;
    Ok(())
}

/// `whittle migrate`: apply migrations and exit.
pub async fn migrate(config: Config) -> anyhow::Result<()> {
    let app = App::open(config).await?;
    info!(database = %db::redact(app.state.db.url()), "migrations applied");
    app.state.db.close().await;
    Ok(())
}

/// `whittle keys …` without `--api-key`: create, list or revoke keys directly in the
/// configured database (how the first administrator key of a server is made).
pub async fn keys(
    config: Config,
    cmd: crate::client::KeysCmd,
    format: crate::client::OutputFormat,
) -> anyhow::Result<()> {
    use crate::client::{KeysCmd, Output};
    use crate::db::keys;
    use crate::http::auth::{self, KeyBody, NewKeyBody};
    let url = config.database_url();
    let db = Db::connect_with(&url, config.pool_options())
        .await
        .with_context(|| format!("connecting to the database at {}", db::redact(&url)))?;
    db.migrate().await.context("applying database migrations")?;
    // Without --api-key this works on the local configuration's database: say which, so that
    // nobody makes keys in a stray ./data while meaning a remote server.
    eprintln!(
        "keys on the database {} (give --api-key to manage a server's keys over its API)",
        db::redact(&url)
    );
    let out = Output::new(format);
    match cmd {
        KeysCmd::Create {
            name,
            scope,
            tenant,
        } => {
            let (record, secret) = auth::mint(auth::CreateKey {
                name,
                scope,
                tenant,
            })
            .map_err(|e| anyhow::anyhow!("{}", e.detail))?;
            keys::insert(&db, &record).await?;
            out.new_key(&serde_json::to_value(NewKeyBody::new(&record, secret))?);
        }
        KeysCmd::List { limit } => {
            let rows = keys::list(&db, None, db::page_limit(Some(limit as i64))).await?;
            let items: Vec<KeyBody> = rows.iter().map(KeyBody::from).collect();
            out.list(
                "keys",
                &serde_json::json!({"items": items, "next_cursor": null}),
            );
        }
        KeysCmd::Revoke { id } => {
            let key_id = id
                .parse()
                .map_err(|_| anyhow::anyhow!("no key with id `{id}`"))?;
            if !keys::revoke(&db, key_id).await? {
                anyhow::bail!("no key with id `{id}`");
            }
            eprintln!("revoked {id}");
        }
    }
    db.close().await;
    Ok(())
}

/// Every 15 minutes, apply the retention period and reclaim unreferenced blobs (an hour old,
/// or older than the longest running job's timeout).
async fn collect_garbage_periodically(app: App, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(15 * 60));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                match app.apply_retention().await {
                    Ok(0) => {}
                    Ok(n) => info!(jobs = n, "retention deleted finished jobs"),
                    Err(e) => warn!(error = %e, "retention failed"),
                }
                // A running attempt's step outputs are referenced only when it completes: spare
                // blobs younger than the longest running job may run (and an hour at least).
                let longest = db::jobs::longest_running_timeout(&app.state.db).await.unwrap_or(0);
                let min_age = Duration::from_secs(3600.max(longest.max(0) as u64 + 600));
                match app.collect_garbage(min_age).await {
                    Ok(0) => {}
                    Ok(n) => info!(blobs = n, "garbage collection removed unreferenced blobs"),
                    Err(e) => warn!(error = %e, "garbage collection failed"),
                }
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Turn Postgres NOTIFYs on the jobs channel into in-process wake-ups, reconnecting on error.
/// Workers also poll, so a lost notification only delays a claim.
async fn listen_for_jobs(queue: Queue, shutdown: CancellationToken) {
    let wake = queue.wake_handle();
    while !shutdown.is_cancelled() {
        let listener = async {
            let mut l = sqlx::postgres::PgListener::connect(queue.db().url()).await?;
            l.listen(NOTIFY_CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        match listener.await {
            Ok(mut l) => loop {
                tokio::select! {
                    msg = l.recv() => match msg {
                        Ok(_) => wake.notify_waiters(),
                        Err(e) => { warn!(error = %e, "LISTEN connection lost; reconnecting"); break; }
                    },
                    _ = shutdown.cancelled() => return,
                }
            },
            Err(e) => warn!(error = %e, "LISTEN failed; relying on polling until it reconnects"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn wait_for_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "whittle".into())
}
