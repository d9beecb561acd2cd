//! The resources of the admin API: what each kind's document holds, how it is
//! validated, what it refers to, and who may read and write it.

use std::collections::BTreeMap;
use std::future::Future;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use utoipa::ToSchema;
use vigil_store::Ref;

use crate::body::pointer_token;
use crate::problem::{FieldError, Problem};
use crate::Control;

/// Admin roles, ordered by power.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Only reports device posture (`PUT /v1/devices/{id}/posture`): the token a
    /// device-management integration holds; it reads nothing.
    Posture,
    /// Reads everything but admin tokens.
    Viewer,
    /// Also writes everything but admin tokens.
    Editor,
    /// Everything, including admin tokens.
    Owner,
}

impl Role {
    /// The role as written in documents (`posture`, `viewer`, `editor`, `owner`).
    pub fn name(self) -> &'static str {
        match self {
            Role::Posture => "posture",
            Role::Viewer => "viewer",
            Role::Editor => "editor",
            Role::Owner => "owner",
        }
    }
}

/// What validation found besides errors: the natural key and the references.
#[derive(Debug, Default)]
pub struct Checked {
    /// Unique key within the kind.
    pub key: Option<String>,
    /// Entities referred to.
    pub refs: Vec<Ref>,
}

/// Something built from every kind of resource in turn (the router, the OpenAPI
/// document), so that the kinds are listed once, in [`each_kind`].
pub(crate) trait Kinds: Sized {
    /// Adds kind `R`.
    fn kind<R: Resource>(self) -> Self;
}

/// `k` with every kind of resource added, in the API's order.
pub(crate) fn each_kind<K: Kinds>(k: K) -> K {
    k.kind::<Policy>()
        .kind::<Route>()
        .kind::<User>()
        .kind::<Group>()
        .kind::<Device>()
        .kind::<ServiceAccount>()
        .kind::<Grant>()
        .kind::<IdentityProvider>()
        .kind::<Session>()
        .kind::<JoinToken>()
        .kind::<AdminToken>()
}

/// One kind of resource in the API.
pub trait Resource: Send + Sync + 'static {
    /// Store kind.
    const KIND: &'static str;
    /// URL segment under `/v1/`.
    const PATH: &'static str;
    /// Human name for the OpenAPI tags.
    const TITLE: &'static str;
    /// One of these in words, for messages (`policy`, `service account`).
    const SINGULAR: &'static str;
    /// Prefix of generated ids (kinds without a [`Self::name`]).
    const ID_PREFIX: &'static str = "";
    /// Role needed to read.
    const READ_ROLE: Role = Role::Viewer;
    /// Role needed to write.
    const WRITE_ROLE: Role = Role::Editor;
    /// Top-level string fields that list requests may filter on.
    const FILTERS: &'static [&'static str] = &[];
    /// When set, creating issues a bearer token with this prefix, shown once and stored hashed.
    const TOKEN_PREFIX: Option<&'static str> = None;
    /// When set, the document carries a write-only secret, stored encrypted.
    const SECRET: Option<WriteOnlySecret<Self::Spec>> = None;
    /// Fields the server owns that clients may echo back but never set.
    const READ_ONLY: &'static [&'static str] = &[];
    /// For kinds whose natural key is a client certificate's fingerprint: the
    /// other kind (store kind, in words) that must not hold the same fingerprint.
    const CERTIFICATE_SHARED_WITH: Option<(&'static str, &'static str)> = None;
    /// The document.
    type Spec: Serialize + DeserializeOwned + ToSchema + Send + Sync + 'static;
    /// What validation needs from the store (e.g. the named policies).
    type Context: Default + Send + Sync;

    /// Loads the validation context (by default, nothing is loaded).
    fn context(_control: &Control) -> impl Future<Output = Result<Self::Context, Problem>> + Send {
        std::future::ready(Ok(Self::Context::default()))
    }
    /// The name of a named resource, which is also its id (others get generated ids).
    fn name(_spec: &Self::Spec) -> Option<&str> {
        None
    }
    /// Validates and normalises the document for entity `id`.
    fn check(spec: &mut Self::Spec, id: &str, ctx: &Self::Context) -> Result<Checked, Problem>;
}

/// A write-only secret in a kind's document (e.g. an OAuth client secret): taken out
/// to be stored encrypted, with a read-only flag in the document saying whether one is stored.
pub struct WriteOnlySecret<S> {
    /// Removes the secret from the document.
    pub take: fn(&mut S) -> Option<String>,
    /// Records whether a secret is stored (e.g. `client_secret_set`).
    pub mark: fn(&mut S, bool),
}

// ---------- shared validation helpers ----------

/// Names that collide with action paths such as `POST /v1/policies/validate`.
const RESERVED_NAMES: &[&str] = &["validate"];

/// `^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`: names double as ids in URLs.
pub(crate) fn check_name(name: &str) -> Result<(), Problem> {
    if RESERVED_NAMES.contains(&name) {
        return Err(Problem::invalid_field(
            "/name",
            format!("`{name}` is reserved"),
        ));
    }
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Problem::invalid_field(
            "/name",
            format!("`{name}` is not a valid name: 1-63 lowercase letters, digits and `-`, not starting or ending with `-`"),
        ))
    }
}

/// Normalises an RFC 3339 instant to UTC (`...Z`) in place; false (with an error) if it is not one.
pub(crate) fn check_time(pointer: &str, value: &mut String, errors: &mut Vec<FieldError>) -> bool {
    match chrono::DateTime::parse_from_rfc3339(value) {
        Ok(t) => {
            let utc = crate::time::secs(t.with_timezone(&chrono::Utc));
            // RFC 3339 has four-digit years: `9999-12-31T23:00:00-14:00` is in year
            // 10000 in UTC, which could not be read back (and would sort wrongly as text).
            if crate::time::parse(&utc).is_none() {
                errors.push(FieldError::new(
                    pointer,
                    format!("`{value}` is {utc} in UTC, outside the years 0000 to 9999"),
                ));
                return false;
            }
            *value = utc;
            true
        }
        Err(e) => {
            errors.push(FieldError::new(
                pointer,
                format!("`{value}` is not an RFC 3339 time: {e}"),
            ));
            false
        }
    }
}

/// [`check_time`] for an optional time.
fn check_optional_time(pointer: &str, value: &mut Option<String>, errors: &mut Vec<FieldError>) {
    if let Some(v) = value {
        check_time(pointer, v, errors);
    }
}

/// Whether an RFC 3339 instant (such as an `expires_at`) is now or past; one that
/// does not parse counts as past.
pub fn is_past(time: &str) -> bool {
    crate::time::parse(time).is_none_or(|t| t <= chrono::Utc::now())
}

/// Sorts and deduplicates a principal's groups; each must exist (and cannot be
/// deleted while it is named).
fn group_refs(groups: &mut Vec<String>) -> Vec<Ref> {
    groups.sort();
    groups.dedup();
    groups.iter().map(|g| restrict(Group::KIND, g)).collect()
}

/// The check of a document whose only rule is an optional `expires_at`.
fn expiry_only(expires_at: &mut Option<String>) -> Result<Checked, Problem> {
    let mut errors = Vec::new();
    check_optional_time("/expires_at", expires_at, &mut errors);
    done(errors, Checked::default())
}

fn done(errors: Vec<FieldError>, checked: Checked) -> Result<Checked, Problem> {
    if errors.is_empty() {
        Ok(checked)
    } else {
        Err(Problem::invalid(errors))
    }
}

fn restrict(kind: &str, id: &str) -> Ref {
    Ref {
        kind: kind.into(),
        id: id.into(),
        cascade: false,
    }
}

fn cascade(kind: &str, id: &str) -> Ref {
    Ref {
        kind: kind.into(),
        id: id.into(),
        cascade: true,
    }
}

/// Parsed named policies, for references and cycle checks.
pub type PolicyLibrary = BTreeMap<String, vigil_policy::Document>;

/// Every entity of `kind` whose top-level `fields` have the given values, page by page.
pub(crate) async fn list_all(
    store: &vigil_store::Store,
    kind: &str,
    fields: Vec<(&'static str, String)>,
) -> Result<Vec<vigil_store::Record>, vigil_store::StoreError> {
    let mut q = vigil_store::ListQuery {
        limit: Some(1000),
        fields,
        ..Default::default()
    };
    let mut all = Vec::new();
    loop {
        let page = store.list(kind, &q).await?;
        all.extend(page.items);
        match page.next {
            Some(n) => q.cursor = Some(n),
            None => return Ok(all),
        }
    }
}

async fn policy_library(control: &Control) -> Result<PolicyLibrary, Problem> {
    let policies = list_all(&control.store, Policy::KIND, Vec::new()).await?;
    Ok(policies
        .into_iter()
        .filter_map(|r| {
            let doc = vigil_policy::parse_json_value(r.body.get("document")?).ok()?;
            Some((r.id, doc))
        })
        .collect())
}

/// Validates a policy document at `pointer`, compiling it against the library with
/// `own` (when it is a named policy) so cycles through it are found.
fn check_document(
    doc: &serde_json::Value,
    pointer: &str,
    own: Option<&str>,
    lib: &PolicyLibrary,
    errors: &mut Vec<FieldError>,
) -> Vec<String> {
    let relocate =
        |p: vigil_policy::Problem| FieldError::new(format!("{pointer}{}", p.pointer), p.message);
    let parsed = match vigil_policy::parse_json_value(doc) {
        Ok(d) => d,
        Err(e) => {
            match e.problems() {
                [] => errors.push(FieldError::new(pointer, e.to_string())),
                ps => errors.extend(ps.iter().cloned().map(relocate)),
            }
            return Vec::new();
        }
    };
    // Compile against a library that holds this document under its own name (a
    // copy only then: an inline route policy compiles against the library as it is).
    let lib: std::borrow::Cow<'_, PolicyLibrary> = match own {
        Some(own) => {
            let mut with_own = lib.clone();
            with_own.insert(own.to_owned(), parsed.clone());
            std::borrow::Cow::Owned(with_own)
        }
        None => std::borrow::Cow::Borrowed(lib),
    };
    let mut symbols = vigil_policy::Symbols::default();
    let env = vigil_policy::CompileEnv {
        symbols: &mut symbols,
        directory: None,
        library: Some(&*lib),
        name: own,
    };
    if let Err(e) = vigil_policy::compile(&parsed, env) {
        errors.extend(e.problems().iter().cloned().map(relocate));
    }
    parsed.references()
}

// ---------- policies ----------

/// A named, reusable policy.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// Unique name, also the id.
    pub name: String,
    /// What the policy is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The policy document (see docs/policy.md).
    #[schema(value_type = Object)]
    pub document: serde_json::Value,
}

/// `/v1/policies`.
pub struct Policy;

impl Resource for Policy {
    const KIND: &'static str = "policy";
    const PATH: &'static str = "policies";
    const TITLE: &'static str = "Policies";
    const SINGULAR: &'static str = "policy";
    type Spec = PolicySpec;
    type Context = PolicyLibrary;

    fn context(control: &Control) -> impl Future<Output = Result<PolicyLibrary, Problem>> + Send {
        policy_library(control)
    }
    fn name(spec: &PolicySpec) -> Option<&str> {
        Some(&spec.name)
    }
    fn check(spec: &mut PolicySpec, id: &str, lib: &PolicyLibrary) -> Result<Checked, Problem> {
        let mut errors = Vec::new();
        let refs = check_document(&spec.document, "/document", Some(id), lib, &mut errors);
        let refs = refs
            .iter()
            .filter(|r| r.as_str() != id)
            .map(|r| restrict(Policy::KIND, r))
            .collect();
        done(errors, Checked { key: None, refs })
    }
}

// ---------- routes ----------

/// What a route's `set_request_headers` values look like to readers below the
/// editor role.
pub const HIDDEN_HEADER_VALUE: &str = "(hidden: shown to editors)";

/// Hides from a reader below the editor role what only writers may see: the values
/// of a route's `set_request_headers`, which often carry the upstream's own
/// credentials (`Authorization`, an API key). Editors see them, since an editor can
/// point the route at a server of their own and read them there anyway. `doc` is a
/// stored document of `kind`, or the API form of one.
pub fn hide_from_readers(kind: &str, doc: &mut serde_json::Value) {
    if kind != Route::KIND {
        return;
    }
    let headers = doc
        .get_mut("settings")
        .and_then(|s| s.get_mut("set_request_headers"))
        .and_then(serde_json::Value::as_object_mut);
    for value in headers.into_iter().flat_map(|h| h.values_mut()) {
        *value = serde_json::Value::String(HIDDEN_HEADER_VALUE.to_owned());
    }
}

/// How a route matches the request path (already normalised by the proxy).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PathMatch {
    /// Paths beginning with this prefix, on a segment boundary (`/api` matches `/api` and `/api/x`, not `/apix`).
    Prefix(String),
    /// Exactly this path.
    Exact(String),
    /// The whole path matches this regular expression.
    Regex(String),
}

impl Default for PathMatch {
    fn default() -> Self {
        PathMatch::Prefix("/".into())
    }
}

/// Per-route behaviour of the proxy.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RouteSettings {
    /// Upstream timeout for the response headers, in milliseconds.
    pub timeout_ms: u64,
    /// Send the client's Host to the upstream instead of the upstream's.
    pub preserve_host: bool,
    /// Replace the matched prefix with this before forwarding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix_rewrite: Option<String>,
    /// Headers to set on the forwarded request.
    pub set_request_headers: BTreeMap<String, String>,
    /// Headers to remove from the forwarded request.
    pub remove_request_headers: Vec<String>,
    /// Allow WebSocket upgrades (HTTP/1.1); when false they are refused with 403.
    pub allow_websockets: bool,
    /// Forward CORS preflights (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) to the upstream without authentication.
    pub cors_preflight: bool,
    /// Send users back through login when their authentication is older (seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_auth_age_s: Option<u64>,
    /// Identity provider used to log in to this route (name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_provider: Option<String>,
    /// PEM bundle of CAs trusted for HTTPS upstreams (default: the Mozilla roots of webpki-roots).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ca_pem: Option<String>,
}

impl Default for RouteSettings {
    fn default() -> Self {
        RouteSettings {
            timeout_ms: 30_000,
            preserve_host: false,
            prefix_rewrite: None,
            set_request_headers: BTreeMap::new(),
            remove_request_headers: Vec::new(),
            allow_websockets: true,
            cors_preflight: false,
            max_auth_age_s: None,
            identity_provider: None,
            upstream_ca_pem: None,
        }
    }
}

/// A protected application: where requests for it go and which policies guard it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Unique name, also the id.
    pub name: String,
    /// What the route is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Host the route answers: `app.example.com` or a wildcard `*.example.com`.
    pub host: String,
    /// Which paths of the host (default: everything).
    #[serde(default)]
    pub path: PathMatch,
    /// Upstream base URLs (`http://` or `https://`), tried in order.
    pub upstreams: Vec<String>,
    /// Named policies; a request is allowed when any allows and none denies.
    #[serde(default)]
    pub policies: Vec<String>,
    /// An inline policy document, combined with the named ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub policy: Option<serde_json::Value>,
    /// Proxy behaviour.
    #[serde(default)]
    pub settings: RouteSettings,
}

fn check_host(host: &str) -> Result<String, String> {
    let h = host.trim().trim_end_matches('.').to_ascii_lowercase();
    let (wild, rest) = match h.strip_prefix("*.") {
        Some(r) => (true, r),
        None => (false, h.as_str()),
    };
    let ok = vigil_snapshot::is_host_name(rest) && (!wild || rest.contains('.'));
    if ok {
        Ok(h)
    } else {
        Err(format!("`{host}` is not a host name (letters, digits, `-`, dots; `*.` allowed as the first label)"))
    }
}

fn check_upstream(u: &str) -> Result<(), String> {
    let uri: http::Uri = u.parse().map_err(|e| format!("`{u}` is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(format!("`{u}` must start with http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{u}` has no host"));
    }
    // A route is readable by every viewer, kept in the audit trail and sent to
    // every proxy: a user name and password in it would be shown to all of them.
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(
            "an upstream URL must not carry a user name or password: a route is shown to every viewer, kept in the audit trail and sent to every proxy".to_owned(),
        );
    }
    if uri.query().is_some() {
        return Err(format!("`{u}` must not have a query"));
    }
    Ok(())
}

fn check_header_name(h: &str) -> bool {
    http::HeaderName::from_bytes(h.as_bytes()).is_ok() && !h.contains('_')
}

/// `/v1/routes`.
pub struct Route;

impl Resource for Route {
    const KIND: &'static str = "route";
    const PATH: &'static str = "routes";
    const TITLE: &'static str = "Routes";
    const SINGULAR: &'static str = "route";
    const FILTERS: &'static [&'static str] = &["host"];
    type Spec = RouteSpec;
    type Context = PolicyLibrary;

    fn context(control: &Control) -> impl Future<Output = Result<PolicyLibrary, Problem>> + Send {
        policy_library(control)
    }
    fn name(spec: &RouteSpec) -> Option<&str> {
        Some(&spec.name)
    }
    fn check(spec: &mut RouteSpec, _id: &str, lib: &PolicyLibrary) -> Result<Checked, Problem> {
        let mut errors = Vec::new();
        match check_host(&spec.host) {
            Ok(h) => spec.host = h,
            Err(e) => errors.push(FieldError::new("/host", e)),
        }
        let path_key = match &spec.path {
            PathMatch::Prefix(p) | PathMatch::Exact(p) if !p.starts_with('/') => {
                errors.push(FieldError::new(
                    "/path",
                    format!("`{p}` must begin with `/`"),
                ));
                String::new()
            }
            PathMatch::Prefix(p) => format!(
                "prefix {}",
                if p.len() > 1 {
                    p.trim_end_matches('/')
                } else {
                    p
                }
            ),
            PathMatch::Exact(p) => format!("exact {p}"),
            PathMatch::Regex(r) => {
                // Also compiled alone, so a pattern cannot break out of the group (`a)|(b`).
                if let Err(e) =
                    regex::Regex::new(&format!("^(?:{r})$")).and_then(|_| regex::Regex::new(r))
                {
                    errors.push(FieldError::new(
                        "/path/regex",
                        format!(
                            "invalid regular expression: {}",
                            e.to_string().replace('\n', " ")
                        ),
                    ));
                }
                format!("regex {r}")
            }
        };
        if spec.upstreams.is_empty() {
            errors.push(FieldError::new(
                "/upstreams",
                "at least one upstream is needed",
            ));
        }
        for (i, u) in spec.upstreams.iter().enumerate() {
            if let Err(e) = check_upstream(u) {
                errors.push(FieldError::new(format!("/upstreams/{i}"), e));
            }
        }
        let mut refs = Vec::new();
        for (i, p) in spec.policies.iter().enumerate() {
            if !lib.contains_key(p) {
                errors.push(FieldError::new(
                    format!("/policies/{i}"),
                    format!("unknown policy `{p}`"),
                ));
            }
            refs.push(restrict(Policy::KIND, p));
        }
        if let Some(doc) = &spec.policy {
            for r in check_document(doc, "/policy", None, lib, &mut errors) {
                refs.push(restrict(Policy::KIND, &r));
            }
        }
        let s = &spec.settings;
        if s.timeout_ms == 0 || s.timeout_ms > 3_600_000 {
            errors.push(FieldError::new(
                "/settings/timeout_ms",
                "must be between 1 and 3600000",
            ));
        }
        if let Some(pem) = &s.upstream_ca_pem {
            if let Err(e) = check_ca_pem(pem) {
                errors.push(FieldError::new("/settings/upstream_ca_pem", e));
            }
        }
        if let Some(p) = &s.prefix_rewrite {
            if !p.starts_with('/') {
                errors.push(FieldError::new(
                    "/settings/prefix_rewrite",
                    "must begin with `/`",
                ));
            }
        }
        for (name, value) in &s.set_request_headers {
            let at = format!("/settings/set_request_headers/{}", pointer_token(name));
            if !check_header_name(name) {
                errors.push(FieldError::new(&at, "not a valid header name"));
            } else if name.to_ascii_lowercase().starts_with("x-vigil-") {
                errors.push(FieldError::new(
                    &at,
                    "`X-Vigil-*` headers are set by the proxy only",
                ));
            }
            if http::HeaderValue::from_str(value).is_err() {
                errors.push(FieldError::new(at, "not a valid header value"));
            }
        }
        for (i, name) in s.remove_request_headers.iter().enumerate() {
            if !check_header_name(name) {
                errors.push(FieldError::new(
                    format!("/settings/remove_request_headers/{i}"),
                    "not a valid header name",
                ));
            }
        }
        if let Some(idp) = &s.identity_provider {
            refs.push(restrict(IdentityProvider::KIND, idp));
        }
        refs.sort_by(|a, b| (&a.kind, &a.id).cmp(&(&b.kind, &b.id)));
        refs.dedup();
        done(
            errors,
            Checked {
                key: Some(format!("{} {path_key}", spec.host)),
                refs,
            },
        )
    }
}

// ---------- users and groups ----------

/// Whether a user may sign in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum UserStatus {
    /// May sign in.
    #[default]
    Active,
    /// Every session denied until reactivated.
    Suspended,
}

/// A person, as known from an identity provider.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    /// The identity provider's issuer URL.
    pub issuer: String,
    /// The subject (`sub`) at that issuer; (issuer, subject) is unique.
    pub subject: String,
    /// Email address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Whether the email was verified by the IdP.
    #[serde(default)]
    pub email_verified: bool,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Active or suspended.
    #[serde(default)]
    pub status: UserStatus,
    /// Local groups (names).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Free-form attributes.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub attributes: serde_json::Map<String, serde_json::Value>,
}

/// `/v1/users`.
pub struct User;

impl Resource for User {
    const KIND: &'static str = "user";
    const PATH: &'static str = "users";
    const TITLE: &'static str = "Users";
    const SINGULAR: &'static str = "user";
    const ID_PREFIX: &'static str = "usr";
    const FILTERS: &'static [&'static str] = &["email", "issuer", "subject", "status"];
    type Spec = UserSpec;
    type Context = ();

    fn check(spec: &mut UserSpec, _id: &str, _: &()) -> Result<Checked, Problem> {
        let mut errors = Vec::new();
        if spec.issuer.trim().is_empty() {
            errors.push(FieldError::new("/issuer", "must not be empty"));
        }
        if spec.subject.is_empty() {
            errors.push(FieldError::new("/subject", "must not be empty"));
        }
        // The natural key joins them with a line break: with one inside, two
        // different (issuer, subject) pairs would share a key.
        for (pointer, value) in [("/issuer", &spec.issuer), ("/subject", &spec.subject)] {
            if value.chars().any(char::is_control) {
                errors.push(FieldError::new(
                    pointer,
                    "must not contain control characters",
                ));
            }
        }
        if let Some(name) = &spec.display_name {
            if name.chars().any(char::is_control) {
                errors.push(FieldError::new(
                    "/display_name",
                    "must not contain control characters",
                ));
            }
        }
        if let Some(e) = &spec.email {
            let domain = e.rsplit_once('@').map_or("", |(_, d)| d);
            if e.matches('@').count() != 1
                || e.starts_with('@')
                || domain.is_empty()
                || (!domain.starts_with('[') && domain.split('.').any(str::is_empty))
            {
                errors.push(FieldError::new(
                    "/email",
                    format!("`{e}` is not an email address"),
                ));
            } else if let Some(c) = e.chars().find(|c| invisible(*c)) {
                errors.push(FieldError::new(
                    "/email",
                    format!(
                        "`{}` holds U+{:04X}: no spaces, control or invisible formatting characters",
                        e.escape_debug(),
                        u32::from(c)
                    ),
                ));
            }
        }
        let refs = group_refs(&mut spec.groups);
        done(
            errors,
            Checked {
                key: Some(format!("{}\n{}", spec.issuer, spec.subject)),
                refs,
            },
        )
    }
}

/// Whether `c` would make text look like other text: white space, a control
/// character, or an invisible formatting one (zero-width, bidirectional controls,
/// a soft hyphen, a byte-order mark). An email holding one never equals the
/// address it shows, in a policy or in a person's reading of the directory.
fn invisible(c: char) -> bool {
    c.is_whitespace()
        || c.is_control()
        || matches!(c,
            '\u{00ad}' | '\u{061c}' | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206f}' | '\u{feff}')
}

/// A local group of users.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    /// Unique name, also the id.
    pub name: String,
    /// What the group is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// `/v1/groups`.
pub struct Group;

impl Resource for Group {
    const KIND: &'static str = "group";
    const PATH: &'static str = "groups";
    const TITLE: &'static str = "Groups";
    const SINGULAR: &'static str = "group";
    type Spec = GroupSpec;
    type Context = ();

    fn name(spec: &GroupSpec) -> Option<&str> {
        Some(&spec.name)
    }
    fn check(_: &mut GroupSpec, _: &str, _: &()) -> Result<Checked, Problem> {
        Ok(Checked::default())
    }
}

/// A PEM bundle of one or more CA certificates, and nothing else: a mistake here
/// would otherwise surface only as 502s at every proxy.
fn check_ca_pem(pem: &str) -> Result<(), String> {
    use base64::Engine as _;
    let mut count = 0;
    let mut body: Option<String> = None;
    for line in pem.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match (&mut body, line) {
            (None, "-----BEGIN CERTIFICATE-----") => body = Some(String::new()),
            (None, l) if l.starts_with("-----BEGIN ") => {
                return Err(format!("`{l}`: only CERTIFICATE blocks belong here"))
            }
            (None, _) => return Err("text outside a PEM block".into()),
            (Some(b), "-----END CERTIFICATE-----") => {
                let der = base64::engine::general_purpose::STANDARD
                    .decode(b.as_bytes())
                    .map_err(|_| format!("certificate {} is not valid base64", count + 1))?;
                if der.first() != Some(&0x30) || der.len() < 64 {
                    return Err(format!(
                        "certificate {} is not a DER certificate",
                        count + 1
                    ));
                }
                count += 1;
                body = None;
            }
            (Some(_), l) if l.starts_with("-----") => {
                return Err(format!("certificate {} is not closed", count + 1))
            }
            (Some(b), l) => b.push_str(l),
        }
    }
    if body.is_some() {
        return Err(format!("certificate {} is not closed", count + 1));
    }
    if count == 0 {
        return Err("expected at least one `-----BEGIN CERTIFICATE-----` block".into());
    }
    Ok(())
}

/// Normalises a client certificate's SPKI fingerprint to 64 lowercase hex digits,
/// which is then the entity's natural key (unique within its kind).
fn check_fingerprint(fp: &mut Option<String>, errors: &mut Vec<FieldError>) -> Option<String> {
    let text = fp.as_mut()?;
    match vigil_policy::parse_fingerprint(text) {
        Some(bytes) => {
            *text = vigil_policy::to_hex(&bytes);
            Some(text.clone())
        }
        None => {
            errors.push(FieldError::new(
                CERTIFICATE_FIELD,
                "expected a SHA-256 fingerprint: 64 hex digits, colons allowed",
            ));
            None
        }
    }
}

/// Where devices and service accounts name their client certificate.
pub(crate) const CERTIFICATE_FIELD: &str = "/client_certificate_sha256";

// ---------- devices ----------

/// A device's reported posture.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PostureSpec {
    /// Attribute values (booleans, numbers, strings), e.g. `managed`, `disk_encrypted`, `os`.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub attributes: BTreeMap<String, serde_json::Value>,
    /// When the report stops counting (RFC 3339); stale posture is not compliant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// A device that may be used to reach routes.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    /// Display name.
    pub name: String,
    /// Owning user's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Approved by an admin.
    #[serde(default)]
    pub approved: bool,
    /// Revoked: every request from it is denied.
    #[serde(default)]
    pub revoked: bool,
    /// Latest posture.
    #[serde(default)]
    pub posture: PostureSpec,
    /// SHA-256 of the client certificate's SubjectPublicKeyInfo (hex), unique.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate_sha256: Option<String>,
}

/// `/v1/devices`.
pub struct Device;

impl Resource for Device {
    const KIND: &'static str = "device";
    const PATH: &'static str = "devices";
    const TITLE: &'static str = "Devices";
    const SINGULAR: &'static str = "device";
    const ID_PREFIX: &'static str = "dev";
    const FILTERS: &'static [&'static str] = &["owner", "name"];
    const CERTIFICATE_SHARED_WITH: Option<(&'static str, &'static str)> =
        Some((ServiceAccount::KIND, ServiceAccount::SINGULAR));
    type Spec = DeviceSpec;
    type Context = ();

    fn check(spec: &mut DeviceSpec, _: &str, _: &()) -> Result<Checked, Problem> {
        let mut errors = Vec::new();
        if spec.name.trim().is_empty() {
            errors.push(FieldError::new("/name", "must not be empty"));
        }
        for (k, v) in &spec.posture.attributes {
            let scalar = v.is_boolean() || v.is_number() || v.is_string();
            let name_ok = !k.is_empty()
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
            if !scalar || !name_ok {
                errors.push(FieldError::new(
                    format!("/posture/attributes/{}", pointer_token(k)),
                    "attributes are named with letters, digits, `_`, `-`, `.` and hold a boolean, number or string",
                ));
            }
        }
        check_optional_time(
            "/posture/expires_at",
            &mut spec.posture.expires_at,
            &mut errors,
        );
        let key = check_fingerprint(&mut spec.client_certificate_sha256, &mut errors);
        let refs = spec.owner.iter().map(|o| restrict(User::KIND, o)).collect();
        done(errors, Checked { key, refs })
    }
}

// ---------- service accounts ----------

/// A non-human principal that authenticates with a bearer token or a client certificate.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccountSpec {
    /// Unique name, also the id.
    pub name: String,
    /// What it is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Groups (names) the account is treated as a member of.
    #[serde(default)]
    pub groups: Vec<String>,
    /// When its token stops working (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Disabled accounts are denied everywhere.
    #[serde(default)]
    pub disabled: bool,
    /// SHA-256 of the SubjectPublicKeyInfo of a client certificate that
    /// authenticates the account at the proxy (hex), unique among service accounts
    /// and devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate_sha256: Option<String>,
}

/// `/v1/service-accounts`.
pub struct ServiceAccount;

impl Resource for ServiceAccount {
    const KIND: &'static str = "service_account";
    const PATH: &'static str = "service-accounts";
    const TITLE: &'static str = "Service accounts";
    const SINGULAR: &'static str = "service account";
    const TOKEN_PREFIX: Option<&'static str> = Some("sa");
    const CERTIFICATE_SHARED_WITH: Option<(&'static str, &'static str)> =
        Some((Device::KIND, Device::SINGULAR));
    type Spec = ServiceAccountSpec;
    type Context = ();

    fn name(spec: &ServiceAccountSpec) -> Option<&str> {
        Some(&spec.name)
    }
    fn check(spec: &mut ServiceAccountSpec, _: &str, _: &()) -> Result<Checked, Problem> {
        let mut errors = Vec::new();
        check_optional_time("/expires_at", &mut spec.expires_at, &mut errors);
        let key = check_fingerprint(&mut spec.client_certificate_sha256, &mut errors);
        let refs = group_refs(&mut spec.groups);
        done(errors, Checked { key, refs })
    }
}

// ---------- access grants ----------

/// Who a grant is for.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Subject {
    /// A user id.
    User(String),
    /// A service account name.
    ServiceAccount(String),
}

/// Just-in-time access to one route for a window of time.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantSpec {
    /// Who gets access.
    pub subject: Subject,
    /// The route (name).
    pub route: String,
    /// Start of access (RFC 3339, inclusive).
    pub start: String,
    /// End of access (RFC 3339, exclusive).
    pub end: String,
    /// Why access was granted.
    pub reason: String,
    /// Who approved it.
    pub approver: String,
}

/// `/v1/grants`.
pub struct Grant;

impl Resource for Grant {
    const KIND: &'static str = "grant";
    const PATH: &'static str = "grants";
    const TITLE: &'static str = "Access grants";
    const SINGULAR: &'static str = "access grant";
    const ID_PREFIX: &'static str = "grt";
    const FILTERS: &'static [&'static str] = &["route", "approver"];
    type Spec = GrantSpec;
    type Context = ();

    fn check(spec: &mut GrantSpec, _: &str, _: &()) -> Result<Checked, Problem> {
        let mut errors = Vec::new();
        let start = check_time("/start", &mut spec.start, &mut errors);
        let end = check_time("/end", &mut spec.end, &mut errors);
        // Both normalised to UTC, so they compare as text.
        if start && end && spec.start >= spec.end {
            errors.push(FieldError::new("/end", "must be after `start`"));
        }
        if spec.reason.trim().is_empty() {
            errors.push(FieldError::new("/reason", "a grant needs a reason"));
        }
        if spec.approver.trim().is_empty() {
            errors.push(FieldError::new("/approver", "a grant needs an approver"));
        }
        let subject = match &spec.subject {
            Subject::User(u) => cascade(User::KIND, u),
            Subject::ServiceAccount(s) => cascade(ServiceAccount::KIND, s),
        };
        done(
            errors,
            Checked {
                key: None,
                refs: vec![subject, cascade(Route::KIND, &spec.route)],
            },
        )
    }
}

// ---------- identity providers ----------

/// Where to find identity facts in the IdP's claims.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ClaimMapping {
    /// Claim holding the email.
    pub email: String,
    /// Claim holding group names.
    pub groups: String,
    /// Claim holding the display name.
    pub name: String,
}

impl Default for ClaimMapping {
    fn default() -> Self {
        ClaimMapping {
            email: "email".into(),
            groups: "groups".into(),
            name: "name".into(),
        }
    }
}

/// An OpenID Connect provider users log in with.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentityProviderSpec {
    /// Unique name, also the id.
    pub name: String,
    /// Issuer URL (https, or http on loopback for development).
    pub issuer_url: String,
    /// OAuth client id.
    pub client_id: String,
    /// OAuth client secret: write-only, stored encrypted, never returned.
    #[serde(default, skip_serializing)]
    pub client_secret: Option<String>,
    /// Whether a client secret is stored (read-only).
    #[serde(default)]
    pub client_secret_set: bool,
    /// Scopes to request.
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// Claim names.
    #[serde(default)]
    pub claim_mapping: ClaimMapping,
    /// Only emails in these domains may sign in (empty: any).
    #[serde(default)]
    pub allowed_domains: Vec<String>,
    /// Audiences accepted in bearer JWTs this provider issues, besides the client id.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// The provider's signing keys (its JWKS), fetched by the control plane and
    /// shipped to the proxies in the snapshot (read-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub jwks: Option<serde_json::Value>,
}

fn default_scopes() -> Vec<String> {
    vec!["openid".into(), "email".into(), "profile".into()]
}

/// `/v1/identity-providers`.
pub struct IdentityProvider;

impl Resource for IdentityProvider {
    const KIND: &'static str = "identity_provider";
    const PATH: &'static str = "identity-providers";
    const TITLE: &'static str = "Identity providers";
    const SINGULAR: &'static str = "identity provider";
    const READ_ONLY: &'static [&'static str] = &["client_secret_set", "jwks"];
    const SECRET: Option<WriteOnlySecret<IdentityProviderSpec>> = Some(WriteOnlySecret {
        take: |spec| spec.client_secret.take(),
        mark: |spec, stored| spec.client_secret_set = stored,
    });
    type Spec = IdentityProviderSpec;
    type Context = ();

    fn name(spec: &IdentityProviderSpec) -> Option<&str> {
        Some(&spec.name)
    }
    fn check(spec: &mut IdentityProviderSpec, _: &str, _: &()) -> Result<Checked, Problem> {
        let mut errors = Vec::new();
        match spec.issuer_url.parse::<http::Uri>() {
            Ok(u) => {
                let loopback = matches!(
                    u.host(),
                    Some("localhost") | Some("127.0.0.1") | Some("[::1]")
                );
                let ok =
                    u.scheme_str() == Some("https") || (u.scheme_str() == Some("http") && loopback);
                if !ok || u.host().is_none() {
                    errors.push(FieldError::new(
                        "/issuer_url",
                        "must be an https:// URL (http:// only on loopback)",
                    ));
                } else if u.authority().is_some_and(|a| a.as_str().contains('@')) {
                    // Shown to every viewer and sent in every snapshot: no credentials.
                    errors.push(FieldError::new(
                        "/issuer_url",
                        "must not carry a user name or password",
                    ));
                } else if u.query().is_some() || spec.issuer_url.contains('#') {
                    errors.push(FieldError::new(
                        "/issuer_url",
                        "an issuer has no query or fragment (OpenID Connect Discovery)",
                    ));
                }
            }
            Err(e) => errors.push(FieldError::new("/issuer_url", format!("not a URL: {e}"))),
        }
        if spec.client_id.is_empty() {
            errors.push(FieldError::new("/client_id", "must not be empty"));
        }
        if !spec.scopes.iter().any(|s| s == "openid") {
            errors.push(FieldError::new("/scopes", "must include `openid`"));
        }
        for d in &mut spec.allowed_domains {
            *d = d.trim().to_lowercase();
        }
        done(errors, Checked::default())
    }
}

// ---------- sessions ----------

/// A signed-in session, reported by a proxy.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionSpec {
    /// The user's id.
    pub user_id: String,
    /// The device's id, if one was identified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Identity provider (name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_provider: Option<String>,
    /// When the user authenticated (RFC 3339).
    pub auth_time: String,
    /// When the session ends (RFC 3339).
    pub expires_at: String,
    /// Authentication methods (RFC 8176).
    #[serde(default)]
    pub amr: Vec<String>,
    /// When it was revoked (RFC 3339); revoked sessions are denied everywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
    /// Last request seen (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_at: Option<String>,
}

/// `/v1/sessions`.
pub struct Session;

impl Resource for Session {
    const KIND: &'static str = "session";
    const PATH: &'static str = "sessions";
    const TITLE: &'static str = "Sessions";
    const SINGULAR: &'static str = "session";
    const ID_PREFIX: &'static str = "ses";
    const FILTERS: &'static [&'static str] = &["user_id", "device_id"];
    type Spec = SessionSpec;
    type Context = ();

    fn check(spec: &mut SessionSpec, _: &str, _: &()) -> Result<Checked, Problem> {
        let mut errors = Vec::new();
        check_time("/auth_time", &mut spec.auth_time, &mut errors);
        check_time("/expires_at", &mut spec.expires_at, &mut errors);
        check_optional_time("/revoked_at", &mut spec.revoked_at, &mut errors);
        check_optional_time("/last_seen_at", &mut spec.last_seen_at, &mut errors);
        let mut refs = vec![cascade(User::KIND, &spec.user_id)];
        if let Some(d) = &spec.device_id {
            refs.push(cascade(Device::KIND, d));
        }
        done(errors, Checked { key: None, refs })
    }
}

// ---------- tokens ----------

/// A token proxies present to join the fleet.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenSpec {
    /// Unique name, also the id.
    pub name: String,
    /// What it is for (which fleet, which cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// When it stops working (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// `/v1/join-tokens`.
pub struct JoinToken;

impl Resource for JoinToken {
    const KIND: &'static str = "join_token";
    const PATH: &'static str = "join-tokens";
    const TITLE: &'static str = "Proxy join tokens";
    const SINGULAR: &'static str = "proxy join token";
    const TOKEN_PREFIX: Option<&'static str> = Some("join");
    type Spec = JoinTokenSpec;
    type Context = ();

    fn name(spec: &JoinTokenSpec) -> Option<&str> {
        Some(&spec.name)
    }
    fn check(spec: &mut JoinTokenSpec, _: &str, _: &()) -> Result<Checked, Problem> {
        expiry_only(&mut spec.expires_at)
    }
}

/// A bearer token for the admin API.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminTokenSpec {
    /// Unique name, also the id.
    pub name: String,
    /// What the bearer may do.
    pub role: Role,
    /// When it stops working (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// `/v1/admin-tokens` (owners only).
pub struct AdminToken;

impl Resource for AdminToken {
    const KIND: &'static str = "admin_token";
    const PATH: &'static str = "admin-tokens";
    const TITLE: &'static str = "Admin tokens";
    const SINGULAR: &'static str = "admin token";
    const READ_ROLE: Role = Role::Owner;
    const WRITE_ROLE: Role = Role::Owner;
    const TOKEN_PREFIX: Option<&'static str> = Some("admin");
    type Spec = AdminTokenSpec;
    type Context = ();

    fn name(spec: &AdminTokenSpec) -> Option<&str> {
        Some(&spec.name)
    }
    fn check(spec: &mut AdminTokenSpec, _: &str, _: &()) -> Result<Checked, Problem> {
        expiry_only(&mut spec.expires_at)
    }
}
