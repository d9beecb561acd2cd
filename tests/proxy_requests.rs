//! The proxy end to end, with real processes: a throwaway PostgreSQL, `vigil control`,
//! `vigil proxy` streaming from it, and an upstream that echoes what reached it.
//! Service-account tokens, the decision (allow, deny, unauthenticated), the
//! headers an upstream may believe, path tricks, revocation, and a proxy with no
//! snapshot.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{
    client, echo_upstream, join_token, patch_json, post_json, ControlProcess, ProxyProcess, TestCa,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use vigil_test_postgres::TestPostgres;

/// The status code of a raw HTTP/1.1 response (0 when there is none).
fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Sends `GET target` for `host`, with `headers` (lines ending in CRLF), as raw
/// HTTP/1.1 on a new connection, so that no client library tidies the target
/// first; returns the status and the body.
async fn raw_get(proxy: &ProxyProcess, target: &str, host: &str, headers: &str) -> (u16, String) {
    let request =
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n");
    let (text, closed) =
        support::send_raw(&proxy.url, request.as_bytes(), Duration::from_secs(10)).await;
    assert!(
        closed,
        "the proxy kept the connection open; it sent:\n{text}"
    );
    let body = text.split_once("\r\n\r\n").map_or("", |b| b.1).to_owned();
    (status_of(&text), body)
}

fn get(proxy: &ProxyProcess, host: &str, path: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .get(format!("{}{path}", proxy.url))
        .header("host", host)
        .timeout(Duration::from_secs(10))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_proxy_authorizes_every_request_from_its_snapshot() {
    let pg = TestPostgres::start().unwrap();
    let db = pg.create_database("proxy").unwrap();
    let cp = ControlProcess::start(&db);
    let c = client();
    let url = cp.url.clone();
    let upstream = echo_upstream().await;

    let robot = post_json(&c, &url, "/v1/service-accounts", json!({"name": "robot"})).await;
    let robot_token = robot["token"].as_str().unwrap().to_owned();
    let operator = post_json(
        &c,
        &url,
        "/v1/service-accounts",
        json!({"name": "operator"}),
    )
    .await;
    let operator_token = operator["token"].as_str().unwrap().to_owned();
    post_json(
        &c,
        &url,
        "/v1/policies",
        json!({"name": "robots", "document": {"allow": {"or": [{"service_account": "robot"}, {"service_account": "operator"}]}}}),
    )
    .await;
    post_json(
        &c,
        &url,
        "/v1/policies",
        json!({"name": "operators", "document": {"allow": {"and": [{"service_account": "operator"}]}}}),
    )
    .await;
    post_json(
        &c,
        &url,
        "/v1/routes",
        json!({"name": "app", "host": "app.test", "upstreams": [upstream], "policies": ["robots"],
               "settings": {"set_request_headers": {"x-team": "blue"}}}),
    )
    .await;
    post_json(
        &c,
        &url,
        "/v1/routes",
        json!({"name": "admin", "host": "app.test", "path": {"prefix": "/admin"}, "upstreams": [upstream], "policies": ["operators"]}),
    )
    .await;
    let token = join_token(&c, &url, "fleet").await;
    let proxy = ProxyProcess::start(&cp.grpc_url, &token, "proxy-a");
    proxy.wait_ready().await;

    // No credential: 401 with a challenge and a request id.
    let res = get(&proxy, "app.test", "/hello").send().await.unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["www-authenticate"], "Bearer realm=\"vigil\"");
    let body: Value = res.json().await.unwrap();
    assert!(body["request_id"].as_str().unwrap().len() == 32, "{body}");

    // A token that matches nothing is refused, not treated as anonymous.
    let res = get(&proxy, "app.test", "/hello")
        .bearer_auth("vgl_not-a-real-token")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert!(res.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("invalid_token"));

    // Allowed: what the upstream sees is what the proxy vouches for, never what the
    // client claimed.
    let res = get(&proxy, "app.test", "/hello?x=1")
        .bearer_auth(&robot_token)
        .header("x-vigil-user", "usr_admin")
        .header("x-vigil-service-account", "operator")
        .header("x-forwarded-for", "6.6.6.6")
        .header("forwarded", "for=6.6.6.6")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let seen: Value = res.json().await.unwrap();
    let h = &seen["headers"];
    assert_eq!(seen["target"], "/hello?x=1");
    assert_eq!(h["x-vigil-service-account"], "robot");
    assert_eq!(h.get("x-vigil-user"), None, "{seen}");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h.get("forwarded"), None);
    assert_eq!(h["x-forwarded-host"], "app.test");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-team"], "blue");
    assert_eq!(h.get("authorization"), None, "the token stays at the proxy");
    assert!(h["x-request-id"].as_str().unwrap().len() == 32);

    // The more specific route decides: the robot may not reach /admin, in any spelling.
    let res = get(&proxy, "app.test", "/admin/panel")
        .bearer_auth(&robot_token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let html = get(&proxy, "app.test", "/admin")
        .bearer_auth(&robot_token)
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(html.status(), 403);
    assert!(html.text().await.unwrap().contains("Request id"));
    let auth = format!("Authorization: Bearer {robot_token}\r\n");
    for (path, want) in [
        ("//admin", 403),
        ("/admin/", 403),
        ("/x/../admin", 403),
        ("/x/%2e%2e/admin", 403),
        ("/%61dmin/panel", 403),
        ("/./admin", 403),
        ("/x/%2E%2E/%2e/admin/panel", 403),
        ("/admin/..%2fpanel", 400),
        ("/admin%2f", 400),
        ("/admin%5c..", 400),
        ("/a%00", 400),
        ("/%ff", 400),
    ] {
        let (status, body) = raw_get(&proxy, path, "app.test", &auth).await;
        assert_eq!(status, want, "{path}: {body}");
    }
    // Host spellings reach the same route; the absolute form must agree with Host.
    for host in ["APP.test", "app.test.", "app.test:80"] {
        let (status, body) = raw_get(&proxy, "/admin", host, &auth).await;
        assert_eq!(status, 403, "{host}: {body}");
    }
    let (status, _) = raw_get(&proxy, "http://app.test/admin", "other.test", &auth).await;
    assert_eq!(status, 400);
    let underscored = format!("X_Vigil_User: usr_admin\r\n{auth}");
    let (status, _) = raw_get(&proxy, "/hello", "app.test", &underscored).await;
    assert_eq!(status, 400, "underscored header names are refused");

    // The operator reaches /admin; an unknown host is nobody's route.
    let res = get(&proxy, "app.test", "/admin/panel")
        .bearer_auth(&operator_token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let seen: Value = res.json().await.unwrap();
    assert_eq!(seen["target"], "/admin/panel");
    let res = get(&proxy, "other.test", "/")
        .bearer_auth(&operator_token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);

    // Revocation reaches the proxy with the next delta: the robot's next requests fail.
    patch_json(
        &c,
        &url,
        "/v1/service-accounts/robot",
        json!({"disabled": true}),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let res = get(&proxy, "app.test", "/hello")
            .bearer_auth(&robot_token)
            .send()
            .await
            .unwrap();
        if res.status() == 401 {
            break;
        }
        assert_eq!(res.status(), 200);
        assert!(
            Instant::now() < deadline,
            "the disabled account still gets in"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Every decision is logged (by a thread of the proxy's own, a moment after
    // the decision), without the token.
    let log = proxy.log_containing("service-account:robot").await;
    assert!(log.contains("decision"), "{log}");
    assert!(!log.contains(&robot_token), "a token reached the log");

    // And counted, by route and outcome, on the health listener.
    let metrics = reqwest::get(format!("{}/metrics", proxy.health_url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        r#"vigil_proxy_decisions_total{route="app",outcome="allow"}"#,
        r#"vigil_proxy_decisions_total{route="admin",outcome="deny"}"#,
        r#"vigil_proxy_requests_total{decision="edge",status="4xx"}"#,
        "vigil_proxy_stream_connected 1",
        "vigil_proxy_request_duration_seconds_bucket",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
    let version = metrics
        .lines()
        .find_map(|l| l.strip_prefix("vigil_proxy_snapshot_version "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap();
    assert!(version > 0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_without_a_snapshot_refuses_everything() {
    // Nothing listens on port 9: the proxy never gets a snapshot. (Its log is JSON.)
    let proxy = ProxyProcess::start_with(
        "http://127.0.0.1:9",
        "no-such-token",
        "lonely",
        &["--log-format".into(), "json".into()],
    );
    let res = get(&proxy, "app.test", "/")
        .bearer_auth("anything-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    // The refusal is one JSON object in the decision log, and no token in it.
    let line = proxy
        .log_line("a JSON decision line", |l| {
            l.contains(r#""target":"vigil::decision""#)
        })
        .await;
    let decision: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(decision["message"], "decision", "{line}");
    assert_eq!(decision["level"], "INFO", "{line}");
    assert_eq!(decision["status"], 503, "{line}");
    assert_eq!(decision["route"], "-", "{line}");
    assert!(
        decision["request_id"]
            .as_str()
            .is_some_and(|id| id.len() == 32),
        "{line}"
    );
    assert!(!proxy.log_text().contains("anything-secret"));
    let ready = reqwest::get(format!("{}/readyz", proxy.health_url))
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    assert!(ready.text().await.unwrap().contains("no policy snapshot"));
    let live = reqwest::get(format!("{}/healthz", proxy.health_url))
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
}

/// Reads what `s` sends until the proxy closes it (at most 20 s).
async fn read_until_closed(s: &mut tokio::net::TcpStream) -> String {
    let (text, closed) = support::read_until_closed(s, Duration::from_secs(20)).await;
    assert!(
        closed,
        "the proxy kept the connection open; it sent:\n{text}"
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_heads_and_idle_connections_are_closed() {
    let proxy = ProxyProcess::start_with(
        "http://127.0.0.1:9",
        "no-such-token",
        "impatient",
        &["--header-timeout-s".into(), "1".into()],
    );
    let addr = proxy.url.trim_start_matches("http://").to_owned();
    // A head that never ends: the connection is closed without a request made.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Slow: 1")
        .await
        .unwrap();
    let sent = read_until_closed(&mut slow).await;
    assert!(!sent.contains("HTTP/1.1 503"), "{sent}");
    // Nothing sent at all, and a keep-alive connection left idle after a
    // response: both closed too, the answer given first.
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    read_until_closed(&mut silent).await;
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .unwrap();
    let answered = read_until_closed(&mut idle).await;
    assert_eq!(status_of(&answered), 503, "{answered}");
    // An HTTP/2 connection (prior knowledge) with no stream open: closed too.
    let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::connect(&addr).await.unwrap());
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let req = hyper::Request::get(format!("http://{addr}/"))
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .unwrap();
    assert_eq!(h2.send_request(req).await.unwrap().status(), 503);
    tokio::time::timeout(Duration::from_secs(20), conn)
        .await
        .expect("an idle HTTP/2 connection is closed")
        .unwrap()
        .unwrap();
    // The setting is checked like any other.
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["proxy", "--header-timeout-s", "0"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("--header-timeout-s"), "{err}");
}

/// Connects over TLS with `sni`, trusting `ca`; sends a GET for `path`; returns the
/// certificate the server presented and the response's status.
async fn tls_get(
    addr: &str,
    ca: &rustls::pki_types::CertificateDer<'static>,
    sni: &str,
    path: &str,
) -> Result<(Vec<u8>, u16), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await;
    let status = status_of(&String::from_utf8_lossy(&out));
    Ok((presented, status))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_picks_the_certificate_by_sni_reloads_it_and_redirects_plain_http() {
    let dir = std::env::temp_dir().join(format!("vigil-proxy-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let test_ca = TestCa::new();
    let ca = test_ca.der.clone();
    let (crt, key, app_der) = test_ca.issue("app.test");
    std::fs::write(dir.join("app.test.crt"), crt).unwrap();
    std::fs::write(dir.join("app.test.key"), key).unwrap();
    let (crt, key, wild_der) = test_ca.issue("*.apps.test");
    std::fs::write(dir.join("_wildcard.apps.test.crt"), crt).unwrap();
    std::fs::write(dir.join("_wildcard.apps.test.key"), key).unwrap();
    let redirect_port = support::free_port();
    let proxy = ProxyProcess::start_with(
        "http://127.0.0.1:9",
        "no-such-token",
        "tls",
        &[
            "--tls-dir".into(),
            dir.display().to_string(),
            "--redirect-listen".into(),
            format!("127.0.0.1:{redirect_port}"),
        ],
    );
    let addr = proxy.url.trim_start_matches("http://").to_owned();

    // Each name gets its own certificate; HTTP runs over it (503: no snapshot yet).
    let (presented, status) = tls_get(&addr, &ca, "app.test", "/").await.unwrap();
    assert_eq!(presented, app_der);
    assert_eq!(status, 503);
    let (presented, _) = tls_get(&addr, &ca, "x.apps.test", "/").await.unwrap();
    assert_eq!(presented, wild_der);
    // A wildcard covers one label only, and there is no default certificate.
    assert!(tls_get(&addr, &ca, "a.b.apps.test", "/").await.is_err());
    assert!(tls_get(&addr, &ca, "other.test", "/").await.is_err());

    // New files for app.test are served without a restart.
    let (crt, key, renewed) = test_ca.issue("app.test");
    std::fs::write(dir.join("app.test.key"), key).unwrap();
    std::fs::write(dir.join("app.test.crt"), crt).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok((presented, _)) = tls_get(&addr, &ca, "app.test", "/").await {
            if presented == renewed {
                break;
            }
            assert_eq!(presented, app_der);
        }
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The plain listener only redirects, to the same host, path and query.
    let res = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("http://127.0.0.1:{redirect_port}/a/b?c=d"))
        .header("host", "App.Test")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 308);
    let port = addr.rsplit(':').next().unwrap();
    assert_eq!(
        res.headers()["location"],
        format!("https://app.test:{port}/a/b?c=d").as_str()
    );
}
