//! Access (API.md "Access"): API keys with scopes, tenants that cannot see each other's
//! resources, keys stored hashed and revoked at once; 503 while the database is away.

use axum::body::Body;
use axum::http::{header, Request};
use serde_json::{json, Value};
use whittle::config::AuthChoice;
use whittle::db::keys::{self, KeyRecord, Scope};

use crate::helpers::*;

async fn keyed(backend: Backend) -> Option<TestApp> {
    TestApp::with(backend, |c| c.auth = Some(AuthChoice::Keys)).await
}

/// A request with `Authorization: Bearer key` (and a JSON or byte body).
async fn call(
    t: &TestApp,
    method: &str,
    uri: &str,
    key: &str,
    body: Option<(&str, Vec<u8>)>,
) -> TestResponse {
    let mut b = Request::builder().method(method).uri(uri);
    if !key.is_empty() {
        b = b.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    let req = match body {
        Some((ct, bytes)) => b.header(header::CONTENT_TYPE, ct).body(Body::from(bytes)),
        None => b.body(Body::empty()),
    };
    t.request(req.unwrap()).await
}

async fn post_json(t: &TestApp, uri: &str, key: &str, body: &Value) -> TestResponse {
    call(
        t,
        "POST",
        uri,
        key,
        Some(("application/json", body.to_string().into_bytes())),
    )
    .await
}

/// A key made through the API by `admin`; its secret.
async fn new_key(
    t: &TestApp,
    admin: &str,
    name: &str,
    scope: &str,
    tenant: &str,
) -> (String, String) {
    let res = post_json(
        t,
        "/v1/keys",
        admin,
        &json!({"name": name, "scope": scope, "tenant": tenant}),
    )
    .await;
    assert_eq!(res.status, 201, "{}", res.text());
    let body = res.json();
    assert_schema("NewApiKey", &body);
    let secret = body["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("wh_") && secret.len() == 67, "{secret}");
    assert_eq!(body["prefix"], &secret[..11]);
    (body["id"].as_str().unwrap().to_string(), secret)
}

async fn keys_scopes_and_tenants(backend: Backend) {
    let Some(t) = keyed(backend).await else {
        return;
    };
    // Open routes stay open; /v1 needs a key.
    assert_eq!(t.get("/healthz").await.status, 200);
    assert_eq!(t.get("/openapi.yaml").await.status, 200);
    assert_eq!(t.get("/").await.status, 200);
    let res = t.get("/v1/models").await;
    res.assert_problem(401, "unauthenticated");
    assert_eq!(res.header("www-authenticate"), Some("Bearer"));
    call(&t, "GET", "/v1/models", "wh_0123", None)
        .await
        .assert_problem(401, "unauthenticated");
    let basic = t
        .get_with("/v1/models", &[("authorization", "Basic YTpi")])
        .await;
    basic.assert_problem(401, "unauthenticated");
    // An unauthenticated upload writes nothing.
    let res = call(
        &t,
        "POST",
        "/v1/models",
        "",
        Some(("application/octet-stream", tiny_model())),
    )
    .await;
    res.assert_problem(401, "unauthenticated");

    // The first administrator key is made on the database (what `whittle keys create` does).
    let (root, admin) = KeyRecord::mint("root".into(), Scope::Admin, "default".into());
    keys::insert(&t.app.state.db, &root).await.unwrap();
    // Only the hash is stored.
    let stored = keys::get(&t.app.state.db, root.id).await.unwrap().unwrap();
    assert_eq!(stored.hash, keys::hash_secret(&admin));
    assert_ne!(stored.hash, admin);
    assert!(!format!("{stored:?}").contains(&admin));

    let (_, acme_w) = new_key(&t, &admin, "acme writer", "write", "acme").await;
    let (acme_r_id, acme_r) = new_key(&t, &admin, "acme reader", "read", "acme").await;
    let (_, globex_w) = new_key(&t, &admin, "globex writer", "write", "globex").await;

    // Bad key requests.
    post_json(
        &t,
        "/v1/keys",
        &admin,
        &json!({"name": "a\u{7}b", "scope": "read"}),
    )
    .await
    .assert_problem(422, "validation_failed");
    post_json(
        &t,
        "/v1/keys",
        &admin,
        &json!({"name": "x", "scope": "root"}),
    )
    .await
    .assert_problem(422, "validation_failed");
    post_json(
        &t,
        "/v1/keys",
        &admin,
        &json!({"name": "x", "scope": "read", "tenant": "Acme!"}),
    )
    .await
    .assert_problem(422, "invalid_tenant");
    post_json(
        &t,
        "/v1/keys",
        &admin,
        &json!({"name": "x", "scope": "read", "extra": 1}),
    )
    .await
    .assert_problem(400, "malformed_json");
    call(
        &t,
        "DELETE",
        "/v1/keys/00000000-0000-7000-8000-000000000000",
        &admin,
        None,
    )
    .await
    .assert_problem(404, "key_not_found");

    // Scopes.
    let res = call(
        &t,
        "POST",
        "/v1/models?name=m",
        &acme_r,
        Some(("application/octet-stream", tiny_model())),
    )
    .await;
    res.assert_problem(403, "forbidden");
    call(&t, "GET", "/v1/keys", &acme_w, None)
        .await
        .assert_problem(403, "forbidden");
    post_json(
        &t,
        "/v1/keys",
        &acme_w,
        &json!({"name": "escalate", "scope": "admin"}),
    )
    .await
    .assert_problem(403, "forbidden");

    // A tenant's model is its own.
    let res = call(
        &t,
        "POST",
        "/v1/models?name=m",
        &acme_w,
        Some(("application/octet-stream", tiny_model())),
    )
    .await;
    assert_eq!(res.status, 201, "{}", res.text());
    let model = res.json();
    assert_eq!(model["tenant"], "acme");
    let mid = model["id"].as_str().unwrap();
    assert_eq!(
        call(&t, "GET", &format!("/v1/models/{mid}"), &acme_r, None)
            .await
            .status,
        200
    );
    call(&t, "GET", &format!("/v1/models/{mid}"), &globex_w, None)
        .await
        .assert_problem(404, "model_not_found");
    call(
        &t,
        "GET",
        &format!("/v1/models/{mid}/content"),
        &globex_w,
        None,
    )
    .await
    .assert_problem(404, "model_not_found");
    call(&t, "DELETE", &format!("/v1/models/{mid}"), &globex_w, None)
        .await
        .assert_problem(404, "model_not_found");
    call(&t, "DELETE", &format!("/v1/models/{mid}"), &acme_r, None)
        .await
        .assert_problem(403, "forbidden");
    let listed = call(&t, "GET", "/v1/models", &globex_w, None).await.json();
    assert_eq!(listed["items"].as_array().unwrap().len(), 0);
    let listed = call(&t, "GET", "/v1/models", &acme_r, None).await.json();
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    // Administrators see every tenant.
    assert_eq!(
        call(&t, "GET", &format!("/v1/models/{mid}"), &admin, None)
            .await
            .status,
        200
    );

    // Another tenant cannot run a job on it; the owner can, and what the job makes is the owner's.
    let res = post_json(&t, "/v1/jobs", &globex_w, &f16_job(mid)).await;
    let problem = res.assert_problem(422, "model_not_found");
    assert_eq!(problem["errors"][0]["pointer"], "/model_id");
    let res = post_json(&t, "/v1/jobs", &acme_w, &f16_job(mid)).await;
    assert_eq!(res.status, 202, "{}", res.text());
    let job = res.json();
    assert_eq!(job["tenant"], "acme");
    let jid = job["id"].as_str().unwrap().to_string();
    t.run_one().await.unwrap();
    let done = call(&t, "GET", &format!("/v1/jobs/{jid}"), &acme_r, None)
        .await
        .json();
    assert_eq!(done["state"], "succeeded", "{done}");
    let out_id = done["result"]["model_id"].as_str().unwrap();
    let out = call(&t, "GET", &format!("/v1/models/{out_id}"), &acme_r, None)
        .await
        .json();
    assert_eq!(out["tenant"], "acme");
    let artifact = done["result"]["artifacts"][0]["id"].as_str().unwrap();
    for uri in [
        format!("/v1/jobs/{jid}"),
        format!("/v1/jobs/{jid}/events"),
        format!("/v1/jobs/{jid}/metrics"),
        format!("/v1/jobs/{jid}/logs"),
        format!("/v1/models/{out_id}"),
    ] {
        let res = call(&t, "GET", &uri, &globex_w, None).await;
        assert_eq!(res.status, 404, "{uri}: {}", res.text());
    }
    call(
        &t,
        "GET",
        &format!("/v1/artifacts/{artifact}"),
        &globex_w,
        None,
    )
    .await
    .assert_problem(404, "artifact_not_found");
    assert_eq!(
        call(
            &t,
            "GET",
            &format!("/v1/artifacts/{artifact}/content"),
            &acme_r,
            None
        )
        .await
        .status,
        200
    );
    call(
        &t,
        "POST",
        &format!("/v1/jobs/{jid}/cancel"),
        &globex_w,
        None,
    )
    .await
    .assert_problem(404, "job_not_found");
    let jobs = call(&t, "GET", "/v1/jobs", &globex_w, None).await.json();
    assert_eq!(jobs["items"].as_array().unwrap().len(), 0);
    let jobs = call(&t, "GET", "/v1/jobs", &admin, None).await.json();
    assert_eq!(jobs["items"].as_array().unwrap().len(), 1);

    // Idempotency keys are per tenant: the same key in two tenants makes two jobs.
    let gm = call(
        &t,
        "POST",
        "/v1/models?name=g",
        &globex_w,
        Some(("application/octet-stream", tiny_model())),
    )
    .await
    .json();
    let with_key = |key: &str, body: Value| {
        Request::post("/v1/jobs")
            .header(header::AUTHORIZATION, format!("Bearer {key}"))
            .header(header::CONTENT_TYPE, "application/json")
            .header("idempotency-key", "nightly-1")
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let a = t.request(with_key(&acme_w, f16_job(mid))).await;
    let g = t
        .request(with_key(&globex_w, f16_job(gm["id"].as_str().unwrap())))
        .await;
    assert_eq!(
        (a.status.as_u16(), g.status.as_u16()),
        (202, 202),
        "{} {}",
        a.text(),
        g.text()
    );
    assert_ne!(a.json()["id"], g.json()["id"]);
    let again = t.request(with_key(&acme_w, f16_job(mid))).await;
    assert_eq!(again.json()["id"], a.json()["id"]);

    // Revocation is immediate; the key is gone from the API, kept in the database.
    let uri = format!("/v1/keys/{acme_r_id}");
    assert_eq!(call(&t, "GET", &uri, &admin, None).await.status, 200);
    assert_eq!(call(&t, "DELETE", &uri, &admin, None).await.status, 204);
    call(&t, "GET", "/v1/models", &acme_r, None)
        .await
        .assert_problem(401, "unauthenticated");
    call(&t, "GET", &uri, &admin, None)
        .await
        .assert_problem(404, "key_not_found");
    call(&t, "DELETE", &uri, &admin, None)
        .await
        .assert_problem(404, "key_not_found");
    let listed = call(&t, "GET", "/v1/keys", &admin, None).await.json();
    assert_schema("ApiKeyList", &listed);
    assert_eq!(listed["items"].as_array().unwrap().len(), 3);
    assert!(!listed.to_string().contains(&acme_w));
    let revoked: Option<i64> = sqlx::query_scalar("select revoked_at from api_keys where id = $1")
        .bind(&acme_r_id)
        .fetch_one(t.app.state.db.pool())
        .await
        .unwrap();
    assert!(revoked.is_some());
}

/// Without keys (loopback default) everything is the `default` tenant's and open.
async fn without_keys_everything_is_the_default_tenants(t: TestApp) {
    let m = t.upload_model(tiny_model()).await;
    assert_eq!(m["tenant"], "default");
    assert_eq!(t.get("/v1/keys").await.status, 200);
}

/// While the database is unreachable, API requests answer 503 with `Retry-After` at once,
/// and readiness says so within a second.
async fn a_database_outage_is_503_with_retry_after(t: TestApp) {
    t.app.state.db.close().await;
    let started = std::time::Instant::now();
    let res = t.get("/v1/models").await;
    let problem = res.assert_problem(503, "database_unavailable");
    assert!(res.header("retry-after").is_some(), "{problem}");
    let r = t.get("/readyz").await;
    assert_eq!(r.status, 503);
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_scopes_and_tenants_on_sqlite() {
    keys_scopes_and_tenants(Backend::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_scopes_and_tenants_on_postgres() {
    keys_scopes_and_tenants(Backend::Postgres).await
}

on_both_backends!(
    without_keys_everything_is_the_default_tenants,
    a_database_outage_is_503_with_retry_after,
);
