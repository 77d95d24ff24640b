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
