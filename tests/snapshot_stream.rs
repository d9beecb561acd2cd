//! The snapshot stream end to end with real processes: a throwaway PostgreSQL,
//! `vigil control` processes, and proxies' subscribers (the real client code) in
//! this process, over real gRPC sockets.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use prost::Message as _;
use serde_json::{json, Value};
use support::{
    client, eventually, get_json, join_token, patch_json, post_json, trusted, ControlProcess,
    TestCa,
};
use vigil_proto::parts::{Joiner, UPDATE_PART_BYTES};
use vigil_proto::v1::control_plane_client::ControlPlaneClient;
use vigil_proto::v1::{
    control_message, proxy_message, ControlMessage, Envelope, Hello, Nack, ProxyMessage, Update,
};
use vigil_proxy::subscriber::{self, Handle, Link};
use vigil_snapshot::{Kind, Signer, Verifier};
use vigil_test_postgres::TestPostgres;

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

/// Waits until `h`'s stream is refused; returns why.
async fn refused(h: &Handle) -> String {
    let mut link = h.link.clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Link::Retrying { error } = &*link.borrow_and_update() {
            return error.clone();
        }
        assert!(Instant::now() < deadline, "no refusal seen");
        let _ = tokio::time::timeout(Duration::from_secs(1), link.changed()).await;
    }
}

/// Sends `barrier` (a report of a new session) and waits until the control plane has
/// recorded it: reports are handled in order, so every earlier one is handled too.
async fn reports_handled(
    proxy: &Handle,
    c: &reqwest::Client,
    url: &str,
    barrier: vigil_proto::v1::SessionReport,
) {
    let path = format!("{url}/v1/sessions/{}", barrier.session_id);
    proxy.reports.send(barrier).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while c
        .get(&path)
        .send()
        .await
        .map_or(true, |r| r.status() != 200)
    {
        assert!(
            Instant::now() < deadline,
            "the report behind {path} was never handled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A throwaway PostgreSQL, a control plane on its database `db`, a client, the
/// control plane's URL and a fleet join token.
async fn plane(
    db: &str,
) -> (
    TestPostgres,
    ControlProcess,
    reqwest::Client,
    String,
    String,
) {
    let pg = TestPostgres::start().unwrap();
    let cp = ControlProcess::start(&pg.create_database(db).unwrap());
    let c = client();
    let url = cp.url.clone();
    let token = join_token(&c, &url, "fleet").await;
    (pg, cp, c, url, token)
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn user_suspended(h: &Handle, id: &str) -> Option<bool> {
    h.index.load().users.get(id).map(|u| u.suspended)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_and_deltas_reach_proxies_and_survive_outages() {
    let pg = TestPostgres::start().unwrap();
    let db = pg.create_database("stream").unwrap();
    let mut cp = ControlProcess::start(&db);
    let c = client();
    let url = cp.url.clone();
    let join = post_json(&c, &url, "/v1/join-tokens", json!({"name": "fleet"})).await;
    let token = join["token"].as_str().unwrap().to_owned();
    post_json(&c, &url, "/v1/groups", json!({"name": "eng"})).await;
    post_json(
        &c,
        &url,
        "/v1/policies",
        json!({"name": "staff", "document": {"allow": {"and": [{"groups": {"has": "eng"}}]}}}),
    )
    .await;
    post_json(&c, &url, "/v1/routes", json!({"name": "app", "host": "app.example.com", "upstreams": ["http://127.0.0.1:9"], "policies": ["staff"]})).await;
    let user = post_json(&c, &url, "/v1/users", json!({"issuer": "https://idp.example", "subject": "alice", "email": "alice@example.com", "groups": ["eng"]})).await;
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
    assert_eq!(
        index.route("app.example.com", "/anything").map(|r| r.0),
        Some("app"),
        "the route table is built from the snapshot"
    );
    assert!(index.route("other.example.com", "/").is_none());

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
    // The ack follows the swap over the stream: waited for like any propagation
    // (a count of tries is no deadline on a loaded machine).
    let fleet = eventually("the ack in the fleet API", || async {
        let fleet = get_json(&c, &url, "/v1/proxies").await;
        if fleet["items"][0]["version"].as_u64() == Some(v) {
            Ok(fleet)
        } else {
            Err(fleet.to_string())
        }
    })
    .await;
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
    let bob = post_json(
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
    assert!(restarted
        .index
        .load()
        .route("app.example.com", "/")
        .is_some());
    assert_eq!(user_suspended(&restarted, &uid), Some(true));
    until("the restarted proxy to find the control plane away", || {
        matches!(&*restarted.link.borrow(), Link::Retrying { .. })
    })
    .await;
    let ready = restarted.readiness().unwrap();
    assert!(
        ready.contains(&format!("enforcing snapshot version {rev}"))
            && ready.contains("unreachable"),
        "{ready}"
    );
    cp.restart();

    // PostgreSQL restarted too: same.
    cp.kill();
    pg.halt().unwrap();
    pg.resume().unwrap();
    cp.restart();
    let ops = post_json(&c, &url, "/v1/groups", json!({"name": "ops"})).await;
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
    let (_pg, cp, c, url, token) = plane("refuse").await;
    post_json(&c, &url, "/v1/groups", json!({"name": "eng"})).await;

    // Signed by a key the proxy does not trust: nacked, nothing applied.
    let (other, _) = Signer::generate().unwrap();
    let wrong = Verifier::from_base64([other.public_key_base64().as_str()]).unwrap();
    let proxy = subscribe(&cp, &token, "suspicious", wrong, None);
    let mut fleet = Value::Null;
    for _ in 0..500 {
        fleet = get_json(&c, &url, "/v1/proxies").await;
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
    let error = refused(&stranger).await;
    assert!(error.contains("unknown join token"), "{error}");
    assert_eq!(stranger.index.load().version(), 0);

    // A deleted join token stops working for new streams.
    let res = c
        .delete(format!("{url}/v1/join-tokens/fleet"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let late = subscribe(&cp, &token, "late", trusted(), None);
    let error = refused(&late).await;
    assert!(error.contains("unknown join token"), "{error}");
    assert_eq!(late.index.load().version(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_through_one_replica_reaches_a_proxy_on_another() {
    let pg = TestPostgres::start().unwrap();
    let db = pg.create_database("replicas").unwrap();
    let a = ControlProcess::start(&db);
    let b = ControlProcess::start(&db);
    let c = client();
    let joined = post_json(&c, &a.url, "/v1/join-tokens", json!({"name": "fleet"})).await;
    let token = joined["token"].as_str().unwrap().to_owned();
    let on_a = subscribe(&a, &token, "on-a", trusted(), None);
    let on_b = subscribe(&b, &token, "on-b", trusted(), None);
    let rev = revision_of(&joined);
    until("both proxies subscribed", || {
        on_a.index.load().version() == rev && on_b.index.load().version() == rev
    })
    .await;
    let user = post_json(
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

    // Either replica lists the whole fleet, whichever replica each proxy streams from.
    for replica in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let fleet = get_json(&c, &replica.url, "/v1/proxies").await;
            let connected: Vec<&str> = fleet["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["connected"] == true)
                .filter_map(|p| p["id"].as_str())
                .collect();
            if connected == ["on-a", "on-b"] {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "fleet on {}: {fleet}",
                replica.url
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_reported_by_a_proxy_are_listed_and_revocable() {
    let (_pg, cp, c, url, token) = plane("sessions").await;
    let user = post_json(
        &c,
        &url,
        "/v1/users",
        json!({"issuer": "https://idp.example", "subject": "bob", "email": "bob@example.com"}),
    )
    .await;
    let uid = user["id"].as_str().unwrap().to_owned();
    let proxy = subscribe(&cp, &token, "edge-1", trusted(), None);
    let rev = revision_of(&user);
    until("the first snapshot", || proxy.index.load().version() >= rev).await;

    let now = 1_900_000_000;
    let report = |id: &str, user: &str, last_seen_at: i64| vigil_proto::v1::SessionReport {
        session_id: id.into(),
        user_id: user.into(),
        device_id: None,
        identity_provider: Some("corp".into()),
        auth_time: now,
        expires_at: now + 3600,
        amr: vec!["pwd".into(), "otp".into()],
        last_seen_at,
        ..Default::default()
    };
    // Malformed or pointing at nobody: not recorded, and the stream carries on.
    proxy
        .reports
        .send(report("not a session id", &uid, now))
        .await
        .unwrap();
    proxy
        .reports
        .send(report("ses_ghost", "usr_nobody", now))
        .await
        .unwrap();
    proxy
        .reports
        .send(report("ses_e2e1", &uid, now))
        .await
        .unwrap();
    let path = format!("/v1/sessions?user_id={uid}");
    let mut listed = Value::Null;
    for _ in 0..500 {
        listed = get_json(&c, &url, &path).await;
        if listed["items"].as_array().is_some_and(|a| !a.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let items = listed["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{listed}");
    let s = &items[0];
    assert_eq!(s["id"], "ses_e2e1");
    assert_eq!(s["amr"], json!(["pwd", "otp"]));
    assert_eq!(s["identity_provider"], "corp");
    assert_eq!(s["auth_time"], "2030-03-17T17:46:40Z");
    assert_eq!(s["last_seen_at"], "2030-03-17T17:46:40Z");
    let all = get_json(&c, &url, "/v1/sessions").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 1, "{all}");

    // Activity a few seconds later is coalesced; a minute later it is recorded.
    proxy
        .reports
        .send(report("ses_e2e1", &uid, now + 5))
        .await
        .unwrap();
    proxy
        .reports
        .send(report("ses_e2e1", &uid, now + 90))
        .await
        .unwrap();
    // Another user cannot take the session over.
    let other = post_json(
        &c,
        &url,
        "/v1/users",
        json!({"issuer": "https://idp.example", "subject": "eve"}),
    )
    .await;
    let other = other["id"].as_str().unwrap();
    proxy
        .reports
        .send(report("ses_e2e1", other, now + 200))
        .await
        .unwrap();
    reports_handled(&proxy, &c, &url, report("ses_barrier1", &uid, now + 200)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let seen = loop {
        let s = get_json(&c, &url, "/v1/sessions/ses_e2e1").await;
        if s["last_seen_at"] != "2030-03-17T17:46:40Z" {
            break s;
        }
        assert!(Instant::now() < deadline, "activity never recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(seen["last_seen_at"], "2030-03-17T17:48:10Z");
    assert_eq!(seen["user_id"], uid.as_str());

    // Revoked by an admin: every proxy learns of it through the snapshot.
    post_json(&c, &url, "/v1/sessions/ses_e2e1/revoke", json!({})).await;
    until("the revocation in the snapshot", || {
        proxy
            .index
            .load()
            .snapshot
            .get(Kind::RevokedSession, "ses_e2e1")
            .is_some()
    })
    .await;
    // Activity after revocation never un-revokes it.
    proxy
        .reports
        .send(report("ses_e2e1", &uid, now + 500))
        .await
        .unwrap();
    reports_handled(&proxy, &c, &url, report("ses_barrier2", &uid, now + 500)).await;
    let after = get_json(&c, &url, "/v1/sessions/ses_e2e1").await;
    assert!(after["revoked_at"].is_string(), "{after}");
    assert_eq!(after["last_seen_at"], "2030-03-17T17:48:10Z");

    // A first sign-in whose provider sends an email and a name the directory
    // would refuse from an admin: the user is added without them, and the
    // session (and later its sign-out) is recorded all the same.
    let (issuer, subject) = ("https://idp.example", "odd-claims");
    let newcomer = vigil_snapshot::provisioned_user_id(issuer, subject);
    let first = vigil_proto::v1::SessionReport {
        issuer: issuer.into(),
        subject: subject.into(),
        email: Some("not an email".into()),
        email_verified: true,
        display_name: Some("Eve\u{0}\r\nAdmin".into()),
        ..report("ses_newcomer", &newcomer, now + 600)
    };
    reports_handled(&proxy, &c, &url, first).await;
    let added = get_json(&c, &url, &format!("/v1/users/{newcomer}")).await;
    assert_eq!(added["subject"], subject, "{added}");
    assert!(added["email"].is_null(), "{added}");
    assert!(added["display_name"].is_null(), "{added}");
    // Only the name is bad (NUL): the email stays.
    let (issuer2, subject2) = ("https://idp.example", "odd-name");
    let second = vigil_snapshot::provisioned_user_id(issuer2, subject2);
    let named = vigil_proto::v1::SessionReport {
        issuer: issuer2.into(),
        subject: subject2.into(),
        email: Some("eve@corp.example".into()),
        email_verified: true,
        display_name: Some("Eve\u{0}".into()),
        ..report("ses_oddname", &second, now + 600)
    };
    reports_handled(&proxy, &c, &url, named).await;
    let added = get_json(&c, &url, &format!("/v1/users/{second}")).await;
    assert_eq!(added["email"], "eve@corp.example", "{added}");
    assert!(added["display_name"].is_null(), "{added}");
    let signed_out = vigil_proto::v1::SessionReport {
        signed_out: true,
        ..report("ses_newcomer", &newcomer, now + 700)
    };
    proxy.reports.send(signed_out).await.unwrap();
    until("the newcomer's sign-out in the snapshot", || {
        proxy
            .index
            .load()
            .snapshot
            .get(Kind::RevokedSession, "ses_newcomer")
            .is_some()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_proxy_does_not_grow_the_control_planes_memory() {
    let (_pg, cp, c, url, token) = plane("stall").await;
    let user = post_json(
        &c,
        &url,
        "/v1/users",
        json!({"issuer": "https://idp.example", "subject": "big"}),
    )
    .await;
    let uid = user["id"].as_str().unwrap().to_owned();
    let healthy = subscribe(&cp, &token, "healthy", trusted(), None);

    // A proxy that says hello and then never reads what it is sent.
    // Held open, never read, to the end.
    let (_tx, _stalled) = raw_subscribe(&cp, &token, "stalled", 0).await;

    // Each write changes a 200 KB user: a stream that queued every update would hold
    // 200 KB more per write.
    let blob = "x".repeat(200_000);
    let mut last = 0;
    let path = format!("/v1/users/{uid}");
    let write = |n: usize| {
        let body = json!({"attributes": {"blob": format!("{n}{blob}")}});
        let (c, url, path) = (c.clone(), url.clone(), path.clone());
        async move { revision_of(&patch_json(&c, &url, &path, body).await) }
    };
    for n in 0..20 {
        last = write(n).await;
    }
    until("the healthy proxy", || {
        healthy.index.load().version() >= last
    })
    .await;
    let before = cp.rss_kib();
    for n in 20..220 {
        last = write(n).await;
    }
    until("the healthy proxy", || {
        healthy.index.load().version() >= last
    })
    .await;
    let after = cp.rss_kib();
    let grown = after.saturating_sub(before);
    // 200 queued updates would be 40,000 KiB; latest-wins holds a couple.
    assert!(
        grown < 16_000,
        "resident memory grew by {grown} KiB over 200 writes with a stalled stream ({before} -> {after})"
    );
    let fleet = get_json(&c, &url, "/v1/proxies").await;
    let stalled_status = fleet["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "stalled")
        .cloned()
        .unwrap();
    assert_eq!(stalled_status["connected"], true);
    assert_eq!(stalled_status["version"], 0, "it never acked anything");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_larger_than_one_message_arrives_in_parts() {
    let pg = TestPostgres::start().unwrap();
    let db = pg.create_database("parts").unwrap();
    let cp = ControlProcess::start(&db);
    let c = client();
    let token = join_token(&c, &cp.url, "fleet").await;
    // Three users of 600 KB each: a full snapshot of more than one part.
    let mut last = 0;
    let mut ids = Vec::new();
    for n in 0..3 {
        let user = post_json(
            &c,
            &cp.url,
            "/v1/users",
            json!({"issuer": "https://idp.example", "subject": format!("big{n}"),
                   "attributes": {"blob": format!("{n}{}", "x".repeat(600_000))}}),
        )
        .await;
        last = revision_of(&user);
        ids.push(user["id"].as_str().unwrap().to_owned());
    }

    // By hand: a stream that asks for the full snapshot once the control plane's
    // holds the three users gets parts of at most UPDATE_PART_BYTES each (checked
    // by next_envelope), joined into one envelope that verifies and holds them.
    let (tx, mut inbound) = raw_subscribe(&cp, &token, "raw", 0).await;
    let update = loop {
        let (envelope, messages) = next_envelope(&mut inbound).await;
        let update = trusted().open(&envelope).unwrap();
        if update.version < last {
            continue;
        }
        if !update.full {
            // It caught up with the writes through a delta: ask for all of it.
            let hello = Hello {
                proxy_id: "raw".into(),
                version: 0,
                ..Hello::default()
            };
            tx.send(ProxyMessage {
                msg: Some(proxy_message::Msg::Hello(hello)),
            })
            .await
            .unwrap();
            continue;
        }
        assert!(
            messages >= 2,
            "a snapshot of {} bytes came in {messages} message(s)",
            envelope.payload.len()
        );
        break update;
    };
    let users: Vec<&str> = update
        .upserts
        .iter()
        .filter(|e| vigil_snapshot::Key::of(e).is_some_and(|k| k.kind == Kind::User))
        .map(|e| e.id.as_str())
        .collect();
    for id in &ids {
        assert!(users.contains(&id.as_str()), "{id} missing from {users:?}");
    }

    // The proxy's subscriber, starting from nothing, gets the same full snapshot in
    // parts, joins them, enforces it and acks it.
    let proxy = subscribe(&cp, &token, "proxy", trusted(), None);
    until("the proxy to hold the large snapshot", || {
        proxy.index.load().version() >= last
    })
    .await;
    for id in &ids {
        assert_eq!(user_suspended(&proxy, id), Some(false), "{id}");
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let fleet = get_json(&c, &cp.url, "/v1/proxies").await;
        let acked = fleet["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == "proxy")
            .and_then(|p| p["version"].as_u64());
        if acked >= Some(last) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy acked {acked:?}, not {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A stream opened by hand, not by the subscriber: says hello holding `version`,
/// then leaves reading and answering to the test.
async fn raw_subscribe(
    cp: &ControlProcess,
    token: &str,
    id: &str,
    version: u64,
) -> (
    tokio::sync::mpsc::Sender<ProxyMessage>,
    tonic::Streaming<ControlMessage>,
) {
    let channel = tonic::transport::Endpoint::from_shared(cp.grpc_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let hello = Hello {
        proxy_id: id.into(),
        version,
        ..Hello::default()
    };
    tx.send(ProxyMessage {
        msg: Some(proxy_message::Msg::Hello(hello)),
    })
    .await
    .unwrap();
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let inbound = ControlPlaneClient::new(channel)
        .subscribe(request)
        .await
        .unwrap()
        .into_inner();
    (tx, inbound)
}

/// The next update on a hand-opened stream (heartbeats skipped, parts joined),
/// decoded unverified.
async fn next_update(inbound: &mut tonic::Streaming<ControlMessage>) -> Update {
    Update::decode(next_envelope(inbound).await.0.payload).unwrap()
}

/// The next update's envelope on a hand-opened stream, its parts joined, with the
/// number of messages it came in.
async fn next_envelope(inbound: &mut tonic::Streaming<ControlMessage>) -> (Envelope, usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut parts = Joiner::default();
    let mut count = 0;
    loop {
        let m = tokio::time::timeout_at(deadline, inbound.message())
            .await
            .expect("no update within 15 s")
            .unwrap()
            .unwrap();
        match m.msg {
            Some(control_message::Msg::Update(env)) => return (env, 1),
            Some(control_message::Msg::UpdatePart(part)) => {
                count += 1;
                assert!(
                    part.payload.len() <= UPDATE_PART_BYTES,
                    "a part of {} bytes",
                    part.payload.len()
                );
                if let Some(env) = parts.push(part).unwrap() {
                    return (env, count);
                }
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nack_is_answered_with_the_full_snapshot_at_once() {
    let pg = TestPostgres::start().unwrap();
    let db = pg.create_database("nack").unwrap();
    let cp = ControlProcess::start(&db);
    let c = client();
    let joined = post_json(&c, &cp.url, "/v1/join-tokens", json!({"name": "fleet"})).await;
    let token = joined["token"].as_str().unwrap().to_owned();
    // Once the control plane's snapshot has caught up with the token's write...
    let watcher = subscribe(&cp, &token, "watcher", trusted(), None);
    let rev = revision_of(&joined);
    until("the snapshot at the token's revision", || {
        watcher.index.load().version() == rev
    })
    .await;
    let (tx, mut inbound) = raw_subscribe(&cp, &token, "picky", rev).await;
    // Holding the current version, it gets nothing until a write: then a delta.
    let eng = post_json(&c, &cp.url, "/v1/groups", json!({"name": "eng"})).await;
    let delta = next_update(&mut inbound).await;
    assert!(
        !delta.full && delta.version == revision_of(&eng),
        "{delta:?}"
    );
    // Refused: the control plane no longer knows what the proxy holds, and sends
    // the full snapshot without waiting for another write.
    let nack = Nack {
        version: delta.version,
        error: "test refusal".into(),
    };
    tx.send(ProxyMessage {
        msg: Some(proxy_message::Msg::Nack(nack)),
    })
    .await
    .unwrap();
    let full = next_update(&mut inbound).await;
    assert!(full.full && full.version == delta.version, "{full:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_stream_runs_over_tls_and_refuses_an_untrusted_server() {
    let pg = TestPostgres::start().unwrap();
    let db = pg.create_database("tls").unwrap();
    let dir = std::env::temp_dir().join(format!("vigil-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let test_ca = TestCa::new();
    let ca = test_ca.pem.clone();
    let (cert, key, _) = test_ca.issue("localhost");
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
    let cp = ControlProcess::start_tls(&db, &dir.join("cert.pem"), &dir.join("key.pem"));
    let c = client();
    let token = join_token(&c, &cp.url, "fleet").await;
    let user = post_json(
        &c,
        &cp.url,
        "/v1/users",
        json!({"issuer": "https://idp.example", "subject": "tls"}),
    )
    .await;
    let rev = revision_of(&user);

    let config = |id: &str, ca_pem: Option<String>| subscriber::Config {
        addresses: vec![cp.grpc_url.clone()],
        join_token: token.clone(),
        ca_pem,
        verifier: trusted(),
        proxy_id: id.to_owned(),
        labels: vec![],
        snapshot_file: None,
    };
    let proxy = subscriber::start(config("tls-proxy", Some(ca.clone())));
    until("the snapshot over TLS", || {
        proxy.index.load().version() >= rev
    })
    .await;
    assert!(
        matches!(&*proxy.link.borrow(), Link::Connected { address } if address.starts_with("https://"))
    );

    // A proxy that trusts another CA never gets a stream.
    let other_ca = TestCa::new().pem;
    let wary = subscriber::start(config("wary", Some(other_ca)));
    let error = refused(&wary).await;
    assert!(error.contains("connect"), "{error}");
    assert_eq!(wary.index.load().version(), 0);

    // Plain text to a TLS port fails too.
    let plain = subscriber::start(subscriber::Config {
        addresses: vec![cp.grpc_url.replace("https://", "http://")],
        ..config("plain", None)
    });
    refused(&plain).await;
    assert_eq!(plain.index.load().version(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes that change no snapshot entry (here join tokens, which never leave the
/// control plane; in production the verifier's and activity reports' session
/// bookkeeping) are announced to proxies at most about once a second, not once
/// each; a write that changes an entry still goes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn versions_that_change_nothing_are_announced_together() {
    let pg = TestPostgres::start().unwrap();
    let db = pg.create_database("quiet").unwrap();
    let cp = ControlProcess::start(&db);
    let c = client();
    let url = cp.url.clone();
    let join = post_json(&c, &url, "/v1/join-tokens", json!({"name": "fleet"})).await;
    let token = join["token"].as_str().unwrap().to_owned();
    let group = post_json(&c, &url, "/v1/groups", json!({"name": "eng"})).await;
    let proxy = subscribe(&cp, &token, "proxy-q", trusted(), None);
    let rev = revision_of(&group);
    until("the first snapshot", || proxy.index.load().version() >= rev).await;

    let mut seen = proxy.version.clone();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counting = count.clone();
    let counter = tokio::spawn(async move {
        while seen.changed().await.is_ok() {
            counting.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let started = Instant::now();
    let mut last = 0;
    for i in 0..30 {
        let t = post_json(
            &c,
            &url,
            "/v1/join-tokens",
            json!({"name": format!("t{i}")}),
        )
        .await;
        last = revision_of(&t);
    }
    until("the last quiet version", || {
        proxy.index.load().version() == last
    })
    .await;
    // An entry change after them still arrives promptly, as its own version.
    let user = post_json(
        &c,
        &url,
        "/v1/users",
        json!({"issuer": "https://idp.example", "subject": "q", "groups": ["eng"]}),
    )
    .await;
    let user_rev = revision_of(&user);
    until("the user", || proxy.index.load().version() == user_rev).await;
    counter.abort();
    let took = started.elapsed();
    let updates = count.load(std::sync::atomic::Ordering::SeqCst);
    println!(
        "31 writes in {} ms reached the proxy as {updates} versions",
        took.as_millis()
    );
    // Quiet versions go out at most once a second, so how many can reach the
    // proxy depends on how long the writes took (on a loaded machine, more than
    // the few seconds they take alone): besides those, the user's version and the
    // first snapshot's (seen by this watch).
    let most = 8.max(took.as_secs() + 3);
    assert!(
        u64::from(updates) <= most,
        "31 writes, 30 of them changing nothing, reached the proxy as {updates} versions in {} ms",
        took.as_millis()
    );
}

/// A TCP relay in front of the control plane's gRPC listener that can swallow
/// what the proxy sends (the stream stays up, its writes go nowhere) and cut
/// every connection through it.
struct Relay {
    url: String,
    swallow: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<tokio::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Relay {
    async fn start(to: &str) -> Relay {
        use std::sync::atomic::Ordering;
        let to = to.trim_start_matches("http://").to_owned();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let swallow = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open = std::sync::Arc::new(tokio::sync::Mutex::new(Vec::new()));
        let (s, o) = (swallow.clone(), open.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = l.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&to).await else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let s = s.clone();
                let up = tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if !s.load(Ordering::SeqCst) && sw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
                let down = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                });
                o.lock()
                    .await
                    .extend([up.abort_handle(), down.abort_handle()]);
            }
        });
        Relay { url, swallow, open }
    }

    fn swallow(&self, on: bool) {
        self.swallow.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Closes every connection through the relay.
    async fn cut(&self) {
        for task in self.open.lock().await.drain(..) {
            task.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sign_out_a_dying_stream_swallowed_is_sent_again() {
    let (_pg, cp, c, url, token) = plane("resend").await;
    let user = post_json(
        &c,
        &url,
        "/v1/users",
        json!({"issuer": "https://idp.example", "subject": "resend"}),
    )
    .await;
    let uid = user["id"].as_str().unwrap().to_owned();
    let rev = revision_of(&user);
    let relay = Relay::start(&cp.grpc_url).await;
    let proxy = subscriber::start(subscriber::Config {
        addresses: vec![relay.url.clone()],
        join_token: token.clone(),
        ca_pem: None,
        verifier: trusted(),
        proxy_id: "edge-relayed".into(),
        labels: vec![],
        snapshot_file: None,
    });
    until("the first snapshot", || proxy.index.load().version() >= rev).await;
    let now = 1_900_000_000;
    let report = |signed_out: bool| vigil_proto::v1::SessionReport {
        session_id: "ses_resend".into(),
        user_id: uid.clone(),
        auth_time: now,
        expires_at: now + 3600,
        last_seen_at: now + 10,
        signed_out,
        ..Default::default()
    };
    reports_handled(&proxy, &c, &url, report(false)).await;
    // The link goes dead without a sign of it: the sign-out is written into it
    // and lost. Then the connection breaks, and the proxy subscribes again.
    relay.swallow(true);
    proxy.reports.send(report(true)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.swallow(false);
    relay.cut().await;
    until("the sign-out in the snapshot, sent again", || {
        proxy
            .index
            .load()
            .snapshot
            .get(Kind::RevokedSession, "ses_resend")
            .is_some()
    })
    .await;
}
