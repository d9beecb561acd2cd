//! Sign-in and session handling as an outside attacker tries them, end to end with
//! real parts: a throwaway PostgreSQL, `vigil control`, four `vigil proxy`
//! processes serving HTTPS, an upstream, and the npm `oidc-provider` as the
//! identity provider. The "browsers" here are HTTP clients with cookie jars of
//! their own (each host's cookies apart, as a browser keeps them), so that every
//! step of the sign-in can be replayed, swapped between browsers or tampered
//! with; the identity provider's development login page is filled in over HTTP.
//! `tests/browser_login.rs` drives the same flow in Chromium. `make deps` installs
//! Node.js and the npm packages.
//!
//! What is asserted, beyond `browser_login.rs`: return URLs on another port, of
//! another shape or too long are refused, also when the browser already has a
//! session (no handoff code is made for them); callbacks with missing, forged,
//! replayed or another browser's `state`, a replayed `code`, the provider's
//! `error=` (alone, and with a code), a forged `nonce`, and callbacks on a route
//! host all fail without a 5xx; handoff codes replayed, expired, tampered with,
//! truncated or oversized fail (a replay at the other proxy works only with the
//! browser's bind value: single use is per proxy, as documented); session
//! cookies tampered, truncated, from another host, sealed with a key the proxy
//! does not hold, sent twice, or handoff codes in their place are no
//! credential, and a huge Cookie header gets 431; the plain-HTTP listener only
//! redirects; another site cannot sign a user out, the site itself can, and then
//! both proxies refuse the session, also after a step-up (the first session
//! ends with the second); no proxy log line holds a code, a `state`, a
//! cookie, or a line forged through the provider's `error_description`.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use support::{
    client, echo_upstream, eventually, free_port, get_json, join_token, post_json, ControlProcess,
    Helper, ProxyProcess, TestCa, TestClock,
};
use vigil_proxy::cookie::{CookieKeys, SessionCookie};
use vigil_test_postgres::TestPostgres;

const CLIENT_SECRET: &str = "vigil-e2e-client-secret";
const KEY1: &str = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";
const KEY2: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
const SESSION: &str = "__Host-vigil_session";
const BIND: &str = "__Host-vigil_bind";
const LOGIN: &str = "__Host-vigil_login";

fn require_idp() {
    let dir = support::e2e_dir()
        .join("node_modules")
        .join("oidc-provider");
    assert!(
        dir.is_dir(),
        "npm package `oidc-provider` is missing in {}: run `make deps`",
        dir.display()
    );
}

/// One answer, as the tests look at it.
#[derive(Debug)]
struct Answer {
    status: u16,
    location: String,
    set_cookies: Vec<String>,
    headers: reqwest::header::HeaderMap,
    body: String,
}

/// A browser: cookies per host (paths and expiry aside), redirects not followed.
struct Browser {
    http: reqwest::Client,
    jar: HashMap<String, HashMap<String, String>>,
}

fn host_of(url: &str) -> String {
    reqwest::Url::parse(url)
        .unwrap()
        .host_str()
        .unwrap()
        .to_owned()
}

impl Browser {
    fn new(ca: &TestCa) -> Browser {
        let mut b = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap())
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(15));
        // Every test host is this machine; the port is the URL's.
        for host in ["auth.vigil.test", "app1.vigil.test", "app2.vigil.test"] {
            b = b.resolve(host, ([127, 0, 0, 1], 0).into());
        }
        Browser {
            http: b.build().unwrap(),
            jar: HashMap::new(),
        }
    }

    fn cookie(&self, url: &str, name: &str) -> Option<String> {
        self.jar.get(&host_of(url))?.get(name).cloned()
    }

    fn set(&mut self, url: &str, name: &str, value: &str) {
        self.jar
            .entry(host_of(url))
            .or_default()
            .insert(name.to_owned(), value.to_owned());
    }

    fn cookie_header(&self, url: &str) -> Option<String> {
        let jar = self.jar.get(&host_of(url))?;
        (!jar.is_empty()).then(|| {
            jar.iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect::<Vec<_>>()
                .join("; ")
        })
    }

    /// A page load (`Accept: text/html`, as a browser's navigation).
    async fn get(&mut self, url: &str) -> Answer {
        self.send(self.http.get(url).header("accept", "text/html"), url)
            .await
    }

    async fn send(&mut self, mut req: reqwest::RequestBuilder, url: &str) -> Answer {
        if let Some(c) = self.cookie_header(url) {
            req = req.header("cookie", c);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let location = headers
            .get("location")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let set_cookies: Vec<String> = headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        let jar = self.jar.entry(host_of(url)).or_default();
        for c in &set_cookies {
            let (name, value) = c.split(';').next().unwrap().split_once('=').unwrap();
            let lower = c.to_ascii_lowercase();
            if value.is_empty() || lower.contains("max-age=0") || lower.contains("1970") {
                jar.remove(name);
            } else {
                jar.insert(name.to_owned(), value.to_owned());
            }
        }
        let body = res.text().await.unwrap_or_default();
        Answer {
            status,
            location,
            set_cookies,
            headers,
            body,
        }
    }

    /// Signs `user` in at the identity provider from its authorization URL, over
    /// its development login page; returns the callback URL it sends back to
    /// (not followed).
    async fn idp_login(&mut self, issuer: &str, auth_url: &str, user: &str) -> String {
        let mut url = auth_url.to_owned();
        for _ in 0..6 {
            let a = if url.contains("/interaction/") {
                let form = [("prompt", "login"), ("login", user), ("password", "pw")];
                let req = self.http.post(&url).form(&form);
                self.send(req, &url).await
            } else {
                self.get(&url).await
            };
            assert!(
                a.status == 302 || a.status == 303,
                "the IdP at {url}: {a:?}"
            );
            url = if a.location.starts_with('/') {
                format!("{issuer}{}", a.location)
            } else {
                a.location
            };
            if url.contains("/.vigil/callback") {
                return url;
            }
        }
        panic!("the IdP never sent the browser back: {url}");
    }
}

/// Everything the test runs.
struct Fleet {
    _pg: TestPostgres,
    cp: ControlProcess,
    proxies: Vec<ProxyProcess>,
    _idp: Helper,
    clock: TestClock,
    ca: TestCa,
    issuer: String,
    auth: String,
    /// app 1 at proxy A, at proxy B, at proxy C (keys 2 and 1: a rotation
    /// under way), at proxy D (key 2 only: the old key dropped).
    app1: String,
    app1_b: String,
    app1_c: String,
    app1_d: String,
    app2: String,
    /// A port on this machine that no proxy serves.
    other_port: u16,
    /// Proxy A's plain-HTTP listener.
    plain: String,
    tls_dir: PathBuf,
}

impl Fleet {
    async fn start() -> Fleet {
        require_idp();
        let pg = TestPostgres::start().unwrap();
        let db = pg.create_database("signin_attacks").unwrap();
        let cp = ControlProcess::start(&db);
        let c = client();
        let url = cp.url.clone();
        let upstream = echo_upstream().await;
        let idp_port = free_port();
        let issuer = format!("http://127.0.0.1:{idp_port}");
        let (port_a, port_b) = (free_port(), free_port());
        let (port_c, port_d) = (free_port(), free_port());
        let (plain_port, other_port) = (free_port(), free_port());
        let auth = format!("https://auth.vigil.test:{port_a}");
        post_json(
            &c,
            &url,
            "/v1/identity-providers",
            json!({"name": "test-idp", "issuer_url": issuer, "client_id": "vigil",
                   "client_secret": CLIENT_SECRET,
                   "scopes": ["openid", "email", "profile", "groups"]}),
        )
        .await;
        post_json(
            &c,
            &url,
            "/v1/policies",
            json!({"name": "signed-in", "document": {"allow": {"and": [{"authenticated_user": true}]}}}),
        )
        .await;
        post_json(
            &c,
            &url,
            "/v1/routes",
            json!({"name": "app1", "host": "app1.vigil.test", "upstreams": [upstream], "policies": ["signed-in"]}),
        )
        .await;
        // App 2 asks for a sign-in less than 3 s old (a step-up).
        post_json(
            &c,
            &url,
            "/v1/routes",
            json!({"name": "app2", "host": "app2.vigil.test", "upstreams": [upstream], "policies": ["signed-in"],
                   "settings": {"max_auth_age_s": 3}}),
        )
        .await;
        let ca = TestCa::new();
        let tls_dir =
            std::env::temp_dir().join(format!("vigil-signin-attacks-{}", std::process::id()));
        std::fs::create_dir_all(&tls_dir).unwrap();
        for host in ["app1.vigil.test", "app2.vigil.test", "auth.vigil.test"] {
            let (crt, key, _) = ca.issue(host);
            std::fs::write(tls_dir.join(format!("{host}.crt")), crt).unwrap();
            std::fs::write(tls_dir.join(format!("{host}.key")), key).unwrap();
        }
        let clock = TestClock::at(tls_dir.join("clock"));
        let args = |keys: &str| {
            vec![
                "--tls-dir".to_owned(),
                tls_dir.display().to_string(),
                "--cookie-keys".to_owned(),
                keys.to_owned(),
                "--authenticate-url".to_owned(),
                auth.clone(),
                "--return-ports".to_owned(),
                format!("{port_a},{port_b}"),
                "--test-clock-file".to_owned(),
                clock.path(),
            ]
        };
        let token = join_token(&c, &url, "fleet").await;
        let mut args_a = args(&format!("1:{KEY1}"));
        args_a.extend([
            "--redirect-listen".to_owned(),
            format!("127.0.0.1:{plain_port}"),
        ]);
        let proxies = vec![
            ProxyProcess::start_at(port_a, &cp.grpc_url, &token, "proxy-a", &args_a),
            ProxyProcess::start_at(
                port_b,
                &cp.grpc_url,
                &token,
                "proxy-b",
                &args(&format!("1:{KEY1}")),
            ),
            // Rotation: key 2 seals, key 1 still opens.
            ProxyProcess::start_at(
                port_c,
                &cp.grpc_url,
                &token,
                "proxy-c",
                &args(&format!("2:{KEY2},1:{KEY1}")),
            ),
            // After the rotation: key 1 dropped.
            ProxyProcess::start_at(
                port_d,
                &cp.grpc_url,
                &token,
                "proxy-d",
                &args(&format!("2:{KEY2}")),
            ),
        ];
        for p in &proxies {
            p.wait_ready().await;
        }
        let idp_cmd = support::idp_command(
            idp_port,
            &issuer,
            &format!("{auth}/.vigil/callback"),
            CLIENT_SECRET,
        );
        let idp = Helper::start("idp", idp_cmd, idp_port);
        Fleet {
            _pg: pg,
            cp,
            proxies,
            _idp: idp,
            clock,
            ca,
            issuer,
            auth,
            app1: format!("https://app1.vigil.test:{port_a}"),
            app1_b: format!("https://app1.vigil.test:{port_b}"),
            app1_c: format!("https://app1.vigil.test:{port_c}"),
            app1_d: format!("https://app1.vigil.test:{port_d}"),
            app2: format!("https://app2.vigil.test:{port_b}"),
            other_port,
            plain: format!("http://127.0.0.1:{plain_port}"),
            tls_dir,
        }
    }

    fn logs(&self) -> String {
        self.proxies
            .iter()
            .map(ProxyProcess::log_text)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Steps 1-2 of a sign-in at `page`: the route host's redirect (and bind
    /// cookie), then the authenticate host's redirect to the IdP (and login
    /// cookie). Returns the IdP's authorization URL.
    async fn begin(&self, b: &mut Browser, page: &str) -> String {
        let a = b.get(page).await;
        assert_eq!(a.status, 302, "{page}: {a:?}");
        assert!(a
            .location
            .starts_with(&format!("{}/.vigil/sign_in?", self.auth)));
        let a = b.get(&a.location).await;
        assert_eq!(a.status, 302, "sign_in: {a:?}");
        assert!(a.location.starts_with(&self.issuer), "{a:?}");
        a.location
    }

    /// Loads `page` as a browser would, signing `user` in at the IdP whenever it
    /// is sent there, until the page itself answers.
    async fn visit(&self, b: &mut Browser, page: &str, user: &str) {
        let mut url = page.to_owned();
        for _ in 0..12 {
            if url.starts_with(&self.issuer) {
                url = b.idp_login(&self.issuer, &url, user).await;
                continue;
            }
            let a = b.get(&url).await;
            match a.status {
                200 if url == page => return,
                302 => url = a.location,
                _ => panic!("{url}: {a:?}"),
            }
        }
        panic!("{page} never answered; last at {url}");
    }

    /// A whole sign-in of `user` at `page`; returns the handoff URL it went
    /// through. The browser then holds sessions at the authenticate host and
    /// at `page`'s host.
    async fn sign_in(&self, b: &mut Browser, page: &str, user: &str) -> String {
        let to_idp = self.begin(b, page).await;
        let callback = b.idp_login(&self.issuer, &to_idp, user).await;
        let a = b.get(&callback).await;
        assert_eq!(a.status, 302, "callback: {a:?}");
        let handoff = a.location;
        assert!(handoff.contains("/.vigil/handoff?code="), "{handoff}");
        let a = b.get(&handoff).await;
        assert_eq!(a.status, 302, "handoff: {a:?}");
        assert_eq!(a.location, page);
        assert!(b.cookie(page, SESSION).is_some());
        handoff
    }
}

/// The status of an API request (no HTML asked) to `url` with `cookie` as the
/// whole Cookie header.
async fn api_status(b: &Browser, url: &str, cookie: Option<&str>) -> u16 {
    let mut req = b.http.get(url);
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    req.send().await.unwrap().status().as_u16()
}

fn session_of(value: &str, host: &str) -> SessionCookie {
    let keys = CookieKeys::new([(1u8, KEY1)]).unwrap();
    keys.open(value, host, support::unix_now()).unwrap()
}

/// `value` with the character at `at` changed.
fn flip(value: &str, at: usize) -> String {
    let mut v: Vec<char> = value.chars().collect();
    v[at] = if v[at] == 'A' { 'B' } else { 'A' };
    v.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sign_in_and_sessions_withstand_an_outside_attacker() {
    let f = Fleet::start().await;
    // Every secret seen on the wire, to look for in the logs at the end.
    let mut secrets: Vec<String> = Vec::new();

    // --- Return URLs (`rd`). -------------------------------------------------
    let mut victim = Browser::new(&f.ca);
    let handoff = f
        .sign_in(&mut victim, &format!("{}/hello", f.app1), "victim")
        .await;
    secrets.push(handoff.clone());
    let bh = "b".repeat(64);
    let port = f.other_port;
    for rd in [
        // Another service on a route host's name, on a port no proxy serves: it
        // would get the handoff code (a victim with a session at the
        // authenticate host gets one with no password asked).
        format!("https://app1.vigil.test:{port}/"),
        format!("https://app1.vigil.test:{port}/.vigil/handoff"),
        "https://evil.example/".to_owned(),
        "//evil.example/".to_owned(),
        "/\\evil.example/".to_owned(),
        "https:evil.example".to_owned(),
        format!("{}@evil.example/", f.app1),
        format!("https://evil.example\\@app1.vigil.test:{port}/"),
        format!("https://APP1.vigil.test.evil.example:{port}/"),
        format!("https://app1%2Evigil%2Etest%2Eevil.example:{port}/"),
        "javascript:alert(document.cookie)".to_owned(),
        "data:text/html,<script>alert(1)</script>".to_owned(),
        format!("{}/a\0b", f.app1),
        format!("{}/{}", f.app1, "a".repeat(3000)),
    ] {
        let url = reqwest::Url::parse_with_params(
            &format!("{}/.vigil/sign_in", f.auth),
            [("rd", rd.as_str()), ("bh", bh.as_str())],
        )
        .unwrap();
        let a = victim.get(url.as_str()).await;
        assert_eq!(a.status, 400, "rd={rd:?} was not refused: {a:?}");
        assert!(
            a.location.is_empty() && a.body.contains("return URL"),
            "{a:?}"
        );
    }
    // Mixed case, a trailing dot and CR/LF in the value are not other hosts: the
    // session comes back to the same host, and no header is injected.
    for rd in [
        format!("{}/x", f.app1.replace("app1.vigil.test", "APP1.Vigil.Test")),
        format!("{}/x\r\nSet-Cookie: injected=1", f.app1),
    ] {
        let url = reqwest::Url::parse_with_params(
            &format!("{}/.vigil/sign_in", f.auth),
            [("rd", rd.as_str()), ("bh", bh.as_str())],
        )
        .unwrap();
        let a = victim.get(url.as_str()).await;
        assert_eq!(a.status, 302, "rd={rd:?}: {a:?}");
        assert!(
            a.location
                .starts_with(&format!("{}/.vigil/handoff?code=", f.app1)),
            "{a:?}"
        );
        assert!(!a.set_cookies.iter().any(|c| c.contains("injected")));
        secrets.push(a.location);
    }

    // --- The callback. --------------------------------------------------------
    let mut mallory = Browser::new(&f.ca);
    let to_idp = f.begin(&mut mallory, &format!("{}/m", f.app1)).await;
    let state = reqwest::Url::parse(&to_idp)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();
    secrets.push(state.clone());
    secrets.push(mallory.cookie(&f.auth, LOGIN).unwrap());
    let cb = format!("{}/.vigil/callback", f.auth);
    // The provider says it names itself in every answer (RFC 9207), so an answer
    // without `iss` is not its own.
    let discovery: serde_json::Value =
        reqwest::get(format!("{}/.well-known/openid-configuration", f.issuer))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(
        discovery["authorization_response_iss_parameter_supported"],
        true
    );
    // The issuer is `http://127.0.0.1:<port>`: only `:` and `/` need escaping.
    let iss = f.issuer.replace(':', "%3A").replace('/', "%2F");
    for (query, status, says) in [
        (String::new(), 400, "`state`"),
        ("code=x".to_owned(), 400, "`state`"),
        (format!("code=x&state={}", "0".repeat(43)), 400, "`state`"),
        (format!("code=x&state={state}x"), 400, "`state`"),
        // Another provider's answer, and one naming no provider (RFC 9207 `iss`).
        (
            format!("code=x&state={state}&iss=http%3A%2F%2Fevil.example"),
            400,
            "another identity provider",
        ),
        (format!("code=x&state={state}"), 400, "does not name"),
        (
            format!("error=access_denied&state={state}"),
            400,
            "does not name",
        ),
        // The provider's refusal, and a code alongside it: refused either way.
        (
            format!("error=access_denied&state={state}&iss={iss}"),
            401,
            "access_denied",
        ),
        (
            format!("error=access_denied&code=x&state={state}&iss={iss}"),
            401,
            "access_denied",
        ),
    ] {
        let a = mallory.get(&format!("{cb}?{query}")).await;
        assert_eq!(a.status, status, "callback?{query}: {a:?}");
        assert!(a.body.contains(says), "callback?{query}: {}", a.body);
    }
    // A line forged into the log, and markup into the page, through the
    // provider's error text.
    let forged = "x\r\nFORGED-LOG-LINE decision=allow\n<script>alert(1)</script>";
    let url = reqwest::Url::parse_with_params(
        &cb,
        [
            ("error", "access_denied"),
            ("error_description", forged),
            ("state", state.as_str()),
            ("iss", f.issuer.as_str()),
        ],
    )
    .unwrap();
    let a = mallory.get(url.as_str()).await;
    assert_eq!(a.status, 401, "{a:?}");
    assert!(!a.body.contains("<script>"), "{}", a.body);
    // The provider's own error answer (`prompt=none` without a session there).
    let a = mallory.get(&format!("{to_idp}&prompt=none")).await;
    assert!(a.location.contains("error=login_required"), "{a:?}");
    let a = mallory.get(&a.location).await;
    assert_eq!(a.status, 401, "{a:?}");
    assert!(a.body.contains("login_required"), "{}", a.body);
    // Mallory's own callback (code and state) in the victim's browser, which has
    // no sign-in in progress, or one of its own: refused (no login CSRF).
    let mallory_cb = mallory.idp_login(&f.issuer, &to_idp, "mallory").await;
    let mut other = Browser::new(&f.ca);
    assert_eq!(other.get(&mallory_cb).await.status, 400);
    let other_to_idp = f.begin(&mut other, &format!("{}/o", f.app1)).await;
    assert!(!other_to_idp.is_empty());
    assert_eq!(other.get(&mallory_cb).await.status, 400);
    // On a route host, the callback (and sign_in) is no endpoint at all.
    for host in [&f.app1, &f.app2] {
        for path in ["callback", "sign_in"] {
            let a = mallory
                .get(&format!(
                    "{host}/.vigil/{path}?{}",
                    &mallory_cb[mallory_cb.find('?').unwrap() + 1..]
                ))
                .await;
            assert_eq!(a.status, 404, "{host} {path}: {a:?}");
        }
    }
    // The real callback works once; the code again (with the login cookie kept,
    // as an attacker replaying the request would) is refused, and not as a
    // gateway failure.
    let login_cookie = mallory.cookie(&f.auth, LOGIN).unwrap();
    let a = mallory.get(&mallory_cb).await;
    assert_eq!(a.status, 302, "{a:?}");
    let mallory_handoff = a.location;
    secrets.push(mallory_handoff.clone());
    secrets.push(mallory_cb.clone());
    mallory.set(&f.auth, LOGIN, &login_cookie);
    let a = mallory.get(&mallory_cb).await;
    assert_eq!(a.status, 401, "a replayed code: {a:?}");
    // A nonce the proxy did not ask for: the ID token is refused.
    let mut nonce_b = Browser::new(&f.ca);
    let to_idp = f.begin(&mut nonce_b, &format!("{}/n", f.app1)).await;
    let nonce_re = to_idp.find("nonce=").unwrap() + "nonce=".len();
    let forged_nonce = format!("{}forged{}", &to_idp[..nonce_re], &to_idp[nonce_re..]);
    let callback = nonce_b.idp_login(&f.issuer, &forged_nonce, "mallory").await;
    secrets.push(callback.clone());
    let a = nonce_b.get(&callback).await;
    assert_eq!(a.status, 401, "{a:?}");
    assert!(a.body.contains("ID token is not valid"), "{}", a.body);
    // ... and the provider's metadata stays cached: a forged nonce, which any
    // user of the provider can send, makes no sign-in wait for discovery.
    let discoveries = || async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        f.proxies[0]
            .log_text()
            .matches("Identity provider discovered")
            .count()
    };
    let discovered = discoveries().await;
    assert_eq!(discovered, 1, "{}", f.proxies[0].log_text());

    let mut after = Browser::new(&f.ca);
    f.begin(&mut after, &format!("{}/after", f.app1)).await;
    assert_eq!(discoveries().await, discovered);

    // --- The handoff code. -----------------------------------------------------
    // Mallory's code, redeemed in her browser, works once at this proxy.
    let bind = mallory.cookie(&f.app1, BIND).unwrap();
    secrets.push(bind.clone());
    let a = mallory.get(&mallory_handoff).await;
    assert_eq!(a.status, 302, "{a:?}");
    let mallory_session = mallory.cookie(&f.app1, SESSION).unwrap();
    secrets.push(mallory_session.clone());
    mallory.set(&f.app1, BIND, &bind);
    let a = mallory.get(&mallory_handoff).await;
    assert_eq!(a.status, 400, "replayed at the same proxy: {a:?}");
    assert!(a.body.contains("used already"), "{}", a.body);
    // Single use is per proxy, not fleet-wide (docs/architecture.md): with the
    // browser's bind value, proxy B takes the same code once more. The bind
    // value lives only in the browser's HttpOnly cookie, which the first
    // redemption deleted (put back here as a thief holding it would).
    let at_b = mallory_handoff.replacen(&f.app1, &f.app1_b, 1);
    let mut thief = Browser::new(&f.ca);
    assert_eq!(thief.get(&at_b).await.status, 400, "no bind value");
    thief.set(&f.app1, BIND, &bind);
    let a = thief.get(&at_b).await;
    assert_eq!(a.status, 302, "the documented limit changed? {a:?}");
    // At the authenticate host, a handoff is no endpoint.
    let q = &mallory_handoff[mallory_handoff.find('?').unwrap()..];
    assert_eq!(
        mallory
            .get(&format!("{}/.vigil/handoff{q}", f.auth))
            .await
            .status,
        404
    );
    // Tampered, truncated, oversized, or with no code.
    let code = &q["?code=".len()..];
    for bad in [
        flip(code, code.len() / 2),
        flip(code, 0),
        code[..code.len() - 4].to_owned(),
        code[..20].to_owned(),
        format!("{code}{}", "A".repeat(9000)),
        "%00".to_owned(),
        String::new(),
    ] {
        let a = mallory
            .get(&format!("{}/.vigil/handoff?code={bad}", f.app1))
            .await;
        assert_eq!(a.status, 400, "{a:?}");
    }
    let a = mallory.get(&format!("{}/.vigil/handoff", f.app1)).await;
    assert_eq!(a.status, 400, "{a:?}");
    // Expired: a fresh code (from Mallory's session at the authenticate host, in
    // a browser that has none at app 1), presented 61 s later.
    let mut late_b = Browser::new(&f.ca);
    late_b.set(&f.auth, SESSION, &mallory.cookie(&f.auth, SESSION).unwrap());
    let a = late_b.get(&format!("{}/late", f.app1)).await;
    let a = late_b.get(&a.location).await;
    assert_eq!(a.status, 302, "{a:?}");
    let late = a.location;
    secrets.push(late.clone());
    f.clock.set(61);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let a = late_b.get(&late).await;
    f.clock.set(0);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(a.status, 400, "{a:?}");
    assert!(a.body.contains("expired"), "{}", a.body);

    // --- The session cookie. ---------------------------------------------------
    let good = victim.cookie(&f.app1, SESSION).unwrap();
    secrets.push(good.clone());
    secrets.push(victim.cookie(&f.auth, SESSION).unwrap());
    let hello = format!("{}/hello", f.app1);
    let with = |v: &str| format!("{SESSION}={v}");
    assert_eq!(api_status(&victim, &hello, Some(&with(&good))).await, 200);
    assert_eq!(
        api_status(&victim, &format!("{}/hello", f.app1_b), Some(&with(&good))).await,
        200
    );
    for bad in [
        flip(&good, good.len() / 2),
        flip(&good, 0),
        flip(&good, good.len() - 1),
        good[..good.len() - 1].to_owned(),
        good[..40].to_owned(),
        String::new(),
        format!("{good}{good}"),
        "%%%".to_owned(),
    ] {
        assert_eq!(
            api_status(&victim, &hello, Some(&with(&bad))).await,
            401,
            "{bad}"
        );
    }
    // Sealed values of one kind never open as another: a handoff code as a
    // session cookie, a session cookie as a handoff code.
    assert_eq!(api_status(&victim, &hello, Some(&with(code))).await, 401);
    let a = victim
        .get(&format!("{}/.vigil/handoff?code={good}", f.app1))
        .await;
    assert_eq!(a.status, 400, "{a:?}");
    // From another host: app 1's cookie on app 2, the authenticate host's on app 1.
    let on_app2 = format!("{}/hello", f.app2);
    assert_eq!(api_status(&victim, &on_app2, Some(&with(&good))).await, 401);
    let auth_session = victim.cookie(&f.auth, SESSION).unwrap();
    assert_eq!(
        api_status(&victim, &hello, Some(&with(&auth_session))).await,
        401
    );
    // Sent twice (a sibling subdomain may plant one): which to believe is
    // ambiguous, so neither is.
    for twice in [
        format!("{}; {}", with(&good), with(&mallory_session)),
        format!("{}; {}", with(&good), with(&good)),
        format!("{}; {}", with(&good), with("x")),
    ] {
        assert_eq!(
            api_status(&victim, &hello, Some(&twice)).await,
            401,
            "{twice}"
        );
    }
    let req = victim
        .http
        .get(&hello)
        .header("cookie", with(&good))
        .header("cookie", with(&mallory_session));
    let status = req.send().await.unwrap().status().as_u16();
    assert!(
        status == 401 || status == 400,
        "two Cookie fields: {status}"
    );
    // A huge Cookie header is refused whole, not a 500.
    let huge = format!("{}; pad={}", with(&good), "p".repeat(300_000));
    let status = victim
        .http
        .get(&hello)
        .header("cookie", huge)
        .send()
        .await
        .map(|r| r.status().as_u16());
    // (The proxy may answer and close before the client has sent it all: the
    // client then sees the connection end instead.)
    match status {
        Ok(s) => assert_eq!(s, 431),
        Err(e) => assert!(e.is_request(), "{e}"),
    }
    // Keys: a cookie opens where its key is configured, and nowhere else. The
    // old key's cookie works at C (rotating: keys 2 and 1) and not at D (key 1
    // dropped); the new key's at C and D, not at A (key 1 only).
    let on_c = format!("{}/hello", f.app1_c);
    let on_d = format!("{}/hello", f.app1_d);
    assert_eq!(api_status(&victim, &on_c, Some(&with(&good))).await, 200);
    assert_eq!(api_status(&victim, &on_d, Some(&with(&good))).await, 401);
    let mut s = session_of(&good, "app1.vigil.test");
    let k2 = CookieKeys::new([(2u8, KEY2)]).unwrap();
    let sealed2 = k2.seal(&s, "app1.vigil.test").unwrap();
    assert_eq!(api_status(&victim, &on_c, Some(&with(&sealed2))).await, 200);
    assert_eq!(api_status(&victim, &on_d, Some(&with(&sealed2))).await, 200);
    assert_eq!(
        api_status(&victim, &hello, Some(&with(&sealed2))).await,
        401
    );
    // Key 2's id with key 1's bytes (or the other way round) does not open.
    s.sid = "ses_00000000000000000000000000000000".into();
    let wrong_id = CookieKeys::new([(2u8, KEY1)]).unwrap();
    let forged = wrong_id.seal(&s, "app1.vigil.test").unwrap();
    for on in [&on_c, &on_d, &hello] {
        assert_eq!(api_status(&victim, on, Some(&with(&forged))).await, 401);
    }
    // The plain-HTTP listener only redirects: no cookie read, none set.
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let res = plain
        .get(format!("{}/hello", f.plain))
        .header("host", "app1.vigil.test")
        .header("cookie", with(&good))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 308);
    assert!(res.headers().get("set-cookie").is_none());
    assert!(res.headers()["location"]
        .to_str()
        .unwrap()
        .starts_with("https://app1.vigil.test"));
    assert!(!res.text().await.unwrap().contains(&good));

    // --- Sign-out. ---------------------------------------------------------------
    // From another site: a question, nothing ended.
    let sign_out = format!("{}/.vigil/sign_out", f.app1);
    let req = victim
        .http
        .get(&sign_out)
        .header("accept", "text/html")
        .header("sec-fetch-site", "cross-site")
        .header("sec-fetch-mode", "navigate");
    let a = victim.send(req, &sign_out).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(
        a.set_cookies.is_empty() && a.body.contains("Sign out?"),
        "{a:?}"
    );
    assert_eq!(a.headers["x-frame-options"], "DENY");
    let req = victim
        .http
        .get(format!("{}/.vigil/sign_out", f.auth))
        .header("sec-fetch-site", "cross-site");
    let a = victim.send(req, &f.auth).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a.set_cookies.is_empty(), "{a:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(api_status(&victim, &hello, Some(&with(&good))).await, 200);
    // From the site itself: the session ends on the route host, then at the
    // authenticate host, and both proxies refuse it.
    let req = victim
        .http
        .get(&sign_out)
        .header("accept", "text/html")
        .header("sec-fetch-site", "same-origin");
    let a = victim.send(req, &sign_out).await;
    assert_eq!(a.status, 302, "{a:?}");
    assert_eq!(a.location, format!("{}/.vigil/sign_out", f.auth));
    assert!(victim.cookie(&f.app1, SESSION).is_none());
    let a = victim.get(&a.location).await;
    assert!(a.status == 302 || a.status == 200, "{a:?}");
    assert!(victim.cookie(&f.auth, SESSION).is_none());
    assert_eq!(api_status(&victim, &hello, Some(&with(&good))).await, 401);
    let on_b = format!("{}/hello", f.app1_b);
    eventually("proxy B refuses the signed-out session", || async {
        match api_status(&victim, &on_b, Some(&with(&good))).await {
            401 => Ok(()),
            s => Err(format!("status {s}")),
        }
    })
    .await;
    // The control plane recorded the end of that session.
    let sid = session_of(&good, "app1.vigil.test").sid;
    let c = client();
    let got = get_json(&c, &f.cp.url, &format!("/v1/sessions/{sid}")).await;
    assert!(got["revoked_at"].is_string(), "{got}");
    // The old cookies put back: no session from the authenticate host either.
    victim.set(&f.auth, SESSION, &auth_session);
    let url = reqwest::Url::parse_with_params(
        &format!("{}/.vigil/sign_in", f.auth),
        [("rd", hello.as_str()), ("bh", bh.as_str())],
    )
    .unwrap();
    let a = victim.get(url.as_str()).await;
    assert!(a.location.starts_with(&f.issuer), "{a:?}");

    // --- Sign-out after a step-up. ------------------------------------------------
    // A browser signed in at app 1, then (its sign-in too old for app 2) again
    // for app 2: signing out of app 2 ends app 1's session too.
    let mut stepper = Browser::new(&f.ca);
    f.sign_in(&mut stepper, &format!("{}/s", f.app1), "stepper")
        .await;
    let first = stepper.cookie(&f.app1, SESSION).unwrap();
    secrets.push(first.clone());
    tokio::time::sleep(Duration::from_secs(4)).await;
    let page2 = format!("{}/s", f.app2);
    f.visit(&mut stepper, &page2, "stepper").await;
    let second = stepper.cookie(&f.app2, SESSION).unwrap();
    secrets.push(second.clone());
    assert_ne!(
        session_of(&first, "app1.vigil.test").sid,
        session_of(&second, "app2.vigil.test").sid
    );
    let on_app1 = format!("{}/s", f.app1);
    assert_eq!(
        api_status(&stepper, &on_app1, Some(&with(&first))).await,
        200
    );
    let out = format!("{}/.vigil/sign_out", f.app2);
    let a = stepper.get(&out).await;
    assert_eq!(a.status, 302, "{a:?}");
    let a = stepper.get(&a.location).await;
    assert!(a.status == 302 || a.status == 200, "{a:?}");
    eventually(
        "app 1 refuses the session signed out of at app 2",
        || async {
            match api_status(&stepper, &on_app1, Some(&with(&first))).await {
                401 => Ok(()),
                s => Err(format!("status {s}")),
            }
        },
    )
    .await;

    // --- The logs. -----------------------------------------------------------------
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logs = f.logs();
    for secret in &secrets {
        // A URL's code and state, or the value itself.
        let values: Vec<String> = match reqwest::Url::parse(secret) {
            Ok(u) => u
                .query_pairs()
                .filter(|(k, _)| k == "code" || k == "state")
                .map(|(_, v)| v.into_owned())
                .collect(),
            Err(_) => vec![secret.clone()],
        };
        assert!(!values.is_empty(), "{secret}");
        for v in values {
            assert!(
                !logs.contains(&v),
                "a secret reached a proxy log: {v}\n{logs}"
            );
        }
    }
    assert!(
        !logs.lines().any(|l| l.starts_with("FORGED-LOG-LINE")),
        "a forged log line:\n{logs}"
    );
    for bad in ["panicked", "status=500", "status=502"] {
        assert!(!logs.contains(bad), "`{bad}` in the logs:\n{logs}");
    }
    std::fs::remove_dir_all(&f.tls_dir).ok();
}
