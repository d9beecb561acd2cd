//! The OpenAPI document against the router: every documented operation must be
//! served (no fallback 404, no 405), the served document must be the generated
//! one, and docs/api/openapi.json must be current.
#![allow(clippy::unwrap_used)]

use axum::body::Body;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;
use vigil_control::{router, Control, ControlConfig};
use vigil_store::{Store, StoreOptions};

const TOKEN: &str = "test-owner-token";

async fn app() -> axum::Router {
    let url = vigil_test_postgres::sqlite_url().unwrap();
    let store = Store::connect(&url, StoreOptions::default()).await.unwrap();
    store.migrate().await.unwrap();
    let config = ControlConfig {
        bootstrap_token: Some(TOKEN.into()),
        secret_key: Some(("k1".into(), "A".repeat(43))),
    };
    router(Control::new(store, config).unwrap())
}

async fn call(app: &axum::Router, method: Method, path: &str) -> (StatusCode, serde_json::Value) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .header("if-match", "*")
        .body(Body::from("{}"))
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test]
async fn every_documented_operation_is_served() {
    let app = app().await;
    let doc = vigil_control::openapi::document();
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, _) in item.as_object().unwrap() {
            let Ok(m) = method.to_uppercase().parse::<Method>() else {
                continue;
            };
            if !["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&m.as_str()) {
                continue;
            }
            let concrete = path.replace("{id}", "does-not-exist");
            let (status, body) = call(&app, m.clone(), &concrete).await;
            assert_ne!(
                status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{m} {path} is documented but not routed"
            );
            assert!(
                !(status == StatusCode::NOT_FOUND
                    && body["type"]
                        .as_str()
                        .is_some_and(|t| t.ends_with("/no-such-endpoint"))),
                "{m} {path} is documented but the router has no such endpoint"
            );
            checked += 1;
        }
    }
    assert!(checked > 60, "only {checked} operations documented");
    // And the reverse for a sample: an undocumented path is the router's 404.
    let (status, body) = call(&app, Method::GET, "/v1/nonsense").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["type"]
        .as_str()
        .unwrap()
        .ends_with("/no-such-endpoint"));
}

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

#[tokio::test]
async fn what_is_served_is_exactly_what_is_documented() {
    use std::collections::BTreeSet;
    let doc = vigil_control::openapi::document();
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(|m| m.to_uppercase())
                .filter(|m| METHODS.contains(&m.as_str()))
                .map(move |m| (m, path.clone()))
        })
        .collect();
    let served: BTreeSet<(String, String)> = vigil_control::served()
        .into_iter()
        .map(|(m, p)| (m.to_owned(), p))
        .collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty() && unserved.is_empty(),
        "served but not documented: {undocumented:?}; documented but not served: {unserved:?}"
    );
    // The route table says what each path answers; the router must agree, method by
    // method, so the table cannot drift from the handlers.
    let app = app().await;
    let paths: BTreeSet<&String> = served.iter().map(|(_, p)| p).collect();
    for path in paths {
        let concrete = path.replace("{id}", "does-not-exist");
        for m in METHODS {
            let (status, _) = call(&app, m.parse().unwrap(), &concrete).await;
            let listed = served.contains(&(m.to_owned(), path.clone()));
            assert_eq!(
                status == StatusCode::METHOD_NOT_ALLOWED,
                !listed,
                "{m} {path}: {status}, but the route table says {}",
                if listed { "it is served" } else { "it is not" }
            );
        }
    }
}

#[tokio::test]
async fn the_served_document_is_the_committed_one() {
    let app = app().await;
    let (status, served) = call(&app, Method::GET, "/v1/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(served["openapi"], "3.1.0");
    assert_eq!(served, vigil_control::openapi::document());
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/api/openapi.json");
    let pretty = serde_json::to_string_pretty(&served).unwrap() + "\n";
    if std::env::var_os("VIGIL_WRITE_OPENAPI").is_some() {
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, &pretty).unwrap();
    }
    let committed = std::fs::read_to_string(&file).unwrap_or_default();
    assert!(
        committed == pretty,
        "docs/api/openapi.json is stale: run `make openapi` and commit it"
    );
}
