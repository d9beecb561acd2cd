//! What the proxy does beyond plain requests, end to end with real processes (a
//! throwaway PostgreSQL, `vigil control`, `vigil proxy`): WebSocket upgrades,
//! decided like any request and tunnelled only on the upstream's real 101, closed
//! when the caller is revoked; `https://` upstreams verified against the route's
//! CA; and CORS preflights forwarded unauthenticated only on routes that opt in.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};
use support::{
    client, echo_upstream, join_token, patch_json, post_json, ControlProcess, ProxyProcess, TestCa,
};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use vigil_test_postgres::TestPostgres;

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Serves WebSockets on `listener`, over TLS when `tls` is given: the first message
/// to a client is the `X-Vigil-Service-Account` the proxy sent, then every message
/// comes back as it was.
fn serve_websockets(listener: tokio::net::TcpListener, tls: Option<tokio_rustls::TlsAcceptor>) {
    async fn echo<S>(stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut seen = String::new();
        // The signature is tungstenite's.
        #[allow(clippy::result_large_err)]
        let callback = |req: &Request, res: Response| -> Result<Response, ErrorResponse> {
            seen = req
                .headers()
                .get("x-vigil-service-account")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned();
            Ok(res)
        };
        let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
            return;
        };
        if ws.send(Message::text(seen)).await.is_err() {
            return;
        }
        while let Some(Ok(m)) = ws.next().await {
            if m.is_close() {
                break;
            }
            if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                break;
            }
        }
    }
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => echo(tcp).await,
                    Some(acceptor) => {
                        if let Ok(s) = acceptor.accept(tcp).await {
                            echo(s).await;
                        }
                    }
                }
            });
        }
    });
}

/// A TLS acceptor with a certificate for 127.0.0.1 issued by `ca`, offering `alpn`.
fn acceptor(ca: &TestCa, alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
    let (cert, key, _) = ca.issue("127.0.0.1");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
        PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
    )
    .unwrap();
    let mut config = config;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// An HTTPS upstream (HTTP/1.1 and HTTP/2 by ALPN) answering every request with
/// JSON: the HTTP version it came in, its target and the service account the proxy
/// vouched for. Returns its base URL.
async fn https_upstream(ca: &TestCa) -> String {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = acceptor(ca, &[b"h2", b"http/1.1"]);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let tls = tls.clone();
            tokio::spawn(async move {
                let Ok(stream) = tls.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(|req: hyper::Request<_>| async move {
                    let (head, body) = req.into_parts();
                    let body = http_body_util::BodyExt::collect(body).await.ok();
                    let trailers: Vec<&str> = body
                        .as_ref()
                        .and_then(|b| b.trailers())
                        .map(|t| t.keys().map(|k| k.as_str()).collect())
                        .unwrap_or_default();
                    let seen = json!({
                        "version": format!("{:?}", head.version),
                        "target": head.uri.path(),
                        "service_account": head.headers.get("x-vigil-service-account")
                            .and_then(|v| v.to_str().ok()),
                        "trailers": trailers,
                    });
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(seen.to_string()))
                });
                // hyper-util's `server-auto` comes with vigil-proxy's build of it.
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    format!("https://{addr}")
}

/// Sends `request` as raw bytes on a new connection to `proxy` (no client library
/// to tidy it); returns the response's status and body.
async fn raw(proxy: &ProxyProcess, request: &str) -> (u16, String) {
    let (text, closed) =
        support::send_raw(&proxy.url, request.as_bytes(), Duration::from_secs(10)).await;
    assert!(
        closed,
        "the proxy kept the connection open; it sent:\n{text}"
    );
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |b| b.1).to_owned();
    (status, body)
}

/// Opens a WebSocket to `host` + `path` through `proxy`, with `token` when given.
async fn ws_connect(
    proxy: &ProxyProcess,
    host: &str,
    path: &str,
    token: Option<&str>,
) -> Result<Ws, WsError> {
    let addr = proxy.url.trim_start_matches("http://");
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("ws://{host}{path}").into_client_request().unwrap();
    if let Some(t) = token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(req, tcp),
    )
    .await
    .unwrap()?;
    Ok(ws)
}

/// The status and body of a refused WebSocket handshake.
fn refused(r: Result<Ws, WsError>) -> (u16, String) {
    match r {
        Err(WsError::Http(res)) => (
            res.status().as_u16(),
            res.body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).to_string())
                .unwrap_or_default(),
        ),
        Err(e) => panic!("expected an HTTP answer, got {e}"),
        Ok(_) => panic!("expected a refusal, got a WebSocket"),
    }
}

/// The next text message, within 10 s.
async fn next_text(ws: &mut Ws) -> String {
    let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    m.to_text().unwrap().to_owned()
}

/// Starts PostgreSQL, the control plane with a `robot` service account and a
/// `robots` policy allowing it, and returns them with the robot's token.
async fn control() -> (TestPostgres, ControlProcess, String) {
    let pg = TestPostgres::start().unwrap();
    let db = pg.create_database("upgrades").unwrap();
    let cp = ControlProcess::start(&db);
    let c = client();
    let robot = post_json(
        &c,
        &cp.url,
        "/v1/service-accounts",
        json!({"name": "robot"}),
    )
    .await;
    post_json(
        &c,
        &cp.url,
        "/v1/policies",
        json!({"name": "robots", "document": {"allow": {"or": [{"service_account": "robot"}]}}}),
    )
    .await;
    let token = robot["token"].as_str().unwrap().to_owned();
    (pg, cp, token)
}

async fn route(cp: &ControlProcess, name: &str, upstream: &str, settings: Value) {
    post_json(
        &client(),
        &cp.url,
        "/v1/routes",
        json!({"name": name, "host": format!("{name}.test"), "upstreams": [upstream],
               "policies": ["robots"], "settings": settings}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_are_decided_tunnelled_and_closed_on_revocation() {
    let (_pg, cp, robot) = control().await;
    let ws_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_upstream = format!("http://{}", ws_listener.local_addr().unwrap());
    serve_websockets(ws_listener, None);
    // An upstream that answers every request, an upgrade too, with a plain 200.
    let plain = echo_upstream().await;
    route(&cp, "chat", &ws_upstream, json!({})).await;
    route(
        &cp,
        "nows",
        &ws_upstream,
        json!({"allow_websockets": false}),
    )
    .await;
    route(&cp, "plain", &plain, json!({})).await;
    let join = join_token(&client(), &cp.url, "fleet").await;
    let proxy = ProxyProcess::start(&cp.grpc_url, &join, "upgrades");
    proxy.wait_ready().await;

    // Allowed: a tunnel to the upstream, which saw who the proxy vouched for.
    let mut ws = ws_connect(&proxy, "chat.test", "/socket", Some(&robot))
        .await
        .unwrap();
    assert_eq!(next_text(&mut ws).await, "robot");
    for text in ["hello", "again"] {
        ws.send(Message::text(text)).await.unwrap();
        assert_eq!(next_text(&mut ws).await, text);
    }
    assert_eq!(proxy.metric("vigil_proxy_tunnels_open").await, Some(1.0));
    // The tunnel is the client's connection still: it holds its place under the
    // connection limit (the HTTP exchange that opened it has ended).
    assert_eq!(
        proxy.metric("vigil_proxy_connections_open").await,
        Some(1.0)
    );

    // No credential: 401, like any request; no upgrade on a route that turns
    // them off: 403 naming the setting.
    let (status, _) = refused(ws_connect(&proxy, "chat.test", "/socket", None).await);
    assert_eq!(status, 401);
    let (status, _) = refused(ws_connect(&proxy, "chat.test", "/socket", Some("vgl_nope")).await);
    assert_eq!(status, 401);
    let (status, body) = refused(ws_connect(&proxy, "nows.test", "/socket", Some(&robot)).await);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("allow_websockets"), "{body}");

    // An upstream that answers 200 instead of 101: its answer comes back, no tunnel.
    let (status, body) = refused(ws_connect(&proxy, "plain.test", "/socket", Some(&robot)).await);
    assert_eq!(status, 200, "{body}");
    let seen: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["headers"]["x-vigil-service-account"], "robot");
    assert_eq!(proxy.metric("vigil_proxy_tunnels_open").await, Some(1.0));

    // Revoked through the REST API: the proxy closes the open tunnel.
    patch_json(
        &client(),
        &cp.url,
        "/v1/service-accounts/robot",
        json!({"disabled": true}),
    )
    .await;
    let revoked = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(m)) if m.is_close() => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    let took = revoked.elapsed();
    assert!(ended.is_ok(), "the tunnel stayed open after the revocation");
    println!(
        "WebSocket closed {} ms after the revocation's 2xx",
        took.as_millis()
    );
    // The proxy unregisters the tunnel before it ends the connection, and its
    // place under the connection limit is given back (the refused upgrades'
    // connections close too).
    assert_eq!(proxy.metric("vigil_proxy_tunnels_open").await, Some(0.0));
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.metric("vigil_proxy_connections_open").await != Some(0.0) {
        assert!(
            Instant::now() < deadline,
            "the closed tunnel still holds a connection's place"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The decision log is written by a thread of its own: the line follows.
    let closed = proxy
        .log_line("a close in the decision log", |l| {
            l.contains("closed") && l.contains("service-account:robot")
        })
        .await;
    let log = proxy.log_text();
    assert!(
        closed.contains("the service account is disabled"),
        "{closed}"
    );
    assert!(closed.contains("chat"), "{closed}");
    assert!(!log.contains(&robot), "a token reached the log");
    // And a new upgrade is refused like any request.
    let (status, _) = refused(ws_connect(&proxy, "chat.test", "/socket", Some(&robot)).await);
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_are_verified_and_cors_preflights_opt_in() {
    let (_pg, cp, robot) = control().await;
    let ca = TestCa::new();
    let other_ca = TestCa::new();
    let secure = https_upstream(&ca).await;
    let ws_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let secure_ws = format!("https://{}", ws_listener.local_addr().unwrap());
    serve_websockets(ws_listener, Some(acceptor(&ca, &[])));
    let echo = echo_upstream().await;
    route(&cp, "secure", &secure, json!({"upstream_ca_pem": ca.pem})).await;
    route(
        &cp,
        "wrongca",
        &secure,
        json!({"upstream_ca_pem": other_ca.pem}),
    )
    .await;
    route(&cp, "publicca", &secure, json!({})).await;
    route(
        &cp,
        "securews",
        &secure_ws,
        json!({"upstream_ca_pem": ca.pem}),
    )
    .await;
    route(&cp, "cors", &echo, json!({"cors_preflight": true})).await;
    route(&cp, "nocors", &echo, json!({})).await;
    let join = join_token(&client(), &cp.url, "fleet").await;
    let proxy = ProxyProcess::start(&cp.grpc_url, &join, "https");
    proxy.wait_ready().await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let get = |host: &str| {
        http.get(format!("{}/x", proxy.url))
            .header("host", host)
            .bearer_auth(&robot)
    };

    // The route's CA verifies the upstream; ALPN picks HTTP/2.
    let res = get("secure.test").send().await.unwrap();
    assert_eq!(res.status(), 200);
    let seen: Value = res.json().await.unwrap();
    assert_eq!(seen["version"], "HTTP/2.0", "{seen}");
    assert_eq!(seen["target"], "/x");
    assert_eq!(seen["service_account"], "robot");
    // A chunked request's trailer fields go no further than the proxy: over HTTP/2
    // the upstream would take them as sent.
    let (status, body) = raw(
        &proxy,
        &format!(
            "POST /x HTTP/1.1\r\nHost: secure.test\r\nAuthorization: Bearer {robot}\r\nTransfer-Encoding: chunked\r\nTE: trailers\r\nTrailer: X-Vigil-Service-Account\r\nConnection: close\r\n\r\n2\r\nhi\r\n0\r\nX-Vigil-Service-Account: admin\r\nX-Vigil-User: usr_admin\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let seen: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["service_account"], "robot", "{seen}");
    assert_eq!(seen["trailers"], json!([]), "{seen}");

    // Another CA, or the public roots: 502 saying why.
    for host in ["wrongca.test", "publicca.test"] {
        let res = get(host).send().await.unwrap();
        assert_eq!(res.status(), 502, "{host}");
        assert_eq!(res.headers()["content-type"], "application/problem+json");
        let body: Value = res.json().await.unwrap();
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.contains("certificate"), "{host}: {detail}");
    }
    proxy.log_containing("Upstream certificate refused").await;

    // A WebSocket to an https:// upstream, verified the same way.
    let mut ws = ws_connect(&proxy, "securews.test", "/", Some(&robot))
        .await
        .unwrap();
    assert_eq!(next_text(&mut ws).await, "robot");
    ws.send(Message::text("over tls")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "over tls");
    ws.close(None).await.unwrap();

    // A preflight reaches the upstream unauthenticated only where the route opts in.
    let preflight = |host: &str| {
        http.request(reqwest::Method::OPTIONS, format!("{}/api", proxy.url))
            .header("host", host)
            .header("origin", "https://web.example")
            .header("access-control-request-method", "PUT")
    };
    let res = preflight("cors.test")
        .header("cookie", "app_session=secret")
        .header("x-http-method-override", "DELETE")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // Only the status and CORS headers come back: the route's content never does
    // (the echo upstream's JSON body is dropped).
    assert!(
        res.headers()
            .keys()
            .all(|k| k.as_str().starts_with("access-control-")
                || ["vary", "content-length", "date", "x-request-id"].contains(&k.as_str())),
        "{:?}",
        res.headers()
    );
    assert_eq!(res.text().await.unwrap(), "");
    assert_eq!(preflight("nocors.test").send().await.unwrap().status(), 401);
    // An OPTIONS with a body is no preflight: authenticated as usual, whether the
    // body has a length or comes in chunks.
    let res = preflight("cors.test").body("payload").send().await.unwrap();
    assert_eq!(res.status(), 401);
    let (status, body) = raw(
        &proxy,
        "OPTIONS /api HTTP/1.1\r\nHost: cors.test\r\nOrigin: https://web.example\r\nAccess-Control-Request-Method: PUT\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n7\r\npayload\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 401, "{body}");
    // Only a preflight: other requests, and OPTIONS without the CORS headers, are
    // authenticated as usual.
    let res = http
        .request(reqwest::Method::OPTIONS, format!("{}/api", proxy.url))
        .header("host", "cors.test")
        .header("origin", "https://web.example")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let res = http
        .get(format!("{}/api", proxy.url))
        .header("host", "cors.test")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    proxy
        .log_line("the preflight in the decision log", |l| {
            l.contains("cors-preflight")
                && (l.contains("route=\"cors\"") || l.contains("route=cors"))
        })
        .await;
}
