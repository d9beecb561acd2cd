//! Helpers shared by the end-to-end tests: start `vigil` processes and wait for them.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `tests/e2e`: the npm packages and the scripts of the sign-in tests.
pub fn e2e_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/e2e"))
}

/// The command that runs the npm `oidc-provider` (`tests/e2e/idp.mjs`) on `port` as
/// `issuer`, for client `vigil` with `client_secret`, sending browsers back to
/// `redirect_uri`; start it with [`Helper::start`].
pub fn idp_command(port: u16, issuer: &str, redirect_uri: &str, client_secret: &str) -> Command {
    let mut cmd = Command::new("node");
    cmd.arg(e2e_dir().join("idp.mjs"))
        .env("PORT", port.to_string())
        .env("ISSUER", issuer)
        .env("REDIRECT_URI", redirect_uri)
        .env("CLIENT_ID", "vigil")
        .env("CLIENT_SECRET", client_secret);
    cmd
}

/// A free loopback port.
pub fn free_port() -> u16 {
    vigil_test_postgres::free_port().unwrap()
}

/// Reads what `s` receives until its peer closes it or `within` has passed: the
/// text, and whether the peer closed it.
pub async fn read_until_closed(s: &mut tokio::net::TcpStream, within: Duration) -> (String, bool) {
    use tokio::io::AsyncReadExt as _;
    let mut out = Vec::new();
    let closed = tokio::time::timeout(within, async {
        let mut buf = [0u8; 8192];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// Sends `bytes` (no client library to tidy them) on a new connection to the
/// `http://host:port` at `url`, then reads as [`read_until_closed`] does.
pub async fn send_raw(url: &str, bytes: &[u8], within: Duration) -> (String, bool) {
    use tokio::io::AsyncWriteExt as _;
    let addr = url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_until_closed(&mut s, within).await
}

/// A child process whose output goes to a log file; killed on drop.
struct Logged {
    child: Option<Child>,
    log: PathBuf,
}

impl Logged {
    /// A log file for process `what` on `port` (nothing started yet).
    fn new(what: &str, port: u16) -> Logged {
        Logged {
            child: None,
            log: std::env::temp_dir().join(format!(
                "vigil-e2e-{what}-{}-{port}.log",
                std::process::id()
            )),
        }
    }

    /// Starts `cmd` with its output appended to the log (`VIGIL_LOG=info` unless
    /// `cmd` sets it).
    fn spawn(&mut self, mut cmd: Command) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        if !cmd.get_envs().any(|(k, _)| k == "VIGIL_LOG") {
            cmd.env("VIGIL_LOG", "info");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Kills the process at once (SIGKILL).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until every one of `ports` accepts connections.
    fn wait_listening(&self, ports: &[u16], what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ports
            .iter()
            .all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok())
        {
            assert!(
                Instant::now() < deadline,
                "{what} did not start; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The operating system's id of the process.
    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits until `find` finds what it looks for in the log; returns that.
    async fn log_find<T>(&self, what: &str, find: impl Fn(&str) -> Option<T>) -> T {
        let find = &find;
        eventually(what, || async move {
            let log = self.log_text();
            find(&log).ok_or_else(|| format!("log:\n{log}"))
        })
        .await
    }

    /// Waits until the log holds `needle`; returns the log then.
    async fn log_containing(&self, needle: &str) -> String {
        let what = format!("`{needle}` never reached the log");
        self.log_find(&what, |log| log.contains(needle).then(|| log.to_owned()))
            .await
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `vigil control` child process; killed on drop.
pub struct ControlProcess {
    process: Logged,
    /// Base URL of its admin API.
    pub url: String,
    /// Address of its gRPC snapshot stream.
    pub grpc_url: String,
    db: String,
    port: u16,
    grpc_port: u16,
    extra: Vec<String>,
    env: Vec<(String, String)>,
}

/// The Ed25519 seed every test control plane signs snapshots with (bytes 1..=32).
pub const SIGNING_SEED: &str = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";

pub const TOKEN: &str = "e2e-bootstrap-token";

/// The signer of [`SIGNING_SEED`].
pub fn signer() -> vigil_snapshot::Signer {
    vigil_snapshot::Signer::from_seed_base64(SIGNING_SEED).unwrap()
}

impl ControlProcess {
    /// Starts the control plane on `db` (with --migrate) and waits until it answers.
    pub fn start(db: &str) -> ControlProcess {
        ControlProcess::start_with(db, &[])
    }

    /// Starts the control plane with its gRPC stream over TLS (certificate and key
    /// PEM files); `grpc_url` is then `https://localhost:port`.
    pub fn start_tls(db: &str, cert: &std::path::Path, key: &std::path::Path) -> ControlProcess {
        let args = [
            "--grpc-tls-cert".to_owned(),
            cert.display().to_string(),
            "--grpc-tls-key".to_owned(),
            key.display().to_string(),
        ];
        let mut p = ControlProcess::start_with(db, &args);
        p.grpc_url = format!("https://localhost:{}", p.grpc_port);
        p
    }

    /// Starts the control plane with extra arguments.
    pub fn start_with(db: &str, extra: &[String]) -> ControlProcess {
        let port = free_port();
        let grpc_port = free_port();
        let mut p = ControlProcess {
            process: Logged::new("control", port),
            url: format!("http://127.0.0.1:{port}"),
            grpc_url: format!("http://127.0.0.1:{grpc_port}"),
            db: db.into(),
            port,
            grpc_port,
            extra: extra.to_vec(),
            env: Vec::new(),
        };
        p.launch(true);
        p
    }

    /// Starts the process (applying migrations when `migrate`) and waits until it answers.
    fn launch(&mut self, migrate: bool) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vigil"));
        cmd.arg("control")
            .args([
                "--database-url",
                &self.db,
                "--admin-listen",
                &format!("127.0.0.1:{}", self.port),
                "--grpc-listen",
                &format!("127.0.0.1:{}", self.grpc_port),
            ])
            .env("VIGIL_SIGNING_KEY", SIGNING_SEED)
            .env("VIGIL_BOOTSTRAP_TOKEN", TOKEN)
            .env("VIGIL_SECRET_KEY", "A".repeat(43));
        if migrate {
            cmd.arg("--migrate");
        }
        cmd.args(&self.extra);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        self.process.spawn(cmd);
        self.process
            .wait_listening(&[self.port, self.grpc_port], "control plane");
    }

    /// Kills the process at once (SIGKILL) and starts it again on the same port and database.
    pub fn crash_and_restart(&mut self) {
        self.kill();
        self.restart();
    }

    /// Kills the process at once (SIGKILL) and leaves it down.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Kills the process (SIGKILL) and starts it again on the same ports and
    /// database with other extra arguments and environment (e.g. `VIGIL_LOG`).
    pub fn relaunch_with(&mut self, extra: &[String], env: &[(&str, &str)]) {
        self.kill();
        self.extra = extra.to_vec();
        self.env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.launch(false);
    }

    /// Starts a killed process again on the same ports and database.
    pub fn restart(&mut self) {
        self.launch(false);
    }

    /// The operating system's id of the process.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The process's resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// The process's output so far. A `vigil` process writes its log through a
    /// thread of its own, a moment after what it logs happened: a line a test
    /// expects is waited for with [`ControlProcess::log_containing`].
    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    /// Waits (up to 30 s) until the output holds `needle`; returns the output then.
    pub async fn log_containing(&self, needle: &str) -> String {
        self.process.log_containing(needle).await
    }
}

/// An HTTP client with the bootstrap token.
pub fn client() -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    reqwest::Client::builder()
        .default_headers(h)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// The verifier that trusts [`SIGNING_SEED`]'s public key.
pub fn trusted() -> vigil_snapshot::Verifier {
    vigil_snapshot::Verifier::from_base64([signer().public_key_base64().as_str()]).unwrap()
}

/// Answers a request that must succeed with its JSON body.
async fn json_of(req: reqwest::RequestBuilder, what: &str) -> serde_json::Value {
    let res = req.send().await.unwrap();
    let status = res.status();
    let text = res.text().await.unwrap();
    assert!(status.is_success(), "{what}: {status} {text}");
    serde_json::from_str(&text).unwrap()
}

/// `GET url+path`, which must succeed.
pub async fn get_json(c: &reqwest::Client, url: &str, path: &str) -> serde_json::Value {
    json_of(c.get(format!("{url}{path}")), &format!("GET {path}")).await
}

/// `POST url+path` with a JSON body, which must succeed.
pub async fn post_json(
    c: &reqwest::Client,
    url: &str,
    path: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    json_of(
        c.post(format!("{url}{path}")).json(&body),
        &format!("POST {path}"),
    )
    .await
}

/// A JSON merge patch of url+path over whatever version is there (`If-Match: *`),
/// which must succeed.
pub async fn patch_json(
    c: &reqwest::Client,
    url: &str,
    path: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let req = c
        .patch(format!("{url}{path}"))
        .header("if-match", "*")
        .header("content-type", "application/merge-patch+json")
        .body(body.to_string());
    json_of(req, &format!("PATCH {path}")).await
}

/// Creates a join token named `name`; returns the token (shown once).
pub async fn join_token(c: &reqwest::Client, url: &str, name: &str) -> String {
    let created = post_json(
        c,
        url,
        "/v1/join-tokens",
        serde_json::json!({ "name": name }),
    )
    .await;
    created["token"].as_str().unwrap().to_owned()
}

/// A `vigil proxy` child process subscribed to a control plane; killed on drop.
pub struct ProxyProcess {
    process: Logged,
    /// Base URL it serves proxied traffic on (`http://127.0.0.1:port`).
    pub url: String,
    /// Base URL of its `/healthz` and `/readyz`.
    pub health_url: String,
}

impl ProxyProcess {
    /// Starts a proxy streaming from `grpc_url` with `join_token`, trusting the
    /// test signing key; does not wait for a snapshot (see [`ProxyProcess::wait_ready`]).
    pub fn start(grpc_url: &str, join_token: &str, id: &str) -> ProxyProcess {
        ProxyProcess::start_with(grpc_url, join_token, id, &[])
    }

    /// Starts a proxy with extra arguments.
    pub fn start_with(
        grpc_url: &str,
        join_token: &str,
        id: &str,
        extra: &[String],
    ) -> ProxyProcess {
        ProxyProcess::start_at(free_port(), grpc_url, join_token, id, extra)
    }

    /// Starts a proxy serving on `port`, with extra arguments.
    pub fn start_at(
        port: u16,
        grpc_url: &str,
        join_token: &str,
        id: &str,
        extra: &[String],
    ) -> ProxyProcess {
        let health = free_port();
        let mut process = Logged::new("proxy", port);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vigil"));
        cmd.arg("proxy")
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--health-listen",
                &format!("127.0.0.1:{health}"),
                "--control-plane",
                grpc_url,
                "--proxy-id",
                id,
            ])
            .args(extra)
            .env("VIGIL_JOIN_TOKEN", join_token)
            .env("VIGIL_SNAPSHOT_KEYS", signer().public_key_base64());
        process.spawn(cmd);
        process.wait_listening(&[port, health], "proxy");
        ProxyProcess {
            process,
            url: format!("http://127.0.0.1:{port}"),
            health_url: format!("http://127.0.0.1:{health}"),
        }
    }

    /// Waits until `/readyz` says a snapshot is held.
    pub async fn wait_ready(&self) {
        let c = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = c.get(format!("{}/readyz", self.health_url)).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "proxy never became ready; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process's output so far. A `vigil` process writes its log (the decision
    /// log too) through a thread of its own, a moment after what it logs happened: a
    /// line a test expects is waited for with [`ProxyProcess::log_containing`].
    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    /// Waits (up to 30 s) until the output holds `needle`; returns the output then.
    pub async fn log_containing(&self, needle: &str) -> String {
        self.process.log_containing(needle).await
    }

    /// The operating system's id of the process.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Waits (up to 30 s) for a line of the output that `matches`; returns it.
    pub async fn log_line(&self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        self.process
            .log_find(what, |log| {
                log.lines().find(|l| matches(l)).map(str::to_owned)
            })
            .await
    }

    /// The value of the series `series` (name and labels, as `/metrics` prints
    /// them), if it is there.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = reqwest::get(format!("{}/metrics", self.health_url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }
}

/// A certificate authority for tests, and certificates it issues.
pub struct TestCa {
    /// Its certificate, PEM.
    pub pem: String,
    /// Its certificate, DER.
    pub der: rustls::pki_types::CertificateDer<'static>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// A client certificate a [`TestCa`] issued.
pub struct ClientCertificate {
    /// The certificate then the key, PEM (what `reqwest::Identity::from_pem` reads).
    pub pem: String,
    /// The certificate, DER.
    pub der: rustls::pki_types::CertificateDer<'static>,
    /// The key, PKCS#8 DER.
    pub key_der: Vec<u8>,
    /// SHA-256 of its SubjectPublicKeyInfo, 64 lowercase hex digits.
    pub fingerprint: String,
}

impl TestCa {
    /// A new CA with a fresh key.
    pub fn new() -> TestCa {
        TestCa::named(&[])
    }

    /// A new CA whose subject is `dn`, as (type, value) pairs in the certificate's
    /// order (RFC 4514 writes them last first), e.g. `[("O", "Tests"), ("CN", "CA")]`.
    pub fn named(dn: &[(&str, &str)]) -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        if !dn.is_empty() {
            params.distinguished_name = rcgen::DistinguishedName::new();
            for (ty, value) in dn {
                let ty = match *ty {
                    "CN" => DnType::CommonName,
                    "O" => DnType::OrganizationName,
                    "OU" => DnType::OrganizationalUnitName,
                    "C" => DnType::CountryName,
                    other => panic!("no DN type {other} in TestCa"),
                };
                params.distinguished_name.push(ty, *value);
            }
        }
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            pem: cert.pem(),
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `name` with a fresh key: (certificate PEM, key PEM, certificate DER).
    pub fn issue(&self, name: &str) -> (String, String, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }

    /// A client certificate (extended key usage `clientAuth`) for `name` with a
    /// fresh key; `expired` makes one whose validity ended in 2001.
    pub fn issue_client(&self, name: &str, expired: bool) -> ClientCertificate {
        use rcgen::PublicKeyData as _;
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        if expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let spki = key.subject_public_key_info();
        let digest = ring::digest::digest(&ring::digest::SHA256, &spki);
        let fingerprint: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        ClientCertificate {
            pem: format!("{}{}", cert.pem(), key.serialize_pem()),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
            fingerprint,
        }
    }
}

/// Some other program the tests need (the identity provider), killed on drop.
pub struct Helper(Logged);

impl Helper {
    /// Starts `cmd` and waits until it listens on `port`.
    pub fn start(what: &str, cmd: Command, port: u16) -> Helper {
        let mut process = Logged::new(what, port);
        process.spawn(cmd);
        process.wait_listening(&[port], what);
        Helper(process)
    }

    /// Its output so far.
    pub fn log_text(&self) -> String {
        self.0.log_text()
    }

    /// The operating system's id of the process.
    pub fn pid(&self) -> u32 {
        self.0.pid()
    }
}

/// An upstream that answers every request with what it received, as JSON
/// (`method`, `target`, `headers`); returns its base URL.
pub async fn echo_upstream() -> String {
    use serde_json::{json, Value};
    async fn echo(req: axum::extract::Request) -> axum::response::Response {
        use axum::response::IntoResponse as _;
        let headers: serde_json::Map<String, Value> = req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    Value::String(v.to_str().unwrap_or("?").to_owned()),
                )
            })
            .collect();
        let mut res = axum::Json(json!({
            "method": req.method().as_str(),
            "target": req.uri().to_string(),
            "headers": headers,
        }))
        .into_response();
        // Each `x-echo-set-cookie` comes back as a `Set-Cookie`.
        for v in req.headers().get_all("x-echo-set-cookie") {
            res.headers_mut().append("set-cookie", v.clone());
        }
        res
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, axum::Router::new().fallback(echo))
            .await
            .unwrap()
    });
    format!("http://{addr}")
}

/// An identity provider for bearer JWTs: an ES256 key, whose discovery document and
/// JWKS are served over HTTP (what the control plane fetches into the snapshot).
pub struct JwtIssuer {
    /// Its issuer URL (`http://127.0.0.1:port`).
    pub issuer: String,
    key: jsonwebtoken::EncodingKey,
    /// The public key, SEC1 uncompressed.
    pub public: Vec<u8>,
}

impl JwtIssuer {
    /// A fresh key (id `k1`), served at once.
    pub async fn start() -> JwtIssuer {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine as _;
        use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
        use serde_json::json;
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let public = pair.public_key().as_ref().to_vec();
        let jwk = json!({"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "use": "sig",
            "x": URL_SAFE_NO_PAD.encode(&public[1..33]), "y": URL_SAFE_NO_PAD.encode(&public[33..65])});
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("http://{}", listener.local_addr().unwrap());
        let discovery = json!({"issuer": issuer, "jwks_uri": format!("{issuer}/jwks"),
            "authorization_endpoint": format!("{issuer}/auth"), "token_endpoint": format!("{issuer}/token")});
        let keys = json!({"keys": [jwk]});
        let app = axum::Router::new()
            .route(
                "/.well-known/openid-configuration",
                axum::routing::get(move || async move { axum::Json(discovery) }),
            )
            .route(
                "/jwks",
                axum::routing::get(move || async move { axum::Json(keys) }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        JwtIssuer {
            issuer,
            key: jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref()),
            public,
        }
    }

    /// `claims` signed with `alg` and `key` (the issuer's own when `None`), key id `k1`.
    pub fn sign_with(
        &self,
        claims: &serde_json::Value,
        alg: jsonwebtoken::Algorithm,
        key: Option<&jsonwebtoken::EncodingKey>,
    ) -> String {
        let mut h = jsonwebtoken::Header::new(alg);
        h.kid = Some("k1".into());
        jsonwebtoken::encode(&h, claims, key.unwrap_or(&self.key)).unwrap()
    }

    /// `claims` signed by the issuer (ES256).
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        self.sign_with(claims, jsonwebtoken::Algorithm::ES256, None)
    }
}

/// One SQL query's rows through `psql` (`|`-separated columns), trimmed.
pub fn sql(db: &str, query: &str) -> String {
    let out = Command::new("psql")
        .args([db, "-Atc", query])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Now, in Unix seconds (the test's own clock: the system's).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Polls `probe` every 50 ms until it returns `Some`, for at most 30 s; panics
/// with `what` (and the last probe's description) otherwise.
pub async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(last) => assert!(Instant::now() < deadline, "{what}: {last}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A proxy's test clock (`vigil proxy --test-clock-file`): a file holding how
/// many seconds the proxies that read it run ahead of real time.
pub struct TestClock(PathBuf);

impl TestClock {
    /// A clock kept in `file`, at real time.
    pub fn at(file: PathBuf) -> TestClock {
        let clock = TestClock(file);
        clock.set(0);
        clock
    }

    /// The file, for `--test-clock-file`.
    pub fn path(&self) -> String {
        self.0.display().to_string()
    }

    /// Moves the clock `offset` seconds ahead of real time (atomically: the
    /// proxies re-read the file every 100 ms).
    pub fn set(&self, offset: i64) {
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, offset.to_string()).unwrap();
        std::fs::rename(&tmp, &self.0).unwrap();
    }
}
