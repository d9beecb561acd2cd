//! mTLS end to end, with real processes: a throwaway PostgreSQL, `vigil control`,
//! and `vigil proxy` over TLS with `--client-ca-file`. Client certificates identify
//! devices (with a user or service account authenticating otherwise) and
//! authenticate service accounts on their own, by the SHA-256 of their public key;
//! revocation, posture, disabling and the policy's certificate criteria are
//! honoured; certificates from elsewhere fail the handshake.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{
    client, echo_upstream, join_token, patch_json, post_json, ClientCertificate, ControlProcess,
    ProxyProcess, TestCa, TestClock,
};
use vigil_test_postgres::TestPostgres;

const HOSTS: &[&str] = &[
    "open.vigil.test",
    "managed.vigil.test",
    "ci.vigil.test",
    "issuer.vigil.test",
    "fingerprint.vigil.test",
];

/// The device CA's subject, as RFC 4514 writes it (last RDN first).
const DEVICE_CA: &str = "CN=Vigil Test Device CA,O=Vigil Tests";

/// An HTTPS client (HTTP/1.1) for the proxy at `addr` that trusts `server_ca` and
/// presents `identity`, if any.
fn tls_client(
    addr: std::net::SocketAddr,
    server_ca: &TestCa,
    identity: Option<&ClientCertificate>,
) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(server_ca.pem.as_bytes()).unwrap())
        .https_only(true)
        .http1_only()
        .timeout(Duration::from_secs(10));
    for host in HOSTS {
        b = b.resolve(host, addr);
    }
    if let Some(id) = identity {
        b = b.identity(reqwest::Identity::from_pem(id.pem.as_bytes()).unwrap());
    }
    b.build().unwrap()
}

/// `GET https://host/` through `c`, with `bearer` if any: the status and the body.
async fn fetch(
    c: &reqwest::Client,
    port: u16,
    host: &str,
    bearer: Option<&str>,
) -> Result<(u16, Value), reqwest::Error> {
    let mut req = c.get(format!("https://{host}:{port}/"));
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    let res = req.send().await?;
    let status = res.status().as_u16();
    let body = res.json().await.unwrap_or(Value::Null);
    Ok((status, body))
}

/// Asks until the answer's status is `want` (the snapshot carrying a change reaches
/// the proxy a moment after the API answered); returns that answer's body.
async fn until_status(
    c: &reqwest::Client,
    port: u16,
    host: &str,
    bearer: Option<&str>,
    want: u16,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // A pooled connection the proxy closed as it was reused is asked again.
        let (status, body) = match fetch(c, port, host, bearer).await {
            Ok(answer) => answer,
            Err(e) if Instant::now() < deadline => {
                eprintln!("{host}: {e}; asking again");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => panic!("{host}: {e}"),
        };
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{host}: still {status}, not {want}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two requests on one HTTP/2 connection presenting `identity`: both statuses.
async fn two_over_h2(
    addr: std::net::SocketAddr,
    server_ca: &TestCa,
    identity: &ClientCertificate,
    host: &str,
    bearer: &str,
) -> (u16, u16) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server_ca.der.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![identity.der.clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(identity.key_der.clone().into()),
    )
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from(host.to_owned()).unwrap(),
            tcp,
        )
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let req = hyper::Request::get(format!("https://{host}/"))
            .header("authorization", format!("Bearer {bearer}"))
            .body(String::new())
            .unwrap();
        statuses.push(sender.send_request(req).await.unwrap().status().as_u16());
    }
    (statuses[0], statuses[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_certificates_identify_devices_and_service_accounts() {
    let pg = TestPostgres::start().unwrap();
    let db = pg.create_database("mtls").unwrap();
    let cp = ControlProcess::start(&db);
    let c = client();
    let url = cp.url.clone();
    let upstream = echo_upstream().await;

    // Two client CAs in one bundle; a third the proxy does not trust.
    let device_ca = TestCa::named(&[("O", "Vigil Tests"), ("CN", "Vigil Test Device CA")]);
    let service_ca = TestCa::named(&[("O", "Vigil Tests"), ("CN", "Vigil Test Service CA")]);
    let rogue_ca = TestCa::named(&[("O", "Vigil Tests"), ("CN", "Vigil Test Device CA")]);
    let laptop = device_ca.issue_client("laptop", false);
    let stray = device_ca.issue_client("stray", false);
    let expired = device_ca.issue_client("old-laptop", true);
    let ci_cert = service_ca.issue_client("ci", false);
    let rogue = rogue_ca.issue_client("laptop", false);

    // The API: fingerprints are checked, normalised, and one identity's only.
    let robot = post_json(&c, &url, "/v1/service-accounts", json!({"name": "robot"})).await;
    let robot_token = robot["token"].as_str().unwrap().to_owned();
    let shouting: Vec<String> = ci_cert
        .fingerprint
        .as_bytes()
        .chunks(2)
        .map(|p| std::str::from_utf8(p).unwrap().to_uppercase())
        .collect();
    let ci = post_json(
        &c,
        &url,
        "/v1/service-accounts",
        json!({"name": "ci", "client_certificate_sha256": shouting.join(":")}),
    )
    .await;
    assert_eq!(
        ci["client_certificate_sha256"],
        ci_cert.fingerprint.as_str()
    );
    let res = c
        .post(format!("{url}/v1/service-accounts"))
        .json(&json!({"name": "bad", "client_certificate_sha256": "abc"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 422);
    let problem: Value = res.json().await.unwrap();
    assert_eq!(
        problem["errors"][0]["pointer"],
        "/client_certificate_sha256"
    );
    let device = post_json(
        &c,
        &url,
        "/v1/devices",
        json!({"name": "laptop", "approved": true, "client_certificate_sha256": laptop.fingerprint}),
    )
    .await;
    let device_id = device["id"].as_str().unwrap().to_owned();
    for (path, body) in [
        (
            "/v1/service-accounts",
            json!({"name": "copycat", "client_certificate_sha256": laptop.fingerprint}),
        ),
        (
            "/v1/devices",
            json!({"name": "copycat", "client_certificate_sha256": ci_cert.fingerprint}),
        ),
    ] {
        let res = c
            .post(format!("{url}{path}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 422, "{path}");
        let problem: Value = res.json().await.unwrap();
        assert_eq!(
            problem["errors"][0]["pointer"],
            "/client_certificate_sha256"
        );
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("already the client certificate of"),
            "{problem}"
        );
    }
    let res = c
        .put(format!("{url}/v1/devices/{device_id}/posture"))
        .json(&json!({"attributes": {"managed": true}, "ttl_s": 3600}))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.text().await.unwrap());

    // Routes: one per criterion.
    let route = |name: &str, policy: Value| {
        json!({"name": name, "host": format!("{name}.vigil.test"), "path": {"prefix": "/"},
               "upstreams": [upstream.clone()], "policy": policy})
    };
    for body in [
        route(
            "open",
            json!({"allow": {"and": [{"service_account": "robot"}]}}),
        ),
        route(
            "managed",
            json!({"allow": {"and": [{"service_account": "robot"}, {"device/approved": true},
                                     {"device/managed": true}, {"device/posture_fresh": true}]}}),
        ),
        route("ci", json!({"allow": {"and": [{"service_account": "ci"}]}})),
        route(
            "issuer",
            json!({"allow": {"and": [{"service_account": "robot"},
                                     {"client_certificate/issuer": DEVICE_CA}]}}),
        ),
        route(
            "fingerprint",
            json!({"allow": {"and": [{"service_account": "robot"},
                                     {"client_certificate/fingerprint": {"in": [stray.fingerprint]}}]}}),
        ),
    ] {
        post_json(&c, &url, "/v1/routes", body).await;
    }

    // The proxy, over TLS, asking for client certificates.
    let dir = std::env::temp_dir().join(format!("vigil-mtls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let server_ca = TestCa::new();
    let (crt, key, _) = server_ca.issue("*.vigil.test");
    std::fs::write(dir.join("default.crt"), crt).unwrap();
    std::fs::write(dir.join("default.key"), key).unwrap();
    let bundle = dir.join("client-cas.pem");
    std::fs::write(&bundle, format!("{}{}", device_ca.pem, service_ca.pem)).unwrap();
    let token = join_token(&c, &url, "mtls").await;
    let clock = TestClock::at(dir.join("clock"));
    let proxy = ProxyProcess::start_with(
        &cp.grpc_url,
        &token,
        "mtls",
        &[
            "--tls-dir".into(),
            dir.display().to_string(),
            "--client-ca-file".into(),
            bundle.display().to_string(),
            "--test-clock-file".into(),
            clock.path(),
        ],
    );
    proxy.wait_ready().await;
    let addr: std::net::SocketAddr = proxy.url.trim_start_matches("http://").parse().unwrap();
    let port = addr.port();
    let anonymous = tls_client(addr, &server_ca, None);
    let with_laptop = tls_client(addr, &server_ca, Some(&laptop));
    let with_ci = tls_client(addr, &server_ca, Some(&ci_cert));
    let with_stray = tls_client(addr, &server_ca, Some(&stray));

    // No certificate: the bearer token works as before; no device, no managed route.
    let (status, body) = fetch(&anonymous, port, "open.vigil.test", Some(&robot_token))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["headers"]["x-vigil-service-account"], "robot");
    assert!(body["headers"].get("x-vigil-device").is_none(), "{body}");
    let (status, _) = fetch(&anonymous, port, "managed.vigil.test", Some(&robot_token))
        .await
        .unwrap();
    assert_eq!(status, 403);

    // A device's certificate names the device; the bearer token names the caller.
    let (status, body) = fetch(&with_laptop, port, "managed.vigil.test", Some(&robot_token))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["headers"]["x-vigil-service-account"], "robot");
    assert_eq!(body["headers"]["x-vigil-device"], device_id.as_str());
    // Alone, it authenticates nobody.
    let (status, _) = fetch(&with_laptop, port, "managed.vigil.test", None)
        .await
        .unwrap();
    assert_eq!(status, 401);
    // Every request of an HTTP/2 connection carries the connection's certificate.
    assert_eq!(
        two_over_h2(
            addr,
            &server_ca,
            &laptop,
            "managed.vigil.test",
            &robot_token
        )
        .await,
        (200, 200)
    );

    // A service account's certificate authenticates it on its own; a bearer token
    // of someone else alongside is refused.
    let (status, body) = fetch(&with_ci, port, "ci.vigil.test", None).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["headers"]["x-vigil-service-account"], "ci");
    let (status, body) = fetch(&with_ci, port, "ci.vigil.test", Some(&robot_token))
        .await
        .unwrap();
    assert_eq!(status, 401, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("client certificate authenticates service account `ci`"),
        "{body}"
    );
    let (status, _) = fetch(&anonymous, port, "ci.vigil.test", None)
        .await
        .unwrap();
    assert_eq!(status, 401);

    // A trusted certificate nobody registered: only the policy's certificate criteria see it.
    let (status, body) = fetch(&with_stray, port, "issuer.vigil.test", Some(&robot_token))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body["headers"].get("x-vigil-device").is_none(), "{body}");
    let (status, _) = fetch(
        &with_stray,
        port,
        "fingerprint.vigil.test",
        Some(&robot_token),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let (status, _) = fetch(
        &with_laptop,
        port,
        "fingerprint.vigil.test",
        Some(&robot_token),
    )
    .await
    .unwrap();
    assert_eq!(status, 403);
    let (status, _) = fetch(&with_laptop, port, "issuer.vigil.test", Some(&robot_token))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let other_issuer = tls_client(
        addr,
        &server_ca,
        Some(&service_ca.issue_client("unregistered", false)),
    );
    let (status, _) = fetch(&other_issuer, port, "issuer.vigil.test", Some(&robot_token))
        .await
        .unwrap();
    assert_eq!(status, 403, "the service CA is not the device CA");
    let (status, _) = fetch(&anonymous, port, "issuer.vigil.test", Some(&robot_token))
        .await
        .unwrap();
    assert_eq!(status, 403);

    // A certificate from an untrusted CA (even one with the same name), or an
    // expired one, fails the handshake.
    for (what, cert) in [("untrusted", &rogue), ("expired", &expired)] {
        let c = tls_client(addr, &server_ca, Some(cert));
        assert!(
            fetch(&c, port, "open.vigil.test", Some(&robot_token))
                .await
                .is_err(),
            "a {what} certificate was accepted"
        );
    }

    // Posture reported non-compliant: denied; compliant again: allowed.
    let res = c
        .put(format!("{url}/v1/devices/{device_id}/posture"))
        .json(&json!({"attributes": {"managed": false}, "ttl_s": 3600}))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success());
    until_status(
        &with_laptop,
        port,
        "managed.vigil.test",
        Some(&robot_token),
        403,
    )
    .await;
    let res = c
        .put(format!("{url}/v1/devices/{device_id}/posture"))
        .json(&json!({"attributes": {"managed": true}, "ttl_s": 3600}))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success());
    until_status(
        &with_laptop,
        port,
        "managed.vigil.test",
        Some(&robot_token),
        200,
    )
    .await;
    // The report expires (ttl_s 3600) by the proxy's own clock, with nothing
    // pushed: stale posture is not compliant. (The robot's token has no expiry.)
    clock.set(3700);
    until_status(
        &with_laptop,
        port,
        "managed.vigil.test",
        Some(&robot_token),
        403,
    )
    .await;
    clock.set(0);
    until_status(
        &with_laptop,
        port,
        "managed.vigil.test",
        Some(&robot_token),
        200,
    )
    .await;

    // The device revoked: everything from it is denied, whoever the caller is.
    patch_json(
        &c,
        &url,
        &format!("/v1/devices/{device_id}"),
        json!({"revoked": true}),
    )
    .await;
    let body = until_status(
        &with_laptop,
        port,
        "managed.vigil.test",
        Some(&robot_token),
        403,
    )
    .await;
    assert!(
        body["detail"].as_str().unwrap().contains("revoked"),
        "{body}"
    );
    let (status, _) = fetch(&with_laptop, port, "open.vigil.test", Some(&robot_token))
        .await
        .unwrap();
    assert_eq!(status, 403);
    let (status, _) = fetch(&anonymous, port, "open.vigil.test", Some(&robot_token))
        .await
        .unwrap();
    assert_eq!(status, 200);

    // The service account disabled: its certificate authenticates nobody.
    patch_json(
        &c,
        &url,
        "/v1/service-accounts/ci",
        json!({"disabled": true}),
    )
    .await;
    let body = until_status(&with_ci, port, "ci.vigil.test", None, 401).await;
    assert!(
        body["detail"].as_str().unwrap().contains("disabled"),
        "{body}"
    );

    // The decision log (written by a thread of its own, a moment after each
    // decision) names the device.
    proxy
        .log_line("a decision line naming the device", |l| {
            l.contains("decision") && l.contains("device=") && l.contains(&device_id)
        })
        .await;
}
