//! The data set both control-plane benchmarks load: 100,000 users in 1-20 of 5,000
//! groups, 10,000 routes over 1,000 policies, written through the store's write path.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::json;
use vigil_store::{Entity, Op, Ref, Store};

pub const USERS: usize = 100_000;
pub const GROUPS: usize = 5_000;
pub const ROUTES: usize = 10_000;
pub const POLICIES: usize = 1_000;

/// xorshift64*: deterministic and dependency-free.
pub struct Rng(u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn r(kind: &str, id: String) -> Ref {
    Ref {
        kind: kind.into(),
        id,
        cascade: false,
    }
}

pub async fn seed(store: &Store) -> Duration {
    let t = Instant::now();
    let mut rng = Rng(0x5eed);
    let batch = |ops: Vec<Op>| async { store.write("bench", Some("seed"), ops).await.unwrap() };
    for chunk in (0..GROUPS).collect::<Vec<_>>().chunks(1000) {
        batch(
            chunk
                .iter()
                .map(|g| {
                    Op::Create(Entity {
                        kind: "group".into(),
                        id: format!("g{g}"),
                        key: None,
                        body: json!({"name": format!("g{g}")}),
                        secret: None,
                        refs: vec![],
                    })
                })
                .collect(),
        )
        .await;
    }
    for chunk in (0..POLICIES).collect::<Vec<_>>().chunks(500) {
        let ops = chunk
            .iter()
            .map(|p| {
                let (a, b) = (rng.below(GROUPS), rng.below(GROUPS));
                let doc = json!({"allow": {"and": [
                    {"groups": {"any_of": [format!("g{a}"), format!("g{b}")]}},
                    {"domain": {"in": ["corp.example", "example.org"]}},
                    {"device/managed": true},
                    {"http_method": {"in": ["GET", "POST"]}},
                    {"source_ip": {"in": ["10.0.0.0/8"]}},
                    {"time_of_day": {"tz": "Europe/Paris", "after": "07:00", "before": "20:00"}}]}});
                Op::Create(Entity { kind: "policy".into(), id: format!("p{p}"), key: None, body: json!({"name": format!("p{p}"), "document": doc}), secret: None, refs: vec![] })
            })
            .collect();
        batch(ops).await;
    }
    for chunk in (0..ROUTES).collect::<Vec<_>>().chunks(500) {
        let ops = chunk
            .iter()
            .map(|i| {
                let policies: Vec<String> = (0..1 + rng.below(3)).map(|_| format!("p{}", rng.below(POLICIES))).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
                let body = json!({"name": format!("r{i}"), "host": format!("app{i}.corp.example"), "path": {"prefix": "/"},
                    "upstreams": [format!("http://10.1.{}.{}:8080", i / 250, i % 250)], "policies": policies, "settings": {}});
                let refs = policies.iter().map(|p| r("policy", p.clone())).collect();
                Op::Create(Entity { kind: "route".into(), id: format!("r{i}"), key: Some(format!("app{i}.corp.example prefix /")), body, secret: None, refs })
            })
            .collect();
        batch(ops).await;
    }
    for chunk in (0..USERS).collect::<Vec<_>>().chunks(1000) {
        let ops = chunk
            .iter()
            .map(|u| {
                let groups: Vec<String> = (0..1 + rng.below(20)).map(|_| format!("g{}", rng.below(GROUPS))).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
                let body = json!({"issuer": "https://idp.corp.example", "subject": format!("sub-{u}"), "email": format!("user{u}@corp.example"),
                    "email_verified": true, "display_name": format!("User {u}"), "status": "active", "groups": groups, "attributes": {}});
                let refs = groups.iter().map(|g| r("group", g.clone())).collect();
                Op::Create(Entity { kind: "user".into(), id: format!("usr_{u:06}"), key: Some(format!("https://idp.corp.example\nsub-{u}")), body, secret: None, refs })
            })
            .collect();
        batch(ops).await;
    }
    t.elapsed()
}

/// The `p` quantile (0 to 1) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// Milliseconds, for printing.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
