//! The `vigil` binary as people start it: `all-in-one --demo` (what `make run`
//! runs), configuration from a file under the environment and flags with
//! `--print-config`, and keys in the formats `vigil keys generate` and the Helm
//! chart write (files, PEM, a certificate carrying the snapshot key).
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::free_port;

const VIGIL: &str = env!("CARGO_BIN_EXE_vigil");

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "vigil-binary-{what}-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child whose stdout and stderr go to `log`; killed on drop.
struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    fn start(mut cmd: Command, log: &Path) -> Running {
        let out = std::fs::File::create(log).unwrap();
        let child = cmd
            .env("VIGIL_LOG", "info")
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Running {
            child,
            log: log.to_owned(),
        }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the output holds `needle`; panics with the output after 90 s.
    fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let text = self.text();
            if text.contains(needle) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "`{needle}` never appeared; output:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then the exit status within 20 s.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "no exit after SIGTERM; output:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn all_in_one(data: &Path, ports: &[u16; 5], log: &Path) -> Running {
    let addr = |p: u16| format!("127.0.0.1:{p}");
    let mut cmd = Command::new(VIGIL);
    cmd.current_dir(data).args([
        "all-in-one",
        "--demo",
        "--data-dir",
        "data",
        "--admin-listen",
        &addr(ports[0]),
        "--grpc-listen",
        &addr(ports[1]),
        "--listen",
        &addr(ports[2]),
        "--health-listen",
        &addr(ports[3]),
        "--demo-listen",
        &addr(ports[4]),
    ]);
    Running::start(cmd, log)
}

fn demo_token(text: &str) -> String {
    let start = text.rfind("Bearer vgl_sa_").unwrap() + "Bearer ".len();
    text[start..]
        .split(['\'', ' ', '\n'])
        .next()
        .unwrap()
        .to_owned()
}

async fn through(proxy: u16, path: &str, token: Option<&str>) -> (u16, String) {
    let c = reqwest::Client::new();
    let mut req = c
        .get(format!("http://127.0.0.1:{proxy}{path}"))
        .header("host", "demo.localhost")
        .header("accept", "application/json");
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.unwrap();
    (res.status().as_u16(), res.text().await.unwrap())
}

/// `make run`: the demo comes up, shows its own checks, answers the printed
/// commands, stops cleanly on SIGTERM, and starts again on the same data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_in_one_demo() {
    let dir = Scratch::new("aio");
    let ports = [
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    ];
    let mut first = all_in_one(&dir.0, &ports, &dir.0.join("first.log"));
    let text = first.wait_for("Stop with Ctrl-C");
    assert!(
        text.contains(
            "GET /hello with the token → 200, GET /admin with the token → 403, GET /hello without a token → 401"
        ),
        "{text}"
    );
    assert!(text.contains("DEVELOPMENT"), "{text}");
    let token = demo_token(&text);
    let (status, body) = through(ports[2], "/hello", Some(&token)).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"x-vigil-service-account\":\"demo-bot\""),
        "{body}"
    );
    assert!(body.contains("x-vigil-jwt-assertion"), "{body}");
    let (status, body) = through(ports[2], "/admin/users", Some(&token)).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(through(ports[2], "/hello", None).await.0, 401);
    // The admin API answers the owner token from the data directory.
    let owner = std::fs::read_to_string(dir.0.join("data/keys/bootstrap.token")).unwrap();
    let routes: serde_json::Value = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/v1/routes", ports[0]))
        .bearer_auth(owner.trim())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(routes["items"][0]["name"], "demo", "{routes}");
    // Graceful stop.
    let status = first.terminate();
    assert!(status.success(), "{status:?}\n{}", first.text());
    // Again on the same data: the store and keys are kept, the demo token is
    // rotated (tokens are shown only once), and the old one stops working.
    let second = all_in_one(&dir.0, &ports, &dir.0.join("second.log"));
    let text = second.wait_for("Stop with Ctrl-C");
    assert!(text.contains("→ 200"), "{text}");
    let fresh = demo_token(&text);
    assert_ne!(fresh, token);
    assert_eq!(through(ports[2], "/hello", Some(&fresh)).await.0, 200);
    assert_eq!(through(ports[2], "/hello", Some(&token)).await.0, 401);
    assert!(
        !text.contains("Generated DEVELOPMENT keys"),
        "keys were made again:\n{text}"
    );
}

fn vigil(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(VIGIL)
        .args(args)
        .envs(env.iter().copied())
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Flags over environment over the file; every mistake names its key; the
/// printed configuration shows no secret.
#[test]
fn configuration_layers_and_print_config() {
    let dir = Scratch::new("config");
    let file = dir.0.join("vigil.yaml");
    let secret_file = dir.0.join("bootstrap");
    std::fs::write(&secret_file, "from-a-file-0123456789\n").unwrap();
    std::fs::write(
        &file,
        format!(
            "control:\n  admin_listen: 127.0.0.1:1111\n  grpc-listen: 127.0.0.1:1112\n  \
             database_url: postgres://vigil:hunter2@db.internal/vigil\n  \
             bootstrap_token_file: {}\n  secret_key: c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlYw==\n  \
             migrate: true\nproxy:\n  control_plane: [http://a:1, http://b:2]\n  log_format: json\n",
            secret_file.display()
        ),
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let (ok, out, err) = vigil(&["--config", f, "control", "--print-config"], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("admin_listen: 127.0.0.1:1111"), "{out}");
    assert!(out.contains("grpc_listen: 127.0.0.1:1112"), "{out}");
    assert!(out.contains("migrate: true"), "{out}");
    assert!(out.contains("log_format: text"), "{out}");
    assert!(
        out.contains("postgres://vigil:<redacted>@db.internal/vigil"),
        "{out}"
    );
    assert!(out.contains("secret_key: <redacted>"), "{out}");
    assert!(
        !out.contains("hunter2") && !out.contains("c2VjcmV0"),
        "{out}"
    );
    // The environment beats the file, a flag beats both.
    let env = [("VIGIL_ADMIN_LISTEN", "127.0.0.1:2222")];
    let (_, out, _) = vigil(&["--config", f, "control", "--print-config"], &env);
    assert!(out.contains("admin_listen: 127.0.0.1:2222"), "{out}");
    let (_, out, _) = vigil(
        &[
            "--config",
            f,
            "control",
            "--admin-listen",
            "127.0.0.1:3333",
            "--print-config",
        ],
        &env,
    );
    assert!(out.contains("admin_listen: 127.0.0.1:3333"), "{out}");
    // The verifier's limits per identity provider: 10 a second, 4 at once, unless
    // raised; never zero.
    assert!(
        out.contains("reverify_rate: 10") && out.contains("reverify_concurrency: 4"),
        "{out}"
    );
    let (_, out, _) = vigil(
        &["--config", f, "control", "--print-config"],
        &[("VIGIL_REVERIFY_RATE", "50")],
    );
    assert!(out.contains("reverify_rate: 50"), "{out}");
    let (ok, _, err) = vigil(
        &[
            "--config",
            f,
            "control",
            "--reverify-concurrency",
            "0",
            "--print-config",
        ],
        &[],
    );
    assert!(!ok && err.contains("--reverify-concurrency"), "{err}");
    // The same file serves the proxy's section.
    let (ok, out, err) = vigil(
        &["proxy", "--print-config", "--join-token", "t"],
        &[("VIGIL_CONFIG", f)],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("- http://a:1") && out.contains("join_token: <redacted>"),
        "{out}"
    );
    // A global flag, set in the running subcommand's section.
    assert!(out.contains("log_format: json"), "{out}");
    // Mistakes name the key.
    for (yaml, expect) in [
        (
            "control:\n  admin_lisen: 127.0.0.1:1\n",
            "`control.admin_lisen` is not a setting",
        ),
        (
            "control:\n  admin_listen: not-an-address\n",
            "`control.admin_listen`",
        ),
        (
            "control:\n  migrate: maybe\n",
            "`control.migrate`: expected true or false",
        ),
        ("controll:\n  migrate: true\n", "unknown section `controll`"),
    ] {
        std::fs::write(&file, yaml).unwrap();
        let (ok, _, err) = vigil(&["--config", f, "control", "--print-config"], &[]);
        assert!(!ok && err.contains(expect), "{yaml}: {err}");
    }
    // A secret given twice is refused, naming both ways.
    std::fs::write(&file, "").unwrap();
    let (ok, _, err) = vigil(
        &[
            "migrate",
            "--database-url-file",
            secret_file.to_str().unwrap(),
        ],
        &[("VIGIL_DATABASE_URL", "sqlite://x")],
    );
    assert!(
        !ok && err.contains("VIGIL_DATABASE_URL or VIGIL_DATABASE_URL_FILE, not both"),
        "{err}"
    );
    let (ok, out, _) = vigil(&["version"], &[]);
    assert!(ok && out.starts_with("vigil "), "{out}");
}

/// `vigil keys generate` writes a working set, never over an existing one.
#[test]
fn keys_generate() {
    let dir = Scratch::new("keys");
    let out_dir = dir.0.join("k");
    let d = out_dir.to_str().unwrap();
    let (ok, out, err) = vigil(&["keys", "generate", "--out-dir", d], &[]);
    assert!(ok, "{err}");
    assert!(
        out.contains("signing.key") && out.contains("VIGIL_SNAPSHOT_KEYS_FILE"),
        "{out}"
    );
    let (ok, _, err) = vigil(&["keys", "generate", "--out-dir", d], &[]);
    assert!(!ok && err.contains("already holds keys"), "{err}");
    let (ok, out, _) = vigil(&["keys", "generate"], &[]);
    assert!(
        ok && out.contains("VIGIL_SIGNING_KEY=") && out.contains("BEGIN PRIVATE KEY"),
        "{out}"
    );
    let seed = std::fs::read_to_string(out_dir.join("signing.key")).unwrap();
    let public = std::fs::read_to_string(out_dir.join("snapshot-keys.pub")).unwrap();
    let signer = vigil_snapshot::Signer::from_text(&seed).unwrap();
    assert_eq!(signer.public_key_base64(), public.trim());
}

/// The keys as the Helm chart makes them: a PKCS#8 PEM signing key, the
/// proxies trusting a self-signed certificate that carries its public key,
/// secrets and tokens from files, a fleet join token from configuration.
/// A proxy trusting another key never takes the snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_from_files_as_the_chart_writes_them() {
    let dir = Scratch::new("chart");
    let write = |name: &str, text: &str| {
        let p = dir.0.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let signing = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["vigil-snapshots".to_owned()])
        .unwrap()
        .self_signed(&signing)
        .unwrap();
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let other_cert = rcgen::CertificateParams::new(vec!["other".to_owned()])
        .unwrap()
        .self_signed(&other)
        .unwrap();
    let signing_file = write("signing.pem", &signing.serialize_pem());
    let trusted_file = write("trusted.crt", &cert.pem());
    let untrusted_file = write("untrusted.crt", &other_cert.pem());
    let join = "fleet-join-token-from-a-kubernetes-secret-0123456789";
    let join_file = write("join", &format!("{join}\n"));
    let db = format!("sqlite://{}?mode=rwc", dir.0.join("v.db").display());
    let db_file = write("db-url", &db);
    let (admin, grpc) = (free_port(), free_port());
    let mut cmd = Command::new(VIGIL);
    cmd.args([
        "control",
        "--migrate",
        "--admin-listen",
        &format!("127.0.0.1:{admin}"),
        "--grpc-listen",
        &format!("127.0.0.1:{grpc}"),
    ])
    .env("VIGIL_DATABASE_URL_FILE", &db_file)
    .env("VIGIL_SIGNING_KEY_FILE", &signing_file)
    .env("VIGIL_FLEET_JOIN_TOKEN_FILE", &join_file)
    .env(
        "VIGIL_BOOTSTRAP_TOKEN_FILE",
        write("owner", "owner-token\n"),
    );
    let control = Running::start(cmd, &dir.0.join("control.log"));
    control.wait_for("Admin API listening");
    // An empty store has no snapshot to enforce (version 0): write something.
    let res = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{admin}/v1/groups"))
        .bearer_auth("owner-token")
        .json(&serde_json::json!({"name": "staff"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201, "{}", control.text());
    let proxy = |trust: &str, log: &str| {
        let (port, health) = (free_port(), free_port());
        let mut cmd = Command::new(VIGIL);
        cmd.args(proxy_on(port, health, &format!("http://127.0.0.1:{grpc}")))
            .args(["--proxy-id", log])
            .env("VIGIL_JOIN_TOKEN_FILE", &join_file)
            .env("VIGIL_SNAPSHOT_KEYS_FILE", trust);
        (Running::start(cmd, &dir.0.join(log)), health)
    };
    let (trusting, health) = proxy(&trusted_file, "trusting.log");
    let (doubting, doubting_health) = proxy(&untrusted_file, "doubting.log");
    let ready = |port: u16| async move {
        reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while ready(health).await != 200 {
        assert!(
            Instant::now() < deadline,
            "the proxy never took a snapshot:\n{}\n{}",
            trusting.text(),
            control.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Subscribed, yet refusing what it cannot verify. (The subscriber starts before
    // the health listener is bound: either line can come first.)
    doubting.wait_for("Subscribed to the control plane");
    doubting.wait_for("Health endpoints listening");
    assert_eq!(ready(doubting_health).await, 503, "{}", doubting.text());
    // A proxy with a wrong join token is turned away.
    let bad_join = write("bad-join", "not-the-fleet-token-0123456789-0123456789");
    let (port, h) = (free_port(), free_port());
    let mut cmd = Command::new(VIGIL);
    cmd.args([
        "proxy",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--health-listen",
        &format!("127.0.0.1:{h}"),
        "--control-plane",
        &format!("http://127.0.0.1:{grpc}"),
    ])
    .env("VIGIL_JOIN_TOKEN_FILE", &bad_join)
    .env("VIGIL_SNAPSHOT_KEYS_FILE", &trusted_file);
    let outsider = Running::start(cmd, &dir.0.join("outsider.log"));
    outsider.wait_for("unknown join token");
}

/// `vigil proxy`'s arguments for a proxy on `port` (health on `health`) whose
/// control plane is at `control_plane`.
fn proxy_on(port: u16, health: u16, control_plane: &str) -> Vec<String> {
    [
        "proxy",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--health-listen",
        &format!("127.0.0.1:{health}"),
        "--control-plane",
        control_plane,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// `vigil proxy`'s arguments for a proxy on `port` (health on `health`) whose
/// control plane never answers.
fn lone_proxy(port: u16, health: u16) -> Vec<String> {
    let mut args = proxy_on(port, health, "http://127.0.0.1:9");
    args.extend(
        [
            "--join-token",
            "unused",
            "--snapshot-keys",
            &support::signer().public_key_base64(),
        ]
        .map(str::to_owned),
    );
    args
}

/// Behind a load balancer mapping 443 to the proxy's port, the plain-HTTP
/// listener sends browsers to the public HTTPS port, not the proxy's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_to_the_public_https_port() {
    let dir = Scratch::new("redirect");
    let certs = dir.0.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["app.test".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(certs.join("default.crt"), cert.pem()).unwrap();
    std::fs::write(certs.join("default.key"), key.serialize_pem()).unwrap();
    let (port, health, redirect) = (free_port(), free_port(), free_port());
    let mut cmd = Command::new(VIGIL);
    cmd.args(lone_proxy(port, health)).args([
        "--redirect-listen",
        &format!("127.0.0.1:{redirect}"),
        "--redirect-https-port",
        "443",
        "--tls-dir",
        certs.to_str().unwrap(),
    ]);
    let proxy = Running::start(cmd, &dir.0.join("proxy.log"));
    proxy.wait_for("Proxy listening (HTTPS)");
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let res = loop {
        match client
            .get(format!("http://127.0.0.1:{redirect}/a?b=c"))
            .header("host", "app.test:80")
            .send()
            .await
        {
            Ok(r) => break r,
            Err(e) => assert!(Instant::now() < deadline, "{e}\n{}", proxy.text()),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(res.status(), 308);
    assert_eq!(res.headers()["location"], "https://app.test/a?b=c");
}

/// `Max open files` from /proc/<pid>/limits: (soft, hard).
fn open_file_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_owned();
    let mut values = line["Max open files".len()..].split_whitespace();
    (
        values.next().unwrap().to_owned(),
        values.next().unwrap().to_owned(),
    )
}

/// Started with a low soft limit on open files (as Debian's default 1,024 is), the
/// proxy raises it to the hard limit, and serves at most half of it in client
/// connections by default; `--max-connections` sets the limit.
#[test]
fn the_open_file_limit_is_raised_and_bounds_connections() {
    let dir = Scratch::new("nofile");
    let run = |extra: &[&str], log: &str| {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", r#"ulimit -S -n 256 && exec "$0" "$@""#, VIGIL])
            .args(lone_proxy(free_port(), free_port()))
            .args(extra);
        Running::start(cmd, &dir.0.join(log))
    };
    let proxy = run(&[], "default.log");
    let text = proxy.wait_for("Connection limit");
    let (soft, hard) = open_file_limits(proxy.child.id());
    assert_eq!(soft, hard, "the soft limit was not raised\n{text}");
    let expected = match hard.parse::<u64>() {
        Ok(h) => h / 2,
        Err(_) => 65_536, // unlimited
    };
    assert!(
        text.contains(&format!("max_connections={expected}")),
        "{text}"
    );
    let proxy = run(&["--max-connections", "3"], "set.log");
    let text = proxy.wait_for("Connection limit");
    assert!(text.contains("max_connections=3"), "{text}");
    // 0 is not a limit anyone means: refused with the flag named.
    let (ok, _, err) = vigil(&["proxy", "--max-connections", "0"], &[]);
    assert!(!ok);
    assert!(err.contains("--max-connections"), "{err}");
}
