//! The OpenAPI document and the router agree: same (method, path) set, and every documented
//! route is really routed.

use std::collections::BTreeSet;

use crate::helpers::*;

fn documented() -> BTreeSet<(String, String)> {
    let doc: serde_yaml::Value =
        serde_yaml::from_str(whittle::http::OPENAPI_YAML).expect("openapi.yaml parses");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_mapping().expect("paths") {
        for (method, _) in item.as_mapping().unwrap() {
            let m = method.as_str().unwrap();
            if ["get", "post", "put", "patch", "delete"].contains(&m) {
                out.insert((m.to_uppercase(), path.as_str().unwrap().to_string()));
            }
        }
    }
    out
}

#[test]
fn openapi_document_lists_exactly_the_routes() {
    let routes: BTreeSet<(String, String)> = whittle::http::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented(), routes);
}

#[tokio::test]
async fn every_route_is_routed_and_the_document_is_served() {
    let t = TestApp::sqlite().await;
    for (method, path) in whittle::http::ROUTES {
        let uri = path.replace("{id}", "0190d4a0-0000-7000-8000-000000000000");
        let req = axum::http::Request::builder()
            .method(*method)
            .uri(&uri)
            .body(axum::body::Body::empty())
            .unwrap();
        let res = t.request(req).await;
        let code = if res.header("content-type") == Some("application/problem+json") {
            res.json()["code"].as_str().unwrap_or("").to_string()
        } else {
            String::new()
        };
        assert!(
            code != "route_not_found" && code != "method_not_allowed",
            "{method} {path} is not routed"
        );
    }
    let res = t.get("/openapi.yaml").await;
    assert_eq!(res.status, 200);
    assert_eq!(res.text(), whittle::http::OPENAPI_YAML);
}

/// Real responses of every route that answers JSON, each checked against the schema the
/// document names for it: success bodies, lists, a failed and a cancelled job, a dry-run plan,
/// problem bodies (the per-op metrics documents are checked by the golden test).
#[tokio::test]
async fn responses_match_their_schemas() {
    use serde_json::json;
    let t = TestApp::sqlite().await;
    // The validator catches a body that does not match.
    let caught = std::panic::catch_unwind(|| assert_schema("Job", &json!({"id": 5})));
    assert!(caught.is_err(), "a wrong body must fail the schema check");

    let model = t.upload_model(tiny_model()).await;
    assert_schema("Model", &model);
    let id = model["id"].as_str().unwrap();
    assert_schema("Model", &t.get(&format!("/v1/models/{id}")).await.json());
    assert_schema("ModelList", &t.get("/v1/models?limit=1").await.json());
    let fresh = t
        .post_json(
            "/v1/models",
            &json!({"architecture": tiny_arch(), "init": {"seed": 1}}),
        )
        .await;
    assert_schema("Model", &fresh.json());

    let csv = b"a,b,label\n0.1,0.2,0\n0.3,0.4,1\n".to_vec();
    let res = t
        .post_multipart(
            "/v1/datasets",
            &[
                Part {
                    name: "format",
                    filename: None,
                    bytes: b"csv".to_vec(),
                },
                Part {
                    name: "file",
                    filename: Some("t.csv"),
                    bytes: csv,
                },
            ],
        )
        .await;
    assert_eq!(res.status, 201, "{}", res.text());
    assert_schema("Dataset", &res.json());
    let did = res.json()["id"].as_str().unwrap().to_string();
    assert_schema(
        "Dataset",
        &t.get(&format!("/v1/datasets/{did}")).await.json(),
    );
    assert_schema("DatasetList", &t.get("/v1/datasets").await.json());

    let queued = t.submit(f16_job(id)).await;
    assert_schema("Job", &queued);
    let plan = t.post_json("/v1/jobs?dry_run=true", &f16_job(id)).await;
    assert_eq!(plan.status, 200);
    assert_schema("DryRunPlan", &plan.json());
    t.run_one().await.unwrap();
    let done = t
        .get(&format!("/v1/jobs/{}", queued["id"].as_str().unwrap()))
        .await
        .json();
    assert_schema("Job", &done);
    assert_schema("JobList", &t.get("/v1/jobs").await.json());

    // A job that fails (its input blob is gone) and one cancelled while queued.
    let doomed = t
        .upload_model(tiny_model_with(
            [("note".to_string(), "doomed".to_string())].into(),
        ))
        .await;
    let mut body = f16_job(doomed["id"].as_str().unwrap());
    body["max_attempts"] = json!(1);
    let failing = t.submit(body).await;
    let blob = t
        .app
        .state
        .store
        .materialize(doomed["sha256"].as_str().unwrap())
        .unwrap();
    std::fs::remove_file(blob).unwrap();
    t.run_one().await.unwrap();
    let failed = t
        .get(&format!("/v1/jobs/{}", failing["id"].as_str().unwrap()))
        .await
        .json();
    assert_eq!(failed["state"], "failed");
    assert_schema("Job", &failed);
    assert_schema(
        "Metrics",
        &t.get(&format!(
            "/v1/jobs/{}/metrics",
            failing["id"].as_str().unwrap()
        ))
        .await
        .json(),
    );
    let later = t.submit(f16_job(id)).await;
    let cancel = t
        .post_json(
            &format!("/v1/jobs/{}/cancel", later["id"].as_str().unwrap()),
            &json!({}),
        )
        .await;
    assert_eq!(cancel.status, 202);
    assert_schema("Job", &cancel.json());

    // Problems.
    for res in [
        t.get("/v1/models/0190d4a0-0000-7000-8000-000000000000")
            .await,
        t.get("/v1/jobs?state=bogus").await,
        t.post_json("/v1/jobs", &json!({"model_id": id, "steps": []}))
            .await,
        t.post_bytes(
            "/v1/models",
            "application/octet-stream",
            b"not safetensors".to_vec(),
        )
        .await,
        t.get("/v1/nothing-here").await,
    ] {
        assert_eq!(res.header("content-type"), Some("application/problem+json"));
        assert_schema("Problem", &res.json());
    }
    assert_schema("Readiness", &t.get("/readyz").await.json());
}
