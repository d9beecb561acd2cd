//! Revocation, end to end (issue: continuous verification): the time from an
//! admin's REST call returning 2xx to the first request each of two real
//! proxies denies. Real parts only: a throwaway PostgreSQL, `vigil control`, two
//! `vigil proxy` processes subscribed over gRPC, an upstream, and HTTP clients
//! polling both proxies as fast as they answer.
//!
//! Each round creates a service account, waits until both proxies let its token
//! through, then revokes it one of three ways (disable the account, delete it,
//! or rotate its token) and measures, per proxy, from the 2xx to the first
//! refused request. The polling clients send a request as soon as the previous
//! one is answered, so a figure is at most one request (well under a
//! millisecond on loopback) later than the moment the proxy started refusing.
//!
//! The same propagation at 1,000 simulated subscribers is measured by the
//! stream bench (`make bench-stream`: a user suspended through the REST API,
//! applied by every subscriber).
#![allow(missing_docs, clippy::unwrap_used)]

#[path = "../../../tests/support.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{
    client, echo_upstream, join_token, patch_json, post_json, ControlProcess, ProxyProcess,
};
use vigil_test_postgres::TestPostgres;

const ROUNDS: usize = 60;
const HOST: &str = "revoke.bench";
/// The end-to-end target (p99).
const TARGET_MS: f64 = 250.0;

/// Polls `proxy` with `token` until it refuses; the refusal's status and when it came.
async fn until_refused(c: reqwest::Client, proxy: String, token: String) -> (u16, Instant) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = c
            .get(format!("{proxy}/x"))
            .header("host", HOST)
            .bearer_auth(&token)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        if status == 401 || status == 403 {
            return (status, Instant::now());
        }
        assert!(
            Instant::now() < deadline,
            "never refused (last status {status})"
        );
    }
}

async fn until_allowed(c: &reqwest::Client, proxy: &str, token: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let res = c
            .get(format!("{proxy}/x"))
            .header("host", HOST)
            .bearer_auth(token)
            .send()
            .await;
        if res.is_ok_and(|r| r.status() == 200) {
            return;
        }
        assert!(Instant::now() < deadline, "never allowed");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(name: &str, mut ms: Vec<f64>) -> f64 {
    ms.sort_by(f64::total_cmp);
    let p99 = percentile(&ms, 0.99);
    println!(
        "{name:<34} n={:<3} median {:>6.1} ms  p90 {:>6.1} ms  p99 {:>6.1} ms  max {:>6.1} ms",
        ms.len(),
        percentile(&ms, 0.5),
        percentile(&ms, 0.9),
        p99,
        ms.last().copied().unwrap_or(0.0)
    );
    p99
}

async fn run() {
    let pg = tokio::task::spawn_blocking(TestPostgres::start)
        .await
        .unwrap()
        .unwrap();
    let db = pg.create_database("revocation").unwrap();
    let cp = ControlProcess::start(&db);
    let admin = client();
    let upstream = echo_upstream().await;
    post_json(
        &admin,
        &cp.url,
        "/v1/routes",
        json!({"name": "r", "host": HOST, "upstreams": [upstream],
               "policy": {"allow": {"and": [{"service_account": true}]}}}),
    )
    .await;
    let token = join_token(&admin, &cp.url, "bench").await;
    let proxies = [
        ProxyProcess::start(&cp.grpc_url, &token, "p1"),
        ProxyProcess::start(&cp.grpc_url, &token, "p2"),
    ];
    for p in &proxies {
        p.wait_ready().await;
    }
    let pollers: Vec<reqwest::Client> = (0..2)
        .map(|_| {
            reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()
                .unwrap()
        })
        .collect();
    let ways = ["disable", "delete", "rotate-token"];
    let mut by_proxy: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut by_way: Vec<Vec<f64>> = vec![Vec::new(); ways.len()];
    let mut rest = Vec::new();
    for round in 0..ROUNDS {
        let name = format!("sa-{round}");
        let created = post_json(
            &admin,
            &cp.url,
            "/v1/service-accounts",
            json!({"name": name}),
        )
        .await;
        let sa_token = created["token"].as_str().unwrap().to_owned();
        for (p, c) in proxies.iter().zip(&pollers) {
            until_allowed(c, &p.url, &sa_token).await;
        }
        let way = round % ways.len();
        let sent = Instant::now();
        match ways[way] {
            "disable" => {
                patch_json(
                    &admin,
                    &cp.url,
                    &format!("/v1/service-accounts/{name}"),
                    json!({"disabled": true}),
                )
                .await;
            }
            "delete" => {
                let res = admin
                    .delete(format!("{}/v1/service-accounts/{name}", cp.url))
                    .header("if-match", "*")
                    .send()
                    .await
                    .unwrap();
                assert!(res.status().is_success(), "{}", res.status());
            }
            _ => {
                post_json(
                    &admin,
                    &cp.url,
                    &format!("/v1/service-accounts/{name}/rotate-token"),
                    json!({}),
                )
                .await;
            }
        }
        let acked = Instant::now();
        rest.push((acked - sent).as_secs_f64() * 1000.0);
        let waits: Vec<_> = proxies
            .iter()
            .zip(&pollers)
            .map(|(p, c)| tokio::spawn(until_refused(c.clone(), p.url.clone(), sa_token.clone())))
            .collect();
        for (i, w) in waits.into_iter().enumerate() {
            let (_, at) = w.await.unwrap();
            let ms = at.saturating_duration_since(acked).as_secs_f64() * 1000.0;
            by_proxy[i].push(ms);
            by_way[way].push(ms);
        }
    }
    println!(
        "\nrevocation, REST 2xx -> first refused request ({ROUNDS} rounds, PostgreSQL, 2 proxies)"
    );
    summary("REST call itself (send -> 2xx)", rest);
    let mut worst: f64 = 0.0;
    for (i, ms) in by_proxy.into_iter().enumerate() {
        worst = worst.max(summary(&format!("proxy p{}", i + 1), ms));
    }
    for (way, ms) in ways.iter().zip(by_way) {
        summary(&format!("  by way: {way}"), ms);
    }
    let verdict = if worst <= TARGET_MS { "met" } else { "NOT met" };
    println!("target p99 <= {TARGET_MS} ms end to end at each proxy: {verdict} (worst p99 {worst:.1} ms)");
}

fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}
