//! Browser sign-in end to end, with real parts only: a throwaway PostgreSQL, `vigil
//! control`, two `vigil proxy` processes serving HTTPS, an upstream, the certified
//! npm `oidc-provider` as the identity provider, and Debian's Chromium driven by
//! `playwright-core` (`tests/e2e/login.mjs`). `make deps` installs Chromium and the
//! npm packages; without them this test fails and says so.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::{
    client, echo_upstream, free_port, get_json, join_token, post_json, ControlProcess, Helper,
    ProxyProcess, TestCa,
};
use vigil_test_postgres::TestPostgres;

const CLIENT_SECRET: &str = "vigil-e2e-client-secret";
const COOKIE_KEY: &str = "1:AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";

/// The browser and the npm packages, or a failure that says how to get them.
fn require_browser_parts() {
    let dir = support::e2e_dir();
    for package in ["oidc-provider", "playwright-core"] {
        assert!(
            dir.join("node_modules").join(package).is_dir(),
            "npm package `{package}` is missing in {}: run `make deps`",
            dir.display()
        );
    }
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "Debian's chromium is missing: run `make deps`"
    );
}

/// A client of the proxies over HTTPS: the test CA trusted, every test host name
/// resolved to the proxy at `port`, redirects not followed.
fn https_client(ca: &TestCa, ports: &[(&str, u16)]) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10));
    for (host, port) in ports {
        b = b.resolve(host, ([127, 0, 0, 1], *port).into());
    }
    b.build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn browsers_sign_in_once_for_every_route_host_and_sign_out_everywhere() {
    require_browser_parts();
    let pg = TestPostgres::start().unwrap();
    let db = pg.create_database("login").unwrap();
    let cp = ControlProcess::start(&db);
    let c = client();
    let url = cp.url.clone();
    let upstream = echo_upstream().await;

    let idp_port = free_port();
    let issuer = format!("http://127.0.0.1:{idp_port}");
    let (port_a, port_b) = (free_port(), free_port());
    let auth = format!("https://auth.vigil.test:{port_a}");
    let app1 = format!("https://app1.vigil.test:{port_a}");
    let app2 = format!("https://app2.vigil.test:{port_b}");

    post_json(
        &c,
        &url,
        "/v1/identity-providers",
        json!({"name": "test-idp", "issuer_url": issuer, "client_id": "vigil",
               "client_secret": CLIENT_SECRET,
               "scopes": ["openid", "email", "profile", "groups"],
               "allowed_domains": ["example.com"]}),
    )
    .await;
    // Groups come from the IdP's claims, the domain from its verified email.
    post_json(
        &c,
        &url,
        "/v1/policies",
        json!({"name": "engineers", "document": {"allow": {"and": [{"groups": "engineering"}, {"domain": "example.com"}]}}}),
    )
    .await;
    for (name, host) in [("app1", "app1.vigil.test"), ("app2", "app2.vigil.test")] {
        post_json(
            &c,
            &url,
            "/v1/routes",
            json!({"name": name, "host": host, "upstreams": [upstream], "policies": ["engineers"]}),
        )
        .await;
    }

    // Both proxies serve every host over HTTPS and share the cookie key and the
    // authenticate host (which proxy A's port reaches).
    let ca = TestCa::new();
    let tls_dir = std::env::temp_dir().join(format!("vigil-login-tls-{}", std::process::id()));
    std::fs::create_dir_all(&tls_dir).unwrap();
    for host in ["app1.vigil.test", "app2.vigil.test", "auth.vigil.test"] {
        let (crt, key, _) = ca.issue(host);
        std::fs::write(tls_dir.join(format!("{host}.crt")), crt).unwrap();
        std::fs::write(tls_dir.join(format!("{host}.key")), key).unwrap();
    }
    let args = vec![
        "--tls-dir".to_owned(),
        tls_dir.display().to_string(),
        "--cookie-keys".to_owned(),
        COOKIE_KEY.to_owned(),
        "--authenticate-url".to_owned(),
        auth.clone(),
        // App 2 is reached at proxy B's port.
        "--return-ports".to_owned(),
        port_b.to_string(),
    ];
    let token = join_token(&c, &url, "fleet").await;
    let proxy_a = ProxyProcess::start_at(port_a, &cp.grpc_url, &token, "proxy-a", &args);
    let proxy_b = ProxyProcess::start_at(port_b, &cp.grpc_url, &token, "proxy-b", &args);
    proxy_a.wait_ready().await;
    proxy_b.wait_ready().await;

    let idp_cmd = support::idp_command(
        idp_port,
        &issuer,
        &format!("{auth}/.vigil/callback"),
        CLIENT_SECRET,
    );
    let idp = Helper::start("idp", idp_cmd, idp_port);

    // Without a browser: what the sign-in endpoints refuse.
    let h = https_client(
        &ca,
        &[
            ("auth.vigil.test", port_a),
            ("app1.vigil.test", port_a),
            ("app2.vigil.test", port_b),
        ],
    );
    let bh = "a".repeat(64);
    let sign_in = |rd: &str, bh: &str| {
        let q = [("rd", rd), ("bh", bh)];
        h.get(format!("{auth}/.vigil/sign_in")).query(&q).send()
    };
    for rd in [
        "https://evil.example/".to_owned(),
        format!("https://evil.example:{port_a}/"),
        format!("https://app1.vigil.test.evil.example:{port_a}/"),
        format!("https://user:pw@app1.vigil.test:{port_a}/"),
        "/relative".to_owned(),
        "javascript:alert(1)".to_owned(),
    ] {
        let res = sign_in(&rd, &bh).await.unwrap();
        assert_eq!(res.status(), 400, "rd={rd}");
        let text = res.text().await.unwrap();
        assert!(text.contains("return URL"), "rd={rd}: {text}");
    }
    let res = sign_in(&format!("{app1}/"), "short").await.unwrap();
    assert_eq!(res.status(), 400);
    // A good request goes to the IdP with PKCE, state and nonce.
    let res = sign_in(&format!("{app1}/x"), &bh).await.unwrap();
    assert_eq!(res.status(), 302);
    let to = res.headers()["location"].to_str().unwrap().to_owned();
    assert!(to.starts_with(&format!("{issuer}/auth?")), "{to}");
    for part in [
        "code_challenge_method=S256",
        "state=",
        "nonce=",
        "client_id=vigil",
    ] {
        assert!(to.contains(part), "{part} missing from {to}");
    }
    // A browser's page load without a session is sent to sign in (bound to this
    // browser by a cookie); an API client gets 401.
    let res = h
        .get(format!("{app1}/hello"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 302);
    let to = res.headers()["location"].to_str().unwrap();
    assert!(
        to.starts_with(&format!("{auth}/.vigil/sign_in?rd=")),
        "{to}"
    );
    let bind = res.headers()["set-cookie"].to_str().unwrap();
    assert!(
        bind.starts_with("__Host-vigil_bind=") && bind.contains("Secure"),
        "{bind}"
    );
    let res = h.get(format!("{app1}/hello")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    // Answers and codes that were never issued.
    let res = h
        .get(format!("{auth}/.vigil/callback?code=x&state=y"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let res = h
        .get(format!("{app1}/.vigil/handoff?code=forged"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);

    // The browser.
    let out = Command::new("node")
        .arg(support::e2e_dir().join("login.mjs"))
        .env("APP1", format!("{app1}/"))
        .env("APP2", format!("{app2}/"))
        .env("AUTH", &auth)
        .env("ISSUER", &issuer)
        .env("USER", "alice")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the browser flow failed:\n{stdout}\n{}\n--- proxy A ---\n{}\n--- proxy B ---\n{}\n--- idp ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        proxy_a.log_text(),
        proxy_b.log_text(),
        idp.log_text()
    );

    // The control plane knows the user (added on first sign-in) and the session,
    // revoked by the sign-out.
    let users = get_json(&c, &url, "/v1/users?subject=alice").await;
    let alice = &users["items"][0];
    assert_eq!(alice["email"], "alice@example.com", "{users}");
    assert_eq!(alice["issuer"], issuer);
    let sessions = get_json(&c, &url, "/v1/sessions").await;
    let items = sessions["items"].as_array().unwrap();
    assert!(
        items
            .iter()
            .any(|s| s["user_id"] == alice["id"] && s["revoked_at"].is_string()),
        "{sessions}"
    );
    std::fs::remove_dir_all(&tls_dir).ok();
}
