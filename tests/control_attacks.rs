//! The control plane attacked from outside, end to end: a real `vigil control`
//! on a throwaway PostgreSQL, sent what a careless or hostile client sends (NUL
//! and other text PostgreSQL refuses, undecodable paths, repeated or tampered
//! query parameters, out-of-range times, odd headers, bad gRPC hellos). The
//! promise checked: a 4xx `application/problem+json` naming the field, never a
//! 500, and nothing stored that breaks a later request. Every case runs against
//! one process; the failures are gathered and reported together.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use base64::Engine as _;
use reqwest::Method;
use serde_json::{json, Value};
use support::{client, join_token, post_json, ControlProcess, TOKEN};
use vigil_proto::v1::control_plane_client::ControlPlaneClient;
use vigil_proto::v1::{proxy_message, Hello, ProxyMessage};
use vigil_test_postgres::TestPostgres;

/// What one request got back.
struct Got {
    status: u16,
    content_type: String,
    text: String,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }
}

/// One control plane under attack, and what went wrong so far.
struct Attack {
    url: String,
    http: reqwest::Client,
    failures: Vec<String>,
}

impl Attack {
    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Got {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .header("authorization", format!("Bearer {TOKEN}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.body(b.to_vec());
        }
        let res = req.send().await.unwrap();
        Got {
            status: res.status().as_u16(),
            content_type: res
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned(),
            text: res.text().await.unwrap(),
        }
    }

    /// Sends raw JSON text with `Content-Type: application/json` (and `If-Match: *`
    /// for PUT and PATCH).
    async fn json(&self, method: Method, path: &str, body: &str) -> Got {
        let ct = if method == Method::PATCH {
            "application/merge-patch+json"
        } else {
            "application/json"
        };
        let mut h = vec![("content-type", ct)];
        if method == Method::PUT || method == Method::PATCH {
            h.push(("if-match", "*"));
        }
        self.send(method, path, &h, Some(body.as_bytes())).await
    }

    /// Records a failure unless `got` is a problem with one of `statuses` and, when
    /// `pointer` is given, names exactly that field first.
    fn expect(&mut self, case: &str, got: &Got, statuses: &[u16], pointer: Option<&str>) {
        let problem = got.content_type == "application/problem+json";
        let named = got.json()["errors"][0]["pointer"]
            .as_str()
            .map(str::to_owned);
        let ok = statuses.contains(&got.status)
            && problem
            && pointer.is_none_or(|p| named.as_deref() == Some(p));
        if !ok {
            self.failures.push(format!(
                "{case}: wanted {statuses:?} problem+json at {pointer:?}, got {} {} {}",
                got.status,
                got.content_type,
                got.text.chars().take(300).collect::<String>()
            ));
        }
    }

    /// Records a failure unless `got` succeeded with `status`.
    fn expect_ok(&mut self, case: &str, got: &Got, status: u16) {
        if got.status != status {
            self.failures.push(format!(
                "{case}: wanted {status}, got {} {}",
                got.status,
                got.text.chars().take(300).collect::<String>()
            ));
        }
    }
}

fn cursor(s: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_answers_hostile_input_with_located_4xx() {
    let pg = TestPostgres::start().unwrap();
    let db = pg.create_database("attacks").unwrap();
    let cp = ControlProcess::start(&db);
    let c = client();
    post_json(&c, &cp.url, "/v1/groups", json!({"name": "eng"})).await;
    let device = post_json(&c, &cp.url, "/v1/devices", json!({"name": "laptop"})).await;
    let device = device["id"].as_str().unwrap().to_owned();
    let mut a = Attack {
        url: cp.url.clone(),
        http: reqwest::Client::new(),
        failures: Vec::new(),
    };
    let (post, put, patch) = (Method::POST, Method::PUT, Method::PATCH);

    // NUL (U+0000) anywhere in a body: PostgreSQL's text refuses it, and one stored
    // inside a document made every filtered list of its kind a 500.
    let user = r#""issuer": "https://i.example", "subject""#;
    let nul_bodies: &[(&Method, &str, String, &str)] = &[
        (&post, "/v1/groups", r#"{"name": "g1", "description": "a\u0000"}"#.into(), "/description"),
        (&post, "/v1/users", format!(r#"{{{user}: "a\u0000b"}}"#), "/subject"),
        (&post, "/v1/users", format!(r#"{{{user}: "s", "email": "a@b\u0000.example"}}"#), "/email"),
        (&post, "/v1/users", format!(r#"{{{user}: "s", "attributes": {{"a": "x\u0000"}}}}"#), "/attributes/a"),
        (&post, "/v1/users", format!(r#"{{{user}: "s", "attributes": {{"k\u0000": 1}}}}"#), "/attributes/k\u{0}"),
        (&post, "/v1/users", format!(r#"{{{user}: "s", "groups": ["eng", "eng\u0000"]}}"#), "/groups/1"),
        (&post, "/v1/policies", r#"{"name": "p", "document": {"allow": {"and": [{"email": {"is": "a\u0000@x"}}]}}}"#.into(), "/document/allow/and/0/email/is"),
        (&post, "/v1/policies/validate", r#"{"document": {"allow": {"and": [{"claim/x\u0000": {"is": "1"}}]}}}"#.into(), "/document/allow/and/0/claim~1x\u{0}"),
        (&post, "/v1/routes", r#"{"name": "r", "host": "a\u0000.example", "upstreams": ["http://x"]}"#.into(), "/host"),
        (&post, "/v1/identity-providers", r#"{"name": "idp", "issuer_url": "https://i.example", "client_id": "c", "client_secret": "s\u0000"}"#.into(), "/client_secret"),
        (&post, "/v1/admin-tokens", r#"{"name": "t", "role": "viewer", "description": "\u0000"}"#.into(), "/description"),
        (&put, "/v1/groups/eng", r#"{"name": "eng", "description": "\u0000"}"#.into(), "/description"),
        (&patch, "/v1/groups/eng", r#"{"description": "x\u0000"}"#.into(), "/description"),
    ];
    for (method, path, body, pointer) in nul_bodies {
        let got = a.json((*method).clone(), path, body).await;
        a.expect(
            &format!("NUL: {method} {path} {body}"),
            &got,
            &[400],
            Some(pointer),
        );
    }
    let path = format!("/v1/devices/{device}/posture");
    let got = a
        .json(put.clone(), &path, r#"{"attributes": {"os": "\u0000"}}"#)
        .await;
    a.expect(
        "NUL in a posture report",
        &got,
        &[400],
        Some("/attributes/os"),
    );

    // NUL in ids: nothing can have one, so the answer is "not found".
    for (method, path) in [
        (Method::GET, "/v1/groups/a%00b"),
        (Method::DELETE, "/v1/groups/a%00b"),
        (Method::POST, "/v1/join-tokens/j%00/rotate-token"),
        (Method::POST, "/v1/sessions/ses_a%00/revoke"),
        (Method::POST, "/v1/users/u%00/revoke-sessions"),
        (Method::GET, "/v1/admin-tokens/%00"),
    ] {
        let got = a.send(method.clone(), path, &[], None).await;
        a.expect(&format!("NUL id: {method} {path}"), &got, &[404], None);
    }
    let got = a
        .json(Method::PUT, "/v1/devices/d%00/posture", r#"{"ttl_s": 60}"#)
        .await;
    a.expect("NUL id: posture", &got, &[404], None);
    let got = a
        .json(Method::PATCH, "/v1/groups/e%00", r#"{"description": "x"}"#)
        .await;
    a.expect("NUL id: merge patch", &got, &[404], None);

    // NUL in query values and cursors.
    for (path, pointer) in [
        ("/v1/users?email=%00".to_owned(), "/query/email"),
        ("/v1/audit?actor=a%00".to_owned(), "/query/actor"),
        ("/v1/routes?host=%00x".to_owned(), "/query/host"),
        (
            format!("/v1/groups?cursor={}", cursor("a\0")),
            "/query/cursor",
        ),
        (
            format!("/v1/audit?cursor={}", cursor("1\0")),
            "/query/cursor",
        ),
    ] {
        let got = a.send(Method::GET, &path, &[], None).await;
        a.expect(&format!("NUL query: {path}"), &got, &[400], Some(pointer));
    }

    // A path segment that does not decode to UTF-8: a problem like the rest, not
    // axum's plain text.
    for path in [
        "/v1/groups/%FF",
        "/v1/users/%C0%AF",
        "/v1/sessions/%ED%A0%80/revoke",
    ] {
        let got = a.send(Method::GET, path, &[], None).await;
        let want = if path.ends_with("revoke") { 405 } else { 400 };
        let pointer = (want == 400).then_some("/path/id");
        a.expect(&format!("undecodable id: {path}"), &got, &[want], pointer);
    }
    let got = a
        .send(Method::POST, "/v1/sessions/%ED%A0%80/revoke", &[], None)
        .await;
    a.expect("undecodable id: revoke", &got, &[400], Some("/path/id"));

    // A parameter given twice is ambiguous: refused, not last-one-wins.
    for (path, pointer) in [
        ("/v1/groups?limit=1&limit=1000", "/query/limit"),
        ("/v1/users?email=a@x&email=b@x", "/query/email"),
        ("/v1/audit?cursor=MQ&cursor=Mg", "/query/cursor"),
    ] {
        let got = a.send(Method::GET, path, &[], None).await;
        a.expect(
            &format!("repeated parameter: {path}"),
            &got,
            &[400],
            Some(pointer),
        );
    }

    // Users: an email that only looks like an address (spaces, invisible or
    // bidirectional characters, empty labels), a line break that would let two
    // (issuer, subject) pairs share the natural key `issuer\nsubject`.
    for (body, pointer) in [
        (
            r#"{"issuer": "https://i.example", "subject": "e1", "email": " a@x.example"}"#,
            "/email",
        ),
        (
            r#"{"issuer": "https://i.example", "subject": "e2", "email": "a@x\u200b.example"}"#,
            "/email",
        ),
        (
            r#"{"issuer": "https://i.example", "subject": "e3", "email": "adm\u202eni@x.example"}"#,
            "/email",
        ),
        (
            r#"{"issuer": "https://i.example", "subject": "e4", "email": "a@x..example"}"#,
            "/email",
        ),
        (
            r#"{"issuer": "https://i.example", "subject": "e5", "email": "a@"}"#,
            "/email",
        ),
        (
            r#"{"issuer": "https://i.example\nb", "subject": "c"}"#,
            "/issuer",
        ),
        (
            r#"{"issuer": "https://i.example", "subject": "b\nc"}"#,
            "/subject",
        ),
    ] {
        let got = a.json(Method::POST, "/v1/users", body).await;
        a.expect(&format!("user: {body}"), &got, &[422], Some(pointer));
    }
    for email in [
        "A.B+tag@X.example",
        "a@[192.0.2.1]",
        "\u{e9}l\u{e8}ve@\u{e9}cole.example",
    ] {
        let body = format!(
            r#"{{"issuer": "https://i.example", "subject": "{email}", "email": "{email}"}}"#
        );
        let got = a.json(Method::POST, "/v1/users", &body).await;
        a.expect_ok(&format!("email {email}"), &got, 201);
    }

    // A password in an upstream URL would be shown to every viewer, in the audit
    // trail and in every snapshot (the error must not echo it either).
    for upstream in [
        "http://user:s3cret@up.example",
        "https://s3cret@up.example:8443/base",
    ] {
        let body =
            json!({"name": "r", "host": "r.example", "upstreams": ["http://ok.example", upstream]});
        let got = a.json(Method::POST, "/v1/routes", &body.to_string()).await;
        a.expect(
            &format!("upstream {upstream}"),
            &got,
            &[422],
            Some("/upstreams/1"),
        );
        if got.text.contains("s3cret") {
            a.failures
                .push(format!("the refusal shows the password: {}", got.text));
        }
    }

    for issuer in [
        "https://user:s3cret@idp.example",
        "https://idp.example/?tenant=1",
        "https://idp.example/#x",
    ] {
        let body = json!({"name": "idp", "issuer_url": issuer, "client_id": "c"});
        let got = a
            .json(Method::POST, "/v1/identity-providers", &body.to_string())
            .await;
        a.expect(
            &format!("issuer {issuer}"),
            &got,
            &[422],
            Some("/issuer_url"),
        );
        if got.text.contains("s3cret") {
            a.failures
                .push(format!("the refusal shows the password: {}", got.text));
        }
    }

    // Instants: a time zone offset may carry a valid time past year 9999 in UTC,
    // which the store would keep in a form nobody can read back.
    for (body, pointer) in [
        (
            r#"{"name": "t1", "role": "viewer", "expires_at": "9999-12-31T23:59:59-14:00"}"#,
            "/expires_at",
        ),
        (
            r#"{"name": "t2", "role": "viewer", "expires_at": "0000-01-01T00:00:00+01:00"}"#,
            "/expires_at",
        ),
        (
            r#"{"name": "t3", "role": "viewer", "expires_at": "10000-01-01T00:00:00Z"}"#,
            "/expires_at",
        ),
        (
            r#"{"name": "t4", "role": "viewer", "expires_at": "2030-01-01T00:00:00+25:00"}"#,
            "/expires_at",
        ),
        (
            r#"{"name": "t5", "role": "viewer", "expires_at": 1893456000}"#,
            "/expires_at",
        ),
    ] {
        let got = a.json(Method::POST, "/v1/admin-tokens", body).await;
        a.expect(&format!("time: {body}"), &got, &[400, 422], Some(pointer));
    }
    let got = a
        .json(
            Method::POST,
            "/v1/admin-tokens",
            r#"{"name": "t6", "role": "viewer", "expires_at": "9999-12-31T09:59:59+00:00"}"#,
        )
        .await;
    a.expect_ok("the last second of 9999", &got, 201);

    // Already right (kept as coverage): JSON that is not quite JSON, numbers out
    // of range, lone surrogates, deep nesting, a gzip body nobody asked for.
    for body in [
        r#"{"name": "s", "description": "\ud800"}"#.to_owned(),
        r#"{"name": "n", "description": 1e400}"#.to_owned(),
        r#"{"name": "x"} trailing"#.to_owned(),
        "\u{feff}{\"name\": \"bom\"}".to_owned(),
        format!("{}{}", "[".repeat(300), "]".repeat(300)),
    ] {
        let got = a.json(Method::POST, "/v1/groups", &body).await;
        a.expect(&format!("not JSON: {body:.40}"), &got, &[400], None);
    }
    let got = a
        .send(
            Method::POST,
            "/v1/groups",
            &[
                ("content-type", "application/json"),
                ("content-encoding", "gzip"),
            ],
            Some(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"),
        )
        .await;
    a.expect("gzip body", &got, &[400, 415], None);
    let got = a
        .send(
            Method::GET,
            &format!("/v1/groups/{}", "a".repeat(8000)),
            &[],
            None,
        )
        .await;
    a.expect("an 8000-character id", &got, &[404], None);
    for (if_match, status) in [
        ("W/\"1\"", 412),
        ("\"99999999999999999999\"", 412),
        ("\"-1\"", 412),
    ] {
        let got = a
            .send(
                Method::DELETE,
                "/v1/groups/eng",
                &[("if-match", if_match)],
                None,
            )
            .await;
        a.expect(&format!("If-Match: {if_match}"), &got, &[status], None);
    }

    // Policies: the language refuses what would hurt, at the exact place.
    for (doc, pointer) in [
        (
            json!({"allow": {"and": [{"http_path": {"matches": "[a-z]{100000}"}}]}}),
            "/document/allow/and/0/http_path/matches",
        ),
        (
            json!({"allow": {"and": [{"source_ip": {"is": "10.0.0.0/33"}}]}}),
            "/document/allow/and/0/source_ip/is",
        ),
        (
            json!({"allow": {"and": [{"time_of_day": {"tz": "Mars/Olympus", "after": "08:00", "before": "09:00"}}]}}),
            "/document/allow/and/0/time_of_day/tz",
        ),
        (
            json!({"allow": {"and": [{"date": {"tz": "UTC", "after": "2026-01-01", "before": "10000-01-01"}}]}}),
            "/document/allow/and/0/date/before",
        ),
        (
            json!({"allow": {"and": [{"auth_age": {"lt": 1e308}}]}}),
            "/document/allow/and/0/auth_age/lt",
        ),
    ] {
        let got = a
            .json(
                Method::POST,
                "/v1/policies/validate",
                &json!({"document": doc}).to_string(),
            )
            .await;
        a.expect(&format!("policy: {doc}"), &got, &[422], Some(pointer));
    }

    // Many regular expressions: each costs CPU and memory wherever the policy is
    // loaded, so their number is bounded (9,000 near the size limit took 18 s).
    let many: Vec<Value> = (0..2000)
        .map(|i| json!({"http_path": {"matches": format!("/a{i}/.*")}}))
        .collect();
    let got = a
        .json(
            Method::POST,
            "/v1/policies/validate",
            &json!({"document": {"allow": {"or": many}}}).to_string(),
        )
        .await;
    a.expect(
        "2000 regular expressions",
        &got,
        &[422],
        Some("/document/allow/or/256/http_path/matches"),
    );

    // Nothing refused was kept, and every filtered list still answers.
    for path in [
        "/v1/users?email=a@x",
        "/v1/users?subject=s",
        "/v1/groups",
        "/v1/routes?host=a.example",
        "/v1/devices?name=laptop",
        "/v1/audit?actor=bootstrap",
    ] {
        let got = a.send(Method::GET, path, &[], None).await;
        a.expect_ok(&format!("afterwards: {path}"), &got, 200);
        if path.starts_with("/v1/users") && got.json()["items"] != json!([]) {
            a.failures
                .push(format!("a refused user was stored: {}", got.text));
        }
    }
    let log = cp.log_text();
    for bad in ["Store error", "panicked"] {
        if let Some(line) = log.lines().find(|l| l.contains(bad)) {
            a.failures.push(format!("the control plane logged: {line}"));
        }
    }

    assert!(
        a.failures.is_empty(),
        "{} case(s) failed:\n{}",
        a.failures.len(),
        a.failures.join("\n")
    );
}

/// A hello the control plane must refuse, and the gRPC code it refuses it with.
async fn hello_refusal(cp: &ControlProcess, token: &str, proxy_id: &str) -> tonic::Code {
    let channel = tonic::transport::Endpoint::from_shared(cp.grpc_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let hello = Hello {
        proxy_id: proxy_id.into(),
        ..Hello::default()
    };
    let first = ProxyMessage {
        msg: Some(proxy_message::Msg::Hello(hello)),
    };
    let mut request = tonic::Request::new(tokio_stream::iter([first]));
    if let Ok(v) = format!("Bearer {token}").parse() {
        request.metadata_mut().insert("authorization", v);
    }
    match ControlPlaneClient::new(channel).subscribe(request).await {
        Err(status) => status.code(),
        Ok(res) => {
            let mut inbound = res.into_inner();
            match inbound.message().await {
                Err(status) => status.code(),
                Ok(_) => tonic::Code::Ok,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_refuses_bad_hellos() {
    let pg = TestPostgres::start().unwrap();
    let db = pg.create_database("hellos").unwrap();
    let cp = ControlProcess::start(&db);
    let token = join_token(&client(), &cp.url, "fleet").await;
    let mut failures = Vec::new();
    for (token, id, want) in [
        ("join_nope", "p1", tonic::Code::Unauthenticated),
        ("", "p1", tonic::Code::Unauthenticated),
        (token.as_str(), "", tonic::Code::InvalidArgument),
        // Into the log, the fleet table and audit actors: no control characters.
        (token.as_str(), "p\0", tonic::Code::InvalidArgument),
        (
            token.as_str(),
            "p1\nINFO Proxy subscribed proxy=admin",
            tonic::Code::InvalidArgument,
        ),
        (
            token.as_str(),
            &"p".repeat(201),
            tonic::Code::InvalidArgument,
        ),
    ] {
        let got = hello_refusal(&cp, token, id).await;
        if got != want {
            failures.push(format!(
                "token {token:.12} id {id:?}: wanted {want:?}, got {got:?}"
            ));
        }
    }
    let log = cp.log_text();
    if let Some(line) = log
        .lines()
        .find(|l| l.contains("panicked") || l.contains("Store error"))
    {
        failures.push(format!("the control plane logged: {line}"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
