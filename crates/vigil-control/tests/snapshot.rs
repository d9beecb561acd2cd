//! Snapshot builds are a function of the revision: built whole, or advanced one
//! write at a time from the change log, the same revision encodes to the same bytes.
#![allow(clippy::unwrap_used)]

use axum::body::Body;
use http::{Method, Request};
use prost::Message as _;
use serde_json::{json, Value};
use tower::ServiceExt;
use vigil_control::snapshot::Builder;
use vigil_control::{router, Control, ControlConfig};
use vigil_store::{Store, StoreOptions};

const TOKEN: &str = "snapshot-test-token";

async fn call(app: &axum::Router, method: Method, path: &str, body: Value) -> Value {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .header("if-match", "*")
        .body(Body::from(body.to_string()))
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert!(
        status.is_success(),
        "{path}: {status} {}",
        String::from_utf8_lossy(&bytes)
    );
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

fn builder(revision: i64, records: Vec<vigil_store::RawRecord>, control: &Control) -> Builder {
    let c = control.clone();
    Builder::full(revision, records, Box::new(move |s| c.open(s)))
}

/// Advances `inc` from the change log and checks it against whole builds.
async fn step(store: &Store, control: &Control, inc: &mut Builder, label: &str) {
    let from = i64::try_from(inc.history().current().version).unwrap();
    let (rev, changes, recs) = store.changed_since(from).await.unwrap();
    inc.advance(rev, &changes, recs);
    let (rev_all, all) = store.load_all().await.unwrap();
    assert_eq!(rev, rev_all);
    let whole = builder(rev_all, all, control);
    assert_eq!(bytes(inc), bytes(&whole), "after {label}");
    // A second whole build (another replica) is byte-identical too.
    let (_, again) = store.load_all().await.unwrap();
    assert_eq!(bytes(&builder(rev_all, again, control)), bytes(&whole));
}

fn bytes(b: &Builder) -> Vec<u8> {
    b.history().current().full_update().encode_to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_revision_same_bytes_whole_or_incremental() {
    let url = vigil_test_postgres::sqlite_url().unwrap();
    let store = Store::connect(&url, StoreOptions::default()).await.unwrap();
    store.migrate().await.unwrap();
    let control = Control::new(
        store.clone(),
        ControlConfig {
            bootstrap_token: Some(TOKEN.into()),
            secret_key: Some(("k1".into(), "A".repeat(43))),
        },
    )
    .unwrap();
    let app = router(control.clone());
    let (rev0, records) = store.load_all().await.unwrap();
    let mut incremental = builder(rev0, records, &control);

    call(&app, Method::POST, "/v1/groups", json!({"name": "eng"})).await;
    call(
        &app,
        Method::POST,
        "/v1/policies",
        json!({"name": "base", "document": {"allow": {"and": [{"groups": {"has": "eng"}}]}}}),
    )
    .await;
    call(
        &app,
        Method::POST,
        "/v1/policies",
        json!({"name": "wrap", "document": {"allow": {"and": [{"policy": "base"}]}}}),
    )
    .await;
    call(&app, Method::POST, "/v1/routes", json!({"name": "r1", "host": "a.example.com", "upstreams": ["http://u"], "policies": ["wrap"]})).await;
    call(&app, Method::POST, "/v1/routes", json!({"name": "r2", "host": "b.example.com", "upstreams": ["http://u"], "policy": {"allow": {"and": [{"email": {"is": "x@example.com"}}]}}})).await;
    let u = call(&app, Method::POST, "/v1/users", json!({"issuer": "https://i", "subject": "s", "email": "s@example.com", "groups": ["eng"], "attributes": {"b": 1, "a": [true]}})).await;
    call(&app, Method::POST, "/v1/devices", json!({"name": "laptop", "approved": true, "posture": {"attributes": {"managed": true, "os": "linux"}, "expires_at": "2030-01-01T00:00:00Z"}})).await;
    call(
        &app,
        Method::POST,
        "/v1/service-accounts",
        json!({"name": "ci", "groups": ["eng"]}),
    )
    .await;
    call(&app, Method::POST, "/v1/identity-providers", json!({"name": "idp", "issuer_url": "https://idp.example.com", "client_id": "c", "client_secret": "s3cret", "scopes": ["openid"]})).await;
    step(&store, &control, &mut incremental, "creating one of each").await;
    let before = bytes(&incremental);

    // A change to a policy deep in a chain recompiles the route that reaches it.
    call(
        &app,
        Method::PUT,
        "/v1/policies/base",
        json!({"name": "base", "document": {"allow": {"and": [{"groups": {"has": "ops"}}]}}}),
    )
    .await;
    step(
        &store,
        &control,
        &mut incremental,
        "changing a referenced policy",
    )
    .await;
    assert_ne!(bytes(&incremental), before);
    let uid = u["id"].as_str().unwrap();
    call(
        &app,
        Method::PATCH,
        &format!("/v1/users/{uid}"),
        json!({"status": "suspended"}),
    )
    .await;
    call(&app, Method::DELETE, "/v1/routes/r2", Value::Null).await;
    step(
        &store,
        &control,
        &mut incremental,
        "suspending a user and deleting a route",
    )
    .await;

    // The client secret is in the snapshot (the proxy exchanges codes), in the clear.
    let snap = incremental.history().current().clone();
    let idp = snap
        .get(vigil_snapshot::Kind::IdentityProvider, "idp")
        .unwrap();
    match idp.body.as_ref().unwrap() {
        vigil_proto::v1::entry::Body::IdentityProvider(p) => assert_eq!(p.client_secret, "s3cret"),
        other => panic!("{other:?}"),
    }
    assert!(snap.get(vigil_snapshot::Kind::Route, "r2").is_none());
}
