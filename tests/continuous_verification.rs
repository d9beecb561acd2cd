//! Continuous verification, end to end, with real processes: a control plane on a
//! throwaway PostgreSQL, two proxies, an upstream, and an identity provider whose
//! bearer JWTs the proxies verify offline (`support::JwtIssuer`). Time is moved by
//! the proxies' test clock (`--test-clock-file`), never by sleeping: a grant is
//! enforced by each proxy's own clock before its start, inside its window and after
//! its end with nothing pushed at expiry; a service account expires the same way;
//! a route's `max_auth_age_s` refuses a session signed in too long ago; and a
//! suspended user is refused at both proxies until unsuspended. And long streaming
//! responses (server-sent events over HTTP/1.1 and HTTP/2, a chunked download)
//! are cut when their caller is revoked, like WebSocket tunnels.
//!
//! Users authenticate with the identity provider's bearer JWTs (the step-up case
//! with a session cookie sealed with the fleet's cookie key): the proxies verify
//! either with no call to anyone, so the test exercises exactly the proxies'
//! decisions, and a token or cookie can be made to last past every clock jump.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use serde_json::{json, Value};
use support::{
    client, echo_upstream, eventually, get_json, join_token, patch_json, post_json, unix_now,
    ControlProcess, JwtIssuer, ProxyProcess, TestClock,
};
use vigil_test_postgres::TestPostgres;

/// The fleet's cookie key in this test (32 bytes, base64).
const COOKIE_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn rfc3339(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A request to `proxy` for `host`, with `auth` as the `Authorization` or `Cookie`
/// header; its status and body.
async fn call(proxy: &ProxyProcess, host: &str, auth: &(&str, String)) -> (u16, Value) {
    let res = reqwest::Client::new()
        .get(format!("{}/x", proxy.url))
        .header("host", host)
        .header(auth.0, &auth.1)
        .timeout(std::time::Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// Waits until both proxies answer `host` with `want` for `auth`; the last body.
async fn both(
    proxies: &[&ProxyProcess; 2],
    host: &str,
    auth: &(&str, String),
    want: u16,
    what: &str,
) -> Value {
    let mut last = Value::Null;
    for p in proxies {
        last = eventually(what, || async {
            let (status, body) = call(p, host, auth).await;
            if status == want {
                Ok(body)
            } else {
                Err(format!("{} answered {status} {body}", p.url))
            }
        })
        .await;
    }
    last
}

/// The snapshot version a proxy holds, from its metrics.
async fn version(p: &ProxyProcess) -> u64 {
    p.metric("vigil_proxy_snapshot_version").await.unwrap() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grants_expiry_step_up_and_suspension_by_the_proxies_own_clock() {
    let pg = TestPostgres::start().unwrap();
    let db = pg.create_database("verify").unwrap();
    let cp = ControlProcess::start(&db);
    let c = client();
    let url = cp.url.clone();
    let upstream = echo_upstream().await;
    let idp = JwtIssuer::start().await;
    let t0 = unix_now();

    post_json(
        &c,
        &url,
        "/v1/identity-providers",
        json!({"name": "corp", "issuer_url": idp.issuer, "client_id": "vigil"}),
    )
    .await;
    let ada = post_json(
        &c,
        &url,
        "/v1/users",
        json!({"issuer": idp.issuer, "subject": "ada", "email": "ada@example.com"}),
    )
    .await;
    let ada_id = ada["id"].as_str().unwrap().to_owned();
    let bot = post_json(
        &c,
        &url,
        "/v1/service-accounts",
        json!({"name": "ci-bot", "expires_at": rfc3339(t0 + 10_800)}),
    )
    .await;
    let bot_token = bot["token"].as_str().unwrap().to_owned();
    for (name, document) in [
        (
            "users",
            json!({"allow": {"and": [{"authenticated_user": true}]}}),
        ),
        (
            "bots",
            json!({"allow": {"and": [{"service_account": "ci-bot"}]}}),
        ),
        ("jit", json!({"allow": {"and": [{"grant": true}]}})),
    ] {
        post_json(
            &c,
            &url,
            "/v1/policies",
            json!({"name": name, "document": document}),
        )
        .await;
    }
    for route in [
        json!({"name": "app", "host": "app.test", "upstreams": [upstream], "policies": ["users", "bots"]}),
        json!({"name": "jit", "host": "jit.test", "upstreams": [upstream], "policies": ["jit"]}),
        json!({"name": "fresh", "host": "fresh.test", "upstreams": [upstream], "policies": ["users"],
               "settings": {"max_auth_age_s": 600}}),
    ] {
        post_json(&c, &url, "/v1/routes", route).await;
    }
    // Just-in-time access to `jit`, from an hour from now for an hour.
    let grant = post_json(
        &c,
        &url,
        "/v1/grants",
        json!({"subject": {"user": ada_id}, "route": "jit", "start": rfc3339(t0 + 3600),
               "end": rfc3339(t0 + 7200), "reason": "incident 42", "approver": "bob@example.com"}),
    )
    .await;
    let listed = get_json(&c, &url, "/v1/grants?route=jit").await;
    assert_eq!(listed["items"][0]["id"], grant["id"], "{listed}");
    assert_eq!(listed["items"][0]["approver"], "bob@example.com");

    let dir = std::env::temp_dir().join(format!("vigil-clock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let clock = TestClock::at(dir.join("offset"));
    clock.set(0);
    let token = join_token(&c, &url, "fleet").await;
    let extra = [
        "--test-clock-file".to_owned(),
        clock.path(),
        "--cookie-keys".to_owned(),
        format!("1:{COOKIE_KEY}"),
    ];
    let pa = ProxyProcess::start_with(&cp.grpc_url, &token, "proxy-a", &extra);
    let pb = ProxyProcess::start_with(&cp.grpc_url, &token, "proxy-b", &extra);
    pa.wait_ready().await;
    pb.wait_ready().await;
    for p in [&pa, &pb] {
        p.log_containing("TEST CLOCK IN USE").await;
    }
    let proxies = [&pa, &pb];

    // Ada's bearer token lasts past every jump of the clock below.
    let jwt = idp.sign(
        &json!({"iss": idp.issuer, "sub": "ada", "aud": "vigil", "iat": t0,
        "exp": t0 + 30 * 86_400, "email": "ada@example.com", "email_verified": true}),
    );
    let ada_auth = ("authorization", format!("Bearer {jwt}"));
    let bot_auth = ("authorization", format!("Bearer {bot_token}"));
    // A session signed in a minute ago, lasting 30 days, sealed as every proxy does.
    let keys = vigil_proxy::cookie::CookieKeys::new([(1u8, COOKIE_KEY)]).unwrap();
    let session = |host: &str| {
        let s = vigil_proxy::cookie::SessionCookie {
            sid: "ses_0123456789abcdef0123456789abcdef".into(),
            uid: ada_id.clone(),
            auth_time: t0 - 60,
            exp: t0 + 30 * 86_400,
            ..Default::default()
        };
        (
            "cookie",
            format!(
                "{}={}",
                vigil_proxy::cookie::NAME,
                keys.seal(&s, host).unwrap()
            ),
        )
    };

    // The identity provider's keys reach the proxies (fetched by the control plane,
    // sent in a delta): Ada gets in.
    let seen = both(&proxies, "app.test", &ada_auth, 200, "Ada never let in").await;
    assert_eq!(seen["headers"]["x-vigil-user"], ada_id.as_str());
    // Now (offset 0): before the grant's start, denied; the service account and a
    // fresh session are let in.
    both(&proxies, "jit.test", &ada_auth, 403, "jit before start").await;
    both(&proxies, "app.test", &bot_auth, 200, "bot at start").await;
    both(
        &proxies,
        "fresh.test",
        &session("fresh.test"),
        200,
        "fresh session",
    )
    .await;

    // Suspended: both proxies deny; unsuspended: allowed again.
    patch_json(
        &c,
        &url,
        &format!("/v1/users/{ada_id}"),
        json!({"status": "suspended"}),
    )
    .await;
    let body = both(&proxies, "app.test", &ada_auth, 403, "suspension").await;
    assert!(
        body["detail"].as_str().unwrap().contains("suspended"),
        "{body}"
    );
    patch_json(
        &c,
        &url,
        &format!("/v1/users/{ada_id}"),
        json!({"status": "active"}),
    )
    .await;
    both(&proxies, "app.test", &ada_auth, 200, "unsuspension").await;

    // From here on the control plane writes nothing: what changes is each proxy's
    // clock alone.
    let held = [version(&pa).await, version(&pb).await];

    // Inside the grant's window (1.5 h on): allowed at both. The session's sign-in
    // is now 1.5 h old: refused on the route that wants one in the last 10 minutes
    // (sign in again: 401), still fine on a route without that limit.
    clock.set(5400);
    both(
        &proxies,
        "jit.test",
        &ada_auth,
        200,
        "jit inside its window",
    )
    .await;
    let body = both(
        &proxies,
        "fresh.test",
        &session("fresh.test"),
        401,
        "step-up",
    )
    .await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("sign-in in the last 600 s"),
        "{body}"
    );
    both(
        &proxies,
        "app.test",
        &session("app.test"),
        200,
        "old session elsewhere",
    )
    .await;

    // After the grant's end (2.5 h on): denied again, with nothing pushed.
    clock.set(9000);
    let body = both(&proxies, "jit.test", &ada_auth, 403, "jit after its end").await;
    assert!(body["request_id"].is_string(), "{body}");
    both(&proxies, "app.test", &bot_auth, 200, "bot before expiry").await;

    // After the service account's expiry (3 h 20 min on): its token is refused.
    clock.set(12_000);
    let body = both(&proxies, "app.test", &bot_auth, 401, "bot after expiry").await;
    assert!(
        body["detail"].as_str().unwrap().contains("expired"),
        "{body}"
    );
    both(&proxies, "app.test", &ada_auth, 200, "Ada after the jumps").await;

    assert_eq!(
        [version(&pa).await, version(&pb).await],
        held,
        "the proxies were sent something at expiry"
    );
    // Back to real time: the grant is not active yet again.
    clock.set(0);
    both(
        &proxies,
        "jit.test",
        &ada_auth,
        403,
        "jit back at the start",
    )
    .await;

    // Inside the window again, then the grant deleted through the REST API: both
    // proxies deny Ada's next request.
    clock.set(5400);
    both(&proxies, "jit.test", &ada_auth, 200, "jit inside again").await;
    let gid = grant["id"].as_str().unwrap();
    let res = c
        .delete(format!("{url}/v1/grants/{gid}"))
        .header("if-match", "*")
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "DELETE grant: {}", res.status());
    both(&proxies, "jit.test", &ada_auth, 403, "jit grant deleted").await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// An upstream that streams forever over HTTP/1.1 chunked encoding: `/events` as
/// server-sent events, anything else as a download; a chunk every 100 ms until the
/// proxy goes away. Returns its base URL.
async fn endless_upstream() -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let events = String::from_utf8_lossy(&head).starts_with("GET /events");
                let kind = if events {
                    "text/event-stream"
                } else {
                    "application/octet-stream"
                };
                let start = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: {kind}\r\ntransfer-encoding: chunked\r\n\r\n"
                );
                if conn.write_all(start.as_bytes()).await.is_err() {
                    return;
                }
                for n in 0u64.. {
                    let data = format!("data: {n}\n\n");
                    let chunk = format!("{:x}\r\n{data}\r\n", data.len());
                    if conn.write_all(chunk.as_bytes()).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            });
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_streaming_responses_end_when_their_caller_is_revoked() {
    use std::time::Duration;
    let pg = TestPostgres::start().unwrap();
    let db = pg.create_database("streams").unwrap();
    let cp = ControlProcess::start(&db);
    let c = client();
    let url = cp.url.clone();
    let upstream = endless_upstream().await;
    let feeder = post_json(&c, &url, "/v1/service-accounts", json!({"name": "feeder"})).await;
    let token = feeder["token"].as_str().unwrap().to_owned();
    post_json(
        &c,
        &url,
        "/v1/routes",
        json!({"name": "feed", "host": "feed.test", "upstreams": [upstream],
               "policy": {"allow": {"and": [{"service_account": "feeder"}]}}}),
    )
    .await;
    let join = join_token(&c, &url, "fleet").await;
    let proxy = ProxyProcess::start(&cp.grpc_url, &join, "streams");
    proxy.wait_ready().await;

    let open = |path: &'static str| {
        let (base, token) = (proxy.url.clone(), token.clone());
        async move {
            let res = reqwest::Client::new()
                .get(format!("{base}{path}"))
                .header("host", "feed.test")
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200, "{path}");
            res
        }
    };
    let mut events = open("/events").await;
    let mut download = open("/download").await;
    // And events over HTTP/2 (prior knowledge on the plain listener).
    let tcp = tokio::net::TcpStream::connect(proxy.url.trim_start_matches("http://"))
        .await
        .unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get("http://feed.test/events")
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .unwrap();
    let res = h2.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let mut over_h2 = res.into_body();
    // Both stream for well over a second (so both are registered, the download
    // lazily, the events at once).
    for _ in 0..15 {
        for res in [&mut events, &mut download] {
            let chunk = res.chunk().await.unwrap().unwrap();
            assert!(chunk.starts_with(b"data: "), "{chunk:?}");
        }
        let frame = http_body_util::BodyExt::frame(&mut over_h2)
            .await
            .unwrap()
            .unwrap();
        assert!(frame.into_data().unwrap().starts_with(b"data: "));
    }
    eventually("both streams watched", || async {
        match proxy.metric("vigil_proxy_streams_watched").await {
            Some(3.0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Revoked through the REST API: both bodies are cut.
    patch_json(
        &c,
        &url,
        "/v1/service-accounts/feeder",
        json!({"disabled": true}),
    )
    .await;
    let revoked = std::time::Instant::now();
    for (what, res) in [("events", &mut events), ("download", &mut download)] {
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match res.chunk().await {
                    Ok(Some(_)) => {}
                    Ok(None) => return "clean end",
                    Err(_) => return "cut",
                }
            }
        })
        .await;
        // A chunked body that stops without its last chunk is an error to the
        // client: the proxy cut it rather than ending it as if complete.
        assert_eq!(ended, Ok("cut"), "{what} after the revocation");
        println!(
            "{what} cut {} ms after the revocation's 2xx",
            revoked.elapsed().as_millis()
        );
    }
    // Over HTTP/2 the stream is reset (an error, not an end).
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match http_body_util::BodyExt::frame(&mut over_h2).await {
                Some(Ok(_)) => {}
                None => return "clean end",
                Some(Err(_)) => return "reset",
            }
        }
    })
    .await;
    assert_eq!(ended, Ok("reset"), "HTTP/2 events after the revocation");
    assert_eq!(
        proxy
            .metric(r#"vigil_proxy_streams_closed_total{by="verification"}"#)
            .await,
        Some(3.0)
    );
    assert_eq!(proxy.metric("vigil_proxy_streams_watched").await, Some(0.0));
    // The decision log is written by a thread of its own: the lines follow.
    let is_closed = |l: &&str| l.contains("decision=\"closed\"") || l.contains("decision=closed");
    let log = eventually("three closed decisions in the log", || async {
        let log = proxy.log_text();
        if log.lines().filter(is_closed).count() >= 3 {
            Ok(log)
        } else {
            Err(log)
        }
    })
    .await;
    let closed: Vec<&str> = log.lines().filter(is_closed).collect();
    assert_eq!(closed.len(), 3, "closed decisions:\n{log}");
    for line in closed {
        assert!(line.contains("the service account is disabled"), "{line}");
        assert!(line.contains("service-account:feeder"), "{line}");
    }
    assert!(!log.contains(&token), "a token reached the log");
    // And a new request is refused like any other.
    let res = reqwest::Client::new()
        .get(format!("{}/events", proxy.url))
        .header("host", "feed.test")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
}
