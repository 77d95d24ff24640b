//! Operations endpoints: health, readiness, Prometheus metrics.

use crate::helpers::*;

#[tokio::test]
async fn health_and_readiness() {
    let t = TestApp::sqlite().await;
    let h = t.get("/healthz").await;
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "ok");
    let r = t.get("/readyz").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        serde_json::json!({"database": "ok", "storage": "ok"})
    );
    t.app.state.db.close().await;
    let r = t.get("/readyz").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["database"], "unavailable");
}

#[tokio::test]
async fn prometheus_metrics_count_requests_and_jobs_by_state() {
    let t = TestApp::sqlite().await;
    let m = t.upload_model(tiny_model()).await;
    t.submit(f16_job(m["id"].as_str().unwrap())).await;
    t.submit(f16_job(m["id"].as_str().unwrap())).await;
    t.run_one().await.unwrap();
    let res = t.get("/metrics").await;
    assert_eq!(res.status, 200);
    let text = res.text();
    assert!(text.contains("whittle_jobs{state=\"queued\"} 1"), "{text}");
    assert!(
        text.contains("whittle_jobs{state=\"succeeded\"} 1"),
        "{text}"
    );
    assert!(
        text.contains(
            "whittle_http_requests_total{method=\"POST\",path=\"/v1/jobs\",status=\"202\"}"
        ),
        "{text}"
    );
    assert!(
        text.contains("whittle_http_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(
        text.contains("whittle_job_duration_seconds_bucket"),
        "{text}"
    );
    assert!(
        text.contains("whittle_step_duration_seconds_bucket{op=\"quantize\""),
        "{text}"
    );
    assert!(
        text.contains("whittle_queue_oldest_queued_seconds "),
        "{text}"
    );
    for help in [
        "# HELP whittle_http_requests_total",
        "# HELP whittle_jobs ",
        "# HELP whittle_step_duration_seconds",
    ] {
        assert!(text.contains(help), "{help} missing:\n{text}");
    }
}

/// `WHITTLE_METRICS_BIND` moves `/metrics` to its own address (served by workers too), and
/// `whittle healthcheck` says whether a server is ready through its exit code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_on_their_own_address_and_the_healthcheck() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let t = TestApp::with(Backend::Sqlite, |c| c.metrics_bind = Some(addr.to_string()))
        .await
        .unwrap();
    t.get("/metrics")
        .await
        .assert_problem(404, "route_not_found");
    let token = tokio_util::sync::CancellationToken::new();
    let handle = t.app.serve_metrics(&token).await.unwrap().unwrap();
    let url = format!("http://{addr}");
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("# TYPE whittle_jobs gauge"), "{text}");
    let bin = env!("CARGO_BIN_EXE_whittle");
    let code = |url: String| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(bin)
                .args(["healthcheck", "--url", &url])
                .output()
                .unwrap()
                .status
                .code()
        })
    };
    assert_eq!(code(url.clone()).await.unwrap(), Some(0));
    token.cancel();
    handle.await.unwrap();
    assert_ne!(code(url).await.unwrap(), Some(0));
}

/// The dashboard is served from the binary: the page, its script and styles, the vendored
/// chart library; with a CSP that allows only this origin, and validators for caching.
#[tokio::test]
async fn the_dashboard_is_served_from_the_binary() {
    let t = TestApp::sqlite().await;
    let page = t.get("/").await;
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(page.text().contains("/ui/app.js"));
    assert!(page
        .header("content-security-policy")
        .unwrap()
        .contains("default-src 'self'"));
    for (path, ty) in [
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
        ("/ui/vendor/uPlot.iife.min.js", "text/javascript"),
    ] {
        let res = t.get(path).await;
        assert_eq!(res.status, 200, "{path}");
        assert!(
            res.header("content-type").unwrap().starts_with(ty),
            "{path}"
        );
        let etag = res.header("etag").unwrap().to_string();
        let again = t.get_with(path, &[("if-none-match", &etag)]).await;
        assert_eq!(again.status, 304, "{path}");
    }
    t.get("/ui/../Cargo.toml")
        .await
        .assert_problem(404, "route_not_found");
    t.get("/ui/nothing.js")
        .await
        .assert_problem(404, "route_not_found");
}

/// Postgres over TLS: `sslmode=require` connects encrypted (the machine's server has Debian's
/// snakeoil certificate), and the whole app works over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_over_tls_with_sslmode_require() {
    let Some(t) = TestApp::with(Backend::Postgres, |c| {
        let url = c.database_url.take().unwrap();
        let sep = if url.contains('?') { '&' } else { '?' };
        c.database_url = Some(format!("{url}{sep}sslmode=require"));
    })
    .await
    else {
        return;
    };
    let encrypted: bool =
        sqlx::query_scalar("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
            .fetch_one(t.app.state.db.pool())
            .await
            .unwrap();
    assert!(encrypted, "the connection is not encrypted");
    let m = t.upload_model(tiny_model()).await;
    t.submit(f16_job(m["id"].as_str().unwrap())).await;
    assert_eq!(
        t.run_one().await.unwrap().1,
        whittle::db::jobs::JobState::Succeeded
    );
}

/// The server's connection limits: a socket that sends nothing and a keep-alive connection
/// left idle are closed after the header timeout; past the connection cap new connections
/// wait until a slot frees; shutdown returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_close_idle_sockets_and_cap_connections() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = TestApp::sqlite().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = whittle::http::server::Limits {
        max_connections: 2,
        header_timeout: Duration::from_secs(1),
        shutdown_grace: Duration::from_secs(1),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(whittle::http::server::serve(
        listener,
        t.router.clone(),
        limits,
        async move {
            let _ = stopped.await;
        },
    ));
    const GET: &[u8] = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";
    // Waits for the peer to close (read returns 0); how long it took.
    async fn closed_after(s: &mut tokio::net::TcpStream) -> Duration {
        let started = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
                Ok(Ok(_)) => continue,
                Err(_) => panic!("the server kept the connection open"),
            }
        }
    }

    // Two silent sockets take both slots.
    let mut silent1 = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut silent2 = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A third client is served only once a slot frees (when a silent one is dropped).
    let started = Instant::now();
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    third.write_all(GET).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let waited = started.elapsed();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert!(
        waited >= Duration::from_millis(700),
        "served at once past the cap: {waited:?}"
    );
    // The silent ones were closed by the header timeout.
    assert!(closed_after(&mut silent1).await < Duration::from_secs(2));
    assert!(closed_after(&mut silent2).await < Duration::from_secs(2));
    // The third, idle after its answer, is closed too.
    let idle = closed_after(&mut third).await;
    assert!(idle < Duration::from_secs(3), "{idle:?}");

    // An upload that stalls mid-body is cut off after the timeout (a 400), not held for ever.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(
        b"POST /v1/models HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\ncontent-length: 1000\r\n\r\n0123456789",
    )
    .await
    .unwrap();
    let started = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf))
        .await
        .expect("a stalled upload is answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("upload_interrupted"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(3));

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve returns on shutdown")
        .unwrap();
}
