//! Faults of the control plane with real processes and a real PostgreSQL:
//! database outages, crashes, races and failed transactions.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{client, get_json, ControlProcess};
use vigil_test_postgres::TestPostgres;

async fn create_group(c: &reqwest::Client, url: &str, name: &str) -> reqwest::Response {
    c.post(format!("{url}/v1/groups"))
        .json(&json!({ "name": name }))
        .send()
        .await
        .unwrap()
}

async fn group_names(c: &reqwest::Client, url: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut req = c
            .get(format!("{url}/v1/groups"))
            .query(&[("limit", "1000")]);
        if let Some(cur) = &cursor {
            req = req.query(&[("cursor", cur)]);
        }
        let page: Value = req
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap();
        out.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["name"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(n) => cursor = Some(n.to_owned()),
            None => return out,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_outage_gives_503_then_recovers_without_restart() {
    let pg = TestPostgres::start().unwrap();
    let db = pg.create_database("outage").unwrap();
    let cp = ControlProcess::start(&db);
    let c = client();
    assert_eq!(create_group(&c, &cp.url, "before").await.status(), 201);

    pg.halt().unwrap();
    let reqs = [
        c.get(format!("{}/v1/groups", cp.url)),
        c.post(format!("{}/v1/groups", cp.url))
            .json(&json!({ "name": "during" })),
        c.get(format!("{}/readyz", cp.url)),
    ];
    for r in reqs {
        let res = r.send().await.unwrap();
        assert_eq!(
            res.status(),
            503,
            "every request during the outage is a 503"
        );
        assert!(res.headers().get("retry-after").is_some());
        assert_eq!(res.headers()["content-type"], "application/problem+json");
    }
    assert_eq!(
        c.get(format!("{}/healthz", cp.url))
            .send()
            .await
            .unwrap()
            .status(),
        200,
        "alive while degraded"
    );

    pg.resume().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let res = create_group(&c, &cp.url, "after").await;
        if res.status() == 201 {
            break;
        }
        assert_eq!(res.status(), 503, "only 503 while reconnecting");
        assert!(Instant::now() < deadline, "no recovery within 20 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let names = group_names(&c, &cp.url).await;
    assert_eq!(
        names,
        BTreeSet::from(["after".to_string(), "before".to_string()]),
        "the refused write left nothing"
    );
    let log = cp.log_containing("Store unavailable").await;
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_crashes_of_the_control_plane_and_the_database() {
    let pg = TestPostgres::start().unwrap();
    let db = pg.create_database("durable").unwrap();
    let mut cp = ControlProcess::start(&db);
    let c = client();
    // Eight writers; every 201 is recorded.
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (c, url) = (c.clone(), cp.url.clone());
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..25 {
                let name = format!("g-{w}-{i}");
                if create_group(&c, &url, &name).await.status() == 201 {
                    acked.push(name);
                }
            }
            acked
        }));
    }
    let mut acked = BTreeSet::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert_eq!(acked.len(), 200);

    // At once: nothing acknowledged may still sit in PostgreSQL's WAL buffers
    // (writes commit asynchronously and wait on a durability barrier).
    pg.halt().unwrap();
    pg.resume().unwrap();
    cp.crash_and_restart();
    assert_eq!(
        group_names(&c, &cp.url).await,
        acked,
        "after an immediate stop of PostgreSQL right after the last acknowledgement"
    );

    cp.crash_and_restart();
    assert_eq!(
        group_names(&c, &cp.url).await,
        acked,
        "after SIGKILL of the control plane"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_writers_on_one_etag_and_a_failed_transaction() {
    let pg = TestPostgres::start().unwrap();
    let db = pg.create_database("race").unwrap();
    let cp = ControlProcess::start(&db);
    let c = client();
    let res = create_group(&c, &cp.url, "eng").await;
    let etag = res.headers()["etag"].to_str().unwrap().to_owned();

    let mut tasks = Vec::new();
    for i in 0..16 {
        let (c, url, etag) = (c.clone(), cp.url.clone(), etag.clone());
        tasks.push(tokio::spawn(async move {
            c.put(format!("{url}/v1/groups/eng"))
                .header("if-match", etag)
                .json(&json!({ "name": "eng", "description": format!("writer {i}") }))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    assert_eq!(codes.iter().filter(|c| **c == 200).count(), 1, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 412).count(), 15, "{codes:?}");

    // A user naming a group that does not exist fails inside the transaction,
    // after the revision was bumped: nothing may remain of it.
    let audit_before = get_json(&c, &cp.url, "/v1/audit").await;
    let res = c
        .post(format!("{}/v1/users", cp.url))
        .json(&json!({ "issuer": "https://idp.example", "subject": "u1", "groups": ["eng", "missing"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 422);
    let users = get_json(&c, &cp.url, "/v1/users").await;
    assert_eq!(users["items"], json!([]));
    let audit_after = get_json(&c, &cp.url, "/v1/audit").await;
    assert_eq!(
        audit_before["items"].as_array().unwrap().len(),
        audit_after["items"].as_array().unwrap().len()
    );
    // The next successful write takes the very next revision.
    let last = audit_after["items"].as_array().unwrap().last().unwrap()["revision"]
        .as_i64()
        .unwrap();
    let res = create_group(&c, &cp.url, "ops").await;
    let v: Value = res.json().await.unwrap();
    assert_eq!(
        v["version"].as_i64().unwrap(),
        last + 1,
        "the failed write consumed no revision"
    );
}

#[tokio::test]
async fn a_schema_behind_the_binary_refuses_to_start() {
    let pg = TestPostgres::start().unwrap();
    let db = pg.create_database("behind").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args([
            "control",
            "--database-url",
            &db,
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("schema is behind") && err.contains("vigil migrate"),
        "{err}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["migrate", "--database-url", &db])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
