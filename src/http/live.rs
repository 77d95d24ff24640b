//! Live job events for `/v1/jobs/{id}/events`: one reader per process, not one per client.
//!
//! Every SSE client subscribes to a per-job broadcast; a single pump task reads the new events
//! of each job that has subscribers (one query per job per pass) and fans them out. It reads a
//! job when this process appends one of its events (and once more 100 ms later, in case the
//! append was not committed yet), and every job every second, which also picks up events other
//! processes (workers sharing the database) wrote. A client replays its history itself once, from
//! `Last-Event-ID`, then follows the broadcast; a client that falls behind the broadcast's
//! buffer re-reads from the database. On shutdown every stream ends, so a graceful shutdown
//! is not held open by followers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::db::events::{self, JobEvent};
use crate::db::Db;
use crate::ids::JobId;

/// Events a subscriber may lag behind before it re-reads from the database.
const BUFFER: usize = 1024;
/// Longest wait between two passes of the pump.
const POLL: Duration = Duration::from_secs(1);

struct Feed {
    tx: broadcast::Sender<JobEvent>,
    /// Events up to this sequence number were broadcast.
    last_seq: i64,
}

struct Inner {
    db: Db,
    feeds: Mutex<HashMap<JobId, Feed>>,
    shutdown: CancellationToken,
    queries: AtomicU64,
}

/// The process's fan-out of job events (cheap to clone).
#[derive(Clone)]
pub struct EventHub {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EventHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventHub").finish_non_exhaustive()
    }
}

impl EventHub {
    /// A hub reading `db`, and its pump task (ends with `shutdown`).
    pub fn start(db: Db, shutdown: CancellationToken) -> EventHub {
        let hub = EventHub {
            inner: Arc::new(Inner {
                db,
                feeds: Mutex::new(HashMap::new()),
                shutdown,
                queries: AtomicU64::new(0),
            }),
        };
        tokio::spawn(hub.clone().pump());
        hub
    }

    /// The shutdown every stream ends with.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// Database queries the pump has made (for tests and metrics).
    pub fn queries(&self) -> u64 {
        self.inner.queries.load(Ordering::Relaxed)
    }

    /// A receiver of `job`'s events from now on (the caller reads what came before from the
    /// database after subscribing; an event may arrive both ways, subscribers skip what they
    /// have by sequence number).
    pub async fn subscribe(&self, job: JobId) -> crate::db::Result<broadcast::Receiver<JobEvent>> {
        if let Some(f) = self
            .inner
            .feeds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&job)
        {
            return Ok(f.tx.subscribe());
        }
        let last_seq = events::max_seq(&self.inner.db, job).await?;
        let mut feeds = self.inner.feeds.lock().unwrap_or_else(|e| e.into_inner());
        let feed = feeds.entry(job).or_insert_with(|| Feed {
            tx: broadcast::channel(BUFFER).0,
            last_seq,
        });
        Ok(feed.tx.subscribe())
    }

    async fn pump(self) {
        use tokio::sync::broadcast::error::RecvError;
        let mut appended = events::appended().subscribe();
        loop {
            let only = tokio::select! {
                got = appended.recv() => match got {
                    Ok(job) if self.follows(job) => Some(job),
                    // Another job's event (or another app's, in tests): nothing to read.
                    Ok(_) => continue,
                    Err(RecvError::Lagged(_)) => None,
                    Err(RecvError::Closed) => break,
                },
                _ = tokio::time::sleep(POLL) => None,
                _ = self.inner.shutdown.cancelled() => break,
            };
            self.pass(only).await;
            if only.is_some() {
                // The append may not have been committed when it was announced.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => self.pass(only).await,
                    _ = self.inner.shutdown.cancelled() => break,
                }
            }
        }
        // Dropping the senders ends every stream.
        self.inner
            .feeds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn follows(&self, job: JobId) -> bool {
        self.inner
            .feeds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&job)
    }

    /// Reads the new events of `only` (or of every job with subscribers) and broadcasts them.
    async fn pass(&self, only: Option<JobId>) {
        let jobs: Vec<(JobId, i64)> = {
            let mut feeds = self.inner.feeds.lock().unwrap_or_else(|e| e.into_inner());
            feeds.retain(|_, f| f.tx.receiver_count() > 0);
            feeds
                .iter()
                .filter(|(id, _)| only.is_none_or(|o| o == **id))
                .map(|(id, f)| (*id, f.last_seq))
                .collect()
        };
        for (job, mut after) in jobs {
            loop {
                self.inner.queries.fetch_add(1, Ordering::Relaxed);
                let batch = match events::list_after(&self.inner.db, job, after, None, 200).await {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading job events failed; retrying");
                        break;
                    }
                };
                let full = batch.len() == 200;
                let feeds = self.inner.feeds.lock().unwrap_or_else(|e| e.into_inner());
                let Some(feed) = feeds.get(&job) else {
                    break;
                };
                for ev in batch {
                    after = ev.seq;
                    let _ = feed.tx.send(ev);
                }
                drop(feeds);
                if let Some(f) = self
                    .inner
                    .feeds
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_mut(&job)
                {
                    f.last_seq = f.last_seq.max(after);
                }
                if !full {
                    break;
                }
            }
        }
    }
}
