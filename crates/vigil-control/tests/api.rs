//! End-to-end tests of the admin REST API: the router runs in-process (driven with
//! `tower::ServiceExt::oneshot`) over both backends, SQLite (a temporary file) and
//! PostgreSQL (a throwaway cluster, or `DATABASE_URL`).
#![allow(clippy::unwrap_used)]

use axum::body::Body;
use axum::Router;
use http::{header, HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;
use vigil_control::crypto::token_hash;
use vigil_control::{router, Control, ControlConfig};
use vigil_store::{Store, StoreOptions};

const BOOTSTRAP: &str = "bootstrap-owner-token";
/// 32 bytes (0..=31), base64.
const SECRET_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
use vigil_control::body::MAX_BODY;
const JSON: &str = "application/json";
const MERGE_PATCH: &str = "application/merge-patch+json";

// ---------- backends ----------

async fn sqlite() -> Store {
    let url = vigil_test_postgres::sqlite_url().unwrap();
    let store = Store::connect(&url, StoreOptions::default()).await.unwrap();
    store.migrate().await.unwrap();
    store
}

async fn postgres() -> Store {
    let url = tokio::task::spawn_blocking(vigil_test_postgres::database_url)
        .await
        .unwrap()
        .unwrap();
    let store = Store::connect(&url, StoreOptions::default()).await.unwrap();
    store.migrate().await.unwrap();
    store
}

macro_rules! api_tests {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() { super::$name(super::Api::new(super::sqlite().await)).await })*
        }
        mod on_postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() { super::$name(super::Api::new(super::postgres().await)).await })*
        }
    };
}

api_tests!(
    crud_every_kind,
    conditional_requests,
    not_found_names_the_resource,
    error_pointers_are_escaped,
    numbers_round_trip,
    list_pagination_and_filters,
    strict_input,
    validation_errors,
    referenced_policy_errors_point_into_the_request,
    uniqueness_and_references,
    concurrent_writes,
    identity_provider_secret_is_write_only,
    tokens_are_shown_once,
    token_responses_are_not_cached,
    auth_and_roles,
    audit_trail,
    audit_hides_admin_tokens_below_owner,
    route_header_values_hidden_below_editor,
    session_revocation,
    posture_reports,
    upstream_ca_is_checked,
    idle_sessions_are_revoked,
    validate_policy_endpoint,
    health_and_fallbacks,
);

// ---------- client ----------

/// The router plus the token requests are sent with.
#[derive(Clone)]
struct Api {
    app: Router,
    control: Control,
    token: Option<String>,
}

/// A response, its body read.
#[derive(Debug)]
struct Res {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
    json: Value,
}

impl Api {
    fn new(store: Store) -> Api {
        Api::with_secret_key(store, Some(SECRET_KEY))
    }

    /// An API over `store` whose secret key (id `k1`) is `key`.
    fn with_secret_key(store: Store, key: Option<&str>) -> Api {
        let control = Control::new(
            store,
            ControlConfig {
                bootstrap_token: Some(BOOTSTRAP.into()),
                secret_key: key.map(|k| ("k1".into(), k.into())),
            },
        )
        .unwrap();
        Api {
            app: router(control.clone()),
            control,
            token: Some(BOOTSTRAP.into()),
        }
    }

    fn store(&self) -> &Store {
        &self.control.store
    }

    /// The same API, called with another bearer token.
    fn with_token(&self, token: &str) -> Api {
        Api {
            token: Some(token.into()),
            ..self.clone()
        }
    }

    /// The same API, called without `Authorization`.
    fn anonymous(&self) -> Api {
        Api {
            token: None,
            ..self.clone()
        }
    }

    async fn send(
        &self,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Res {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = self
            .app
            .clone()
            .oneshot(req.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let (parts, body) = res.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Res {
            status: parts.status,
            headers: parts.headers,
            text,
            json,
        }
    }

    async fn get(&self, uri: &str) -> Res {
        self.send(Method::GET, uri, &[], vec![]).await
    }

    async fn post(&self, uri: &str, body: &Value) -> Res {
        self.post_raw(uri, body.to_string().into_bytes()).await
    }

    /// A POST of these bytes as `application/json`.
    async fn post_raw(&self, uri: &str, body: Vec<u8>) -> Res {
        self.send(Method::POST, uri, &[("content-type", JSON)], body)
            .await
    }

    async fn post_empty(&self, uri: &str) -> Res {
        self.send(Method::POST, uri, &[], vec![]).await
    }

    async fn put(&self, uri: &str, if_match: Option<&str>, body: &Value) -> Res {
        let mut h = vec![("content-type", JSON)];
        h.extend(if_match.map(|m| ("if-match", m)));
        self.send(Method::PUT, uri, &h, body.to_string().into_bytes())
            .await
    }

    async fn patch(&self, uri: &str, if_match: Option<&str>, body: &Value) -> Res {
        self.patch_as(uri, if_match, MERGE_PATCH, body).await
    }

    async fn patch_as(&self, uri: &str, if_match: Option<&str>, ct: &str, body: &Value) -> Res {
        let mut h = vec![("content-type", ct)];
        h.extend(if_match.map(|m| ("if-match", m)));
        self.send(Method::PATCH, uri, &h, body.to_string().into_bytes())
            .await
    }

    async fn delete(&self, uri: &str, if_match: Option<&str>) -> Res {
        let h: Vec<(&str, &str)> = if_match.map(|m| ("if-match", m)).into_iter().collect();
        self.send(Method::DELETE, uri, &h, vec![]).await
    }

    /// Creates a resource, expecting 201; returns its body.
    async fn create(&self, path: &str, body: Value) -> Value {
        self.post(&format!("/v1/{path}"), &body)
            .await
            .status(201)
            .json
    }

    /// Creates a resource, expecting 201; returns its id.
    async fn create_id(&self, path: &str, body: Value) -> String {
        self.create(path, body).await["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// The secret stored for an entity (token hash or sealed secret).
    async fn secret(&self, kind: &str, id: &str) -> Option<String> {
        self.store().secret(kind, id).await.unwrap()
    }

    /// Every audit event matching `query`, following cursors.
    async fn audit(&self, query: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut uri = format!("/v1/audit?limit=1000{query}");
        loop {
            let page = self.get(&uri).await.status(200).json;
            out.extend(page["items"].as_array().unwrap().iter().cloned());
            match page["next_cursor"].as_str() {
                Some(c) => uri = format!("/v1/audit?limit=1000{query}&cursor={c}"),
                None => return out,
            }
        }
    }
}

impl Res {
    /// Asserts the status, showing the body when it differs.
    #[track_caller]
    fn status(self, status: u16) -> Res {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected status; body: {}",
            self.text
        );
        self
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    fn etag(&self) -> String {
        self.header("etag").expect("an ETag header").to_owned()
    }

    /// Asserts an RFC 9457 problem with this status and type slug.
    #[track_caller]
    fn problem(self, status: u16, slug: &str) -> Res {
        let res = self.status(status);
        assert_eq!(
            res.header("content-type"),
            Some("application/problem+json"),
            "{}",
            res.text
        );
        assert_eq!(res.json["status"], json!(status), "{}", res.text);
        assert_eq!(
            res.json["type"],
            json!(format!("https://vigil.dev/problems/{slug}")),
            "{}",
            res.text
        );
        assert!(
            res.json["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{}",
            res.text
        );
        assert!(
            res.json["detail"].as_str().is_some_and(|t| !t.is_empty()),
            "{}",
            res.text
        );
        res
    }

    /// A 400 naming exactly one field.
    #[track_caller]
    fn bad_field(self, pointer: &str) -> Res {
        let res = self.problem(400, "invalid-field");
        assert_eq!(res.pointers(), vec![pointer], "{}", res.text);
        res
    }

    /// A 422 whose located errors are exactly these pointers.
    #[track_caller]
    fn invalid(self, pointers: &[&str]) -> Res {
        let res = self.problem(422, "validation");
        assert_eq!(res.pointers(), pointers, "{}", res.text);
        res
    }

    fn pointers(&self) -> Vec<&str> {
        self.json["errors"]
            .as_array()
            .map(|a| a.iter().map(|e| e["pointer"].as_str().unwrap()).collect())
            .unwrap_or_default()
    }

    fn detail(&self) -> &str {
        self.json["detail"].as_str().unwrap_or_default()
    }

    fn error_detail(&self, i: usize) -> &str {
        self.json["errors"][i]["detail"]
            .as_str()
            .unwrap_or_default()
    }

    fn version(&self) -> i64 {
        self.json["version"].as_i64().expect("a version")
    }
}

fn quoted(version: i64) -> String {
    format!("\"{version}\"")
}

/// The document part of a resource: without id, version, timestamps and token.
fn doc(v: &Value) -> Value {
    let mut v = v.clone();
    for k in ["id", "version", "created_at", "updated_at", "token"] {
        v.as_object_mut().unwrap().remove(k);
    }
    v
}

fn with(base: &Value, extra: Value) -> Value {
    let mut out = base.clone();
    for (k, v) in extra.as_object().unwrap() {
        out[k] = v.clone();
    }
    out
}

fn ids(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect()
}

fn parse_time(s: &str) -> chrono::DateTime<chrono::FixedOffset> {
    chrono::DateTime::parse_from_rfc3339(s).unwrap_or_else(|e| panic!("`{s}` is not RFC 3339: {e}"))
}

fn default_settings() -> Value {
    json!({
        "timeout_ms": 30000, "preserve_host": false, "set_request_headers": {},
        "remove_request_headers": [], "allow_websockets": true, "cors_preflight": false
    })
}

fn accept_all() -> Value {
    json!({"allow": {"and": [{"accept": true}]}})
}

async fn new_user(api: &Api, subject: &str) -> String {
    api.create_id(
        "users",
        json!({"issuer": "https://idp.example.com", "subject": subject}),
    )
    .await
}

async fn new_session(api: &Api, user: &str) -> String {
    api.create_id(
        "sessions",
        json!({"user_id": user, "auth_time": "2030-01-01T00:00:00Z", "expires_at": "2030-01-01T08:00:00Z"}),
    )
    .await
}

/// Creates an admin token with a role; returns the bearer token.
async fn admin_token(api: &Api, name: &str, role: &str) -> String {
    let t = api
        .create("admin-tokens", json!({"name": name, "role": role}))
        .await;
    t["token"].as_str().unwrap().to_owned()
}

// ---------- 1. CRUD ----------

/// One kind's walk through create, read, list, replace, patch and delete.
struct Case {
    path: &'static str,
    /// Prefix of generated ids; `None` when the id is the name.
    id_prefix: Option<&'static str>,
    /// Prefix of the token issued on create.
    token_prefix: Option<&'static str>,
    create: Value,
    created: Value,
    replace: Value,
    replaced: Value,
    patch: Value,
    patched: Value,
}

async fn crud_every_kind(api: Api) {
    // What the cases refer to.
    api.create("groups", json!({"name": "staff"})).await;
    api.create(
        "policies",
        json!({"name": "base", "document": accept_all()}),
    )
    .await;
    api.create(
        "routes",
        json!({"name": "base", "host": "base.example.com", "upstreams": ["http://10.0.0.9"]}),
    )
    .await;
    api.create("service-accounts", json!({"name": "base-sa"}))
        .await;
    let user = new_user(&api, "owner").await;
    let device = api
        .create_id("devices", json!({"name": "base-device", "owner": user}))
        .await;
    let fingerprint: Vec<String> = (0..32u32).map(|i| format!("{:02X}", i * 7)).collect();
    let fingerprint_hex = fingerprint.concat().to_lowercase();
    let fingerprint = fingerprint.join(":");

    let cases = vec![
        Case {
            path: "policies",
            id_prefix: None,
            token_prefix: None,
            create: json!({"name": "p1", "description": "first", "document": accept_all()}),
            created: json!({"name": "p1", "description": "first", "document": accept_all()}),
            replace: json!({"name": "p1", "document": [{"deny": {"or": [{"groups": "contractors"}]}}, {"allow": {"and": [{"policy": "base"}]}}]}),
            replaced: json!({"name": "p1", "document": [{"deny": {"or": [{"groups": "contractors"}]}}, {"allow": {"and": [{"policy": "base"}]}}]}),
            patch: json!({"description": "patched"}),
            patched: json!({"name": "p1", "description": "patched", "document": [{"deny": {"or": [{"groups": "contractors"}]}}, {"allow": {"and": [{"policy": "base"}]}}]}),
        },
        Case {
            path: "routes",
            id_prefix: None,
            token_prefix: None,
            create: json!({"name": "web", "host": "Web.Example.COM.", "upstreams": ["http://10.0.0.1:8080"], "policies": ["base"]}),
            created: json!({"name": "web", "host": "web.example.com", "path": {"prefix": "/"}, "upstreams": ["http://10.0.0.1:8080"],
                            "policies": ["base"], "settings": default_settings()}),
            replace: json!({"name": "web", "host": "web.example.com", "path": {"exact": "/login"},
                            "upstreams": ["https://a.internal", "http://b.internal:81/base"],
                            "policy": {"allow": {"and": [{"policy": "base"}]}},
                            "settings": {"timeout_ms": 5000, "set_request_headers": {"X-Env": "prod"}}}),
            replaced: json!({"name": "web", "host": "web.example.com", "path": {"exact": "/login"},
                             "upstreams": ["https://a.internal", "http://b.internal:81/base"], "policies": [],
                             "policy": {"allow": {"and": [{"policy": "base"}]}},
                             "settings": with(&default_settings(), json!({"timeout_ms": 5000, "set_request_headers": {"X-Env": "prod"}}))}),
            patch: json!({"description": "Web app", "settings": {"cors_preflight": true, "max_auth_age_s": 3600}}),
            patched: json!({"name": "web", "description": "Web app", "host": "web.example.com", "path": {"exact": "/login"},
                            "upstreams": ["https://a.internal", "http://b.internal:81/base"], "policies": [],
                            "policy": {"allow": {"and": [{"policy": "base"}]}},
                            "settings": with(&default_settings(), json!({"timeout_ms": 5000, "set_request_headers": {"X-Env": "prod"},
                                                                         "cors_preflight": true, "max_auth_age_s": 3600}))}),
        },
        Case {
            path: "users",
            id_prefix: Some("usr_"),
            token_prefix: None,
            create: json!({"issuer": "https://idp.example.com", "subject": "alice", "email": "alice@example.com", "groups": ["staff", "staff"]}),
            created: json!({"issuer": "https://idp.example.com", "subject": "alice", "email": "alice@example.com", "email_verified": false,
                            "status": "active", "groups": ["staff"], "attributes": {}}),
            replace: json!({"issuer": "https://idp.example.com", "subject": "alice", "status": "suspended", "display_name": "Alice"}),
            replaced: json!({"issuer": "https://idp.example.com", "subject": "alice", "email_verified": false, "display_name": "Alice",
                             "status": "suspended", "groups": [], "attributes": {}}),
            patch: json!({"attributes": {"team": "red", "level": 3}, "email": "alice@corp.example", "email_verified": true}),
            patched: json!({"issuer": "https://idp.example.com", "subject": "alice", "email": "alice@corp.example", "email_verified": true,
                            "display_name": "Alice", "status": "suspended", "groups": [], "attributes": {"team": "red", "level": 3}}),
        },
        Case {
            path: "groups",
            id_prefix: None,
            token_prefix: None,
            create: json!({"name": "eng", "description": "Engineers"}),
            created: json!({"name": "eng", "description": "Engineers"}),
            replace: json!({"name": "eng"}),
            replaced: json!({"name": "eng"}),
            patch: json!({"description": "Eng"}),
            patched: json!({"name": "eng", "description": "Eng"}),
        },
        Case {
            path: "devices",
            id_prefix: Some("dev_"),
            token_prefix: None,
            create: json!({"name": "laptop", "owner": user, "client_certificate_sha256": fingerprint}),
            created: json!({"name": "laptop", "owner": user, "approved": false, "revoked": false, "posture": {"attributes": {}},
                            "client_certificate_sha256": fingerprint_hex}),
            replace: json!({"name": "laptop", "approved": true,
                            "posture": {"attributes": {"managed": true, "os": "macos"}, "expires_at": "2030-01-01T01:00:00+01:00"}}),
            replaced: json!({"name": "laptop", "approved": true, "revoked": false,
                             "posture": {"attributes": {"managed": true, "os": "macos"}, "expires_at": "2030-01-01T00:00:00Z"}}),
            patch: json!({"revoked": true, "posture": {"attributes": {"os": null}}}),
            patched: json!({"name": "laptop", "approved": true, "revoked": true,
                            "posture": {"attributes": {"managed": true}, "expires_at": "2030-01-01T00:00:00Z"}}),
        },
        Case {
            path: "service-accounts",
            id_prefix: None,
            token_prefix: Some("vgl_sa_"),
            create: json!({"name": "ci", "groups": ["staff"], "expires_at": "2031-06-01T02:00:00+02:00"}),
            created: json!({"name": "ci", "groups": ["staff"], "expires_at": "2031-06-01T00:00:00Z", "disabled": false}),
            replace: json!({"name": "ci", "disabled": true}),
            replaced: json!({"name": "ci", "groups": [], "disabled": true}),
            patch: json!({"description": "CI bot"}),
            patched: json!({"name": "ci", "description": "CI bot", "groups": [], "disabled": true}),
        },
        Case {
            path: "grants",
            id_prefix: Some("grt_"),
            token_prefix: None,
            create: json!({"subject": {"user": user}, "route": "base", "start": "2030-01-01T00:00:00+02:00",
                           "end": "2030-01-02T00:00:00Z", "reason": "incident 42", "approver": "bob"}),
            created: json!({"subject": {"user": user}, "route": "base", "start": "2029-12-31T22:00:00Z",
                            "end": "2030-01-02T00:00:00Z", "reason": "incident 42", "approver": "bob"}),
            replace: json!({"subject": {"service_account": "base-sa"}, "route": "base", "start": "2030-01-01T00:00:00Z",
                            "end": "2030-01-01T04:00:00Z", "reason": "maintenance", "approver": "carol"}),
            replaced: json!({"subject": {"service_account": "base-sa"}, "route": "base", "start": "2030-01-01T00:00:00Z",
                             "end": "2030-01-01T04:00:00Z", "reason": "maintenance", "approver": "carol"}),
            patch: json!({"approver": "dave"}),
            patched: json!({"subject": {"service_account": "base-sa"}, "route": "base", "start": "2030-01-01T00:00:00Z",
                            "end": "2030-01-01T04:00:00Z", "reason": "maintenance", "approver": "dave"}),
        },
        Case {
            path: "identity-providers",
            id_prefix: None,
            token_prefix: None,
            create: json!({"name": "corp", "issuer_url": "https://idp.example.com", "client_id": "vigil"}),
            created: json!({"name": "corp", "issuer_url": "https://idp.example.com", "client_id": "vigil", "client_secret_set": false,
                            "scopes": ["openid", "email", "profile"],
                            "claim_mapping": {"email": "email", "groups": "groups", "name": "name"}, "allowed_domains": [], "audiences": []}),
            replace: json!({"name": "corp", "issuer_url": "http://localhost:5556/dex", "client_id": "vigil2",
                            "scopes": ["openid", "groups"], "claim_mapping": {"groups": "roles"}}),
            replaced: json!({"name": "corp", "issuer_url": "http://localhost:5556/dex", "client_id": "vigil2", "client_secret_set": false,
                             "scopes": ["openid", "groups"],
                             "claim_mapping": {"email": "email", "groups": "roles", "name": "name"}, "allowed_domains": [], "audiences": []}),
            patch: json!({"allowed_domains": [" Corp.Example "]}),
            patched: json!({"name": "corp", "issuer_url": "http://localhost:5556/dex", "client_id": "vigil2", "client_secret_set": false,
                            "scopes": ["openid", "groups"],
                            "claim_mapping": {"email": "email", "groups": "roles", "name": "name"}, "allowed_domains": ["corp.example"], "audiences": []}),
        },
        Case {
            path: "sessions",
            id_prefix: Some("ses_"),
            token_prefix: None,
            create: json!({"user_id": user, "auth_time": "2030-01-01T00:00:00Z", "expires_at": "2030-01-01T10:00:00+02:00",
                           "amr": ["pwd", "otp"]}),
            created: json!({"user_id": user, "auth_time": "2030-01-01T00:00:00Z", "expires_at": "2030-01-01T08:00:00Z",
                            "amr": ["pwd", "otp"]}),
            replace: json!({"user_id": user, "device_id": device, "identity_provider": "corp", "auth_time": "2030-01-01T00:00:00Z",
                            "expires_at": "2030-01-01T08:00:00Z", "last_seen_at": "2030-01-01T01:00:00.5Z"}),
            replaced: json!({"user_id": user, "device_id": device, "identity_provider": "corp", "auth_time": "2030-01-01T00:00:00Z",
                             "expires_at": "2030-01-01T08:00:00Z", "amr": [], "last_seen_at": "2030-01-01T01:00:00Z"}),
            patch: json!({"revoked_at": "2030-01-01T02:00:00Z", "amr": ["hwk"]}),
            patched: json!({"user_id": user, "device_id": device, "identity_provider": "corp", "auth_time": "2030-01-01T00:00:00Z",
                            "expires_at": "2030-01-01T08:00:00Z", "amr": ["hwk"], "revoked_at": "2030-01-01T02:00:00Z",
                            "last_seen_at": "2030-01-01T01:00:00Z"}),
        },
        Case {
            path: "join-tokens",
            id_prefix: None,
            token_prefix: Some("vgl_join_"),
            create: json!({"name": "edge", "description": "edge fleet"}),
            created: json!({"name": "edge", "description": "edge fleet"}),
            replace: json!({"name": "edge", "expires_at": "2032-01-01T00:00:00Z"}),
            replaced: json!({"name": "edge", "expires_at": "2032-01-01T00:00:00Z"}),
            patch: json!({"description": "edge"}),
            patched: json!({"name": "edge", "description": "edge", "expires_at": "2032-01-01T00:00:00Z"}),
        },
        Case {
            path: "admin-tokens",
            id_prefix: None,
            token_prefix: Some("vgl_admin_"),
            create: json!({"name": "ops", "role": "viewer"}),
            created: json!({"name": "ops", "role": "viewer"}),
            replace: json!({"name": "ops", "role": "editor", "expires_at": "2099-01-01T00:00:00Z"}),
            replaced: json!({"name": "ops", "role": "editor", "expires_at": "2099-01-01T00:00:00Z"}),
            patch: json!({"role": "owner", "expires_at": null}),
            patched: json!({"name": "ops", "role": "owner"}),
        },
    ];
    for case in cases {
        crud(&api, case).await;
    }
}

async fn crud(api: &Api, c: Case) {
    let base = format!("/v1/{}", c.path);
    let ctx = c.path;

    // Create.
    let created = api.post(&base, &c.create).await.status(201);
    let id = created.json["id"].as_str().unwrap().to_owned();
    match c.id_prefix {
        None => assert_eq!(
            id,
            c.create["name"].as_str().unwrap(),
            "{ctx}: named kinds use the name as id"
        ),
        Some(p) => {
            let rest = id
                .strip_prefix(p)
                .unwrap_or_else(|| panic!("{ctx}: id {id} lacks {p}"));
            assert!(
                rest.len() == 32 && rest.bytes().all(|b| b.is_ascii_hexdigit()),
                "{ctx}: id {id}"
            );
        }
    }
    let uri = format!("{base}/{id}");
    assert_eq!(created.header("location"), Some(uri.as_str()), "{ctx}");
    let v1 = created.version();
    assert!(v1 > 0, "{ctx}");
    assert_eq!(created.etag(), quoted(v1), "{ctx}");
    assert_eq!(created.header("content-type"), Some(JSON), "{ctx}");
    assert_eq!(doc(&created.json), c.created, "{ctx}: created document");
    let created_at = created.json["created_at"].as_str().unwrap().to_owned();
    assert!(created_at.ends_with('Z'), "{ctx}: {created_at}");
    parse_time(&created_at);
    assert_eq!(
        created.json["updated_at"].as_str(),
        Some(created_at.as_str()),
        "{ctx}"
    );
    match c.token_prefix {
        Some(p) => {
            let t = created.json["token"].as_str().unwrap();
            assert!(
                t.starts_with(p) && t.len() > p.len() + 40,
                "{ctx}: token {t}"
            );
        }
        None => assert!(created.json.get("token").is_none(), "{ctx}"),
    }

    // Read.
    let got = api.get(&uri).await.status(200);
    assert_eq!(got.etag(), quoted(v1), "{ctx}");
    let mut expected = created.json.clone();
    expected.as_object_mut().unwrap().remove("token");
    assert_eq!(
        got.json, expected,
        "{ctx}: GET returns what POST did, minus the token"
    );

    // List.
    let list = api.get(&base).await.status(200);
    assert_eq!(list.json["next_cursor"], Value::Null, "{ctx}");
    let item = list.json["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == json!(id))
        .cloned();
    assert_eq!(item, Some(expected.clone()), "{ctx}: listed");

    // Replace: If-Match is required and must be current.
    api.put(&uri, None, &c.replace)
        .await
        .problem(428, "precondition-required");
    api.put(&uri, Some(&quoted(v1 - 1)), &c.replace)
        .await
        .problem(412, "precondition-failed");
    api.put(&uri, Some(&quoted(v1 + 1000)), &c.replace)
        .await
        .problem(412, "precondition-failed");
    // Server-owned fields may be echoed back and are ignored.
    let echoed = with(
        &c.replace,
        json!({"id": id, "version": 12345, "created_at": "1999-01-01T00:00:00Z", "updated_at": "x", "token": "vgl_mine"}),
    );
    let put = api.put(&uri, Some(&quoted(v1)), &echoed).await.status(200);
    let v2 = put.version();
    assert!(v2 > v1, "{ctx}");
    assert_eq!(put.etag(), quoted(v2), "{ctx}");
    assert_eq!(doc(&put.json), c.replaced, "{ctx}: replaced document");
    assert!(
        put.json.get("token").is_none(),
        "{ctx}: PUT never shows a token"
    );
    assert!(put.header("location").is_none(), "{ctx}");
    assert_eq!(
        put.json["created_at"].as_str(),
        Some(created_at.as_str()),
        "{ctx}"
    );
    assert!(
        parse_time(put.json["updated_at"].as_str().unwrap()) >= parse_time(&created_at),
        "{ctx}"
    );
    assert_eq!(api.get(&uri).await.status(200).json, put.json, "{ctx}");
    // The old ETag is stale now.
    api.put(&uri, Some(&quoted(v1)), &c.replace)
        .await
        .problem(412, "precondition-failed");
    // `*` overwrites whatever is there.
    let star = api.put(&uri, Some("*"), &c.replace).await.status(200);
    let v3 = star.version();
    assert!(v3 > v2, "{ctx}");
    assert_eq!(doc(&star.json), c.replaced, "{ctx}");

    // Patch (JSON merge patch).
    api.patch(&uri, None, &c.patch)
        .await
        .problem(428, "precondition-required");
    api.patch(&uri, Some(&quoted(v2)), &c.patch)
        .await
        .problem(412, "precondition-failed");
    let patched = api
        .patch(&uri, Some(&quoted(v3)), &c.patch)
        .await
        .status(200);
    let v4 = patched.version();
    assert!(v4 > v3, "{ctx}");
    assert_eq!(patched.etag(), quoted(v4), "{ctx}");
    assert_eq!(doc(&patched.json), c.patched, "{ctx}: patched document");
    // application/json is accepted for a merge patch too; the same patch again is a no-op but a new version.
    let again = api
        .patch_as(&uri, Some(&quoted(v4)), JSON, &c.patch)
        .await
        .status(200);
    assert!(again.version() > v4, "{ctx}");
    assert_eq!(doc(&again.json), c.patched, "{ctx}");
    let v5 = again.version();
    assert_eq!(api.get(&uri).await.status(200).json, again.json, "{ctx}");

    // Delete: If-Match optional, refused when stale.
    api.delete(&uri, Some(&quoted(v4)))
        .await
        .problem(412, "precondition-failed");
    let gone = api.delete(&uri, Some(&quoted(v5))).await.status(204);
    assert!(gone.text.is_empty(), "{ctx}");
    api.get(&uri).await.problem(404, "not-found");
    api.delete(&uri, None).await.problem(404, "not-found");
    api.put(&uri, Some("*"), &c.replace)
        .await
        .problem(404, "not-found");
    api.patch(&uri, Some("*"), &c.patch)
        .await
        .problem(404, "not-found");
    assert!(
        !ids(&api.get(&base).await.status(200).json).contains(&id),
        "{ctx}"
    );

    // Without If-Match a delete just happens.
    let again = api.post(&base, &c.create).await.status(201);
    let again_id = again.json["id"].as_str().unwrap();
    api.delete(&format!("{base}/{again_id}"), None)
        .await
        .status(204);
    api.delete(&format!("{base}/{again_id}"), None)
        .await
        .problem(404, "not-found");
}

/// ETag and If-Match details, on policies.
async fn conditional_requests(api: Api) {
    let p = api
        .post(
            "/v1/policies",
            &json!({"name": "p", "document": accept_all()}),
        )
        .await
        .status(201);
    let etag = p.etag();
    let replace = json!({"name": "p", "description": "x", "document": accept_all()});
    // Malformed If-Match.
    api.put("/v1/policies/p", Some("1"), &replace)
        .await
        .problem(400, "bad-request");
    // A quoted value this server never issues.
    api.put("/v1/policies/p", Some("\"abc\""), &replace)
        .await
        .problem(412, "precondition-failed");
    // RFC 9110: two If-Match fields are one list; none of these matches. A weak
    // ETag never matches (strong comparison); `*` cannot be listed with tags.
    let put_with = |fields: Vec<&'static str>| {
        let mut h: Vec<(&str, &str)> = vec![("content-type", JSON)];
        h.extend(fields.into_iter().map(|f| ("if-match", f)));
        h
    };
    for (fields, status) in [
        (vec!["\"998\"", "\"999\""], 412),
        (vec!["\"998\", \"999\""], 412),
        (vec!["W/\"1\""], 412),
        (vec!["*, \"1\""], 400),
        (vec!["\"1\" \"2\""], 400),
        (vec!["\"a b\""], 400),
        (vec![""], 400),
    ] {
        let got = api
            .send(
                Method::PUT,
                "/v1/policies/p",
                &put_with(fields.clone()),
                replace.to_string().into_bytes(),
            )
            .await;
        assert_eq!(got.status.as_u16(), status, "{fields:?}: {}", got.text);
    }
    // Tags are compared octet by octet: `"+N"` and `"0N"` are not `"N"`.
    let n = etag.trim_matches('"');
    let lookalikes = format!("\"+{n}\", \"0{n}\"");
    let got = api
        .send(
            Method::PUT,
            "/v1/policies/p",
            &[("content-type", JSON), ("if-match", &lookalikes)],
            replace.to_string().into_bytes(),
        )
        .await;
    assert_eq!(got.status.as_u16(), 412, "{lookalikes}: {}", got.text);
    // Nothing above changed the policy.
    assert_eq!(api.get("/v1/policies/p").await.status(200).etag(), etag);
    // The 412 says which ETag is current.
    let stale = api
        .put("/v1/policies/p", Some("\"999999\""), &replace)
        .await
        .problem(412, "precondition-failed");
    assert!(stale.detail().contains(&etag), "{}", stale.detail());
    // A list holding the current ETag matches, whichever field holds it.
    let listed = format!("\"998\", W/{etag}, {etag}");
    let got = api
        .send(
            Method::PUT,
            "/v1/policies/p",
            &[
                ("content-type", JSON),
                ("if-match", "\"997\""),
                ("if-match", &listed),
            ],
            replace.to_string().into_bytes(),
        )
        .await
        .status(200);
    let etag = got.etag();
    // The body's id must match the URL's; the name cannot change.
    api.put(
        "/v1/policies/p",
        Some(&etag),
        &with(&replace, json!({"id": "q"})),
    )
    .await
    .bad_field("/id");
    api.put(
        "/v1/policies/p",
        Some(&etag),
        &with(&replace, json!({"name": "q"})),
    )
    .await
    .bad_field("/name");
    api.patch("/v1/policies/p", Some(&etag), &json!({"name": "q"}))
        .await
        .bad_field("/name");
    api.patch("/v1/policies/p", Some(&etag), &json!({"id": "q"}))
        .await
        .bad_field("/id");
    // Merge-patch null removes a member; removing a required one is a 400 naming it.
    let patched = api
        .patch("/v1/policies/p", Some(&etag), &json!({"description": "d"}))
        .await
        .status(200);
    let removed = api
        .patch(
            "/v1/policies/p",
            Some(&patched.etag()),
            &json!({"description": null}),
        )
        .await
        .status(200);
    assert_eq!(
        doc(&removed.json),
        json!({"name": "p", "document": accept_all()})
    );
    let missing = api
        .patch(
            "/v1/policies/p",
            Some(&removed.etag()),
            &json!({"document": null}),
        )
        .await
        .problem(400, "invalid-field");
    assert!(
        missing.detail().contains("missing field `document`"),
        "{}",
        missing.detail()
    );
    // A non-object merge patch replaces the whole document, which then is not one.
    api.patch("/v1/policies/p", Some(&removed.etag()), &json!([1]))
        .await
        .bad_field("");
    // Delete with `*`.
    api.delete("/v1/policies/p", Some("*")).await.status(204);
}

/// 404s name the resource in words.
async fn not_found_names_the_resource(api: Api) {
    // The resource in plain words: its singular title or its kind with spaces.
    for (path, words) in [
        ("policies", &["policy"][..]),
        ("routes", &["route"]),
        ("users", &["user"]),
        ("groups", &["group"]),
        ("devices", &["device"]),
        ("service-accounts", &["service account"]),
        ("grants", &["access grant", "grant"]),
        ("identity-providers", &["identity provider"]),
        ("sessions", &["session"]),
        ("join-tokens", &["proxy join token", "join token"]),
        ("admin-tokens", &["admin token"]),
    ] {
        let uri = format!("/v1/{path}/nope");
        let named = |detail: &str| {
            words
                .iter()
                .any(|w| detail == format!("{w} `nope` does not exist"))
        };
        let res = api.get(&uri).await.problem(404, "not-found");
        assert!(named(res.detail()), "GET {path}: {}", res.detail());
        let res = api.delete(&uri, None).await.problem(404, "not-found");
        assert!(named(res.detail()), "DELETE {path}: {}", res.detail());
    }
}

/// JSON Pointers in problems escape `~` and `/` in member names (RFC 6901).
async fn error_pointers_are_escaped(api: Api) {
    api.post("/v1/groups", &json!({"name": "g", "a/b~c": 1}))
        .await
        .bad_field("/a~1b~0c");
    api.post(
        "/v1/devices",
        &json!({"name": "d", "posture": {"attributes": {"a/b": [1]}}}),
    )
    .await
    .invalid(&["/posture/attributes/a~1b"]);
    api.post(
        "/v1/routes",
        &json!({"name": "r", "host": "r.example.com", "upstreams": ["http://x"],
                "settings": {"set_request_headers": {"a/b": "v"}}}),
    )
    .await
    .invalid(&["/settings/set_request_headers/a~1b"]);
}

/// Numbers in documents come back as they were sent (or are refused), never silently changed.
async fn numbers_round_trip(api: Api) {
    let attributes = json!({"max": u64::MAX, "min": i64::MIN, "half": 0.5, "big": 1e300});
    let res = api
        .post(
            "/v1/users",
            &json!({"issuer": "https://i.example", "subject": "n", "attributes": attributes}),
        )
        .await;
    match res.status.as_u16() {
        201 => assert_eq!(res.json["attributes"], attributes, "{}", res.text),
        400 | 422 => assert_eq!(res.pointers(), ["/attributes/max"], "{}", res.text),
        other => panic!("unexpected {other}: {}", res.text),
    }
}

async fn list_pagination_and_filters(api: Api) {
    for n in ["g5", "g3", "g1", "g4", "g2"] {
        api.create("groups", json!({"name": n})).await;
    }
    let all = api.get("/v1/groups").await.status(200);
    assert_eq!(ids(&all.json), ["g1", "g2", "g3", "g4", "g5"]);
    assert_eq!(all.json["next_cursor"], Value::Null);
    assert_eq!(all.header("content-type"), Some(JSON));

    let p1 = api.get("/v1/groups?limit=2").await.status(200).json;
    assert_eq!(ids(&p1), ["g1", "g2"]);
    let c1 = p1["next_cursor"].as_str().unwrap();
    let p2 = api
        .get(&format!("/v1/groups?limit=2&cursor={c1}"))
        .await
        .status(200)
        .json;
    assert_eq!(ids(&p2), ["g3", "g4"]);
    let c2 = p2["next_cursor"].as_str().unwrap();
    let p3 = api
        .get(&format!("/v1/groups?cursor={c2}&limit=2"))
        .await
        .status(200)
        .json;
    assert_eq!(ids(&p3), ["g5"]);
    assert_eq!(p3["next_cursor"], Value::Null);
    // A page that is exactly full has no next page.
    let exact = api.get("/v1/groups?limit=5").await.status(200).json;
    assert_eq!(ids(&exact).len(), 5);
    assert_eq!(exact["next_cursor"], Value::Null);
    assert_eq!(
        ids(&api.get("/v1/groups?limit=1000").await.status(200).json).len(),
        5
    );
    // An empty kind.
    assert_eq!(
        api.get("/v1/routes").await.status(200).json,
        json!({"items": [], "next_cursor": null})
    );

    // Bad limits and cursors.
    for bad in ["0", "1001", "-1", "abc", "2.5", ""] {
        let res = api
            .get(&format!("/v1/groups?limit={bad}"))
            .await
            .bad_field("/query/limit");
        assert_eq!(res.error_detail(0), "must be a whole number from 1 to 1000");
    }
    api.get("/v1/groups?cursor=!!!")
        .await
        .bad_field("/query/cursor");

    // Unknown parameters are named, with what the list takes.
    let res = api
        .get("/v1/groups?limit=2&colour=red")
        .await
        .bad_field("/query/colour");
    assert_eq!(
        res.error_detail(0),
        "unknown parameter; this list takes limit, cursor"
    );
    let res = api
        .get("/v1/routes?hostname=x")
        .await
        .bad_field("/query/hostname");
    assert_eq!(
        res.error_detail(0),
        "unknown parameter; this list takes limit, cursor, host"
    );

    // Filters.
    let alice = api
        .create_id(
            "users",
            json!({"issuer": "https://a.example", "subject": "1", "email": "alice@example.com"}),
        )
        .await;
    let bob = api
        .create_id(
            "users",
            json!({"issuer": "https://b.example", "subject": "1", "email": "bob@example.com", "status": "suspended"}),
        ).await;
    assert_eq!(
        ids(&api
            .get("/v1/users?email=alice%40example.com")
            .await
            .status(200)
            .json),
        [alice.as_str()]
    );
    assert_eq!(
        ids(&api.get("/v1/users?status=suspended").await.status(200).json),
        [bob.as_str()]
    );
    assert_eq!(
        ids(&api
            .get("/v1/users?status=active&issuer=https%3A%2F%2Fa.example")
            .await
            .status(200)
            .json),
        [alice.as_str()]
    );
    assert_eq!(
        ids(&api
            .get("/v1/users?status=active&issuer=https%3A%2F%2Fb.example")
            .await
            .status(200)
            .json),
        Vec::<String>::new()
    );
    let both = ids(&api.get("/v1/users?subject=1").await.status(200).json);
    let mut expected = vec![alice.clone(), bob.clone()];
    expected.sort();
    assert_eq!(both, expected);
    let first = api
        .get("/v1/users?subject=1&limit=1")
        .await
        .status(200)
        .json;
    assert_eq!(ids(&first), [expected[0].as_str()]);
    let c = first["next_cursor"].as_str().unwrap();
    let second = api
        .get(&format!("/v1/users?subject=1&limit=1&cursor={c}"))
        .await
        .status(200)
        .json;
    assert_eq!(ids(&second), [expected[1].as_str()]);
    assert_eq!(second["next_cursor"], Value::Null);

    api.create(
        "routes",
        json!({"name": "a", "host": "a.example.com", "upstreams": ["http://x"]}),
    )
    .await;
    api.create(
        "routes",
        json!({"name": "b", "host": "b.example.com", "upstreams": ["http://x"]}),
    )
    .await;
    assert_eq!(
        ids(&api
            .get("/v1/routes?host=b.example.com")
            .await
            .status(200)
            .json),
        ["b"]
    );
    let s1 = new_session(&api, &alice).await;
    new_session(&api, &bob).await;
    assert_eq!(
        ids(&api
            .get(&format!("/v1/sessions?user_id={alice}"))
            .await
            .status(200)
            .json),
        [s1]
    );
    let d = api
        .create_id("devices", json!({"name": "mac", "owner": bob}))
        .await;
    api.create("devices", json!({"name": "pc"})).await;
    assert_eq!(
        ids(&api
            .get(&format!("/v1/devices?owner={bob}"))
            .await
            .status(200)
            .json),
        [d.as_str()]
    );
    assert_eq!(
        ids(&api.get("/v1/devices?name=mac").await.status(200).json),
        [d]
    );
    api.get("/v1/devices?user_id=x")
        .await
        .bad_field("/query/user_id");
    let grant = |route: &str, approver: &str| {
        json!({"subject": {"user": alice}, "route": route, "start": "2030-01-01T00:00:00Z",
               "end": "2030-01-02T00:00:00Z", "reason": "r", "approver": approver})
    };
    let ga = api.create_id("grants", grant("a", "carol")).await;
    let gb = api.create_id("grants", grant("b", "carol")).await;
    let gc = api.create_id("grants", grant("b", "dave")).await;
    assert_eq!(
        ids(&api.get("/v1/grants?route=a").await.status(200).json),
        [ga.as_str()]
    );
    assert_eq!(
        ids(&api
            .get("/v1/grants?route=b&approver=dave")
            .await
            .status(200)
            .json),
        [gc.as_str()]
    );
    let mut carol = vec![ga, gb];
    carol.sort();
    assert_eq!(
        ids(&api.get("/v1/grants?approver=carol").await.status(200).json),
        carol
    );
}

// ---------- 2. strict input ----------

async fn strict_input(api: Api) {
    let policy = |extra: Value| with(&json!({"name": "p", "document": accept_all()}), extra);

    // Unknown fields, top-level and nested.
    let res = api
        .post("/v1/policies", &policy(json!({"emial": "x"})))
        .await
        .bad_field("/emial");
    assert!(
        res.error_detail(0).contains("unknown field `emial`"),
        "{}",
        res.text
    );
    api.post(
        "/v1/routes",
        &json!({"name": "r", "host": "r.example.com", "upstreams": ["http://x"], "settings": {"timeoutms": 5}}),
    )
    .await
    .bad_field("/settings/timeoutms");
    api.post(
        "/v1/devices",
        &json!({"name": "d", "posture": {"attrs": {}}}),
    )
    .await
    .bad_field("/posture/attrs");

    // Wrong types.
    let res = api
        .post(
            "/v1/policies",
            &json!({"name": 5, "document": accept_all()}),
        )
        .await
        .bad_field("/name");
    assert!(
        res.error_detail(0)
            .contains("invalid type: integer `5`, expected a string"),
        "{}",
        res.text
    );
    api.post(
        "/v1/users",
        &json!({"issuer": "https://i", "subject": "s", "groups": "staff"}),
    )
    .await
    .bad_field("/groups");
    api.post(
        "/v1/users",
        &json!({"issuer": "https://i", "subject": "s", "groups": ["a", 7]}),
    )
    .await
    .bad_field("/groups/1");
    api.post(
        "/v1/users",
        &json!({"issuer": "https://i", "subject": "s", "status": "gone"}),
    )
    .await
    .bad_field("/status");
    api.post("/v1/admin-tokens", &json!({"name": "t", "role": "god"}))
        .await
        .bad_field("/role");
    api.post("/v1/routes", &json!({"name": "r", "host": "h.example", "upstreams": ["http://x"], "settings": {"timeout_ms": "5"}}))
        .await
        .bad_field("/settings/timeout_ms");
    api.post("/v1/routes", &json!({"name": "r", "host": "h.example", "upstreams": ["http://x"], "settings": {"timeout_ms": -5}}))
        .await
        .bad_field("/settings/timeout_ms");

    // Missing required fields: the detail names the member.
    let res = api
        .post("/v1/policies", &json!({"name": "p"}))
        .await
        .problem(400, "invalid-field");
    assert!(
        res.detail().contains("missing field `document`"),
        "{}",
        res.text
    );
    let res = api
        .post(
            "/v1/routes",
            &json!({"name": "r", "upstreams": ["http://x"]}),
        )
        .await
        .problem(400, "invalid-field");
    assert!(
        res.detail().contains("missing field `host`"),
        "{}",
        res.text
    );
    let res = api
        .post("/v1/admin-tokens", &json!({"name": "t"}))
        .await
        .problem(400, "invalid-field");
    assert!(
        res.detail().contains("missing field `role`"),
        "{}",
        res.text
    );

    // Not a JSON object; not JSON at all.
    api.post("/v1/policies", &json!([policy(json!({}))]))
        .await
        .bad_field("");
    api.post("/v1/policies", &json!("p")).await.bad_field("");
    let res = api.post_raw("/v1/policies", b"{\"name\": ".to_vec()).await;
    res.problem(400, "bad-request");
    api.post_raw("/v1/policies", vec![])
        .await
        .problem(400, "bad-request");

    // Invalid UTF-8.
    let res = api
        .post_raw("/v1/groups", b"{\"name\": \"g\xff\"}".to_vec())
        .await
        .problem(400, "bad-request");
    assert!(res.detail().contains("UTF-8"), "{}", res.text);

    // Duplicate keys, at the top and deep inside.
    let res = api
        .post_raw("/v1/groups", br#"{"name": "a", "name": "b"}"#.to_vec())
        .await
        .problem(400, "bad-request");
    assert!(
        res.detail().contains("duplicate key `name`"),
        "{}",
        res.text
    );
    let res = api
        .post_raw("/v1/policies", br#"{"name": "p", "document": {"allow": {"and": [{"accept": true}]}, "allow": {"and": [{"accept": false}]}}}"#.to_vec())
        .await
        .problem(400, "bad-request");
    assert!(
        res.detail().contains("duplicate key `allow`"),
        "{}",
        res.text
    );
    let g = api.create("groups", json!({"name": "dup"})).await;
    let res = api
        .send(
            Method::PATCH,
            "/v1/groups/dup",
            &[
                ("content-type", MERGE_PATCH),
                ("if-match", &quoted(g["version"].as_i64().unwrap())),
            ],
            br#"{"description": "a", "description": "b"}"#.to_vec(),
        )
        .await
        .problem(400, "bad-request");
    assert!(
        res.detail().contains("duplicate key `description`"),
        "{}",
        res.text
    );

    // Media types.
    let body = policy(json!({})).to_string().into_bytes();
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some(MERGE_PATCH),
        None,
    ] {
        let h: Vec<(&str, &str)> = ct.map(|c| ("content-type", c)).into_iter().collect();
        let res = api
            .send(Method::POST, "/v1/policies", &h, body.clone())
            .await
            .problem(415, "unsupported-media-type");
        assert_eq!(
            res.detail(),
            "Content-Type must be application/json",
            "{ct:?}"
        );
    }
    let res = api
        .send(
            Method::PATCH,
            "/v1/groups/dup",
            &[("content-type", "text/plain"), ("if-match", "*")],
            b"{}".to_vec(),
        )
        .await
        .problem(415, "unsupported-media-type");
    assert_eq!(
        res.detail(),
        "Content-Type must be application/merge-patch+json or application/json"
    );
    api.send(
        Method::PUT,
        "/v1/groups/dup",
        &[("content-type", "text/json"), ("if-match", "*")],
        br#"{"name":"dup"}"#.to_vec(),
    )
    .await
    .problem(415, "unsupported-media-type");
    // Parameters and case do not matter.
    api.send(
        Method::POST,
        "/v1/groups",
        &[("content-type", "Application/JSON; charset=utf-8")],
        br#"{"name":"ct"}"#.to_vec(),
    )
    .await
    .status(201);

    // Size: exactly 1 MiB is fine, one byte more is 413.
    let sized = |name: &str, total: usize| {
        let head = format!(
            r#"{{"name":"{name}","document":{},"description":""#,
            accept_all()
        );
        let tail = "\"}";
        let pad = total - head.len() - tail.len();
        let s = format!("{head}{}{tail}", "x".repeat(pad));
        assert_eq!(s.len(), total);
        s.into_bytes()
    };
    let res = api
        .post_raw("/v1/policies", sized("big", MAX_BODY + 1))
        .await
        .problem(413, "payload-too-large");
    assert_eq!(res.detail(), "the body is larger than 1048576 bytes");
    api.post_raw("/v1/policies", sized("big", 4 * MAX_BODY))
        .await
        .problem(413, "payload-too-large");
    api.send(
        Method::PUT,
        "/v1/groups/dup",
        &[("content-type", JSON), ("if-match", "*")],
        sized("dup", MAX_BODY + 1),
    )
    .await
    .problem(413, "payload-too-large");
    let fits = api
        .post_raw("/v1/policies", sized("big", MAX_BODY))
        .await
        .status(201);
    assert!(fits.json["description"].as_str().unwrap().len() > MAX_BODY - 100);
    assert!(api.get("/v1/policies/big").await.status(200).text.len() > MAX_BODY);

    // Nothing invalid was stored.
    assert_eq!(
        ids(&api.get("/v1/policies").await.status(200).json),
        ["big"]
    );
    assert_eq!(
        ids(&api.get("/v1/groups").await.status(200).json),
        ["ct", "dup"]
    );
    assert!(ids(&api.get("/v1/routes").await.status(200).json).is_empty());
}

async fn validation_errors(api: Api) {
    // Policy documents: every error located under /document.
    let res = api
        .post(
            "/v1/policies",
            &json!({"name": "p", "document": {"allow": {"and": [{"emial": "a@b.c"}]}}}),
        )
        .await
        .invalid(&["/document/allow/and/0/emial"]);
    assert!(
        res.detail().starts_with("/document/allow/and/0/emial: "),
        "{}",
        res.text
    );
    api.post(
        "/v1/policies",
        &json!({"name": "p", "document": {"allow": {"and": []}}}),
    )
    .await
    .invalid(&["/document/allow/and"]);
    let res = api
        .post(
            "/v1/policies",
            &json!({"name": "p", "document": {"allow": {"and": [{"accept": true}, {"groups": 5}]}, "deny": {"or": [{"nope": 1}]}}}),
        )
        .await
        .problem(422, "validation");
    let pointers = res.pointers();
    assert!(pointers.len() >= 2, "{}", res.text);
    assert!(
        pointers.contains(&"/document/allow/and/1/groups"),
        "{}",
        res.text
    );
    assert!(
        pointers.contains(&"/document/deny/or/0/nope"),
        "{}",
        res.text
    );
    assert!(res.detail().contains("more)"), "{}", res.text);
    api.post("/v1/policies", &json!({"name": "p", "document": 5}))
        .await
        .problem(422, "validation");
    // Unknown named policy; a policy that refers to itself.
    let res = api
        .post(
            "/v1/policies",
            &json!({"name": "a", "document": {"allow": {"and": [{"policy": "b"}]}}}),
        )
        .await
        .invalid(&["/document/allow/and/0/policy"]);
    assert!(res.error_detail(0).contains('b'), "{}", res.text);
    api.create("policies", json!({"name": "b", "document": accept_all()}))
        .await;
    api.create(
        "policies",
        json!({"name": "a", "document": {"allow": {"and": [{"policy": "b"}]}}}),
    )
    .await;
    api.post(
        "/v1/policies",
        &json!({"name": "c", "document": {"allow": {"and": [{"policy": "c"}]}}}),
    )
    .await
    .invalid(&["/document/allow/and/0/policy"]);

    // Names.
    for bad in ["Bad", "-x", "x-", "a_b", "", "a.b", &"a".repeat(64)] {
        let res = api
            .post("/v1/groups", &json!({"name": bad}))
            .await
            .invalid(&["/name"]);
        assert!(
            res.error_detail(0).contains("is not a valid name"),
            "{bad}: {}",
            res.text
        );
    }
    api.create("groups", json!({"name": "a".repeat(63)})).await;

    // Routes.
    let route = |extra: Value| {
        with(
            &json!({"name": "r", "host": "app.example.com", "upstreams": ["http://10.0.0.1"]}),
            extra,
        )
    };
    for host in [
        "bad host",
        "a..b",
        "-a.example.com",
        "*.com",
        "ex ample.com",
        "",
        "*",
    ] {
        api.post("/v1/routes", &route(json!({"host": host})))
            .await
            .invalid(&["/host"]);
    }
    for up in [
        "ftp://x",
        "x.example.com",
        "http://",
        "http://x/?q=1",
        "not a url",
    ] {
        api.post(
            "/v1/routes",
            &route(json!({"upstreams": ["http://ok", up]})),
        )
        .await
        .invalid(&["/upstreams/1"]);
    }
    for (extra, pointer) in [
        (json!({"upstreams": []}), "/upstreams"),
        (json!({"path": {"prefix": "api"}}), "/path"),
        (json!({"path": {"regex": "(["}}), "/path/regex"),
        (
            json!({"settings": {"timeout_ms": 0}}),
            "/settings/timeout_ms",
        ),
        (
            json!({"settings": {"prefix_rewrite": "x"}}),
            "/settings/prefix_rewrite",
        ),
        (
            json!({"settings": {"set_request_headers": {"X-Vigil-User": "me"}}}),
            "/settings/set_request_headers/X-Vigil-User",
        ),
        (
            json!({"settings": {"remove_request_headers": ["ok", "bad header"]}}),
            "/settings/remove_request_headers/1",
        ),
        (
            json!({"policy": {"allow": {"and": [{"emial": "x"}]}}}),
            "/policy/allow/and/0/emial",
        ),
    ] {
        api.post("/v1/routes", &route(extra))
            .await
            .invalid(&[pointer]);
    }
    // Every error at once, in document order.
    let res = api
        .post("/v1/routes", &json!({"name": "r", "host": "bad host", "upstreams": ["ftp://x"], "policies": ["nope"]}))
        .await
        .invalid(&["/host", "/upstreams/0", "/policies/0"]);
    assert!(res.detail().ends_with("(and 2 more)"), "{}", res.text);
    assert_eq!(res.error_detail(2), "unknown policy `nope`");

    // Times.
    let grant = json!({"subject": {"user": "usr_x"}, "route": "r", "start": "tomorrow", "end": "2030-01-01T00:00:00",
                       "reason": " ", "approver": ""});
    let res =
        api.post("/v1/grants", &grant)
            .await
            .invalid(&["/start", "/end", "/reason", "/approver"]);
    assert!(
        res.error_detail(0)
            .contains("`tomorrow` is not an RFC 3339 time"),
        "{}",
        res.text
    );
    // More times, then other kinds: each body and exactly its errors.
    for (path, body, pointers) in [
        (
            "grants",
            with(
                &grant,
                json!({"start": "2030-01-02T00:00:00Z", "end": "2030-01-01T00:00:00Z", "reason": "r", "approver": "a"}),
            ),
            &["/end"][..],
        ),
        (
            "join-tokens",
            json!({"name": "j", "expires_at": "2030-13-01T00:00:00Z"}),
            &["/expires_at"],
        ),
        (
            "admin-tokens",
            json!({"name": "t", "role": "viewer", "expires_at": "2030-01-01"}),
            &["/expires_at"],
        ),
        (
            "service-accounts",
            json!({"name": "s", "expires_at": "soon"}),
            &["/expires_at"],
        ),
        (
            "devices",
            json!({"name": "d", "posture": {"expires_at": "1/1/2030"}}),
            &["/posture/expires_at"],
        ),
        (
            "sessions",
            json!({"user_id": "u", "auth_time": "x", "expires_at": "2030-01-01T00:00:00Z", "revoked_at": "y"}),
            &["/auth_time", "/revoked_at"],
        ),
        (
            "users",
            json!({"issuer": " ", "subject": "", "email": "nope"}),
            &["/issuer", "/subject", "/email"],
        ),
        (
            "devices",
            json!({"name": " ", "client_certificate_sha256": "abc"}),
            &["/name", "/client_certificate_sha256"],
        ),
        (
            "devices",
            json!({"name": "d", "posture": {"attributes": {"ok": true, "bad": [1], "b d": 1}}}),
            &["/posture/attributes/b d", "/posture/attributes/bad"],
        ),
        (
            "identity-providers",
            json!({"name": "i", "issuer_url": "http://idp.example.com", "client_id": "", "scopes": ["email"]}),
            &["/issuer_url", "/client_id", "/scopes"],
        ),
    ] {
        api.post(&format!("/v1/{path}"), &body)
            .await
            .invalid(pointers);
    }

    // Nothing was stored but what was meant to be.
    assert_eq!(
        ids(&api.get("/v1/policies").await.status(200).json),
        ["a", "b"]
    );
    for kind in [
        "routes",
        "grants",
        "join-tokens",
        "service-accounts",
        "devices",
        "sessions",
        "users",
        "identity-providers",
    ] {
        assert!(
            ids(&api.get(&format!("/v1/{kind}")).await.status(200).json).is_empty(),
            "{kind}"
        );
    }
}

/// Problems the policy compiler finds inside another named policy (pointer `a#/...`)
/// must still be reported with a JSON Pointer into the request body.
async fn referenced_policy_errors_point_into_the_request(api: Api) {
    api.create("policies", json!({"name": "b", "document": accept_all()}))
        .await;
    api.create(
        "policies",
        json!({"name": "a", "document": {"allow": {"and": [{"policy": "b"}]}}}),
    )
    .await;
    // The loop closes inside `a`, which is not in the request: the error must still
    // point into the request body (RFC 6901), not at `a#/...` glued onto `/document`.
    let cyclic = json!({"name": "b", "document": {"allow": {"and": [{"policy": "a"}]}}});
    let res = api
        .put("/v1/policies/b", Some("*"), &cyclic)
        .await
        .problem(422, "validation");
    assert_eq!(res.pointers().len(), 1, "{}", res.text);
    assert!(
        res.error_detail(0).contains("refers to itself (b → a → b)"),
        "{}",
        res.text
    );
    let pointer = res.pointers()[0];
    assert!(
        pointer.starts_with("/document") && cyclic.pointer(pointer).is_some(),
        "`{pointer}` is not a JSON Pointer into the request body: {}",
        res.text
    );
    // Nothing changed.
    assert_eq!(
        doc(&api.get("/v1/policies/b").await.status(200).json),
        json!({"name": "b", "document": accept_all()})
    );
}

// ---------- 3. uniqueness and references ----------

async fn uniqueness_and_references(api: Api) {
    // Same name twice.
    for (path, body) in [
        ("policies", json!({"name": "dup", "document": accept_all()})),
        ("groups", json!({"name": "dup"})),
        ("service-accounts", json!({"name": "dup"})),
        (
            "identity-providers",
            json!({"name": "dup", "issuer_url": "https://i.example", "client_id": "c"}),
        ),
        ("join-tokens", json!({"name": "dup"})),
        ("admin-tokens", json!({"name": "dup", "role": "viewer"})),
        (
            "routes",
            json!({"name": "dup", "host": "dup.example.com", "upstreams": ["http://x"]}),
        ),
    ] {
        api.post(&format!("/v1/{path}"), &body).await.status(201);
        // Only the name is the same (a route's host and path are a key of their own).
        let mut again = body.clone();
        if path == "routes" {
            again["host"] = json!("other.example.com");
        }
        let res = api
            .post(&format!("/v1/{path}"), &again)
            .await
            .problem(409, "conflict");
        assert!(
            res.detail().contains("`dup` already exists"),
            "{path}: {}",
            res.text
        );
    }
    // Reserved names.
    for (path, body) in [
        (
            "policies",
            json!({"name": "validate", "document": accept_all()}),
        ),
        ("groups", json!({"name": "validate"})),
        (
            "routes",
            json!({"name": "validate", "host": "v.example.com", "upstreams": ["http://x"]}),
        ),
    ] {
        let res = api
            .post(&format!("/v1/{path}"), &body)
            .await
            .invalid(&["/name"]);
        assert_eq!(res.error_detail(0), "`validate` is reserved", "{path}");
    }

    // Users: (issuer, subject) is unique.
    api.create("groups", json!({"name": "staff"})).await;
    let alice = api
        .create_id(
            "users",
            json!({"issuer": "https://idp.example.com", "subject": "alice", "groups": ["staff"]}),
        )
        .await;
    api.post(
        "/v1/users",
        &json!({"issuer": "https://idp.example.com", "subject": "alice", "email": "x@y.z"}),
    )
    .await
    .problem(409, "conflict");
    // Another issuer, or another subject, is fine; moving onto a taken pair is not.
    let other = api
        .create(
            "users",
            json!({"issuer": "https://other.example.com", "subject": "alice"}),
        )
        .await;
    api.create(
        "users",
        json!({"issuer": "https://idp.example.com", "subject": "alice2"}),
    )
    .await;
    api.patch(
        &format!("/v1/users/{}", other["id"].as_str().unwrap()),
        Some("*"),
        &json!({"issuer": "https://idp.example.com"}),
    )
    .await
    .problem(409, "conflict");

    // Devices: the certificate fingerprint is unique, however it is written.
    let fp = "ab".repeat(32);
    let colons: Vec<String> = (0..32).map(|_| "AB".to_owned()).collect();
    api.create(
        "devices",
        json!({"name": "a", "client_certificate_sha256": fp}),
    )
    .await;
    api.post(
        "/v1/devices",
        &json!({"name": "b", "client_certificate_sha256": colons.join(":")}),
    )
    .await
    .problem(409, "conflict");

    // Routes: host + path is unique, after normalisation.
    api.create(
        "policies",
        json!({"name": "staff", "document": accept_all()}),
    )
    .await;
    let r1 = api
        .create(
            "routes",
            json!({"name": "r1", "host": "app.example.com", "path": {"prefix": "/api"}, "upstreams": ["http://x"], "policies": ["staff"]}),
        )
        .await;
    for path in [json!({"prefix": "/api"}), json!({"prefix": "/api/"})] {
        for host in ["app.example.com", "APP.example.com."] {
            let res = api
                .post(
                    "/v1/routes",
                    &json!({"name": "r2", "host": host, "path": path, "upstreams": ["http://y"]}),
                )
                .await
                .problem(409, "conflict");
            assert!(res.detail().contains("already exists"), "{}", res.text);
        }
    }
    // Another path kind, or another host, is another key.
    api.create("routes", json!({"name": "r3", "host": "app.example.com", "path": {"exact": "/api"}, "upstreams": ["http://y"]}))
        .await;
    api.create("routes", json!({"name": "r4", "host": "*.example.com", "path": {"prefix": "/api"}, "upstreams": ["http://y"]}))
        .await;
    // Moving r1 away frees its key.
    let moved = with(&doc(&r1), json!({"path": {"prefix": "/v2"}}));
    api.put(
        "/v1/routes/r1",
        Some(&quoted(r1["version"].as_i64().unwrap())),
        &moved,
    )
    .await
    .status(200);
    api.create("routes", json!({"name": "r2", "host": "app.example.com", "path": {"prefix": "/api/"}, "upstreams": ["http://y"]}))
        .await;
    // ... and moving onto a taken one is refused.
    api.patch(
        "/v1/routes/r1",
        Some("*"),
        &json!({"path": {"prefix": "/api"}}),
    )
    .await
    .problem(409, "conflict");

    // References: unknown targets are 422.
    let res = api
        .post("/v1/routes", &json!({"name": "r5", "host": "r5.example.com", "upstreams": ["http://x"], "policies": ["ghost"]}))
        .await
        .invalid(&["/policies/0"]);
    assert_eq!(res.error_detail(0), "unknown policy `ghost`");
    api.post(
        "/v1/routes",
        &json!({"name": "r5", "host": "r5.example.com", "upstreams": ["http://x"], "policy": {"allow": {"and": [{"policy": "ghost"}]}}}),
    )
    .await
    .invalid(&["/policy/allow/and/0/policy"]);
    let res = api
        .post(
            "/v1/routes",
            &json!({"name": "r5", "host": "r5.example.com", "upstreams": ["http://x"], "settings": {"identity_provider": "ghost"}}),
        )
        .await
        .problem(422, "missing-reference");
    assert!(res.detail().contains("ghost"), "{}", res.text);
    api.post(
        "/v1/users",
        &json!({"issuer": "https://i", "subject": "s", "groups": ["ghost"]}),
    )
    .await
    .problem(422, "missing-reference");
    api.post("/v1/sessions", &json!({"user_id": "usr_ghost", "auth_time": "2030-01-01T00:00:00Z", "expires_at": "2030-01-02T00:00:00Z"}))
        .await
        .problem(422, "missing-reference");
    api.post("/v1/devices", &json!({"name": "d", "owner": "usr_ghost"}))
        .await
        .problem(422, "missing-reference");
    api.post(
        "/v1/grants",
        &json!({"subject": {"user": alice}, "route": "ghost", "start": "2030-01-01T00:00:00Z", "end": "2030-01-02T00:00:00Z",
                "reason": "r", "approver": "a"}),
    )
    .await
    .problem(422, "missing-reference");
    api.post(
        "/v1/service-accounts",
        &json!({"name": "sa", "groups": ["ghost"]}),
    )
    .await
    .problem(422, "missing-reference");

    // Deleting what is referred to is refused...
    let res = api
        .delete("/v1/policies/staff", None)
        .await
        .problem(409, "conflict");
    assert!(res.detail().contains("route `r1`"), "{}", res.text);
    let res = api
        .delete("/v1/groups/staff", None)
        .await
        .problem(409, "conflict");
    assert!(res.detail().contains(&alice), "{}", res.text);
    api.create(
        "policies",
        json!({"name": "outer", "document": {"allow": {"and": [{"policy": "staff"}]}}}),
    )
    .await;
    api.patch("/v1/routes/r1", Some("*"), &json!({"policies": []}))
        .await
        .status(200);
    let res = api
        .delete("/v1/policies/staff", None)
        .await
        .problem(409, "conflict");
    assert!(res.detail().contains("policy `outer`"), "{}", res.text);
    let owner = api
        .create("devices", json!({"name": "owned", "owner": alice}))
        .await;
    let res = api
        .delete(&format!("/v1/users/{alice}"), None)
        .await
        .problem(409, "conflict");
    assert!(
        res.detail().contains(owner["id"].as_str().unwrap()),
        "{}",
        res.text
    );
    // ... until the reference goes.
    api.delete("/v1/policies/outer", None).await.status(204);
    api.delete("/v1/policies/staff", None).await.status(204);
    api.patch(
        &format!("/v1/users/{alice}"),
        Some("*"),
        &json!({"groups": []}),
    )
    .await
    .status(200);
    api.delete("/v1/groups/staff", None).await.status(204);

    // Deleting a user or a route takes its sessions and grants with it.
    api.delete(
        &format!("/v1/devices/{}", owner["id"].as_str().unwrap()),
        None,
    )
    .await
    .status(204);
    let session = new_session(&api, &alice).await;
    let grant = api
        .create_id(
            "grants",
            json!({"subject": {"user": alice}, "route": "r3", "start": "2030-01-01T00:00:00Z", "end": "2030-01-02T00:00:00Z",
                   "reason": "r", "approver": "a"}),
        ).await;
    api.delete(&format!("/v1/users/{alice}"), None)
        .await
        .status(204);
    api.get(&format!("/v1/sessions/{session}"))
        .await
        .problem(404, "not-found");
    api.get(&format!("/v1/grants/{grant}"))
        .await
        .problem(404, "not-found");
    let cascaded = api.audit(&format!("&entity_id={session}")).await;
    assert_eq!(cascaded.last().unwrap()["action"], json!("cascade-delete"));
    let bob = new_user(&api, "bob").await;
    let grant = api
        .create_id(
            "grants",
            json!({"subject": {"user": bob}, "route": "r3", "start": "2030-01-01T00:00:00Z", "end": "2030-01-02T00:00:00Z",
                   "reason": "r", "approver": "a"}),
        ).await;
    api.delete("/v1/routes/r3", None).await.status(204);
    api.get(&format!("/v1/grants/{grant}"))
        .await
        .problem(404, "not-found");
    api.get(&format!("/v1/users/{bob}")).await.status(200);
}

// ---------- 4. concurrency ----------

async fn concurrent_writes(api: Api) {
    let p = api
        .post(
            "/v1/policies",
            &json!({"name": "p", "document": accept_all()}),
        )
        .await
        .status(201);
    let etag = p.etag();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let api = api.clone();
            let etag = etag.clone();
            tokio::spawn(async move {
                let body = json!({"name": "p", "description": format!("writer {i}"), "document": accept_all()});
                api.put("/v1/policies/p", Some(&etag), &body).await
            })
        })
        .collect();
    let mut winners = Vec::new();
    let mut losers = 0;
    for t in tasks {
        let res = t.await.unwrap();
        match res.status.as_u16() {
            200 => winners.push(res),
            412 => {
                res.problem(412, "precondition-failed");
                losers += 1;
            }
            other => panic!("unexpected {other}: {}", res.text),
        }
    }
    assert_eq!((winners.len(), losers), (1, 15));
    let now = api.get("/v1/policies/p").await.status(200);
    assert_eq!(now.json, winners[0].json);
    // One write made it to the audit trail.
    let replaces: Vec<Value> = api
        .audit("&entity_id=p")
        .await
        .into_iter()
        .filter(|e| e["action"] == json!("replace"))
        .collect();
    assert_eq!(replaces.len(), 1);

    // Same for merge patches.
    let etag = now.etag();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let api = api.clone();
            let etag = etag.clone();
            tokio::spawn(async move {
                api.patch(
                    "/v1/policies/p",
                    Some(&etag),
                    &json!({"description": format!("patch {i}")}),
                )
                .await
            })
        })
        .collect();
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap().status.as_u16());
    }
    codes.sort();
    assert_eq!(codes, [vec![200], vec![412; 15]].concat());

    // Same-name creates: one wins, the rest conflict.
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let api = api.clone();
            tokio::spawn(async move { api.post("/v1/groups", &json!({"name": "race"})).await })
        })
        .collect();
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap().status.as_u16());
    }
    codes.sort();
    assert_eq!(codes, [vec![201], vec![409; 15]].concat());
}

// ---------- 5. secrets ----------

async fn identity_provider_secret_is_write_only(api: Api) {
    const SECRET: &str = "very-secret-client-secret-1";
    const SECRET2: &str = "second-client-secret-2";
    let created = api
        .post(
            "/v1/identity-providers",
            &json!({"name": "corp", "issuer_url": "https://idp.example.com", "client_id": "vigil", "client_secret": SECRET}),
        )
        .await
        .status(201);
    assert!(
        created.json.get("client_secret").is_none(),
        "{}",
        created.text
    );
    assert_eq!(created.json["client_secret_set"], json!(true));
    assert!(!created.text.contains(SECRET));
    // Stored sealed, and opens to the secret.
    let sealed = api.secret("identity_provider", "corp").await.unwrap();
    assert!(
        sealed.starts_with("v1.k1.") && !sealed.contains(SECRET),
        "{sealed}"
    );
    assert_eq!(api.control.open(&sealed).as_deref(), Some(SECRET));

    let got = api.get("/v1/identity-providers/corp").await.status(200);
    assert!(got.json.get("client_secret").is_none() && !got.text.contains(SECRET));
    assert_eq!(got.json["client_secret_set"], json!(true));
    let list = api.get("/v1/identity-providers").await.status(200);
    assert!(
        !list.text.contains(SECRET) && !list.text.contains("\"client_secret\""),
        "{}",
        list.text
    );
    assert_eq!(list.json["items"][0]["client_secret_set"], json!(true));

    // A PUT without the secret keeps it; `client_secret_set` is read-only.
    let put = api
        .put(
            "/v1/identity-providers/corp",
            Some(&got.etag()),
            &json!({"name": "corp", "issuer_url": "https://idp.example.com", "client_id": "vigil2", "client_secret_set": false}),
        )
        .await
        .status(200);
    assert_eq!(put.json["client_secret_set"], json!(true));
    assert_eq!(put.json["client_id"], json!("vigil2"));
    assert_eq!(
        api.secret("identity_provider", "corp").await.as_deref(),
        Some(sealed.as_str())
    );
    // So does a PATCH; a PATCH (or PUT) with a secret replaces it.
    let patched = api
        .patch(
            "/v1/identity-providers/corp",
            Some(&put.etag()),
            &json!({"scopes": ["openid"]}),
        )
        .await
        .status(200);
    assert_eq!(patched.json["client_secret_set"], json!(true));
    let patched = api
        .patch(
            "/v1/identity-providers/corp",
            Some(&patched.etag()),
            &json!({"client_secret": SECRET2}),
        )
        .await
        .status(200);
    assert!(patched.json.get("client_secret").is_none() && !patched.text.contains(SECRET2));
    assert_eq!(patched.json["client_secret_set"], json!(true));
    let resealed = api.secret("identity_provider", "corp").await.unwrap();
    assert_eq!(api.control.open(&resealed).as_deref(), Some(SECRET2));
    let put = api
        .put(
            "/v1/identity-providers/corp",
            Some("*"),
            &json!({"name": "corp", "issuer_url": "https://idp.example.com", "client_id": "vigil", "client_secret": SECRET}),
        )
        .await
        .status(200);
    assert!(!put.text.contains(SECRET));
    let resealed = api.secret("identity_provider", "corp").await.unwrap();
    assert_eq!(api.control.open(&resealed).as_deref(), Some(SECRET));

    // The stored secret is never carried over to another issuer: pointing the
    // provider elsewhere needs the secret again.
    api.patch(
        "/v1/identity-providers/corp",
        Some("*"),
        &json!({"issuer_url": "https://elsewhere.example"}),
    )
    .await
    .invalid(&["/client_secret"]);
    let moved = api
        .patch(
            "/v1/identity-providers/corp",
            Some("*"),
            &json!({"issuer_url": "https://elsewhere.example", "client_secret": SECRET2}),
        )
        .await
        .status(200);
    assert_eq!(moved.json["client_secret_set"], json!(true));
    let resealed = api.secret("identity_provider", "corp").await.unwrap();
    assert_eq!(api.control.open(&resealed).as_deref(), Some(SECRET2));

    // Without a secret, `client_secret_set` is false whatever the client says.
    let bare = api
        .post(
            "/v1/identity-providers",
            &json!({"name": "bare", "issuer_url": "https://idp.example.com", "client_id": "c", "client_secret_set": true}),
        )
        .await
        .status(201);
    assert_eq!(bare.json["client_secret_set"], json!(false));
    assert_eq!(api.secret("identity_provider", "bare").await, None);

    // The audit trail never holds it either.
    let audit = api
        .get("/v1/audit?kind=identity_provider")
        .await
        .status(200);
    assert_eq!(audit.json["items"].as_array().unwrap().len(), 7);
    for s in [SECRET, SECRET2, sealed.as_str(), "\"client_secret\""] {
        assert!(!audit.text.contains(s), "audit holds {s}: {}", audit.text);
    }
    api.delete("/v1/identity-providers/corp", None)
        .await
        .status(204);
    let audit = api.get("/v1/audit?entity_id=corp").await.status(200);
    assert!(!audit.text.contains(SECRET) && !audit.text.contains("\"client_secret\""));

    // Without a secret key the control plane refuses to take secrets.
    Api::with_secret_key(api.store().clone(), None)
        .post(
            "/v1/identity-providers",
            &json!({"name": "k", "issuer_url": "https://idp.example.com", "client_id": "c", "client_secret": SECRET}),
        )
        .await
        .problem(503, "no-secret-key");
    api.get("/v1/identity-providers/k")
        .await
        .problem(404, "not-found");
}

/// The token hash in a stored secret. A service account's secret also holds the
/// public key that signed its token: the token must verify under it.
fn stored_hash(secret: Option<String>, token: &str) -> Option<String> {
    let secret = secret?;
    match secret.split_once(' ') {
        Some((hash, key)) => {
            use base64::Engine as _;
            let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(key)
                .unwrap();
            let sub = if token.starts_with("vgl_sa_") {
                "bot"
            } else {
                ""
            };
            assert_eq!(
                vigil_snapshot::satoken::verify(token, sub, &key),
                Ok(()),
                "{token}"
            );
            Some(hash.to_owned())
        }
        None => {
            assert!(
                !token.starts_with("vgl_sa_"),
                "a service account's token is signed"
            );
            Some(secret)
        }
    }
}

async fn tokens_are_shown_once(api: Api) {
    api.create("groups", json!({"name": "ci"})).await;
    let mut seen: Vec<String> = Vec::new();
    for (path, kind, body, prefix) in [
        (
            "service-accounts",
            "service_account",
            json!({"name": "bot", "groups": ["ci"]}),
            "vgl_sa_",
        ),
        (
            "join-tokens",
            "join_token",
            json!({"name": "bot"}),
            "vgl_join_",
        ),
        (
            "admin-tokens",
            "admin_token",
            json!({"name": "bot", "role": "viewer"}),
            "vgl_admin_",
        ),
    ] {
        let uri = format!("/v1/{path}/bot");
        // A token the client sends is ignored.
        let created = api
            .post(
                &format!("/v1/{path}"),
                &with(&body, json!({"token": "vgl_chosen"})),
            )
            .await
            .status(201);
        assert_eq!(created.header("cache-control"), Some("no-store"), "{path}");
        let token = created.json["token"].as_str().unwrap().to_owned();
        assert!(
            token.starts_with(prefix) && token != "vgl_chosen",
            "{token}"
        );
        assert_eq!(
            stored_hash(api.secret(kind, "bot").await, &token),
            Some(token_hash(&token)),
            "{path}: stored hashed"
        );

        let got = api.get(&uri).await.status(200);
        let list = api.get(&format!("/v1/{path}")).await.status(200);
        let put = api.put(&uri, Some(&got.etag()), &body).await.status(200);
        let patched = api
            .patch(&uri, Some(&put.etag()), &json!({}))
            .await
            .status(200);
        for r in [&got, &list, &put, &patched] {
            assert!(
                r.json.get("token").is_none() && !r.text.contains(&token),
                "{path}: {}",
                r.text
            );
            assert!(!r.text.contains(&token_hash(&token)), "{path}: {}", r.text);
        }
        // Replacing the document keeps the token.
        assert_eq!(
            stored_hash(api.secret(kind, "bot").await, &token),
            Some(token_hash(&token)),
            "{path}"
        );

        // Rotation: a new token, shown once.
        let stale = api
            .send(
                Method::POST,
                &format!("{uri}/rotate-token"),
                &[("if-match", "\"1\"")],
                vec![],
            )
            .await;
        stale.problem(412, "precondition-failed");
        let rotated = api
            .send(
                Method::POST,
                &format!("{uri}/rotate-token"),
                &[("if-match", &patched.etag())],
                vec![],
            )
            .await
            .status(200);
        let new = rotated.json["token"].as_str().unwrap().to_owned();
        assert!(new.starts_with(prefix) && new != token);
        assert!(rotated.version() > patched.version());
        assert_eq!(rotated.etag(), quoted(rotated.version()));
        assert_eq!(
            doc(&rotated.json),
            doc(&patched.json),
            "{path}: rotation keeps the document"
        );
        assert_eq!(
            stored_hash(api.secret(kind, "bot").await, &new),
            Some(token_hash(&new)),
            "{path}"
        );
        let after = api.get(&uri).await.status(200);
        assert!(after.json.get("token").is_none() && !after.text.contains(&new));
        api.post_empty(&format!("/v1/{path}/ghost/rotate-token"))
            .await
            .problem(404, "not-found");

        // Neither token nor hash is in the audit trail.
        let audit = api.get(&format!("/v1/audit?kind={kind}")).await.status(200);
        assert!(
            audit.json["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["action"] == json!("rotate-token")),
            "{path}"
        );
        for t in [&token, &new, &token_hash(&token), &token_hash(&new)] {
            assert!(!audit.text.contains(t.as_str()), "{path}: audit holds {t}");
        }
        seen.push(token);
        seen.push(new);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 6, "tokens are all different");
    // Other kinds have no token to rotate.
    api.post_empty("/v1/groups/ci/rotate-token")
        .await
        .problem(404, "no-such-endpoint");

    // An admin token made through the API authenticates; rotation retires the old one.
    let owner = api
        .post("/v1/admin-tokens", &json!({"name": "own", "role": "owner"}))
        .await
        .status(201);
    let old = owner.json["token"].as_str().unwrap().to_owned();
    let as_old = api.with_token(&old);
    as_old.get("/v1/admin-tokens").await.status(200);
    // It can rotate itself.
    let rotated = as_old
        .post_empty("/v1/admin-tokens/own/rotate-token")
        .await
        .status(200);
    let new = rotated.json["token"].as_str().unwrap().to_owned();
    let res = as_old
        .get("/v1/policies")
        .await
        .problem(401, "unauthorized");
    assert_eq!(
        res.header("www-authenticate"),
        Some("Bearer realm=\"vigil\"")
    );
    api.with_token(&new)
        .get("/v1/admin-tokens")
        .await
        .status(200);
    // Replacing the document keeps it working; deleting it does not.
    api.with_token(&new)
        .put(
            "/v1/admin-tokens/own",
            Some("*"),
            &json!({"name": "own", "role": "owner", "token": old}),
        )
        .await
        .status(200);
    api.with_token(&new).get("/v1/policies").await.status(200);
    as_old
        .get("/v1/policies")
        .await
        .problem(401, "unauthorized");
    api.delete("/v1/admin-tokens/own", None).await.status(204);
    api.with_token(&new)
        .get("/v1/policies")
        .await
        .problem(401, "unauthorized");
    // A token that is not an admin token is not accepted by the admin API.
    let sa = api
        .create("service-accounts", json!({"name": "robot"}))
        .await;
    api.with_token(sa["token"].as_str().unwrap())
        .get("/v1/policies")
        .await
        .problem(401, "unauthorized");
    let jt = api.create("join-tokens", json!({"name": "robot"})).await;
    api.with_token(jt["token"].as_str().unwrap())
        .get("/v1/policies")
        .await
        .problem(401, "unauthorized");
}

/// Every response that carries a token is marked `Cache-Control: no-store`.
async fn token_responses_are_not_cached(api: Api) {
    for (path, body) in [
        ("service-accounts", json!({"name": "nc"})),
        ("join-tokens", json!({"name": "nc"})),
        ("admin-tokens", json!({"name": "nc", "role": "viewer"})),
    ] {
        let created = api.post(&format!("/v1/{path}"), &body).await.status(201);
        assert_eq!(
            created.header("cache-control"),
            Some("no-store"),
            "{path} create"
        );
        let rotated = api
            .post_empty(&format!("/v1/{path}/nc/rotate-token"))
            .await
            .status(200);
        assert!(rotated.json["token"].is_string());
        assert_eq!(
            rotated.header("cache-control"),
            Some("no-store"),
            "{path} rotate-token"
        );
    }
}

// ---------- 6. auth ----------

async fn auth_and_roles(api: Api) {
    // No or bad credentials.
    let challenge = Some("Bearer realm=\"vigil\"");
    for (name, headers) in [
        ("none", vec![]),
        ("unknown token", vec![("authorization", "Bearer nope")]),
        ("basic", vec![("authorization", "Basic Ym9vdHN0cmFwOng=")]),
        ("empty bearer", vec![("authorization", "Bearer ")]),
        ("no scheme", vec![("authorization", BOOTSTRAP)]),
        (
            "two headers",
            vec![
                ("authorization", "Bearer bootstrap-owner-token"),
                ("authorization", "Bearer bootstrap-owner-token"),
            ],
        ),
    ] {
        for (method, uri) in [
            (Method::GET, "/v1/policies"),
            (Method::GET, "/v1/policies/nope"),
            (Method::POST, "/v1/policies"),
            (Method::GET, "/v1/audit"),
        ] {
            let res = api
                .anonymous()
                .send(method.clone(), uri, &headers, vec![])
                .await
                .problem(401, "unauthorized");
            assert_eq!(
                res.header("www-authenticate"),
                challenge,
                "{name} {method} {uri}"
            );
        }
    }
    // The scheme is case-insensitive.
    api.anonymous()
        .send(
            Method::GET,
            "/v1/policies",
            &[("authorization", "bearer bootstrap-owner-token")],
            vec![],
        )
        .await
        .status(200);

    let viewer = api.with_token(&admin_token(&api, "viewer", "viewer").await);
    let editor = api.with_token(&admin_token(&api, "editor", "editor").await);
    let owner = api.with_token(&admin_token(&api, "owner", "owner").await);
    api.create("policies", json!({"name": "p", "document": accept_all()}))
        .await;
    let user = new_user(&api, "u").await;
    let session = new_session(&api, &user).await;

    // Viewers read (but not admin tokens) and write nothing.
    viewer.get("/v1/policies").await.status(200);
    viewer.get("/v1/policies/p").await.status(200);
    viewer.get("/v1/audit").await.status(200);
    viewer
        .post("/v1/policies/validate", &json!({"document": accept_all()}))
        .await
        .status(200);
    for path in [
        "routes",
        "users",
        "groups",
        "devices",
        "service-accounts",
        "grants",
        "identity-providers",
        "sessions",
        "join-tokens",
    ] {
        viewer.get(&format!("/v1/{path}")).await.status(200);
    }
    let res = viewer
        .post(
            "/v1/policies",
            &json!({"name": "q", "document": accept_all()}),
        )
        .await
        .problem(403, "forbidden");
    assert_eq!(
        res.detail(),
        "this needs the editor role; the token has viewer"
    );
    // The role is checked before the body is looked at.
    viewer
        .send(
            Method::POST,
            "/v1/policies",
            &[("content-type", "text/plain")],
            b"junk".to_vec(),
        )
        .await
        .problem(403, "forbidden");
    viewer
        .put(
            "/v1/policies/p",
            Some("*"),
            &json!({"name": "p", "document": accept_all()}),
        )
        .await
        .problem(403, "forbidden");
    viewer
        .patch("/v1/policies/p", Some("*"), &json!({"description": "x"}))
        .await
        .problem(403, "forbidden");
    viewer
        .delete("/v1/policies/p", None)
        .await
        .problem(403, "forbidden");
    viewer
        .post_empty(&format!("/v1/sessions/{session}/revoke"))
        .await
        .problem(403, "forbidden");
    viewer
        .post_empty(&format!("/v1/users/{user}/revoke-sessions"))
        .await
        .problem(403, "forbidden");
    let res = viewer
        .get("/v1/admin-tokens")
        .await
        .problem(403, "forbidden");
    assert_eq!(
        res.detail(),
        "this needs the owner role; the token has viewer"
    );
    viewer
        .get("/v1/admin-tokens/viewer")
        .await
        .problem(403, "forbidden");

    // Editors write everything but admin tokens.
    editor
        .post(
            "/v1/policies",
            &json!({"name": "q", "document": accept_all()}),
        )
        .await
        .status(201);
    editor
        .put(
            "/v1/policies/q",
            Some("*"),
            &json!({"name": "q", "description": "d", "document": accept_all()}),
        )
        .await
        .status(200);
    editor
        .patch("/v1/policies/q", Some("*"), &json!({"description": "e"}))
        .await
        .status(200);
    editor.delete("/v1/policies/q", None).await.status(204);
    let sa = editor
        .post("/v1/service-accounts", &json!({"name": "sa"}))
        .await
        .status(201);
    assert!(sa.json["token"].is_string());
    editor
        .post_empty("/v1/service-accounts/sa/rotate-token")
        .await
        .status(200);
    editor
        .post_empty(&format!("/v1/sessions/{session}/revoke"))
        .await
        .status(200);
    let res = editor
        .get("/v1/admin-tokens")
        .await
        .problem(403, "forbidden");
    assert_eq!(
        res.detail(),
        "this needs the owner role; the token has editor"
    );
    editor
        .post(
            "/v1/admin-tokens",
            &json!({"name": "mine", "role": "owner"}),
        )
        .await
        .problem(403, "forbidden");
    editor
        .patch(
            "/v1/admin-tokens/editor",
            Some("*"),
            &json!({"role": "owner"}),
        )
        .await
        .problem(403, "forbidden");
    editor
        .post_empty("/v1/admin-tokens/editor/rotate-token")
        .await
        .problem(403, "forbidden");
    editor
        .delete("/v1/admin-tokens/viewer", None)
        .await
        .problem(403, "forbidden");

    // Owners do everything.
    owner.get("/v1/admin-tokens").await.status(200);
    let made = owner
        .post(
            "/v1/admin-tokens",
            &json!({"name": "made", "role": "viewer"}),
        )
        .await
        .status(201);
    owner
        .patch(
            "/v1/admin-tokens/made",
            Some(&made.etag()),
            &json!({"role": "editor"}),
        )
        .await
        .status(200);
    // A role change applies at once.
    let made = api.with_token(made.json["token"].as_str().unwrap());
    made.post("/v1/groups", &json!({"name": "g"}))
        .await
        .status(201);
    owner
        .delete("/v1/admin-tokens/made", None)
        .await
        .status(204);
    made.get("/v1/groups").await.problem(401, "unauthorized");
    owner
        .post(
            "/v1/policies",
            &json!({"name": "r", "document": accept_all()}),
        )
        .await
        .status(201);
    owner.delete("/v1/policies/r", None).await.status(204);

    // Expiry.
    let expired = owner
        .post(
            "/v1/admin-tokens",
            &json!({"name": "old", "role": "owner", "expires_at": "2000-01-01T00:00:00Z"}),
        )
        .await
        .status(201);
    let res = api
        .with_token(expired.json["token"].as_str().unwrap())
        .get("/v1/policies")
        .await
        .problem(401, "unauthorized");
    assert_eq!(res.detail(), "the token has expired");
    assert_eq!(res.header("www-authenticate"), challenge);
    let fresh = owner
        .post(
            "/v1/admin-tokens",
            &json!({"name": "fresh", "role": "viewer", "expires_at": "2999-01-01T00:00:00+01:00"}),
        )
        .await
        .status(201);
    let fresh_api = api.with_token(fresh.json["token"].as_str().unwrap());
    fresh_api.get("/v1/policies").await.status(200);
    // Expiring it through the API takes effect at once.
    owner
        .patch(
            "/v1/admin-tokens/fresh",
            Some("*"),
            &json!({"expires_at": "2001-01-01T00:00:00Z"}),
        )
        .await
        .status(200);
    fresh_api
        .get("/v1/policies")
        .await
        .problem(401, "unauthorized");

    // Health and the API document need no token.
    api.anonymous().get("/healthz").await.status(200);
    api.anonymous().get("/readyz").await.status(200);
    api.anonymous().get("/v1/openapi.json").await.status(200);
}

// ---------- 7. audit ----------

async fn audit_trail(api: Api) {
    let editor_token = admin_token(&api, "ed", "editor").await;
    let editor = api.with_token(&editor_token);

    let p = api
        .post(
            "/v1/policies",
            &json!({"name": "p", "document": accept_all()}),
        )
        .await
        .status(201);
    let replaced = editor
        .put(
            "/v1/policies/p",
            Some(&p.etag()),
            &json!({"name": "p", "description": "v2", "document": accept_all()}),
        )
        .await
        .status(200);
    let patched = editor
        .patch(
            "/v1/policies/p",
            Some(&replaced.etag()),
            &json!({"description": "v3"}),
        )
        .await
        .status(200);
    // Failed writes leave no trace.
    editor
        .patch(
            "/v1/policies/p",
            Some(&replaced.etag()),
            &json!({"description": "lost"}),
        )
        .await
        .problem(412, "precondition-failed");
    editor
        .post(
            "/v1/policies",
            &json!({"name": "p", "document": accept_all()}),
        )
        .await
        .problem(409, "conflict");
    editor
        .post(
            "/v1/policies",
            &json!({"name": "bad", "document": {"allow": {}}}),
        )
        .await
        .problem(422, "validation");
    editor
        .delete("/v1/policies/p", Some(&p.etag()))
        .await
        .problem(412, "precondition-failed");
    editor.delete("/v1/policies/p", None).await.status(204);

    let events = api.audit("&entity_id=p").await;
    let summary: Vec<(String, String, String, String)> = events
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap().to_owned();
            (s("actor"), s("action"), s("kind"), s("entity_id"))
        })
        .collect();
    let row = |actor: &str, action: &str| {
        (
            actor.to_owned(),
            action.to_owned(),
            "policy".to_owned(),
            "p".to_owned(),
        )
    };
    assert_eq!(
        summary,
        vec![
            row("bootstrap", "create"),
            row("admin-token:ed", "replace"),
            row("admin-token:ed", "replace"),
            row("admin-token:ed", "delete"),
        ]
    );
    let v1 = json!({"name": "p", "document": accept_all()});
    let v2 = json!({"name": "p", "description": "v2", "document": accept_all()});
    let v3 = json!({"name": "p", "description": "v3", "document": accept_all()});
    assert_eq!(
        (&events[0]["before"], &events[0]["after"]),
        (&Value::Null, &v1)
    );
    assert_eq!((&events[1]["before"], &events[1]["after"]), (&v1, &v2));
    assert_eq!((&events[2]["before"], &events[2]["after"]), (&v2, &v3));
    assert_eq!(
        (&events[3]["before"], &events[3]["after"]),
        (&v3, &Value::Null)
    );
    // Revisions are the ETags the writes returned; seq and time ascend.
    assert_eq!(events[0]["revision"], json!(p.version()));
    assert_eq!(events[1]["revision"], json!(replaced.version()));
    assert_eq!(events[2]["revision"], json!(patched.version()));
    for w in events.windows(2) {
        assert!(w[0]["seq"].as_i64().unwrap() < w[1]["seq"].as_i64().unwrap());
        assert!(w[0]["revision"].as_i64().unwrap() < w[1]["revision"].as_i64().unwrap());
        assert!(
            parse_time(w[0]["at"].as_str().unwrap()) <= parse_time(w[1]["at"].as_str().unwrap())
        );
    }
    let at = events[0]["at"].as_str().unwrap();
    assert!(at.ends_with('Z'), "{at}");
    assert!(
        (chrono::Utc::now() - parse_time(at).with_timezone(&chrono::Utc))
            .num_seconds()
            .abs()
            < 300,
        "{at}"
    );

    // Other kinds of write: rotation, revocation, cascades.
    api.create("service-accounts", json!({"name": "sa"})).await;
    editor
        .post_empty("/v1/service-accounts/sa/rotate-token")
        .await
        .status(200);
    let user = new_user(&api, "u").await;
    let session = new_session(&api, &user).await;
    editor
        .post_empty(&format!("/v1/sessions/{session}/revoke"))
        .await
        .status(200);
    editor
        .delete(&format!("/v1/users/{user}"), None)
        .await
        .status(204);
    let last = |events: Vec<Value>| -> (String, String) {
        let e = events.last().unwrap();
        (
            e["actor"].as_str().unwrap().to_owned(),
            e["action"].as_str().unwrap().to_owned(),
        )
    };
    assert_eq!(
        last(api.audit("&entity_id=sa").await),
        ("admin-token:ed".into(), "rotate-token".into())
    );
    let session_events = api.audit(&format!("&entity_id={session}")).await;
    let actions: Vec<&str> = session_events
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["create", "revoke", "cascade-delete"]);
    assert!(session_events[1]["after"]["revoked_at"].is_string());
    assert_eq!(session_events[1]["before"]["revoked_at"], Value::Null);
    assert_eq!(session_events[2]["actor"], json!("admin-token:ed"));
    assert_eq!(
        last(api.audit(&format!("&entity_id={user}")).await),
        ("admin-token:ed".into(), "delete".into())
    );

    // Filters, alone and together.
    let all = api.audit("").await;
    // ed's token, p x4, sa x2, user x2, session x3.
    assert_eq!(all.len(), 12);
    let by_ed = api.audit("&actor=admin-token%3Aed").await;
    assert_eq!(by_ed.len(), 7);
    assert!(by_ed.iter().all(|e| e["actor"] == json!("admin-token:ed")));
    let policies = api.audit("&kind=policy").await;
    assert_eq!(policies.len(), 4);
    assert!(policies.iter().all(|e| e["kind"] == json!("policy")));
    let both = api.audit("&kind=session&actor=admin-token%3Aed").await;
    assert_eq!(both.len(), 2);
    assert!(api.audit("&kind=policy&entity_id=sa").await.is_empty());
    let tokens = api.audit("&kind=admin_token").await;
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0]["after"], json!({"name": "ed", "role": "editor"}));
    assert!(!api.get("/v1/audit").await.text.contains(&editor_token));
    assert!(!api
        .get("/v1/audit")
        .await
        .text
        .contains(&token_hash(&editor_token)));

    // Pages.
    let first = api.get("/v1/audit?limit=5").await.status(200).json;
    assert_eq!(first["items"].as_array().unwrap().len(), 5);
    let c = first["next_cursor"].as_str().unwrap();
    let second = api
        .get(&format!("/v1/audit?limit=100&cursor={c}"))
        .await
        .status(200)
        .json;
    assert_eq!(second["items"].as_array().unwrap().len(), 7);
    assert_eq!(second["next_cursor"], Value::Null);
    let seqs: Vec<i64> = first["items"]
        .as_array()
        .unwrap()
        .iter()
        .chain(second["items"].as_array().unwrap())
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        all.iter()
            .map(|e| e["seq"].as_i64().unwrap())
            .collect::<Vec<_>>()
    );

    // Bad parameters.
    let res = api.get("/v1/audit?who=me").await.bad_field("/query/who");
    assert!(
        res.error_detail(0)
            .contains("limit, cursor, kind, entity_id, actor"),
        "{}",
        res.text
    );
    api.get("/v1/audit?limit=0").await.bad_field("/query/limit");
    api.get("/v1/audit?limit=x").await.bad_field("/query/limit");
    api.get("/v1/audit?cursor=!!")
        .await
        .bad_field("/query/cursor");
    api.get("/v1/audit?cursor=eA")
        .await
        .bad_field("/query/cursor");
    // Viewers may read it; nobody anonymous.
    let viewer = api.with_token(&admin_token(&api, "v", "viewer").await);
    viewer.get("/v1/audit").await.status(200);
    api.anonymous()
        .get("/v1/audit")
        .await
        .problem(401, "unauthorized");
}

/// Only owners may read admin tokens, so only owners see their documents in the audit trail.
async fn audit_hides_admin_tokens_below_owner(api: Api) {
    admin_token(&api, "secret-ops", "owner").await;
    let viewer = api.with_token(&admin_token(&api, "v", "viewer").await);
    let editor = api.with_token(&admin_token(&api, "e", "editor").await);
    api.create("groups", json!({"name": "g"})).await;
    let owner_sees = api.audit("").await;
    assert_eq!(owner_sees.len(), 4);
    viewer
        .get("/v1/admin-tokens")
        .await
        .problem(403, "forbidden");
    for (who, as_) in [("viewer", &viewer), ("editor", &editor)] {
        let page = as_.get("/v1/audit").await.status(200);
        let items = page.json["items"].as_array().unwrap();
        assert!(
            items.iter().all(|e| e["kind"] != json!("admin_token")),
            "a {who} reads admin token documents through the audit trail: {}",
            page.text
        );
        assert!(!page.text.contains("secret-ops"), "{who}: {}", page.text);
        assert!(items.iter().any(|e| e["kind"] == json!("group")), "{who}");
        let filtered = as_.get("/v1/audit?kind=admin_token").await;
        assert!(
            filtered.status == StatusCode::FORBIDDEN
                || filtered.json["items"]
                    .as_array()
                    .is_some_and(|a| a.is_empty()),
            "{who}: {}",
            filtered.text
        );
    }
}

/// A route's `set_request_headers` often carry the upstream's credentials: viewers
/// see the header names but never the values, in the route, the list or the audit
/// trail; editors (who write them) see them.
async fn route_header_values_hidden_below_editor(api: Api) {
    let viewer = api.with_token(&admin_token(&api, "v", "viewer").await);
    let editor = api.with_token(&admin_token(&api, "e", "editor").await);
    let secret = "Basic dXBzdHJlYW06aHVudGVyMg==";
    let r = api
        .create(
            "routes",
            json!({"name": "billing", "host": "billing.example.com", "upstreams": ["http://b"],
                   "settings": {"set_request_headers": {"Authorization": secret, "X-Team": "blue"}}}),
        )
        .await;
    assert_eq!(
        r["settings"]["set_request_headers"]["Authorization"],
        json!(secret)
    );
    api.patch(
        "/v1/routes/billing",
        Some("*"),
        &json!({"settings": {"set_request_headers": {"Authorization": format!("{secret}x")}}}),
    )
    .await
    .status(200);
    for uri in ["/v1/routes/billing", "/v1/routes", "/v1/audit?kind=route"] {
        let seen = viewer.get(uri).await.status(200);
        assert!(
            !seen.text.contains(secret),
            "a viewer reads {uri}: {}",
            seen.text
        );
        assert!(!seen.text.contains("\"blue\""), "{uri}: {}", seen.text);
        assert!(seen.text.contains("Authorization"), "{uri}: {}", seen.text);
        assert!(
            seen.text.contains("(hidden: shown to editors)"),
            "{uri}: {}",
            seen.text
        );
        let written = editor.get(uri).await.status(200);
        assert!(
            written.text.contains(secret),
            "an editor reads {uri}: {}",
            written.text
        );
    }
    // The ETag a viewer reads is the route's own.
    let seen = viewer.get("/v1/routes/billing").await.status(200);
    let full = editor.get("/v1/routes/billing").await.status(200);
    assert_eq!(seen.json["version"], full.json["version"]);
}

// ---------- 8. actions ----------

async fn session_revocation(api: Api) {
    let alice = new_user(&api, "alice").await;
    let bob = new_user(&api, "bob").await;
    let device = api
        .create_id("devices", json!({"name": "d", "owner": alice}))
        .await;
    let a1 = new_session(&api, &alice).await;
    let a2 = api
        .create_id(
            "sessions",
            json!({"user_id": alice, "device_id": device, "auth_time": "2030-01-01T00:00:00Z", "expires_at": "2030-01-01T08:00:00Z"}),
        ).await;
    let a3 = new_session(&api, &alice).await;
    let b1 = new_session(&api, &bob).await;

    // One session.
    let before = chrono::Utc::now() - chrono::Duration::seconds(2);
    let got = api.get(&format!("/v1/sessions/{a1}")).await.status(200);
    let revoked = api
        .post_empty(&format!("/v1/sessions/{a1}/revoke"))
        .await
        .status(200);
    let at = revoked.json["revoked_at"].as_str().unwrap().to_owned();
    let t = parse_time(&at).with_timezone(&chrono::Utc);
    assert!(
        t >= before && t <= chrono::Utc::now() + chrono::Duration::seconds(2),
        "{at}"
    );
    assert!(at.ends_with('Z'));
    assert!(revoked.version() > got.version());
    assert_eq!(revoked.etag(), quoted(revoked.version()));
    let mut expected = doc(&got.json);
    expected["revoked_at"] = json!(at);
    assert_eq!(doc(&revoked.json), expected);
    assert_eq!(
        api.get(&format!("/v1/sessions/{a1}"))
            .await
            .status(200)
            .json,
        revoked.json
    );
    // Again: still revoked, at the first time.
    let again = api
        .post_empty(&format!("/v1/sessions/{a1}/revoke"))
        .await
        .status(200);
    assert_eq!(again.json["revoked_at"], json!(at));
    api.post_empty("/v1/sessions/ses_ghost/revoke")
        .await
        .problem(404, "not-found");
    api.send(
        Method::GET,
        &format!("/v1/sessions/{a1}/revoke"),
        &[],
        vec![],
    )
    .await
    .problem(405, "method-not-allowed");

    // All of a user's sessions: the ones not yet revoked are counted.
    let res = api
        .post_empty(&format!("/v1/users/{alice}/revoke-sessions"))
        .await
        .status(200);
    assert_eq!(res.json["revoked"], json!(2), "{}", res.text);
    let revision = res.json["revision"].as_i64().unwrap();
    for s in [&a2, &a3] {
        let got = api.get(&format!("/v1/sessions/{s}")).await.status(200);
        assert!(got.json["revoked_at"].is_string(), "{}", got.text);
        assert_eq!(got.version(), revision);
    }
    assert_eq!(
        api.get(&format!("/v1/sessions/{a2}")).await.json["device_id"],
        json!(device)
    );
    assert_eq!(
        api.get(&format!("/v1/sessions/{a1}")).await.json["revoked_at"],
        json!(at)
    );
    assert_eq!(
        api.get(&format!("/v1/sessions/{b1}"))
            .await
            .json
            .get("revoked_at"),
        None
    );
    let again = api
        .post_empty(&format!("/v1/users/{alice}/revoke-sessions"))
        .await
        .status(200);
    assert_eq!(again.json, json!({"revoked": 0, "revision": null}));
    api.post_empty("/v1/users/usr_ghost/revoke-sessions")
        .await
        .problem(404, "not-found");
    // Each revocation is audited as `revoke`, with before and after.
    let revokes: Vec<(String, Value, Value)> = api
        .audit("&kind=session")
        .await
        .into_iter()
        .filter(|e| e["action"] == json!("revoke"))
        .map(|e| {
            (
                e["entity_id"].as_str().unwrap().to_owned(),
                e["before"]["revoked_at"].clone(),
                e["after"]["revoked_at"].clone(),
            )
        })
        .collect();
    let revoked_ids: Vec<&str> = revokes.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(revoked_ids[0], a1);
    assert_eq!(revokes[0].1, Value::Null);
    assert_eq!(revokes[0].2, json!(at));
    let mut bulk = revoked_ids[2..].to_vec();
    bulk.sort();
    let mut expected = vec![a2.as_str(), a3.as_str()];
    expected.sort();
    assert_eq!(bulk, expected);
    assert!(!revoked_ids.contains(&b1.as_str()));
}

async fn validate_policy_endpoint(api: Api) {
    let ok = api
        .post("/v1/policies/validate", &json!({"document": accept_all()}))
        .await
        .status(200);
    assert_eq!(ok.json, json!({"valid": true}));
    let res = api
        .post(
            "/v1/policies/validate",
            &json!({"document": {"allow": {"and": [{"emial": "a@b.c"}]}}}),
        )
        .await
        .invalid(&["/document/allow/and/0/emial"]);
    assert!(!res.error_detail(0).is_empty());
    api.post(
        "/v1/policies/validate",
        &json!({"document": {"deny": {"or": [{"groups": "x"}]}, "allow": {"and": []}}}),
    )
    .await
    .invalid(&["/document/allow/and"]);
    // Named policies are resolved against the stored ones.
    api.post(
        "/v1/policies/validate",
        &json!({"document": {"allow": {"and": [{"policy": "staff"}]}}}),
    )
    .await
    .invalid(&["/document/allow/and/0/policy"]);
    api.create(
        "policies",
        json!({"name": "staff", "document": accept_all()}),
    )
    .await;
    api.post(
        "/v1/policies/validate",
        &json!({"document": {"allow": {"and": [{"policy": "staff"}]}}}),
    )
    .await
    .status(200);
    // Strict body.
    api.post(
        "/v1/policies/validate",
        &json!({"document": accept_all(), "name": "x"}),
    )
    .await
    .bad_field("/name");
    let res = api
        .post("/v1/policies/validate", &json!({}))
        .await
        .problem(400, "invalid-field");
    assert!(
        res.detail().contains("missing field `document`"),
        "{}",
        res.text
    );
    api.send(
        Method::POST,
        "/v1/policies/validate",
        &[("content-type", "text/plain")],
        b"{}".to_vec(),
    )
    .await
    .problem(415, "unsupported-media-type");
    // Viewers may validate; validating stores nothing.
    let viewer = api.with_token(&admin_token(&api, "v", "viewer").await);
    viewer
        .post("/v1/policies/validate", &json!({"document": accept_all()}))
        .await
        .status(200);
    assert_eq!(
        ids(&api.get("/v1/policies").await.status(200).json),
        ["staff"]
    );
    assert_eq!(api.audit("&kind=policy").await.len(), 1);
    // It is not a policy.
    api.get("/v1/policies/validate")
        .await
        .problem(405, "method-not-allowed");
}

// ---------- 9. health and fallbacks ----------

async fn health_and_fallbacks(api: Api) {
    let h = api.anonymous().get("/healthz").await.status(200);
    assert_eq!(h.text, "ok");
    let r = api.anonymous().get("/readyz").await.status(200);
    assert_eq!(r.text, "ready");
    let doc = api.anonymous().get("/v1/openapi.json").await.status(200);
    assert_eq!(doc.json["openapi"], json!("3.1.0"));

    for uri in [
        "/nope",
        "/v1/nope",
        "/v1/policies/p/extra",
        "/v2/policies",
        "/",
    ] {
        let res = api.get(uri).await.problem(404, "no-such-endpoint");
        assert!(
            res.detail().contains("/v1/openapi.json"),
            "{uri}: {}",
            res.text
        );
        api.anonymous()
            .get(uri)
            .await
            .problem(404, "no-such-endpoint");
    }
    for (method, uri) in [
        (Method::DELETE, "/v1/policies"),
        (Method::PUT, "/v1/policies"),
        (Method::POST, "/v1/policies/p"),
        (Method::POST, "/healthz"),
        (Method::GET, "/v1/sessions/s/revoke"),
        (Method::PATCH, "/v1/audit"),
        (Method::GET, "/v1/users/u/revoke-sessions"),
        (Method::GET, "/v1/admin-tokens/t/rotate-token"),
    ] {
        let res = api
            .send(method.clone(), uri, &[], vec![])
            .await
            .problem(405, "method-not-allowed");
        assert!(
            res.header("allow").is_some(),
            "{method} {uri}: 405 needs Allow"
        );
        api.anonymous()
            .send(method.clone(), uri, &[], vec![])
            .await
            .problem(405, "method-not-allowed");
    }
    let res = api.send(Method::DELETE, "/v1/policies", &[], vec![]).await;
    let allow = res.header("allow").unwrap_or_default().to_owned();
    for m in ["GET", "POST"] {
        assert!(allow.contains(m), "{allow}");
    }
}

/// A device-management integration reports posture with a token that can do
/// nothing else; every report expires.
async fn posture_reports(api: Api) {
    let device = api.create_id("devices", json!({"name": "laptop-1"})).await;
    let mdm = api.with_token(&admin_token(&api, "mdm", "posture").await);
    let before = chrono::Utc::now();
    let res = mdm
        .put(
            &format!("/v1/devices/{device}/posture"),
            None,
            &json!({"attributes": {"managed": true, "os": "linux", "disk_encrypted": true}}),
        )
        .await
        .status(200);
    assert_eq!(res.json["posture"]["attributes"]["managed"], json!(true));
    let at =
        parse_time(res.json["posture"]["expires_at"].as_str().unwrap()).with_timezone(&chrono::Utc);
    // The default: one hour from now.
    assert!(
        at > before + chrono::Duration::seconds(3590)
            && at < chrono::Utc::now() + chrono::Duration::seconds(3610),
        "{at}"
    );
    let res = mdm
        .put(
            &format!("/v1/devices/{device}/posture"),
            None,
            &json!({"attributes": {"managed": false}, "ttl_s": 60}),
        )
        .await
        .status(200);
    // A report replaces the last one whole.
    assert_eq!(res.json["posture"]["attributes"], json!({"managed": false}));
    let audit = api.audit(&format!("&entity_id={device}")).await;
    assert!(
        audit
            .iter()
            .any(|e| e["action"] == "posture" && e["actor"] == "admin-token:mdm"),
        "{audit:?}"
    );
    // The posture token reads nothing and writes nothing else.
    mdm.get("/v1/devices").await.problem(403, "forbidden");
    mdm.get(&format!("/v1/devices/{device}"))
        .await
        .problem(403, "forbidden");
    mdm.post("/v1/groups", &json!({"name": "g"}))
        .await
        .problem(403, "forbidden");
    // A viewer may not report posture; an editor may.
    let viewer = api.with_token(&admin_token(&api, "v", "viewer").await);
    viewer
        .put(
            &format!("/v1/devices/{device}/posture"),
            None,
            &json!({"attributes": {}}),
        )
        .await
        .problem(403, "forbidden");
    api.put(
        &format!("/v1/devices/{device}/posture"),
        None,
        &json!({"attributes": {}}),
    )
    .await
    .status(200);
    // Bad reports name the field and change nothing.
    let uri = format!("/v1/devices/{device}/posture");
    mdm.put(&uri, None, &json!({"attributes": {}, "ttl_s": 0}))
        .await
        .invalid(&["/ttl_s"]);
    mdm.put(
        &uri,
        None,
        &json!({"attributes": {}, "ttl_s": 60, "expires_at": "2030-01-01T00:00:00Z"}),
    )
    .await
    .invalid(&["/ttl_s"]);
    mdm.put(
        &uri,
        None,
        &json!({"attributes": {}, "expires_at": "2001-01-01T00:00:00Z"}),
    )
    .await
    .invalid(&["/expires_at"]);
    mdm.put(
        &uri,
        None,
        &json!({"attributes": {}, "expires_at": "9999-12-31T00:00:00Z"}),
    )
    .await
    .invalid(&["/expires_at"]);
    mdm.put(
        &uri,
        None,
        &json!({"attributes": {}, "expires_at": "tomorrow"}),
    )
    .await
    .invalid(&["/expires_at"]);
    mdm.put(&uri, None, &json!({"atributes": {}}))
        .await
        .problem(400, "invalid-field");
    mdm.put(
        "/v1/devices/no-such-device/posture",
        None,
        &json!({"attributes": {}}),
    )
    .await
    .problem(404, "not-found");
    mdm.anonymous()
        .put(&uri, None, &json!({"attributes": {}}))
        .await
        .problem(401, "unauthorized");
}

/// A route's upstream CA bundle is checked when written, not at every proxy's
/// first request.
async fn upstream_ca_is_checked(api: Api) {
    let route = |pem: &str| {
        json!({"name": "r", "host": "r.example", "upstreams": ["https://10.0.0.1"],
               "policy": accept_all(), "settings": {"upstream_ca_pem": pem}})
    };
    for bad in [
        "",
        "not pem at all",
        "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        "-----BEGIN CERTIFICATE-----\nMIIB\n",
        "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    ] {
        api.post("/v1/routes", &route(bad))
            .await
            .invalid(&["/settings/upstream_ca_pem"]);
    }
    // A real certificate (any DER SEQUENCE of certificate size passes this check;
    // the proxy verifies chains).
    let der = [vec![0x30, 0x82, 0x01, 0x00], vec![0u8; 256]].concat();
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let pem = format!("-----BEGIN CERTIFICATE-----\n{b64}\n-----END CERTIFICATE-----\n");
    api.post("/v1/routes", &route(&pem)).await.status(201);
}

/// Sessions unused for longer than the idle timeout are revoked by the sweep,
/// once; live, recent and already revoked ones are left alone.
async fn idle_sessions_are_revoked(api: Api) {
    let user = new_user(&api, "idle").await;
    let now = chrono::Utc::now();
    let at =
        |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let session = |auth: String| json!({"user_id": user, "auth_time": auth, "expires_at": "2099-01-01T00:00:00Z"});
    let idle = api
        .create_id("sessions", session(at(now - chrono::Duration::hours(3))))
        .await;
    let recent = api
        .create_id("sessions", session(at(now - chrono::Duration::minutes(10))))
        .await;
    let hour = std::time::Duration::from_secs(3600);
    assert_eq!(vigil_control::idle::sweep(&api.control, hour).await, 1);
    let got = api.get(&format!("/v1/sessions/{idle}")).await.status(200);
    assert!(got.json["revoked_at"].is_string(), "{}", got.text);
    let got = api.get(&format!("/v1/sessions/{recent}")).await.status(200);
    assert!(
        got.json.get("revoked_at").is_none_or(Value::is_null),
        "{}",
        got.text
    );
    // Once revoked, never again.
    assert_eq!(vigil_control::idle::sweep(&api.control, hour).await, 0);
    let audit = api.audit(&format!("&entity_id={idle}")).await;
    assert!(
        audit
            .iter()
            .any(|e| e["actor"] == "idle-timeout" && e["action"] == "idle"),
        "{audit:?}"
    );
}
