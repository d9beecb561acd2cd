//! `vigil all-in-one`: the control plane on an embedded SQLite file and one
//! proxy subscribed to it over real gRPC on loopback, in one process, with
//! development keys kept in the data directory. With `--demo` it also serves a
//! small demo application and seeds a route, a policy and a service account
//! for it, checks them through the proxy, and prints the commands to try.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use clap::Args;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tower::ServiceExt as _;

use crate::keys::Keys;
use crate::{config, ControlArgs, DatabaseArgs, ProxyArgs};

/// `vigil all-in-one` flags.
#[derive(Args, Serialize, Clone)]
pub struct AllInOneArgs {
    /// Directory of the embedded database, the development keys and the last
    /// good snapshot.
    #[arg(long, env = "VIGIL_DATA_DIR", default_value = "vigil-data")]
    data_dir: PathBuf,
    /// The store (default: the SQLite file `vigil.db` in the data directory);
    /// `postgres://...` works too.
    #[arg(long, env = "VIGIL_DATABASE_URL", hide_env_values = true)]
    #[serde(serialize_with = "config::redact_url")]
    database_url: Option<String>,
    /// Address of the admin API.
    #[arg(long, env = "VIGIL_ADMIN_LISTEN", default_value = "127.0.0.1:8080")]
    admin_listen: SocketAddr,
    /// Address of the snapshot stream (the proxy inside subscribes here; others may too).
    #[arg(long, env = "VIGIL_GRPC_LISTEN", default_value = "127.0.0.1:8443")]
    grpc_listen: SocketAddr,
    /// Address the proxy serves on (plain HTTP unless `--tls-dir`).
    #[arg(long, env = "VIGIL_PROXY_LISTEN", default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// The proxy's certificates by SNI (see `vigil proxy --help`).
    #[arg(long, env = "VIGIL_PROXY_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// Address of the proxy's `/healthz`, `/readyz` and `/metrics`.
    #[arg(
        long,
        env = "VIGIL_PROXY_HEALTH_LISTEN",
        default_value = "127.0.0.1:9091"
    )]
    health_listen: SocketAddr,
    /// Serve a demo application and seed a route, a policy and a service
    /// account for it (kept if they exist), then print commands to try.
    #[arg(long, env = "VIGIL_DEMO")]
    demo: bool,
    /// Address of the demo application (the demo route's upstream).
    #[arg(long, env = "VIGIL_DEMO_LISTEN", default_value = "127.0.0.1:8081")]
    demo_listen: SocketAddr,
}

/// The demo route's host: `*.localhost` names resolve to loopback in curl and
/// in browsers, so no DNS or hosts file is needed.
const DEMO_HOST: &str = "demo.localhost";

/// An address to connect to for a listen address (`0.0.0.0` → loopback).
fn connectable(addr: SocketAddr) -> SocketAddr {
    let mut a = addr;
    if a.ip().is_unspecified() {
        a.set_ip(if a.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    a
}

/// Runs the all-in-one until SIGTERM or Ctrl-C.
pub async fn run(args: AllInOneArgs) -> anyhow::Result<()> {
    let keys_dir = args.data_dir.join("keys");
    let (keys, made) = Keys::read_or_create(&keys_dir)
        .with_context(|| format!("development keys in {}", keys_dir.display()))?;
    if made {
        tracing::warn!(dir = %keys_dir.display(), "Generated DEVELOPMENT keys; for production generate keys with `vigil keys generate` and keep them in a secret store");
    }
    let database_url = args.database_url.clone().unwrap_or_else(|| {
        format!(
            "sqlite://{}?mode=rwc",
            args.data_dir.join("vigil.db").display()
        )
    });
    let file = |name: &str| Some(keys_dir.join(name));
    let control_args = ControlArgs {
        db: DatabaseArgs {
            database_url: Some(database_url),
            database_url_file: None,
        },
        admin_listen: args.admin_listen,
        migrate: true,
        bootstrap_token: None,
        bootstrap_token_file: file("bootstrap.token"),
        secret_key: None,
        secret_key_file: file("secret.key"),
        grpc_listen: args.grpc_listen,
        grpc_tls_cert: None,
        grpc_tls_key: None,
        signing_key: None,
        signing_key_file: file("signing.key"),
        fleet_join_token: None,
        fleet_join_token_file: file("join.token"),
        database_max_connections: None,
        admin_max_connections: None,
        // `vigil control`'s default.
        reverify_interval_s: 300,
        reverify_rate: vigil_control::verifier::PER_PROVIDER_PER_SECOND,
        reverify_concurrency: vigil_control::verifier::IN_FLIGHT,
        session_idle_timeout_s: 28_800,
    };
    let proxy_args = ProxyArgs {
        listen: args.listen,
        tls_dir: args.tls_dir.clone(),
        client_ca_file: None,
        redirect_listen: None,
        redirect_https_port: None,
        health_listen: args.health_listen,
        control_plane: vec![format!("http://{}", connectable(args.grpc_listen))],
        join_token: None,
        join_token_file: file("join.token"),
        control_plane_ca: None,
        snapshot_keys: Vec::new(),
        snapshot_keys_file: file("snapshot-keys.pub"),
        proxy_id: Some("all-in-one".into()),
        snapshot_file: Some(args.data_dir.join("snapshot.bin")),
        cookie_keys: Vec::new(),
        cookie_keys_file: file("cookie.keys"),
        trusted_proxies: Vec::new(),
        authenticate_url: None,
        return_ports: Vec::new(),
        assertion_key_file: file("assertion.pem"),
        session_lifetime_s: 43_200,
        header_timeout_s: 30,
        max_connections: None,
        test_clock_file: None,
    };
    let (control_tx, control_rx) = tokio::sync::oneshot::channel();
    let (proxy_tx, proxy_rx) = tokio::sync::oneshot::channel();
    let control = tokio::spawn(crate::control(control_args, Some(control_tx)));
    let proxy = tokio::spawn(crate::proxy(proxy_args, Some(proxy_tx)));
    let demo_app = if args.demo {
        let listener = tokio::net::TcpListener::bind(args.demo_listen)
            .await
            .with_context(|| format!("binding the demo application to {}", args.demo_listen))?;
        Some(tokio::spawn(async move {
            axum::serve(listener, demo_app())
                .with_graceful_shutdown(crate::shutdown_signal())
                .await
        }))
    } else {
        None
    };
    let intro = {
        let args = args.clone();
        let bootstrap = keys.bootstrap_token.clone();
        tokio::spawn(async move {
            let (Ok(control), Ok(proxy)) = (control_rx.await, proxy_rx.await) else {
                return; // one of them failed to start: its error is reported below
            };
            if let Err(e) = introduce(&args, &bootstrap, control, proxy).await {
                tracing::error!(error = format!("{e:#}"), "The demo could not be set up");
            }
        })
    };
    // The first to end (with an error, or both on a signal) ends the process.
    let result = tokio::select! {
        r = control => r.context("the control plane task")?.context("control plane"),
        r = proxy => r.context("the proxy task")?.context("proxy"),
    };
    intro.abort();
    if let Some(d) = demo_app {
        d.abort();
    }
    result
}

/// The demo seed (when asked for), the check through the proxy, and what to try.
async fn introduce(
    args: &AllInOneArgs,
    bootstrap: &str,
    control: vigil_control::Control,
    proxy: vigil_proxy::subscriber::Handle,
) -> anyhow::Result<()> {
    let admin = format!("http://{}", connectable(args.admin_listen));
    let scheme = if args.tls_dir.is_some() {
        "https"
    } else {
        "http"
    };
    let port = args.listen.port();
    let token_file = args.data_dir.join("keys").join("bootstrap.token");
    let mut out = String::new();
    out.push_str(&format!(
        "\nVigil all-in-one is running. DEVELOPMENT SETUP: generated keys in {}, {}.\n\n",
        args.data_dir.join("keys").display(),
        if args.tls_dir.is_some() {
            "HTTPS proxy"
        } else {
            "plain-HTTP proxy"
        }
    ));
    out.push_str(&format!(
        "  Admin API   {admin}   (owner token in {})\n",
        token_file.display()
    ));
    out.push_str(&format!("  Proxy       {scheme}://<route host>:{port}\n"));
    out.push_str(&format!(
        "  Health      http://{}/readyz   metrics at /metrics\n",
        connectable(args.health_listen)
    ));
    if args.demo {
        let token = seed(&control, bootstrap, args.demo_listen).await?;
        let url = format!("{scheme}://{DEMO_HOST}:{port}");
        let target = connectable(args.listen);
        out.push_str(&format!(
            "\nA demo route `demo` ({DEMO_HOST} → the demo app on {}) lets the service account\n\
             `demo-bot` in, except under /admin.",
            args.demo_listen
        ));
        if args.tls_dir.is_none() {
            let allowed = wait_for(&proxy, target, &token).await?;
            let admin_status = status_of(target, "/admin", Some(&token)).await?;
            let anonymous = status_of(target, "/hello", None).await?;
            out.push_str(&format!(
                " Checked just now through the proxy:\n\
                 GET /hello with the token → {allowed}, GET /admin with the token → {admin_status}, \
                 GET /hello without a token → {anonymous}."
            ));
        }
        out.push_str("\n\n");
        out.push_str("Try it:\n\n");
        out.push_str(&format!(
            "  # allowed: the service account's token (the app echoes the identity Vigil adds)\n  \
             curl -s -H 'Authorization: Bearer {token}' {url}/hello\n\n"
        ));
        out.push_str(&format!(
            "  # denied with 403: the policy refuses /admin to everyone\n  \
             curl -s -H 'Authorization: Bearer {token}' {url}/admin\n\n"
        ));
        out.push_str(&format!(
            "  # denied with 401: no credentials\n  curl -si {url}/hello\n\n"
        ));
    }
    out.push_str(&format!(
        "  # the admin API (see docs/api.md): routes, policies, who is connected\n  \
         export VIGIL_TOKEN=$(cat {})\n  \
         curl -s -H \"Authorization: Bearer $VIGIL_TOKEN\" {admin}/v1/routes\n  \
         curl -s -H \"Authorization: Bearer $VIGIL_TOKEN\" {admin}/v1/proxies\n\n\
         Stop with Ctrl-C; the data directory keeps the store and the keys for next time.\n",
        token_file.display()
    ));
    println!("{out}");
    Ok(())
}

/// Sends one request to the in-process admin API.
async fn call(
    control: &vigil_control::Control,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<(StatusCode, Value)> {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .context("building a request")?;
    let res = vigil_control::router(control.clone())
        .oneshot(req)
        .await
        .context("the admin API")?;
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .context("reading the admin API's answer")?;
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Ok((status, value))
}

/// Creates what the demo needs unless it exists; returns the service
/// account's token (a new one each start, since tokens are shown only once).
async fn seed(
    control: &vigil_control::Control,
    bootstrap: &str,
    upstream: SocketAddr,
) -> anyhow::Result<String> {
    let objects = [
        (
            "/v1/policies",
            "demo",
            json!({
                "name": "demo",
                "description": "The demo: the demo-bot service account, never /admin",
                "document": {
                    "deny": {"or": [{"http_path": {"starts_with": "/admin"}}]},
                    "allow": {"and": [{"service_account": "demo-bot"}]}
                }
            }),
        ),
        (
            "/v1/service-accounts",
            "demo-bot",
            json!({"name": "demo-bot", "description": "Calls the demo route"}),
        ),
        (
            "/v1/routes",
            "demo",
            json!({
                "name": "demo",
                "host": DEMO_HOST,
                "upstreams": [format!("http://{}", connectable(upstream))],
                "policies": ["demo"]
            }),
        ),
    ];
    let mut token = None;
    for (path, name, body) in objects {
        let (status, _) = call(
            control,
            bootstrap,
            Method::GET,
            &format!("{path}/{name}"),
            None,
        )
        .await?;
        if status == StatusCode::OK {
            continue;
        }
        let (status, answer) = call(control, bootstrap, Method::POST, path, Some(body)).await?;
        if !status.is_success() {
            bail!("creating {path}/{name}: {status} {answer}");
        }
        if let Some(t) = answer.get("token").and_then(Value::as_str) {
            token = Some(t.to_owned());
        }
    }
    if let Some(t) = token {
        return Ok(t);
    }
    let (status, answer) = call(
        control,
        bootstrap,
        Method::POST,
        "/v1/service-accounts/demo-bot/rotate-token",
        None,
    )
    .await?;
    match answer.get("token").and_then(Value::as_str) {
        Some(t) if status.is_success() => Ok(t.to_owned()),
        _ => bail!("rotating the demo token: {status} {answer}"),
    }
}

/// Waits (up to 20 s) until the proxy lets the demo token through; its status.
async fn wait_for(
    proxy: &vigil_proxy::subscriber::Handle,
    target: SocketAddr,
    token: &str,
) -> anyhow::Result<u16> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut version = proxy.version.clone();
    loop {
        let status = status_of(target, "/hello", Some(token)).await?;
        if status == 200 || tokio::time::Instant::now() > deadline {
            return Ok(status);
        }
        // The next snapshot, or a short pause (the seed may already be in).
        let _ = tokio::time::timeout(Duration::from_millis(200), version.changed()).await;
    }
}

/// The status of one plain HTTP/1.1 request to the demo host through the proxy.
async fn status_of(target: SocketAddr, path: &str, token: Option<&str>) -> anyhow::Result<u16> {
    let mut stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(target),
    )
    .await
    .context("connecting to the proxy")?
    .context("connecting to the proxy")?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {DEMO_HOST}\r\nUser-Agent: vigil-all-in-one\r\nAccept: application/json\r\n{auth}Connection: close\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .context("reading from the proxy")??;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    line.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("the proxy answered `{}`", line.lines().next().unwrap_or("")))
}

/// The demo application: says hello and echoes the identity Vigil forwarded.
fn demo_app() -> axum::Router {
    axum::Router::new().fallback(|req: Request<Body>| async move {
        let identity: serde_json::Map<String, Value> = req
            .headers()
            .iter()
            .filter(|(k, _)| {
                k.as_str().starts_with("x-vigil-") || k.as_str().starts_with("x-forwarded-")
            })
            .map(|(k, v)| {
                let v = v.to_str().unwrap_or("<binary>");
                // The assertion is long; its start is enough to show it is there.
                let v = if v.len() > 60 {
                    format!("{}...", &v[..60])
                } else {
                    v.to_owned()
                };
                (k.as_str().to_owned(), Value::String(v))
            })
            .collect();
        axum::Json(json!({
            "app": "the Vigil demo application",
            "method": req.method().as_str(),
            "path": req.uri().path(),
            "headers_from_vigil": identity,
        }))
    })
}
