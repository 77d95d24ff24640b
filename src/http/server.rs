//! The HTTP server loop: hyper's connection builder with the limits `axum::serve` does not
//! offer — a cap on open connections, a deadline for a request's headers (which also closes
//! idle keep-alive connections and sockets that never send anything) — and a graceful
//! shutdown that waits a bounded time for the connections in flight.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// Connection limits (`WHITTLE_MAX_CONNECTIONS`, `WHITTLE_HEADER_TIMEOUT_SECONDS`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; past it new ones wait in the listen backlog.
    pub max_connections: usize,
    /// Longest a client may take to send a request's headers, a connection may sit idle
    /// between requests, and a request body may stall between two chunks.
    pub header_timeout: Duration,
    /// On shutdown, longest to wait for requests in flight (SSE streams end on their own).
    pub shutdown_grace: Duration,
}

/// Serves `router` on `listener` within `limits` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    // HTTP/1.1 only: hyper-util's HTTP/1-or-2 detection waits for the first bytes with no
    // deadline, so a socket that never speaks would hold its slot for ever.
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        // A request body that stalls (no bytes for the header timeout) fails the request: a
        // client cannot hold a slot by trickling an upload.
        let service = TowerToHyperService::new(
            tower::ServiceBuilder::new()
                .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
                    limits.header_timeout,
                ))
                .service(router.clone()),
        );
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(limits.shutdown_grace) => {
            warn!("connections still open after the grace period; closing them");
        }
    }
}
