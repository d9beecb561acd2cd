//! The snapshot stream end to end with real processes: a throwaway PostgreSQL,
//! `vigil control` processes, and proxies' subscribers (the real client code) in
//! this process, over real gRPC sockets.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{client, ControlProcess, SIGNING_SEED};
use vigil_proto::v1::entry::Body;
use vigil_proxy::subscriber::{self, Handle, Link};
use vigil_snapshot::{Kind, Signer, Verifier};
use vigil_test_postgres::TestPostgres;

fn trusted() -> Verifier {
    let key = Signer::from_seed_base64(SIGNING_SEED)
        .unwrap()
        .public_key_base64();
    Verifier::from_base64([key.as_str()]).unwrap()
}

async fn post(c: &reqwest::Client, url: &str, path: &str, body: Value) -> Value {
    let res = c
        .post(format!("{url}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = res.status();
    let text = res.text().await.unwrap();
    assert!(status.is_success(), "POST {path}: {status} {text}");
    serde_json::from_str(&text).unwrap()
}

/// The revision a write committed at: its response's `version`.
fn revision_of(written: &Value) -> u64 {
    written["version"].as_u64().unwrap()
}

fn subscribe(
    cp: &ControlProcess,
    token: &str,
    id: &str,
    verifier: Verifier,
    file: Option<std::path::PathBuf>,
) -> Handle {
    subscriber::start(subscriber::Config {
        addresses: vec![cp.grpc_url.clone()],
        join_token: token.to_owned(),
        ca_pem: None,
        verifier,
        proxy_id: id.to_owned(),
        labels: vec![("zone".into(), "test".into())],
        snapshot_file: file,
    })
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn user_suspended(h: &Handle, id: &str) -> Option<bool> {
    match h.index.load().snapshot.get(Kind::User, id)?.body.as_ref()? {
        Body::User(u) => Some(u.suspended),
        _ => None,
    }
}

async fn proxies(c: &reqwest::Client, url: &str) -> Value {
    c.get(format!("{url}/v1/proxies"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_and_deltas_reach_proxies_and_survive_outages() {
    let pg = TestPostgres::start().unwrap();
    let db = pg.create_database("stream").unwrap();
    let mut cp = ControlProcess::start(&db);
    let c = client();
    let url = cp.url.clone();
    let join = post(&c, &url, "/v1/join-tokens", json!({"name": "fleet"})).await;
    let token = join["token"].as_str().unwrap().to_owned();
    post(&c, &url, "/v1/groups", json!({"name": "eng"})).await;
    post(
        &c,
        &url,
        "/v1/policies",
        json!({"name": "staff", "document": {"allow": {"and": [{"groups": {"has": "eng"}}]}}}),
    )
    .await;
    post(&c, &url, "/v1/routes", json!({"name": "app", "host": "app.example.com", "upstreams": ["http://127.0.0.1:9"], "policies": ["staff"]})).await;
    let user = post(&c, &url, "/v1/users", json!({"issuer": "https://idp.example", "subject": "alice", "email": "alice@example.com", "groups": ["eng"]})).await;
    let uid = user["id"].as_str().unwrap().to_owned();

    let dir = std::env::temp_dir().join(format!("vigil-stream-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("snapshot.bin");
    let _ = std::fs::remove_file(&file);
    let proxy = subscribe(&cp, &token, "proxy-a", trusted(), Some(file.clone()));
    let rev = revision_of(&user);
    until("the first snapshot", || proxy.index.load().version() == rev).await;
    let index = proxy.index.load_full();
    assert!(
        index.policy("app").is_some(),
        "the route's policy is loaded"
    );
    assert_eq!(user_suspended(&proxy, &uid), Some(false));
    assert!(index.snapshot.get(Kind::Route, "app").is_some());

    // A write reaches the proxy as a delta; the fleet API shows the ack.
    let res = c
        .patch(format!("{url}/v1/users/{uid}"))
        .header("if-match", "*")
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"status": "suspended"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    until("the suspension", || {
        user_suspended(&proxy, &uid) == Some(true)
    })
    .await;
    let v = proxy.index.load().version();
    let mut fleet = Value::Null;
    for _ in 0..200 {
        fleet = proxies(&c, &url).await;
        if fleet["items"][0]["version"].as_u64() == Some(v) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let p = &fleet["items"][0];
    assert_eq!(p["id"], "proxy-a", "{fleet}");
    assert_eq!(p["version"].as_u64(), Some(v), "{fleet}");
    assert_eq!(p["connected"], true);
    assert_eq!(p["labels"]["zone"], "test");
    assert_eq!(p["join_token"], "fleet");

    // Control plane killed: the proxy keeps what it has, reconnects when it is back,
    // and catches up on what was written while it was away.
    cp.kill();
    let held = proxy.index.load().version();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(proxy.index.load().version(), held);
    assert!(proxy.index.load().policy("app").is_some());
    cp.restart();
    let bob = post(
        &c,
        &url,
        "/v1/users",
        json!({"issuer": "https://idp.example", "subject": "bob"}),
    )
    .await;
    let rev = revision_of(&bob);
    until("catching up after the restart", || {
        proxy.index.load().version() == rev
    })
    .await;

    // A proxy restarted while the control plane is down serves its persisted snapshot.
    cp.kill();
    let restarted = subscribe(&cp, &token, "proxy-a2", trusted(), Some(file.clone()));
    assert_eq!(
        restarted.index.load().version(),
        rev,
        "loaded from disk at once"
    );
    assert!(restarted.index.load().policy("app").is_some());
    assert_eq!(user_suspended(&restarted, &uid), Some(true));
    cp.restart();

    // PostgreSQL restarted too: same.
    cp.kill();
    pg.halt().unwrap();
    pg.resume().unwrap();
    cp.restart();
    let ops = post(&c, &url, "/v1/groups", json!({"name": "ops"})).await;
    let rev = revision_of(&ops);
    until("catching up after both restarts", || {
        proxy.index.load().version() == rev
    })
    .await;
    until("the restarted proxy catching up", || {
        restarted.index.load().version() == rev
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn untrusted_snapshots_and_unknown_tokens_are_refused() {
    let pg = TestPostgres::start().unwrap();
    let db = pg.create_database("refuse").unwrap();
    let cp = ControlProcess::start(&db);
    let c = client();
    let url = cp.url.clone();
    let token = post(&c, &url, "/v1/join-tokens", json!({"name": "fleet"})).await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    post(&c, &url, "/v1/groups", json!({"name": "eng"})).await;

    // Signed by a key the proxy does not trust: nacked, nothing applied.
    let (other, _) = Signer::generate().unwrap();
    let wrong = Verifier::from_base64([other.public_key_base64().as_str()]).unwrap();
    let proxy = subscribe(&cp, &token, "suspicious", wrong, None);
    let mut fleet = Value::Null;
    for _ in 0..500 {
        fleet = proxies(&c, &url).await;
        if !fleet["items"][0]["last_nack"].is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let nack = &fleet["items"][0]["last_nack"];
    assert!(
        nack["error"]
            .as_str()
            .unwrap_or("")
            .contains("unknown signing key"),
        "{fleet}"
    );
    assert_eq!(proxy.index.load().version(), 0, "nothing applied");

    // An unknown join token never gets a stream.
    let stranger = subscribe(&cp, "vgl_join_not-a-token", "stranger", trusted(), None);
    let mut link = stranger.link.clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Link::Retrying { error } = &*link.borrow_and_update() {
            assert!(error.contains("unknown join token"), "{error}");
            break;
        }
        assert!(Instant::now() < deadline, "no refusal seen");
        let _ = tokio::time::timeout(Duration::from_secs(1), link.changed()).await;
    }
    assert_eq!(stranger.index.load().version(), 0);

    // A deleted join token stops working for new streams.
    let res = c
        .delete(format!("{url}/v1/join-tokens/fleet"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let late = subscribe(&cp, &token, "late", trusted(), None);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(late.index.load().version(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_through_one_replica_reaches_a_proxy_on_another() {
    let pg = TestPostgres::start().unwrap();
    let db = pg.create_database("replicas").unwrap();
    let a = ControlProcess::start(&db);
    let b = ControlProcess::start(&db);
    let c = client();
    let joined = post(&c, &a.url, "/v1/join-tokens", json!({"name": "fleet"})).await;
    let token = joined["token"].as_str().unwrap().to_owned();
    let on_a = subscribe(&a, &token, "on-a", trusted(), None);
    let on_b = subscribe(&b, &token, "on-b", trusted(), None);
    let rev = revision_of(&joined);
    until("both proxies subscribed", || {
        on_a.index.load().version() == rev && on_b.index.load().version() == rev
    })
    .await;
    let user = post(
        &c,
        &a.url,
        "/v1/users",
        json!({"issuer": "https://idp.example", "subject": "carol"}),
    )
    .await;
    let uid = user["id"].as_str().unwrap().to_owned();
    // Replica B learns of it through LISTEN/NOTIFY: its safety-net poll is 30 s away.
    let deadline = Instant::now() + Duration::from_secs(10);
    while user_suspended(&on_b, &uid) != Some(false) {
        assert!(
            Instant::now() < deadline,
            "the write on replica A did not reach the proxy on replica B"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Both replicas built the same version; their entries are identical.
    until("the same version", || {
        on_a.index.load().version() == on_b.index.load().version()
    })
    .await;
    assert_eq!(on_a.index.load().snapshot, on_b.index.load().snapshot);
}
