//! The cost of continuous verification (issue 7): sessions re-verified per second
//! per core against the local identity provider. Real parts only: a throwaway
//! PostgreSQL, `vigil control`, and the npm `oidc-provider` (`tests/e2e/idp.mjs`).
//!
//! 1. The IdP mints a grant and a refresh token for each of `N` accounts through
//!    its own models (no browser: `POST /test/mint`). Each becomes a session the
//!    way a proxy reports a sign-in: a `SessionReport` carrying the refresh token,
//!    sent by the proxy's own subscriber over the gRPC stream with a join token,
//!    so the control plane provisions the user and stores the token sealed,
//!    exactly as in production. The verifier is off meanwhile.
//! 2. Once every session is stored and due, the control plane is started again
//!    with the verifier on (a short interval, the per-provider rate limit lifted,
//!    a fixed number in flight) and its verifier's timings logged at debug. All
//!    `N` sessions are due at once: round 1 is the verifier flat out. Round 2
//!    goes on until every session has been verified twice, so each rotated
//!    refresh token must have been stored (the IdP revokes a grant whose used
//!    token comes back).
//! 3. Correctness, before any figure is printed (the bench aborts otherwise):
//!    every session verified at least twice (its audit trail), none revoked, no
//!    refused grant at the IdP, no failed verification in the log, and every
//!    user's record carrying the IdP's groups from userinfo.
//!
//! Figures: wall-clock verifications per second (depends on the machine's load),
//! and CPU seconds per verification (utime + stime from `/proc/<pid>/stat`) of the
//! control plane, the IdP (node) and PostgreSQL (postmaster and its live
//! backends) separately, the control plane's giving sessions per second per core.
//! The time of one verification (p50, p99) comes from the verifier's debug lines:
//! in total, and the part spent waiting for the IdP's two answers.
//!
//! `VIGIL_BENCH_SESSIONS` (default 2,000) and `VIGIL_BENCH_CONCURRENCY` (default
//! 8 in flight) change the workload.
#![allow(missing_docs, clippy::unwrap_used)]

#[path = "../../../tests/support.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{client, free_port, join_token, post_json, sql, ControlProcess, Helper};
use vigil_proto::v1::SessionReport;
use vigil_proxy::subscriber;
use vigil_test_postgres::TestPostgres;

const CLIENT_SECRET: &str = "vigil-bench-client-secret";
const IDP: &str = "bench-idp";
/// The verifier's interval: short, so that every session is due when it starts.
const INTERVAL_S: u64 = 2;
/// Verifications started per second per provider: far above what one core does,
/// so the pace never binds.
const RATE: u32 = 1_000_000;
/// How long the bench waits for a round.
const ROUND_LIMIT: Duration = Duration::from_secs(900);

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} must be a number"))
        })
        .unwrap_or(default)
}

fn number(text: &str) -> u64 {
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {text:?}"))
}

/// Clock ticks per second of `/proc/<pid>/stat`.
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// `/proc/<pid>/stat` after the command name: field 3 (state) is at index 0.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// utime + stime of `pid`, in ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let f = stat_fields(pid).unwrap_or_else(|| panic!("process {pid} is gone"));
    number(&f[11]) + number(&f[12])
}

/// The PostgreSQL server listening on `port`: its postmaster's pid.
fn postmaster(port: u16) -> u32 {
    let port = port.to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_postgres = args.first().is_some_and(|a| a.ends_with(b"/postgres"));
        if is_postgres
            && args
                .windows(2)
                .any(|w| w[0] == b"-p" && w[1] == port.as_bytes())
        {
            return pid;
        }
    }
    panic!("no postmaster listening on port {port}");
}

/// utime + stime of the postmaster and its live children (the control plane's
/// pooled connections among them), in ticks.
fn postgres_ticks(postmaster: u32) -> u64 {
    let mut ticks = cpu_ticks(postmaster);
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if let Some(f) = stat_fields(pid) {
            if f.get(1).map(String::as_str) == Some(postmaster.to_string().as_str()) {
                ticks += number(&f[11]) + number(&f[12]);
            }
        }
    }
    ticks
}

/// One look at the verifier's progress and everyone's CPU.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    /// Verifications that ended in a stored result (`reverify` on a session).
    verified: u64,
    /// Sessions verified at least once, and at least twice.
    once: u64,
    twice: u64,
    control: u64,
    idp: u64,
    postgres: u64,
}

struct Round {
    name: &'static str,
    verified: u64,
    wall_s: f64,
    control_s: f64,
    idp_s: f64,
    postgres_s: f64,
}

impl Round {
    fn between(name: &'static str, a: &Sample, b: &Sample, tick: f64) -> Round {
        let secs = |x: u64, y: u64| (y - x) as f64 / tick;
        Round {
            name,
            verified: b.verified - a.verified,
            wall_s: (b.at - a.at).as_secs_f64(),
            control_s: secs(a.control, b.control),
            idp_s: secs(a.idp, b.idp),
            postgres_s: secs(a.postgres, b.postgres),
        }
    }

    fn print(&self) {
        let n = self.verified.max(1) as f64;
        let ms = |s: f64| s * 1000.0 / n;
        println!(
            "{:<8} {:>6} {:>8.1} {:>9.1} | {:>8.3} {:>9.0} | {:>8.3} {:>8.3}",
            self.name,
            self.verified,
            self.wall_s,
            self.verified as f64 / self.wall_s,
            ms(self.control_s),
            n / self.control_s,
            ms(self.idp_s),
            ms(self.postgres_s),
        );
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// From the verifier's debug lines in `log`: verifications, sessions verified at
/// least once, and at least twice.
fn progress(log: &str) -> (u64, u64, u64) {
    let mut by_session: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    for line in log.lines().filter(|l| l.contains("Verified a session")) {
        let Some(id) = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("session="))
        else {
            continue;
        };
        *by_session.entry(id).or_default() += 1;
    }
    (
        by_session.values().sum(),
        by_session.len() as u64,
        by_session.values().filter(|n| **n >= 2).count() as u64,
    )
}

/// The `ms=` and `idp_ms=` of every "Verified a session" line in `log`.
fn timings(log: &str) -> (Vec<f64>, Vec<f64>) {
    let (mut total, mut idp) = (Vec::new(), Vec::new());
    for line in log.lines().filter(|l| l.contains("Verified a session")) {
        for word in line.split_whitespace() {
            if let Some(v) = word.strip_prefix("ms=") {
                total.push(v.parse::<f64>().unwrap());
            } else if let Some(v) = word.strip_prefix("idp_ms=") {
                idp.push(v.parse::<f64>().unwrap());
            }
        }
    }
    total.sort_by(f64::total_cmp);
    idp.sort_by(f64::total_cmp);
    (total, idp)
}

async fn run() {
    let sessions = env_or("VIGIL_BENCH_SESSIONS", 2_000);
    let in_flight = env_or("VIGIL_BENCH_CONCURRENCY", 8);
    assert!(
        support::e2e_dir()
            .join("node_modules/oidc-provider")
            .is_dir(),
        "npm package `oidc-provider` is missing in tests/e2e: run `make deps`"
    );
    let pg = tokio::task::spawn_blocking(TestPostgres::start)
        .await
        .unwrap()
        .unwrap();
    let db = pg.create_database("verifier").unwrap();
    let mut cp = ControlProcess::start_with(&db, &["--reverify-interval-s".into(), "0".into()]);
    let admin = client();

    let idp_port = free_port();
    let issuer = format!("http://127.0.0.1:{idp_port}");
    let mut idp_cmd = support::idp_command(
        idp_port,
        &issuer,
        "https://auth.vigil.bench/.vigil/callback",
        CLIENT_SECRET,
    );
    idp_cmd.env("UNBOUNDED", "1");
    let idp = Helper::start("idp", idp_cmd, idp_port);
    post_json(
        &admin,
        &cp.url,
        "/v1/identity-providers",
        json!({"name": IDP, "issuer_url": issuer, "client_id": "vigil",
               "client_secret": CLIENT_SECRET,
               "scopes": ["openid", "email", "profile", "groups"],
               "allowed_domains": ["example.com"]}),
    )
    .await;

    // The sign-ins: a refresh token per account from the IdP, reported as a proxy does.
    let t = Instant::now();
    let minted: Vec<Value> = reqwest::Client::new()
        .post(format!("{issuer}/test/mint?prefix=u&count={sessions}"))
        .timeout(Duration::from_secs(300))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(minted.len(), sessions);
    println!(
        "minted {sessions} grants and refresh tokens at the IdP in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let token = join_token(&admin, &cp.url, "bench").await;
    let proxy = subscriber::start(subscriber::Config {
        addresses: vec![cp.grpc_url.clone()],
        join_token: token,
        ca_pem: None,
        verifier: support::trusted(),
        proxy_id: "bench-proxy".into(),
        labels: Vec::new(),
        snapshot_file: None,
    });
    let t = Instant::now();
    let mut signed_in = 0;
    for (i, m) in minted.iter().enumerate() {
        let account = m["account"].as_str().unwrap();
        signed_in = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        proxy
            .reports
            .send(SessionReport {
                session_id: format!("ses_bench{i}"),
                user_id: vigil_snapshot::provisioned_user_id(&issuer, account),
                device_id: None,
                identity_provider: Some(IDP.into()),
                auth_time: signed_in,
                expires_at: signed_in + 12 * 3600,
                amr: vec!["pwd".into()],
                last_seen_at: signed_in,
                issuer: issuer.clone(),
                subject: account.into(),
                email: Some(format!("{account}@example.com")),
                email_verified: true,
                display_name: Some(format!("Test user {account}")),
                signed_out: false,
                refresh_token: m["refresh_token"].as_str().unwrap().into(),
            })
            .await
            .unwrap();
    }
    let stored = || {
        number(&sql(
            &db,
            "SELECT count(*) FROM entities WHERE kind = 'session' AND secret LIKE 'v1.k1.%'",
        ))
    };
    while stored() < sessions as u64 {
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "only {} of {sessions} sessions stored with their token\n{}",
            stored(),
            cp.log_text()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let users = number(&sql(
        &db,
        "SELECT count(*) FROM entities WHERE kind = 'user'",
    ));
    assert_eq!(users, sessions as u64, "users provisioned by the reports");
    println!(
        "{sessions} sign-in reports over the gRPC stream stored (user provisioned, token sealed) in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // Every session due (interval × 1.25 after its sign-in), then the verifier on.
    let due = signed_in + (INTERVAL_S * 5 / 4) as i64 + 2;
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        if now > due {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let tick = clock_ticks();
    let pm = postmaster(pg.port());
    let count_query = "SELECT coalesce(sum(n), 0), count(*) FILTER (WHERE n >= 1), \
                       count(*) FILTER (WHERE n >= 2) FROM (SELECT count(*) AS n FROM audit \
                       WHERE actor = 'verifier' AND action = 'reverify' AND kind = 'session' \
                       GROUP BY entity_id) s";
    cp.relaunch_with(
        &[
            "--reverify-interval-s".into(),
            INTERVAL_S.to_string(),
            "--reverify-rate".into(),
            RATE.to_string(),
            "--reverify-concurrency".into(),
            in_flight.to_string(),
        ],
        &[("VIGIL_LOG", "info,vigil_control::verifier=debug")],
    );
    // Progress from the verifier's own log lines, not the database: a query every
    // quarter second would add PostgreSQL work of the bench's own to the figures.
    let sample = |cp: &ControlProcess| {
        let (verified, once, twice) = progress(&cp.log_text());
        Sample {
            at: Instant::now(),
            verified,
            once,
            twice,
            control: cpu_ticks(cp.pid()),
            idp: cpu_ticks(idp.pid()),
            postgres: postgres_ticks(pm),
        }
    };
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let start = sample(&cp);
    let mut first: Option<Sample> = None;
    let second = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let s = sample(&cp);
        if first.is_none() && s.once >= sessions as u64 {
            first = Some(s);
        }
        if s.twice >= sessions as u64 {
            break s;
        }
        assert!(
            s.at - start.at < ROUND_LIMIT,
            "after {:?}: {} sessions verified once, {} twice, of {sessions}\n{}",
            ROUND_LIMIT,
            s.once,
            s.twice,
            cp.log_text()
        );
    };
    let first = first.unwrap();

    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    // Correctness before any figure.
    let control_log = cp.log_text();
    let idp_log = idp.log_text();
    let revoked = number(&sql(
        &db,
        "SELECT count(*) FROM entities WHERE kind = 'session' \
         AND (body::json->>'revoked_at' IS NOT NULL OR secret IS NULL)",
    ));
    assert_eq!(
        revoked, 0,
        "sessions revoked or without a token\n{control_log}"
    );
    for bad in [
        "Revoked a session",
        "Cannot re-verify",
        "gave no answer",
        "Cannot read userinfo",
        "re-verification cycle failed",
    ] {
        assert!(
            !control_log.contains(bad),
            "the control plane logged `{bad}`:\n{control_log}"
        );
    }
    assert!(
        !idp_log.contains("grant error") && !idp_log.contains("server_error"),
        "the IdP refused a grant:\n{idp_log}"
    );
    let refreshed = idp_log.matches("refresh grant for").count() as u64;
    assert!(
        refreshed >= second.verified,
        "{refreshed} refresh grants at the IdP for {} verifications",
        second.verified
    );
    let with_groups = number(&sql(
        &db,
        "SELECT count(*) FROM entities WHERE kind = 'user' \
         AND body::json->'attributes'->'idp_groups'->>0 = 'engineering'",
    ));
    assert_eq!(
        with_groups, sessions as u64,
        "users whose record has the IdP's groups from userinfo"
    );
    // The audit trail agrees with the log: every verification's result stored.
    let row = sql(&db, count_query);
    let audited: Vec<u64> = row.split('|').map(number).collect();
    let logged = progress(&control_log);
    assert!(
        audited[0] >= logged.0 && audited[2] == sessions as u64,
        "audit trail (verifications, sessions once, twice) {audited:?}, log {logged:?}"
    );
    let (total, at_idp) = timings(&control_log);

    println!(
        "\nverifier: {sessions} sessions, 1 IdP (oidc-provider, node {}), interval {INTERVAL_S} s, \
         {in_flight} in flight, rate limit lifted; {} cores",
        Command::new("node")
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<8} {:>6} {:>8} {:>9} | {:>8} {:>9} | {:>8} {:>8}",
        "", "verif.", "wall s", "/s wall", "ctl ms", "/s/core", "IdP ms", "PG ms"
    );
    println!(
        "{:<8} {:>6} {:>8} {:>9} | {:>8} {:>9} | {:>8} {:>8}",
        "", "", "", "", "CPU/ver.", "control", "CPU/ver.", "CPU/ver."
    );
    let rounds = [
        Round::between("round 1", &start, &first, tick),
        Round::between("round 2", &first, &second, tick),
        Round::between("both", &start, &second, tick),
    ];
    for r in &rounds {
        r.print();
    }
    println!(
        "one verification ({in_flight} in flight), n={}: total p50 {:.1} ms p99 {:.1} ms; \
         waiting for the IdP p50 {:.1} ms p99 {:.1} ms",
        total.len(),
        percentile(&total, 0.5),
        percentile(&total, 0.99),
        percentile(&at_idp, 0.5),
        percentile(&at_idp, 0.99)
    );
    println!(
        "load average (1, 5, 15 min) before: {}; after: {}",
        load_before
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        load_after
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "round 1: every session due at once (the verifier flat out; the first verification \
         also writes the user's idp_groups). round 2: until each was verified twice."
    );
    println!(
        "correct: {} verifications stored, every session verified twice, none revoked, \
         no refused grant, every user has the IdP's groups",
        second.verified
    );
}

fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}
