//! The snapshot stream at scale (issue 4), with real parts: a throwaway PostgreSQL
//! holding 100,000 users and 10,000 routes, a `vigil control` process, and simulated
//! proxies in this process, each one the real subscriber code on its own gRPC
//! connection. Reports:
//!
//! - full snapshot build: load from PostgreSQL, build, encode and sign; its size;
//! - bytes on the wire for a one-user revocation (a delta) against the full snapshot;
//! - propagation from a REST write's 2xx to the new version applied in every
//!   subscriber, at 1, 100 and 1,000 subscribers (median, p99 over every
//!   subscriber of every write);
//! - the control plane's resident memory per connected stream.
//!
//! The subscribers start from one index shared between them (as if each had loaded it
//! from its snapshot file), so 1,000 of them fit in memory; each then holds its own
//! copy of whatever the updates change.
#![allow(missing_docs, clippy::unwrap_used)]

#[path = "../../vigil-control/benches/common/mod.rs"]
mod common;
#[path = "../../../tests/support.rs"]
mod support;

use std::time::{Duration, Instant};

use common::{ms, percentile};
use prost::Message as _;
use serde_json::json;
use support::{client, signer, ControlProcess};
use vigil_control::snapshot::Builder;
use vigil_proto::v1::{control_message, ControlMessage};
use vigil_proxy::index::Index;
use vigil_proxy::subscriber::{self, Handle, Link};
use vigil_store::{Store, StoreOptions};
use vigil_test_postgres::TestPostgres;

/// (subscribers, writes measured at that size).
const STEPS: [(usize, usize); 3] = [(1, 100), (100, 50), (1000, 30)];
const BUILDS: usize = 5;

/// Bytes of one update as the gRPC stream carries it (the message, before the 5-byte
/// gRPC and 9-byte HTTP/2 frame headers).
fn wire_bytes(envelope: vigil_snapshot::Envelope) -> usize {
    ControlMessage {
        msg: Some(control_message::Msg::Update(envelope)),
    }
    .encoded_len()
}

fn config(cp: &ControlProcess, token: &str, id: String) -> subscriber::Config {
    subscriber::Config {
        addresses: vec![cp.grpc_url.clone()],
        join_token: token.to_owned(),
        ca_pem: None,
        verifier: support::trusted(),
        proxy_id: id,
        labels: vec![("bench".into(), "stream".into())],
        snapshot_file: None,
    }
}

/// Full builds as the control plane does them at start: read everything, build,
/// encode and sign. Returns the last builder for the delta measurement.
async fn builds(store: &Store) -> Builder {
    let signer = signer();
    let mut loads = Vec::new();
    let mut compiles = Vec::new();
    let mut seals = Vec::new();
    let mut totals = Vec::new();
    let mut last = None;
    let mut size = 0;
    for _ in 0..BUILDS {
        let t = Instant::now();
        let (revision, records) = store.load_all().await.unwrap();
        let loaded = t.elapsed();
        let builder = Builder::full(revision, records, Box::new(|_| None));
        let built = t.elapsed();
        let envelope = signer.seal(&builder.history().current().full_update());
        let total = t.elapsed();
        size = wire_bytes(envelope);
        loads.push(loaded);
        compiles.push(built - loaded);
        seals.push(total - built);
        totals.push(total);
        last = Some(builder);
    }
    for v in [&mut loads, &mut compiles, &mut seals, &mut totals] {
        v.sort();
    }
    let mid = BUILDS / 2;
    let builder = last.unwrap();
    println!(
        "full snapshot build ({BUILDS} runs, median): load {:.0} ms + build {:.0} ms + encode and sign {:.0} ms = {:.0} ms (min {:.0}, max {:.0}); target <= 1000 ms: {}",
        ms(loads[mid]),
        ms(compiles[mid]),
        ms(seals[mid]),
        ms(totals[mid]),
        ms(totals[0]),
        ms(totals[BUILDS - 1]),
        if totals[mid] <= Duration::from_secs(1) { "PASS" } else { "FAIL" }
    );
    println!(
        "full snapshot: {} entries, {size} bytes on the wire ({:.1} MiB)",
        builder.history().current().entries.len(),
        size as f64 / (1 << 20) as f64
    );
    builder
}

/// Suspends or reactivates one user through the REST API; returns the revision.
async fn flip_user(c: &reqwest::Client, url: &str, n: usize, suspend: bool) -> u64 {
    let status = if suspend { "suspended" } else { "active" };
    let written = support::patch_json(
        c,
        url,
        &format!("/v1/users/usr_{:06}", n % common::USERS),
        json!({ "status": status }),
    )
    .await;
    written["version"].as_u64().unwrap()
}

/// The delta a one-user revocation puts on the wire, against the full snapshot.
async fn delta(store: &Store, mut builder: Builder, c: &reqwest::Client, url: &str) {
    let signer = signer();
    let full = wire_bytes(signer.seal(&builder.history().current().full_update()));
    let from = builder.history().current().version;
    let revision = flip_user(c, url, 4242, true).await;
    let (rev, changes, records) = store
        .changed_since(i64::try_from(from).unwrap())
        .await
        .unwrap();
    assert_eq!(u64::try_from(rev).unwrap(), revision);
    builder.advance(rev, &changes, records);
    let update = builder.history().update_from(from).unwrap();
    assert!(!update.full);
    let bytes = wire_bytes(signer.seal(&update));
    println!(
        "one-user revocation (user suspended): delta {bytes} bytes on the wire vs {full} bytes full ({:.0}x smaller); target <= 2048 bytes: {}",
        full as f64 / bytes as f64,
        if bytes <= 2048 { "PASS" } else { "FAIL" }
    );
    flip_user(c, url, 4242, false).await;
}

async fn until_connected(pool: &[Handle]) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !pool
        .iter()
        .all(|h| matches!(*h.link.borrow(), Link::Connected { .. }))
    {
        assert!(Instant::now() < deadline, "subscribers did not all connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn until_version(pool: &[Handle], version: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !pool.iter().all(|h| *h.version.borrow() >= version) {
        assert!(Instant::now() < deadline, "subscribers did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One write, then the time until each subscriber has applied it.
async fn propagate(pool: &[Handle], c: &reqwest::Client, url: &str, n: usize) -> Vec<Duration> {
    let target = flip_user(c, url, n, n % 2 == 0).await;
    let t0 = Instant::now();
    let waits: Vec<_> = pool
        .iter()
        .map(|h| {
            let mut v = h.version.clone();
            tokio::spawn(async move {
                v.wait_for(|v| *v >= target).await.unwrap();
                t0.elapsed()
            })
        })
        .collect();
    let mut out = Vec::with_capacity(waits.len());
    for w in waits {
        out.push(w.await.unwrap());
    }
    out
}

async fn fleet(store: &Store, pg_url: &str) {
    let cp = ControlProcess::start(pg_url);
    let c = client();
    let token = support::join_token(&c, &cp.url, "bench").await;
    let builder = builds(store).await;
    delta(store, builder, &c, &cp.url).await;

    // The first subscriber takes the full snapshot over the wire.
    let current = u64::try_from(store.revision().await.unwrap()).unwrap();
    let t = Instant::now();
    let first = subscriber::start(config(&cp, &token, "proxy-0000".into()));
    until_version(std::slice::from_ref(&first), current).await;
    println!(
        "first subscriber: full snapshot received, verified, decoded and indexed in {:.0} ms",
        ms(t.elapsed())
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut prev_rss = (cp.rss_kib(), 1);
    let mut pool = vec![first];
    let mut writes = 0;
    for (size, rounds) in STEPS {
        let base: Index = (*pool[0].index.load_full()).clone();
        while pool.len() < size {
            let id = format!("proxy-{:04}", pool.len());
            pool.push(subscriber::start_with(
                config(&cp, &token, id),
                base.clone(),
            ));
        }
        until_connected(&pool).await;
        until_version(&pool, base.version()).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut lat = Vec::new();
        for _ in 0..rounds {
            writes += 1;
            lat.extend(propagate(&pool, &c, &cp.url, writes).await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        lat.sort();
        let p99 = percentile(&lat, 0.99);
        let verdict = if size == 1000 {
            if p99 <= Duration::from_millis(100) {
                "; target p99 <= 100 ms: PASS"
            } else {
                "; target p99 <= 100 ms: FAIL"
            }
        } else {
            ""
        };
        println!(
            "propagation, REST 2xx -> applied, {size} subscribers x {rounds} writes: median {:.1} ms, p99 {:.1} ms, max {:.1} ms{verdict}",
            ms(percentile(&lat, 0.5)),
            ms(p99),
            ms(*lat.last().unwrap()),
        );
        if size > 1 {
            // Growth since the previous step, over the streams added: the process's
            // one-time garbage (the first full snapshot's encoding) stays out of it.
            let rss = cp.rss_kib();
            let (before, streams) = prev_rss;
            let per = rss.saturating_sub(before) as f64 / (size - streams) as f64;
            let verdict = if size == 1000 {
                if per <= 64.0 {
                    "; target <= 64 KiB: PASS"
                } else {
                    "; target <= 64 KiB: FAIL"
                }
            } else {
                ""
            };
            println!(
                "control-plane memory: {before} KiB resident with {streams} streams, {rss} KiB with {size}: {per:.1} KiB per added stream{verdict}"
            );
            prev_rss = (rss, size);
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!(
            "# Snapshot stream at scale ({} cores; PostgreSQL, control plane and subscribers share them)",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let pg = TestPostgres::start().unwrap();
        let url = pg.create_database("stream").unwrap();
        let store = Store::connect(&url, StoreOptions::default()).await.unwrap();
        store.migrate().await.unwrap();
        let seeded = common::seed(&store).await;
        println!(
            "seeded {} users, {} groups, {} policies, {} routes in {:.1} s (fsync=off)",
            common::USERS,
            common::GROUPS,
            common::POLICIES,
            common::ROUTES,
            seeded.as_secs_f64()
        );
        fleet(&store, &url).await;
    });
}
