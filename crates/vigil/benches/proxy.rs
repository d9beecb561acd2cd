//! The data plane under load (issue: proxy performance), with real parts only: `wrk`
//! through a `vigil proxy` process (bearer token and session cookie, the route's
//! policy decided on every request) against nginx as a plain `proxy_pass` and
//! against nginx with `auth_request` to a small authorization endpoint (the
//! round trip per request that Vigil's local decision avoids). All of them forward
//! to the same nginx upstream serving a static 200 body. Reports requests/s and
//! p50/p99 latency for each, the ratios, p99 added over the direct upstream at
//! about half of peak load, and the proxy's resident memory holding a
//! 100,000-user, 10,000-route snapshot.
//!
//! Needs `nginx` and `wrk` (`apt-get install -y nginx wrk`; `make bench-proxy`
//! installs them when missing). The nginx configurations are in `bench/proxy/`.
//!
//! Everything shares the machine's cores with `wrk`: compare the rows of one round,
//! not figures from different machines. Each nginx role runs `worker_processes 1`
//! (as the comparison does); Vigil runs its default tokio runtime, one
//! worker thread per core. So that the asymmetry is visible rather than assumed, the
//! two nginx proxies are also measured with `worker_processes 2`, and Vigil (bearer)
//! with its runtime pinned to one worker thread (`TOKIO_WORKER_THREADS=1`). At half
//! load, nginx proxy_pass and the one-thread Vigil get the same paced load too, so
//! the tail latency this host adds to any proxy at that rate is visible beside
//! Vigil's.
#![allow(missing_docs)]

#[path = "../../vigil-control/benches/common/mod.rs"]
mod common;
#[path = "../../../tests/support.rs"]
mod support;

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use support::{client, join_token, post_json, ControlProcess, ProxyProcess};
use vigil_proxy::cookie::{CookieKeys, SessionCookie};
use vigil_store::{Store, StoreOptions};
use vigil_test_postgres::TestPostgres;

/// The host every target is asked for (Vigil routes by it; nginx ignores it).
const HOST: &str = "app.bench";
/// The session cookie key given to the proxy (`--cookie-keys 1:…`): 32 bytes of `B`.
const COOKIE_KEY: &str = "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=";
const ROUNDS: usize = 2;
const THREADS: u32 = 2;
const CONNECTIONS: u32 = 64;
const MEASURE_S: u32 = 5;
const WARMUP_S: u32 = 2;
/// Half-load runs: each connection waits this long after a response (paced.lua).
const PACE_MS: u32 = 2;
/// The memory target, in bytes (150 MB, read as 150 × 10^6: the stricter reading).
const RSS_TARGET: u64 = 150_000_000;

const UPSTREAM_CONF: &str = include_str!("../../../bench/proxy/upstream.conf");
const PROXY_PASS_CONF: &str = include_str!("../../../bench/proxy/proxy_pass.conf");
const AUTH_REQUEST_CONF: &str = include_str!("../../../bench/proxy/auth_request.conf");
const PACED_LUA: &str = include_str!("../../../bench/proxy/paced.lua");

// ---------------------------------------------------------------------------
// Tools

/// The path of `tool` on `PATH` (or in /usr/sbin, where Debian puts nginx).
fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// nginx and wrk, or an exit naming the command that installs them.
fn require_tools() -> (PathBuf, PathBuf) {
    match (find_tool("nginx"), find_tool("wrk")) {
        (Some(nginx), Some(wrk)) => (nginx, wrk),
        (nginx, wrk) => {
            let missing: Vec<&str> = [("nginx", nginx.is_none()), ("wrk", wrk.is_none())]
                .into_iter()
                .filter_map(|(name, gone)| gone.then_some(name))
                .collect();
            eprintln!(
                "the proxy bench needs nginx and wrk; missing: {}.\n\
                 Install them with `apt-get install -y nginx wrk` (or run `make bench-proxy`, which does).",
                missing.join(", ")
            );
            std::process::exit(2);
        }
    }
}

/// The first line a command prints (on stdout or stderr), for the report's header.
fn version_line(tool: &Path, arg: &str) -> String {
    Command::new(tool)
        .arg(arg)
        .output()
        .map(|o| {
            let text = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("?")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|e| format!("? ({e})"))
}

// ---------------------------------------------------------------------------
// nginx

/// One nginx instance (master in the foreground, `daemon off`), stopped on drop.
struct Nginx {
    child: Child,
    name: &'static str,
    dir: PathBuf,
    port: u16,
}

impl Nginx {
    /// Starts nginx with `template`, its `{{NAME}}` placeholders replaced by `vars`
    /// (plus `DIR` and `PORT`), and waits until it answers.
    fn start(
        nginx: &Path,
        root: &Path,
        name: &'static str,
        template: &str,
        vars: &[(&str, String)],
    ) -> Nginx {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("creating the nginx directory");
        let port = support::free_port();
        // Comments dropped: they name the placeholders.
        let template: String = template
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        let mut conf = template
            .replace("{{DIR}}", &dir.display().to_string())
            .replace("{{PORT}}", &port.to_string());
        for (k, v) in vars {
            conf = conf.replace(&format!("{{{{{k}}}}}"), v);
        }
        assert!(
            !conf.contains("{{"),
            "{name}: a placeholder was left unfilled"
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("writing nginx.conf");
        let log = std::fs::File::create(dir.join("stderr.log")).expect("creating nginx's log");
        let child = Command::new(nginx)
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("nginx's log"))
            .stderr(log)
            .spawn()
            .expect("starting nginx");
        let mut me = Nginx {
            child,
            name,
            dir,
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = me.child.try_wait() {
                panic!("nginx ({name}) exited with {status}:\n{}", me.logs());
            }
            assert!(
                Instant::now() < deadline,
                "nginx ({name}) did not start:\n{}",
                me.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        me
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    /// The master and its workers.
    fn pids(&self) -> Vec<u32> {
        with_children(self.child.id())
    }

    fn logs(&self) -> String {
        ["stderr.log", "error.log"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // Fast shutdown of the master, which stops its workers; SIGKILL would leave
        // the workers listening.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("nginx ({}) did not stop; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// The authorization endpoint nginx's auth_request asks

/// Starts, on the current tokio runtime, a minimal HTTP/1.1 server that answers 204
/// when the request carries `Authorization: Bearer <t>` with SHA-256(t) equal to
/// `token_sha256`, and 401 otherwise. Returns its port.
async fn start_authorizer(token_sha256: Vec<u8>) -> u16 {
    use hyper::{Request, Response, StatusCode};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding the authorization endpoint");
    let port = listener
        .local_addr()
        .expect("the authorization endpoint's address")
        .port();
    let want = Arc::new(token_sha256);
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    eprintln!("authorization endpoint: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let want = Arc::clone(&want);
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let allowed = vigil_proto::sole_bearer(req.headers()).is_ok_and(|token| {
                            ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref()
                                == want.as_slice()
                        });
                        let mut res = Response::new(String::new());
                        *res.status_mut() = if allowed {
                            StatusCode::NO_CONTENT
                        } else {
                            StatusCode::UNAUTHORIZED
                        };
                        async move { Ok::<_, std::convert::Infallible>(res) }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

// ---------------------------------------------------------------------------
// wrk

/// What one wrk run measured.
#[derive(Debug, Clone, Copy, Default)]
struct Measured {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    requests: u64,
    /// Responses that were not 2xx or 3xx.
    non_2xx: u64,
    /// Connect, read, write and timeout errors.
    socket_errors: u64,
    /// CPU time the target's own processes spent per request, in µs, user and
    /// system, when the target names them.
    cpu_us: Option<(f64, f64)>,
}

impl Measured {
    fn clean(&self) -> bool {
        self.non_2xx == 0 && self.socket_errors == 0 && self.requests > 0
    }
}

/// A wrk latency (`676.00us`, `1.02ms`, `2.00s`, `1.00m`) in microseconds.
fn parse_latency(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some(n * scale)
}

/// The figures in wrk's `--latency` output.
fn parse_wrk(out: &str) -> Option<Measured> {
    let mut m = Measured::default();
    let (mut rps, mut p50, mut p99, mut requests) = (None, None, None, None);
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("50%") {
            p50 = parse_latency(v);
        } else if let Some(v) = line.strip_prefix("99%") {
            p99 = parse_latency(v);
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            m.non_2xx = v.trim().parse().ok()?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            m.socket_errors = v
                .split(',')
                .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
        } else if line.contains(" requests in ") {
            requests = line.split_whitespace().next().and_then(|n| n.parse().ok());
        }
    }
    m.rps = rps?;
    m.p50_us = p50?;
    m.p99_us = p99?;
    m.requests = requests?;
    Some(m)
}

/// How to load a target.
#[derive(Debug, Clone, Copy)]
struct Load {
    threads: u32,
    connections: u32,
    seconds: u32,
    /// Each connection's wait after a response, in ms (paced.lua), if any.
    pace_ms: Option<u32>,
}

const FULL: Load = Load {
    threads: THREADS,
    connections: CONNECTIONS,
    seconds: MEASURE_S,
    pace_ms: None,
};

/// What wrk is pointed at.
#[derive(Debug, Clone)]
struct Target {
    name: String,
    url: String,
    /// `Name: value` lines for `wrk -H`.
    headers: Vec<String>,
    /// The processes whose CPU time is the target's (nginx's master and workers,
    /// or `vigil proxy`); empty when not known.
    pids: Vec<u32>,
}

/// CPU time (user, system) `pids` have used so far, in µs, from `/proc/<pid>/stat`
/// (clock ticks of 1/100 s, Linux's USER_HZ on every architecture it runs here).
fn cpu_us(pids: &[u32]) -> (u64, u64) {
    pids.iter()
        .filter_map(|pid| {
            // From `state`: utime and stime are the 12th and 13th.
            let fields = stat_fields(&format!("/proc/{pid}/stat"))?;
            let utime: u64 = fields.get(11)?.parse().ok()?;
            let stime: u64 = fields.get(12)?.parse().ok()?;
            Some((utime * 10_000, stime * 10_000))
        })
        .fold((0, 0), |(u, s), (du, ds)| (u + du, s + ds))
}

/// The fields of a `/proc/<pid>/stat` file after the command name (which may hold
/// spaces), from `state` on.
fn stat_fields(path: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(path).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// `pid` and its children (nginx's master and its workers).
fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            // From `state`: the parent's pid is the 2nd.
            let parent = stat_fields(&e.path().join("stat").to_string_lossy())
                .and_then(|f| f.get(1)?.parse::<u32>().ok());
            if parent == Some(pid) {
                pids.push(child);
            }
        }
    }
    pids
}

struct Wrk {
    bin: PathBuf,
    script: PathBuf,
}

impl Wrk {
    /// Runs wrk once against `target`; panics with its output when it fails.
    async fn run(&self, target: &Target, load: Load) -> Measured {
        let mut cmd = Command::new(&self.bin);
        cmd.arg(format!("-t{}", load.threads))
            .arg(format!("-c{}", load.connections))
            .arg(format!("-d{}s", load.seconds))
            .arg("--latency");
        for h in &target.headers {
            cmd.arg("-H").arg(h);
        }
        if let Some(ms) = load.pace_ms {
            cmd.arg("-s")
                .arg(&self.script)
                .env("VIGIL_BENCH_DELAY_MS", ms.to_string());
        }
        cmd.arg(&target.url);
        let name = target.name.clone();
        let cpu_before = cpu_us(&target.pids);
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .expect("the wrk task")
            .expect("running wrk");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "wrk against {name} failed ({}):\n{text}\n{err}",
            out.status
        );
        let mut m = parse_wrk(&text)
            .unwrap_or_else(|| panic!("unreadable wrk output for {name}:\n{text}\n{err}"));
        if !target.pids.is_empty() && m.requests > 0 {
            let (user, system) = cpu_us(&target.pids);
            let n = m.requests as f64;
            m.cpu_us = Some((
                user.saturating_sub(cpu_before.0) as f64 / n,
                system.saturating_sub(cpu_before.1) as f64 / n,
            ));
        }
        m
    }

    /// A warm-up run (discarded), then the measured one.
    async fn measure(&self, target: &Target) -> Measured {
        self.run(
            target,
            Load {
                seconds: WARMUP_S,
                ..FULL
            },
        )
        .await;
        self.run(target, FULL).await
    }
}

// ---------------------------------------------------------------------------
// Checks before measuring

/// The status of `GET /` at `url` (`http://127.0.0.1:port/`) with `headers`, over a
/// fresh connection.
fn status_of(url: &str, headers: &[String]) -> u16 {
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let mut s = TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("a read timeout");
    let mut req = String::from("GET / HTTP/1.1\r\n");
    if !headers
        .iter()
        .any(|h| h.to_ascii_lowercase().starts_with("host:"))
    {
        req.push_str("Host: 127.0.0.1\r\n");
    }
    for h in headers {
        let _ = write!(req, "{h}\r\n");
    }
    req.push_str("Connection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .unwrap_or_else(|e| panic!("writing to {addr}: {e}"));
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn expect_status(target: &Target, headers: &[String], want: u16, what: &str) {
    let got = status_of(&target.url, headers);
    assert_eq!(
        got, want,
        "{} {what}: expected {want}, got {got}",
        target.name
    );
}

// ---------------------------------------------------------------------------
// Reporting

fn ms(us: f64) -> String {
    format!("{:.3} ms", us / 1e3)
}

/// The CPU column: µs per request (user + system), or `?`.
fn cpu(m: &Measured) -> String {
    m.cpu_us.map_or_else(
        || "?".to_owned(),
        |(user, system)| format!("{:.1} ({user:.1} + {system:.1})", user + system),
    )
}

/// The errors column: wrk's non-2xx responses and socket errors.
fn errors(m: &Measured) -> String {
    if m.clean() {
        "none".to_owned()
    } else {
        format!("{} non-2xx, {} socket", m.non_2xx, m.socket_errors)
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

/// One round's measurements.
struct Round {
    rows: Vec<(String, Measured)>,
    half_load: HalfLoad,
}

struct HalfLoad {
    connections: u32,
    peak_rps: f64,
    direct: Measured,
    vigil: Measured,
    /// The same paced load through nginx proxy_pass and through Vigil on one
    /// worker thread: what this host adds to any proxy's tail at that rate.
    others: Vec<(&'static str, Measured)>,
}

const DIRECT: &str = "direct upstream (nginx static 200)";
const NGINX_PASS: &str = "nginx proxy_pass, 1 worker";
const NGINX_AUTH: &str = "nginx auth_request, 1 worker";
const NGINX_PASS_2: &str = "nginx proxy_pass, 2 workers";
const NGINX_AUTH_2: &str = "nginx auth_request, 2 workers";
const VIGIL_BEARER: &str = "Vigil, bearer token";
const VIGIL_COOKIE: &str = "Vigil, session cookie";
const VIGIL_BEARER_1: &str = "Vigil, bearer token, 1 worker thread";

impl Round {
    fn get(&self, name: &str) -> Measured {
        self.rows
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, m)| *m)
            .unwrap_or_default()
    }

    fn print(&self, number: usize) {
        let pass = self.get(NGINX_PASS).rps;
        let auth = self.get(NGINX_AUTH).rps;
        println!(
            "\n## Round {number} (wrk -t{THREADS} -c{CONNECTIONS} -d{MEASURE_S}s --latency, after a {WARMUP_S} s warm-up)\n"
        );
        println!(
            "| target | req/s | p50 | p99 | × nginx proxy_pass | × nginx auth_request | CPU µs/request (user + system) | errors |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---|");
        for (name, m) in &self.rows {
            println!(
                "| {name} | {:.0} | {} | {} | {:.2} | {:.2} | {} | {} |",
                m.rps,
                ms(m.p50_us),
                ms(m.p99_us),
                m.rps / pass,
                m.rps / auth,
                cpu(m),
                errors(m)
            );
        }
        println!(
            "\nCPU µs/request: user + system time of the target's own processes (nginx's \
             master and workers; `vigil proxy`) over the measured run, per request; for the \
             auth_request rows it leaves out the authorization endpoint, which runs in the \
             bench's process. The direct row is the upstream's own cost."
        );
        let h = &self.half_load;
        let added = h.vigil.p99_us - h.direct.p99_us;
        println!(
            "\nHalf load: Vigil (bearer) peaked at {:.0} req/s above; target rate {:.0} req/s. \
             wrk -t{THREADS} -c{} -d{MEASURE_S}s, each connection waiting {PACE_MS} ms after every response (bench/proxy/paced.lua):\n",
            h.peak_rps,
            h.peak_rps / 2.0,
            h.connections
        );
        println!("| target | req/s | p50 | p99 | p99 added over direct | errors |");
        println!("|---|---:|---:|---:|---:|---|");
        let rows = [(DIRECT, &h.direct), (VIGIL_BEARER, &h.vigil)]
            .into_iter()
            .chain(h.others.iter().map(|(n, m)| (*n, m)));
        for (name, m) in rows {
            println!(
                "| {name} | {:.0} | {} | {} | {} | {} |",
                m.rps,
                ms(m.p50_us),
                ms(m.p99_us),
                ms(m.p99_us - h.direct.p99_us),
                errors(m)
            );
        }
        println!(
            "\np99 added by Vigil over the direct upstream at {:.0} req/s ({:.0} % of Vigil's peak): {}",
            h.vigil.rps,
            100.0 * h.vigil.rps / h.peak_rps,
            ms(added)
        );

        println!("\nTargets, round {number}:");
        let pass2 = self.get(NGINX_PASS_2).rps;
        let auth2 = self.get(NGINX_AUTH_2).rps;
        for name in [VIGIL_BEARER, VIGIL_COOKIE, VIGIL_BEARER_1] {
            let m = self.get(name);
            let clean = m.clean() && self.get(NGINX_PASS).clean() && self.get(NGINX_AUTH).clean();
            println!(
                "- {name}: ≥ 1.0× nginx proxy_pass: {:.2}× → {} (against 2 nginx workers: {:.2}×)",
                m.rps / pass,
                verdict(clean && m.rps >= pass),
                m.rps / pass2
            );
            println!(
                "- {name}: ≥ 2× nginx + auth_request: {:.2}× → {} (against 2 nginx workers: {:.2}×)",
                m.rps / auth,
                verdict(clean && m.rps >= 2.0 * auth),
                m.rps / auth2
            );
        }
        let half_ok = h.direct.clean() && h.vigil.clean() && added <= 1000.0;
        println!(
            "- p99 added over the direct upstream at about half of peak ≤ 1 ms: {} → {}",
            ms(added),
            verdict(half_ok)
        );
    }
}

// ---------------------------------------------------------------------------
// The rounds

struct Targets {
    direct: Target,
    nginx_pass: Target,
    nginx_auth: Target,
    nginx_pass_2: Target,
    nginx_auth_2: Target,
    vigil_bearer: Target,
    vigil_cookie: Target,
    vigil_bearer_1: Target,
}

async fn round(wrk: &Wrk, t: &Targets) -> Round {
    let mut rows = Vec::new();
    for (name, target) in [
        (DIRECT, &t.direct),
        (NGINX_PASS, &t.nginx_pass),
        (NGINX_AUTH, &t.nginx_auth),
        (NGINX_PASS_2, &t.nginx_pass_2),
        (NGINX_AUTH_2, &t.nginx_auth_2),
        (VIGIL_BEARER, &t.vigil_bearer),
        (VIGIL_COOKIE, &t.vigil_cookie),
        (VIGIL_BEARER_1, &t.vigil_bearer_1),
    ] {
        let m = wrk.measure(target).await;
        eprintln!("  {name}: {:.0} req/s", m.rps);
        rows.push((name.to_owned(), m));
    }
    let peak = rows
        .iter()
        .find(|(n, _)| n == VIGIL_BEARER)
        .map_or(0.0, |(_, m)| m.rps);
    let half_load = half_load(wrk, t, peak).await;
    Round { rows, half_load }
}

/// `--quick`: the two nginx proxies and Vigil (default runtime) taking turns, twice,
/// and nothing else; for before/after pairs and profiles (the proxy's pid is
/// printed, to attach `perf` to), not for the record.
async fn quick(wrk: &Wrk, t: &Targets, proxy_pid: u32) {
    println!("\n## Quick turns (vigil proxy pid {proxy_pid})\n");
    for _ in 0..2 {
        for target in [
            &t.nginx_pass,
            &t.nginx_auth,
            &t.vigil_bearer,
            &t.vigil_cookie,
        ] {
            let m = wrk.measure(target).await;
            println!(
                "- {}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, CPU {} µs/request{}",
                target.name,
                m.rps,
                m.p50_us / 1e3,
                m.p99_us / 1e3,
                cpu(&m),
                if m.clean() { "" } else { " (errors)" }
            );
        }
    }
}

/// p99 at about half of Vigil's peak: paced connections (wrk2's constant rate is not
/// available), their number calibrated against Vigil, then the same load on the
/// direct upstream, on Vigil, and for comparison on nginx proxy_pass and on Vigil
/// with one worker thread.
async fn half_load(wrk: &Wrk, t: &Targets, peak: f64) -> HalfLoad {
    let want = peak / 2.0;
    let paced = |connections: u32, seconds: u32| Load {
        threads: THREADS,
        connections,
        seconds,
        pace_ms: Some(PACE_MS),
    };
    // Each connection offers at most 1000 / PACE_MS requests per second.
    let mut connections = ((want * f64::from(PACE_MS) / 1e3).round() as u32).clamp(THREADS, 512);
    for _ in 0..2 {
        let probe = wrk.run(&t.vigil_bearer, paced(connections, 2)).await;
        if probe.rps <= 0.0 {
            break;
        }
        let next = (f64::from(connections) * want / probe.rps).round() as u32;
        connections = next.clamp(THREADS, 512);
    }
    let direct = wrk.run(&t.direct, paced(connections, MEASURE_S)).await;
    let vigil = wrk
        .run(&t.vigil_bearer, paced(connections, MEASURE_S))
        .await;
    let mut others = Vec::new();
    for (name, target) in [
        (NGINX_PASS, &t.nginx_pass),
        (VIGIL_BEARER_1, &t.vigil_bearer_1),
    ] {
        others.push((name, wrk.run(target, paced(connections, MEASURE_S)).await));
    }
    HalfLoad {
        connections,
        peak_rps: peak,
        direct,
        vigil,
        others,
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Removes the log file `support` keeps for a process listening on `url`'s port.
fn remove_support_log(what: &str, url: &str) {
    if let Some(port) = url.rsplit(':').next() {
        let _ = std::fs::remove_file(std::env::temp_dir().join(format!(
            "vigil-e2e-{what}-{}-{port}.log",
            std::process::id()
        )));
    }
}

async fn throughput(pg: &TestPostgres, nginx: &Path, wrk: &Wrk, root: &Path) {
    // The shared upstream; the nginx proxies start once the authorization endpoint
    // they call is up.
    let upstream = Nginx::start(nginx, root, "upstream", UPSTREAM_CONF, &[]);
    let upstream_port = upstream.port.to_string();

    // Vigil: a control plane, one route whose policy admits a service account and
    // a user of a group, and a proxy with a cookie key.
    let db = pg.create_database("proxy").expect("creating the database");
    let cp = ControlProcess::start(&db);
    let c = client();
    let url = cp.url.clone();
    let robot = post_json(
        &c,
        &url,
        "/v1/service-accounts",
        json!({"name": "bench-robot"}),
    )
    .await;
    let robot_token = robot["token"]
        .as_str()
        .expect("a service-account token")
        .to_owned();
    post_json(&c, &url, "/v1/groups", json!({"name": "staff"})).await;
    let user = post_json(
        &c,
        &url,
        "/v1/users",
        json!({"issuer": "https://idp.bench", "subject": "alice", "email": "alice@corp.example",
               "email_verified": true, "groups": ["staff"]}),
    )
    .await;
    let uid = user["id"].as_str().expect("a user id").to_owned();
    post_json(
        &c,
        &url,
        "/v1/policies",
        json!({"name": "bench", "document": {"allow": {"or": [
            {"service_account": "bench-robot"},
            {"and": [{"groups": {"has": "staff"}}, {"domain": "corp.example"}]}]}}}),
    )
    .await;
    post_json(
        &c,
        &url,
        "/v1/routes",
        json!({"name": "app", "host": HOST, "upstreams": [format!("http://127.0.0.1:{upstream_port}")],
               "policies": ["bench"]}),
    )
    .await;
    let join = join_token(&c, &url, "bench").await;
    let proxy = ProxyProcess::start_with(
        &cp.grpc_url,
        &join,
        "bench-proxy",
        &["--cookie-keys".into(), format!("1:{COOKIE_KEY}")],
    );
    proxy.wait_ready().await;
    // The same proxy again with its tokio runtime pinned to one worker thread, like
    // nginx's `worker_processes 1`.
    let pinned = PinnedProxy::start(&cp.grpc_url, &join, root, "1").await;
    let default_threads = runtime_workers(proxy.pid());
    println!(
        "- Vigil proxies' tokio worker threads: {default_threads} in the default one, {} in \
         the one started with TOKIO_WORKER_THREADS=1",
        runtime_workers(pinned.child.id())
    );

    let token_sha = ring::digest::digest(&ring::digest::SHA256, robot_token.as_bytes())
        .as_ref()
        .to_vec();
    let auth_port = start_authorizer(token_sha).await.to_string();
    let vars = |workers: &str| {
        vec![
            ("UPSTREAM_PORT", upstream_port.clone()),
            ("AUTH_PORT", auth_port.clone()),
            ("WORKERS", workers.to_owned()),
        ]
    };
    let pass1 = Nginx::start(nginx, root, "proxy-pass-1", PROXY_PASS_CONF, &vars("1"));
    let auth1 = Nginx::start(nginx, root, "auth-request-1", AUTH_REQUEST_CONF, &vars("1"));
    let pass2 = Nginx::start(nginx, root, "proxy-pass-2", PROXY_PASS_CONF, &vars("2"));
    let auth2 = Nginx::start(nginx, root, "auth-request-2", AUTH_REQUEST_CONF, &vars("2"));

    let keys = CookieKeys::new([(1, COOKIE_KEY)]).expect("the cookie key");
    let now = unix_now();
    // Built from JSON so that fields the cookie gains later (all optional) need no
    // change here.
    let session: SessionCookie = serde_json::from_value(json!({
        "sid": "ses_bench", "uid": uid, "auth_time": now, "exp": now + 24 * 3600, "amr": ["pwd"],
    }))
    .expect("a session cookie");
    let cookie = keys
        .seal(&session, HOST)
        .expect("sealing the session cookie");

    let host = format!("Host: {HOST}");
    let bearer = vec![host.clone(), format!("Authorization: Bearer {robot_token}")];
    let plain = vec![host.clone()];
    let with_cookie = vec![
        host.clone(),
        format!("Cookie: {}={cookie}", vigil_proxy::cookie::NAME),
    ];
    let target = |name: &str, url: String, headers: &[String], pids: Vec<u32>| Target {
        name: name.to_owned(),
        url,
        headers: headers.to_vec(),
        pids,
    };
    let vigil_pids = vec![proxy.pid()];
    let t = Targets {
        direct: target(DIRECT, upstream.url(), &plain, upstream.pids()),
        nginx_pass: target(NGINX_PASS, pass1.url(), &plain, pass1.pids()),
        nginx_auth: target(NGINX_AUTH, auth1.url(), &bearer, auth1.pids()),
        nginx_pass_2: target(NGINX_PASS_2, pass2.url(), &plain, pass2.pids()),
        nginx_auth_2: target(NGINX_AUTH_2, auth2.url(), &bearer, auth2.pids()),
        vigil_bearer: target(
            VIGIL_BEARER,
            format!("{}/", proxy.url),
            &bearer,
            vigil_pids.clone(),
        ),
        vigil_cookie: target(
            VIGIL_COOKIE,
            format!("{}/", proxy.url),
            &with_cookie,
            vigil_pids,
        ),
        vigil_bearer_1: target(
            VIGIL_BEARER_1,
            format!("{}/", pinned.url),
            &bearer,
            vec![pinned.child.id()],
        ),
    };

    // Every target answers what it should before anything is measured.
    for t in [
        &t.direct,
        &t.nginx_pass,
        &t.nginx_auth,
        &t.nginx_pass_2,
        &t.nginx_auth_2,
        &t.vigil_bearer,
        &t.vigil_cookie,
        &t.vigil_bearer_1,
    ] {
        expect_status(t, &t.headers, 200, "with its credential");
    }
    let wrong = vec![host.clone(), "Authorization: Bearer vgl_wrong".to_owned()];
    for t in [&t.nginx_auth, &t.nginx_auth_2, &t.vigil_bearer] {
        expect_status(t, &plain, 401, "without a credential");
        expect_status(t, &wrong, 401, "with a wrong token");
    }

    if std::env::args().any(|a| a == "--quick") {
        quick(wrk, &t, proxy.pid()).await;
    } else {
        for n in 1..=ROUNDS {
            eprintln!("round {n} of {ROUNDS}...");
            let r = round(wrk, &t).await;
            r.print(n);
        }
    }

    if let Some(rss) = status_kib(proxy.pid(), "VmRSS") {
        println!(
            "\nFor scale: this proxy, holding a one-route snapshot, is at VmRSS {} after both rounds.",
            mib(rss)
        );
    }
    let proxy_url = proxy.url.clone();
    drop(proxy);
    remove_support_log("proxy", &proxy_url);
    drop(cp);
    remove_support_log("control", &url);
    drop((pass1, auth1, pass2, auth2, pinned, upstream));
}

/// A `vigil proxy` started here rather than by support's ProxyProcess, so that its
/// environment can set the tokio runtime's worker threads; killed on drop.
struct PinnedProxy {
    child: Child,
    url: String,
}

impl PinnedProxy {
    async fn start(grpc_url: &str, join: &str, root: &Path, threads: &str) -> PinnedProxy {
        let port = support::free_port();
        let health = support::free_port();
        let log = std::fs::File::create(root.join(format!("vigil-proxy-{threads}-thread.log")))
            .expect("creating the proxy's log");
        let child = Command::new(env!("CARGO_BIN_EXE_vigil"))
            .arg("proxy")
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--health-listen",
                &format!("127.0.0.1:{health}"),
                "--control-plane",
                grpc_url,
                "--proxy-id",
                &format!("bench-proxy-{threads}-thread"),
                "--cookie-keys",
                &format!("1:{COOKIE_KEY}"),
            ])
            .env("VIGIL_JOIN_TOKEN", join)
            .env("VIGIL_SNAPSHOT_KEYS", support::signer().public_key_base64())
            .env("VIGIL_LOG", "info")
            .env("TOKIO_WORKER_THREADS", threads)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the proxy's log"))
            .stderr(log)
            .spawn()
            .expect("starting vigil proxy");
        let me = PinnedProxy {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let health_url = format!("http://127.0.0.1:{health}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while ready_version(&health_url).await.is_none() {
            assert!(
                Instant::now() < deadline,
                "the pinned proxy never became ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        me
    }
}

impl Drop for PinnedProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How many tokio worker threads process `pid` runs, by thread name
/// (`tokio-rt-worker`; `tokio-runtime-worker`, truncated, in older tokio, which
/// also gave that name to blocking-pool threads).
fn runtime_workers(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| {
                        c.starts_with("tokio-rt-worker") || c.starts_with("tokio-runtime-w")
                    })
                })
                .count()
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Memory holding a large snapshot

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The snapshot version `/readyz` reports, if it reports one.
async fn ready_version(health_url: &str) -> Option<u64> {
    let text = reqwest::get(format!("{health_url}/readyz"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.strip_prefix("enforcing snapshot version ")?
        .split(';')
        .next()?
        .trim()
        .parse()
        .ok()
}

fn mib(kib: u64) -> String {
    format!(
        "{:.1} MiB ({:.1} MB)",
        kib as f64 / 1024.0,
        kib as f64 * 1.024 / 1e3
    )
}

async fn memory(pg: &TestPostgres, wrk: &Wrk) {
    println!("\n## Proxy memory holding a 100,000-user, 10,000-route snapshot\n");
    let db = pg.create_database("rss").expect("creating the database");
    let store = Store::connect(&db, StoreOptions::default())
        .await
        .expect("connecting to the store");
    store.migrate().await.expect("migrating");
    let seeded = common::seed(&store).await;
    let revision = u64::try_from(store.revision().await.expect("the store's revision"))
        .expect("a non-negative revision");
    println!(
        "seeded {} users, {} groups, {} policies, {} routes through the store in {:.1} s (revision {revision})",
        common::USERS,
        common::GROUPS,
        common::POLICIES,
        common::ROUTES,
        seeded.as_secs_f64()
    );
    store.close().await;

    let cp = ControlProcess::start(&db);
    let c = client();
    let join = join_token(&c, &cp.url, "rss").await;
    let started = Instant::now();
    // VIGIL_BENCH_SNAPSHOT_FILE=path keeps the proxy's snapshot file there, to study
    // the same snapshot again without PostgreSQL or a control plane.
    let extra: Vec<String> = std::env::var("VIGIL_BENCH_SNAPSHOT_FILE")
        .map(|path| vec!["--snapshot-file".to_owned(), path])
        .unwrap_or_default();
    let proxy = ProxyProcess::start_with(&cp.grpc_url, &join, "rss-proxy", &extra);
    let deadline = Instant::now() + Duration::from_secs(120);
    let version = loop {
        match ready_version(&proxy.health_url).await {
            Some(v) if v >= revision => break v,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "the proxy never enforced the seeded snapshot; log:\n{}",
            proxy.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "proxy started and enforcing snapshot version {version} after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let pid = proxy.pid();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = status_kib(pid, "VmRSS").expect("VmRSS");
    let idle_peak = status_kib(pid, "VmHWM").expect("VmHWM");
    println!("- VmRSS 2 s after ready, idle: {}", mib(idle));
    println!(
        "- VmHWM (peak so far, includes receiving and decoding the snapshot): {}",
        mib(idle_peak)
    );

    // Requests through the 10,000-route table: anonymous, so decided and refused (401).
    let anon = Target {
        name: "Vigil, anonymous, large snapshot".into(),
        url: format!("{}/", proxy.url),
        headers: vec!["Host: app4242.corp.example".into()],
        pids: Vec::new(),
    };
    expect_status(&anon, &anon.headers, 401, "anonymous");
    let m = wrk.run(&anon, Load { seconds: 3, ..FULL }).await;
    let loaded = status_kib(pid, "VmRSS").expect("VmRSS");
    println!(
        "- VmRSS after 3 s of wrk -c{CONNECTIONS} ({:.0} req/s, every one decided and refused 401): {}",
        m.rps,
        mib(loaded)
    );
    let worst = idle.max(loaded);
    println!(
        "\nTarget: proxy RSS ≤ 150 MB holding the snapshot: {} → {}",
        mib(worst),
        verdict(worst * 1024 <= RSS_TARGET)
    );
    let proxy_url = proxy.url.clone();
    drop(proxy);
    remove_support_log("proxy", &proxy_url);
    let cp_url = cp.url.clone();
    drop(cp);
    remove_support_log("control", &cp_url);
}

/// Removes the bench's directory (nginx configurations and logs) at the end, and
/// when a step panics.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let (nginx, wrk_bin) = require_tools();
    let root = std::env::temp_dir().join(format!("vigil-bench-proxy-{}", std::process::id()));
    std::fs::create_dir_all(&root).expect("creating the bench directory");
    let _cleanup = RemoveOnDrop(root.clone());
    let script = root.join("paced.lua");
    std::fs::write(&script, PACED_LUA).expect("writing paced.lua");
    let wrk = Wrk {
        bin: wrk_bin.clone(),
        script,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let started = Instant::now();
    rt.block_on(async {
        println!(
            "# Vigil's data plane against nginx ({} cores; wrk, the proxies, the upstream and the authorization endpoint share them)\n",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        println!("- {} / {}", version_line(&nginx, "-v"), version_line(&wrk_bin, "-v"));
        println!(
            "- every nginx role runs `worker_processes 1` (the two proxies are measured with 2 as well); \
             Vigil runs its default tokio runtime (one worker thread per core), and is measured pinned \
             to one worker thread as well; the authorization endpoint is a hyper server on this process's tokio runtime"
        );
        println!(
            "- Vigil writes its decision log (one line per request, `VIGIL_LOG=info`) to a file; \
             the nginx proxies write their access log to a file; the upstream logs nothing"
        );
        println!(
            "- Vigil's route policy: service account `bench-robot`, or group `staff` and domain `corp.example`"
        );
        let pg = TestPostgres::start().expect("starting PostgreSQL");
        // `--rss-only`: the memory part alone (deterministic, so worth running on its own).
        if !std::env::args().any(|a| a == "--rss-only") {
            throughput(&pg, &nginx, &wrk, &root).await;
        }
        if std::env::args().any(|a| a == "--quick") {
            return;
        }
        memory(&pg, &wrk).await;
    });
    println!("\n(whole bench: {:.0} s)", started.elapsed().as_secs_f64());
}
