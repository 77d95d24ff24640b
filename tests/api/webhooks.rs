//! Webhooks (Standard Webhooks): a job's events are delivered at least once from the durable
//! outbox, signed, retried with backoff while the receiver fails or is down, and shown with
//! every attempt at `GET /v1/jobs/{id}/deliveries`; a job never waits for them.

use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use hmac::Mac;
use serde_json::{json, Value};
use whittle::queue::webhooks::{Secret, Sender};

use crate::helpers::*;

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

fn secret() -> String {
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(KEY)
    )
}

/// The reference check of a Standard Webhooks signature, written from the spec.
fn verify(headers: &HeaderMap, body: &str) -> bool {
    let id = headers["webhook-id"].to_str().unwrap();
    let ts = headers["webhook-timestamp"].to_str().unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(KEY).unwrap();
    mac.update(format!("{id}.{ts}.{body}").as_bytes());
    let want = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    headers["webhook-signature"]
        .to_str()
        .unwrap()
        .split(' ')
        .any(|s| s == want)
}

type Seen = Arc<Mutex<Vec<(HeaderMap, String)>>>;

/// A receiver that answers 500 to its first `fail_first` requests, then 204.
async fn receiver(fail_first: usize) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let s = s.clone();
            async move {
                let mut v = s.lock().unwrap();
                v.push((headers, body));
                if v.len() <= fail_first {
                    (StatusCode::INTERNAL_SERVER_ERROR, "not now")
                } else {
                    (StatusCode::NO_CONTENT, "")
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

async fn webhooks_are_delivered_at_least_once_signed_and_retried(backend: Backend) {
    let Some(t) = TestApp::with(backend, |c| {
        c.webhook_secret = Some(secret());
        c.webhook_allow_private = true;
    })
    .await
    else {
        return;
    };
    let (url, seen) = receiver(2).await;
    let m = t.upload_model(tiny_model()).await;
    let mut body = f16_job(m["id"].as_str().unwrap());
    body["webhook_url"] = json!(url);
    let job = t.submit(body).await;
    assert_eq!(job["webhook_url"], json!(url));
    let id = job["id"].as_str().unwrap().to_string();
    // The job runs to its end without waiting for any receiver.
    t.run_one().await.unwrap();
    let deliveries_uri = format!("/v1/jobs/{id}/deliveries");
    let d = t.get(&deliveries_uri).await.json();
    let types: Vec<&str> = d["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["job.started", "job.succeeded"]);
    assert!(d["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["state"] == "pending"));

    let sender = Sender::new(
        t.app.state.db.clone(),
        Secret::parse_list(&secret()).unwrap(),
        true,
    );
    let now = whittle::ids::now_micros();
    assert_eq!(sender.deliver_due(now).await.unwrap(), 2, "both fail (500)");
    assert_eq!(sender.deliver_due(now).await.unwrap(), 0, "backing off");
    assert_eq!(
        sender.deliver_due(now + 6_000_000).await.unwrap(),
        2,
        "after 5 s: accepted"
    );
    assert_eq!(
        sender.deliver_due(now + 3_600_000_000).await.unwrap(),
        0,
        "nothing left"
    );

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4);
    for (headers, body) in &seen {
        assert!(
            verify(headers, body),
            "signature does not verify: {headers:?}"
        );
        assert_eq!(headers["content-type"], "application/json");
    }
    // Each event keeps its id over its attempts (receivers de-duplicate on it).
    let ids: std::collections::HashSet<&str> = seen
        .iter()
        .map(|(h, _)| h["webhook-id"].to_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    let succeeded: Value = seen
        .iter()
        .map(|(_, b)| serde_json::from_str::<Value>(b).unwrap())
        .find(|b| b["type"] == "job.succeeded")
        .unwrap();
    assert_eq!(succeeded["data"]["job_id"], json!(id));
    assert_eq!(succeeded["data"]["state"], "succeeded");
    assert!(
        succeeded["data"]["result"]["model_id"].is_string(),
        "{succeeded}"
    );
    assert!(succeeded["timestamp"].is_string());

    let d = t.get(&deliveries_uri).await.json();
    assert_schema("DeliveryList", &d);
    for item in d["items"].as_array().unwrap() {
        assert_eq!(item["state"], "delivered", "{item}");
        assert_eq!(item["attempts"], 2);
        let statuses: Vec<i64> = item["responses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["status"].as_i64().unwrap())
            .collect();
        assert_eq!(statuses, [500, 204]);
        assert_eq!(item["responses"][0]["body"], "not now");
    }
}

/// A receiver that is down: each attempt records the connection error and backs off; after
/// the last attempt the delivery is `failed`. Deleting the job removes its deliveries.
async fn a_receiver_that_stays_down_is_given_up_after_the_last_attempt(t: TestApp) {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}/hook", free.local_addr().unwrap());
    drop(free);
    let m = t.upload_model(tiny_model()).await;
    let mut body = f16_job(m["id"].as_str().unwrap());
    body["webhook_url"] = json!(dead);
    let job = t.submit(body).await;
    let id = job["id"].as_str().unwrap();
    let uri = format!("/v1/jobs/{id}/cancel");
    assert_eq!(t.post_json(&uri, &json!({})).await.status, 202);
    let sender = Sender::new(
        t.app.state.db.clone(),
        Secret::parse_list(&secret()).unwrap(),
        true,
    );
    let mut now = whittle::ids::now_micros();
    for _ in 0..whittle::db::webhooks::MAX_ATTEMPTS {
        assert_eq!(sender.deliver_due(now).await.unwrap(), 1);
        now += 4 * 3_600_000_000;
    }
    assert_eq!(sender.deliver_due(now).await.unwrap(), 0);
    let d = t.get(&format!("/v1/jobs/{id}/deliveries")).await.json();
    let item = &d["items"][0];
    assert_eq!(item["type"], "job.cancelled");
    assert_eq!(item["state"], "failed");
    assert_eq!(item["attempts"], whittle::db::webhooks::MAX_ATTEMPTS);
    assert!(item["responses"][0]["error"].is_string(), "{item}");
    assert_eq!(t.delete(&format!("/v1/jobs/{id}")).await.status, 204);
    let left: i64 = sqlx::query_scalar("select count(*) from webhook_deliveries")
        .fetch_one(t.app.state.db.pool())
        .await
        .unwrap();
    assert_eq!(left, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhooks_are_delivered_at_least_once_signed_and_retried_on_sqlite() {
    webhooks_are_delivered_at_least_once_signed_and_retried(Backend::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhooks_are_delivered_at_least_once_signed_and_retried_on_postgres() {
    webhooks_are_delivered_at_least_once_signed_and_retried(Backend::Postgres).await
}

async fn down_sqlite() -> Option<TestApp> {
    TestApp::with(Backend::Sqlite, |c| {
        c.webhook_secret = Some(secret());
        c.webhook_allow_private = true;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_receiver_that_stays_down_is_given_up_on_sqlite() {
    a_receiver_that_stays_down_is_given_up_after_the_last_attempt(down_sqlite().await.unwrap())
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_receiver_that_stays_down_is_given_up_on_postgres() {
    if let Some(t) = TestApp::with(Backend::Postgres, |c| {
        c.webhook_secret = Some(secret());
        c.webhook_allow_private = true;
    })
    .await
    {
        a_receiver_that_stays_down_is_given_up_after_the_last_attempt(t).await
    }
}

/// Receivers on the server's own network are refused unless allowed: a literal loopback or
/// private address at submission, a host name that resolves to one when it is called (and
/// then given up at once, not retried).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_on_private_addresses_are_refused() {
    let t = TestApp::with(Backend::Sqlite, |c| c.webhook_secret = Some(secret()))
        .await
        .unwrap();
    let m = t.upload_model(tiny_model()).await;
    for url in [
        "http://127.0.0.1:9/hook",
        "http://169.254.169.254/latest",
        "http://[::1]/x",
        "http://10.1.2.3/",
        "http://localhost:8080/",
    ] {
        let mut body = f16_job(m["id"].as_str().unwrap());
        body["webhook_url"] = json!(url);
        let p = t
            .post_json("/v1/jobs", &body)
            .await
            .assert_problem(422, "validation_failed");
        assert_eq!(p["errors"][0]["pointer"], "/webhook_url", "{url}");
    }
    // A name resolving to loopback passes submission (on a server that allows it here) but a
    // sender that does not allow private receivers refuses to call it.
    let t = TestApp::with(Backend::Sqlite, |c| {
        c.webhook_secret = Some(secret());
        c.webhook_allow_private = true;
    })
    .await
    .unwrap();
    let m = t.upload_model(tiny_model()).await;
    let mut body = f16_job(m["id"].as_str().unwrap());
    body["webhook_url"] = json!("http://localhost:9/hook");
    let job = t.submit(body).await;
    let id = job["id"].as_str().unwrap();
    assert_eq!(
        t.post_json(&format!("/v1/jobs/{id}/cancel"), &json!({}))
            .await
            .status,
        202
    );
    let strict = Sender::new(
        t.app.state.db.clone(),
        Secret::parse_list(&secret()).unwrap(),
        false,
    );
    assert_eq!(
        strict
            .deliver_due(whittle::ids::now_micros())
            .await
            .unwrap(),
        1
    );
    let d = t.get(&format!("/v1/jobs/{id}/deliveries")).await.json();
    let item = &d["items"][0];
    assert_eq!(item["state"], "failed", "{item}");
    assert_eq!(item["attempts"], 1);
    assert!(
        item["responses"][0]["error"]
            .as_str()
            .unwrap()
            .contains("not a public address"),
        "{item}"
    );
    use std::net::IpAddr;
    use whittle::queue::webhooks::is_public;
    for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
        assert!(is_public(ip.parse::<IpAddr>().unwrap()), "{ip}");
    }
    for ip in [
        "127.0.0.1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "::1",
        "fe80::1",
        "fd00::1",
        "::ffff:10.0.0.1",
        "64:ff9b::a9fe:a9fe",
        "2002:a9fe:a9fe::1",
        "::169.254.169.254",
        "198.18.0.1",
    ] {
        assert!(!is_public(ip.parse::<IpAddr>().unwrap()), "{ip}");
    }
}

/// Without a secret the server refuses webhook URLs; a bad URL is refused either way.
#[tokio::test]
async fn webhook_urls_need_a_secret_and_a_real_url() {
    let t = TestApp::sqlite().await;
    let m = t.upload_model(tiny_model()).await;
    let mut body = f16_job(m["id"].as_str().unwrap());
    body["webhook_url"] = json!("https://example.com/hook");
    let p = t
        .post_json("/v1/jobs", &body)
        .await
        .assert_problem(422, "unsupported_operation");
    assert_eq!(p["errors"][0]["pointer"], "/webhook_url");
    let t = down_sqlite().await.unwrap();
    let m = t.upload_model(tiny_model()).await;
    for bad in [
        "ftp://example.com/x",
        "https://user:pw@example.com/",
        "not a url",
        "http://",
    ] {
        let mut body = f16_job(m["id"].as_str().unwrap());
        body["webhook_url"] = json!(bad);
        let p = t
            .post_json("/v1/jobs", &body)
            .await
            .assert_problem(422, "validation_failed");
        assert_eq!(p["errors"][0]["pointer"], "/webhook_url", "{bad}");
    }
    assert!(Secret::parse_list("short").is_err());
    assert!(Secret::parse_list("whsec_!!!").is_err());
}
