//! The admin REST API's handlers: one generic set for every resource kind, plus
//! the few actions that are not plain CRUD.

use axum::body::Body;
use axum::extract::{FromRequestParts, Path, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{Map, Value};
use vigil_store::{Entity, ListQuery, Op, Record, SecretChange, StoreError};

use crate::auth::Admin;
use crate::body::{read_json, typed};
use crate::crypto::{new_token, service_account_token, token_hash};
use crate::problem::Problem;
use crate::resources::*;
use crate::time;
use crate::Control;

/// The `{id}` in a URL, percent-decoded. A segment that does not decode to UTF-8
/// is a 400 problem like every other error (axum's own rejection is plain text).
pub struct Id(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Id {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Id, Problem> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| Id(id))
            .map_err(|e| Problem::field("/path/id", e.body_text()))
    }
}

/// Fields the server owns in every resource.
const META: &[&str] = &["id", "version", "created_at", "updated_at", "token"];

/// One create or replace by `admin`; returns the stored record.
async fn commit_one(
    c: &Control,
    admin: &Admin,
    action: Option<&str>,
    op: Op,
) -> Result<Record, Problem> {
    c.write(&admin.actor, action, vec![op])
        .await?
        .records
        .into_iter()
        .flatten()
        .next()
        .ok_or_else(Problem::internal)
}

/// The API form of a record: its document plus id, version and timestamps.
pub(crate) fn render(rec: &Record) -> Value {
    let mut out = Map::new();
    out.insert("id".into(), Value::String(rec.id.clone()));
    if let Value::Object(body) = &rec.body {
        for (k, v) in body {
            out.insert(k.clone(), v.clone());
        }
    }
    out.insert("version".into(), Value::from(rec.version));
    out.insert(
        "created_at".into(),
        Value::String(time::from_unix_millis(rec.created_at)),
    );
    out.insert(
        "updated_at".into(),
        Value::String(time::from_unix_millis(rec.updated_at)),
    );
    Value::Object(out)
}

fn etag(version: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

/// Hides from `admin`, when it is a reader below the editor role, what only
/// writers may see of document `doc` of `kind` (see [`hide_from_readers`]).
fn shown_to(admin: &Admin, kind: &str, doc: &mut Value) {
    if admin.role < Role::Editor {
        hide_from_readers(kind, doc);
    }
}

/// [`render`] as `admin` may see it.
fn render_for(admin: &Admin, rec: &Record) -> Value {
    let mut body = render(rec);
    shown_to(admin, &rec.kind, &mut body);
    body
}

fn respond(
    admin: &Admin,
    status: StatusCode,
    rec: &Record,
    token: Option<String>,
    location: Option<String>,
) -> Response {
    let mut body = render_for(admin, rec);
    let shows_token = token.is_some();
    if let (Some(t), Value::Object(o)) = (token, &mut body) {
        o.insert("token".into(), Value::String(t));
    }
    let mut res = (status, Json(body)).into_response();
    res.headers_mut().insert(header::ETAG, etag(rec.version));
    if let Some(l) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        res.headers_mut().insert(header::LOCATION, l);
    }
    if shows_token || rec.kind == AdminToken::KIND || res.headers().contains_key(header::LOCATION) {
        res.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    res
}

/// What `If-Match` asks (RFC 9110 §13.1.1): `*`, or a list of entity tags
/// (from every `If-Match` field, joined). Only this server's strong ETags can
/// match: the list keeps those, as versions.
enum IfMatch {
    Any,
    Versions(Vec<i64>),
}

impl IfMatch {
    /// Whether `R` `id` at version `current` meets it; else the 412 that names
    /// the current ETag.
    fn admits<R: Resource>(&self, id: &str, current: i64) -> Result<(), Problem> {
        match self {
            IfMatch::Versions(v) if !v.contains(&current) => Err(StoreError::VersionMismatch {
                kind: R::KIND.into(),
                id: id.into(),
                current,
            }
            .into()),
            _ => Ok(()),
        }
    }

    /// The version a write of `R` `id` must find (`None`: any). A list of several
    /// is settled against the current version, read for it.
    async fn expect<R: Resource>(self, c: &Control, id: &str) -> Result<Option<i64>, Problem> {
        match &self {
            IfMatch::Any => Ok(None),
            IfMatch::Versions(v) => match v.as_slice() {
                [] => Err(Problem::new(
                    StatusCode::PRECONDITION_FAILED,
                    "precondition-failed",
                    "no ETag in If-Match is one this server issued (they are strong, such as \"12\")",
                )),
                [one] => Ok(Some(*one)),
                _ => {
                    let cur = current::<R>(c, id).await?;
                    self.admits::<R>(id, cur.version)?;
                    Ok(Some(cur.version))
                }
            },
        }
    }
}

/// `If-Match`, or `None` when absent; a field that is neither `*` nor a list of
/// entity tags is a 400.
fn if_match(headers: &HeaderMap) -> Result<Option<IfMatch>, Problem> {
    let malformed = |s: &str| {
        Problem::bad_request(format!(
            "If-Match must be * or entity tags such as \"12\" (a list separated by commas), got {s}"
        ))
    };
    let (mut fields, mut any, mut tags) = (0, false, 0usize);
    let mut versions = Vec::new();
    for value in &headers.get_all(header::IF_MATCH) {
        fields += 1;
        let s = value
            .to_str()
            .map_err(|_| Problem::bad_request("malformed If-Match"))?;
        let mut rest = s;
        loop {
            rest = rest.trim_start_matches([' ', '\t', ',']);
            if rest.is_empty() {
                break;
            }
            if let Some(r) = rest.strip_prefix('*') {
                any = true;
                rest = r;
            } else {
                let (weak, r) = match rest.strip_prefix("W/") {
                    Some(r) => (true, r),
                    None => (false, rest),
                };
                let r = r.strip_prefix('"').ok_or_else(|| malformed(s))?;
                let end = r.find('"').ok_or_else(|| malformed(s))?;
                let tag = &r[..end];
                if !tag.bytes().all(|b| b == 0x21 || (0x23..=0x7e).contains(&b)) {
                    return Err(malformed(s));
                }
                tags += 1;
                // Strong comparison, octet by octet: a weak tag never matches,
                // nor `"05"` or `"+5"` for version 5.
                if let (false, Ok(v)) = (weak, tag.parse::<i64>()) {
                    if v.to_string() == tag {
                        versions.push(v);
                    }
                }
                rest = &r[end + 1..];
            }
            rest = rest.trim_start_matches([' ', '\t']);
            if !(rest.is_empty() || rest.starts_with(',')) {
                return Err(malformed(s));
            }
        }
    }
    match (fields, any, tags) {
        (0, _, _) => Ok(None),
        (_, true, 0) => Ok(Some(IfMatch::Any)),
        (_, false, 1..) => Ok(Some(IfMatch::Versions(versions))),
        (_, true, _) => Err(Problem::bad_request(
            "If-Match is either * or a list of entity tags, not both",
        )),
        (_, false, 0) => Err(Problem::bad_request("If-Match is empty")),
    }
}

fn require_if_match(headers: &HeaderMap) -> Result<IfMatch, Problem> {
    if_match(headers)?.ok_or_else(|| {
        Problem::new(
            StatusCode::PRECONDITION_REQUIRED,
            "precondition-required",
            "send If-Match with the ETag you read (or `*` to overwrite whatever is there)",
        )
    })
}

/// Removes server-owned fields a client echoed back; a differing `id` is an error.
fn strip_meta<R: Resource>(value: &mut Value, id: Option<&str>) -> Result<(), Problem> {
    let Value::Object(o) = value else {
        return Err(Problem::field("", "expected a JSON object"));
    };
    if let (Some(id), Some(given)) = (id, o.get("id")) {
        if given.as_str() != Some(id) {
            return Err(Problem::field(
                "/id",
                format!("does not match the id in the URL (`{id}`)"),
            ));
        }
    }
    for k in META.iter().chain(R::READ_ONLY) {
        o.remove(*k);
    }
    Ok(())
}

fn new_id<R: Resource>(spec: &R::Spec) -> Result<String, Problem> {
    match R::name(spec) {
        Some(name) => {
            check_name(name)?;
            Ok(name.to_owned())
        }
        None => Ok(format!(
            "{}_{}",
            R::ID_PREFIX,
            uuid::Uuid::now_v7().simple()
        )),
    }
}

/// Validates `spec` as the document of entity `id` (which `exists` already, or is
/// being created) and makes the entity to store, with the secret the document
/// carried, if any, sealed and kept apart.
pub(crate) async fn prepare<R: Resource>(
    control: &Control,
    mut spec: R::Spec,
    id: &str,
    exists: bool,
) -> Result<(Entity, Option<String>), Problem> {
    if R::name(&spec).is_some_and(|name| name != id) {
        return Err(Problem::field(
            "/name",
            format!("does not match the id in the URL (`{id}`); names cannot change"),
        ));
    }
    let ctx = R::context(control).await?;
    let checked = R::check(&mut spec, id, &ctx)?;
    // One certificate, one identity: the store keeps a fingerprint unique within a
    // kind (409); across devices and service accounts it is checked here.
    if let (Some((other, singular)), Some(fingerprint)) = (R::CERTIFICATE_SHARED_WITH, &checked.key)
    {
        if let Some(holder) = control.store.get_by_key(other, fingerprint).await? {
            return Err(Problem::invalid_field(
                crate::resources::CERTIFICATE_FIELD,
                format!(
                    "already the client certificate of {singular} `{}`",
                    holder.id
                ),
            ));
        }
    }
    let mut sealed = None;
    if let Some(secret) = R::SECRET {
        if let Some(plain) = (secret.take)(&mut spec) {
            sealed = Some(control.seal(&plain)?);
        }
        // Without a new secret, one stored earlier is kept.
        let kept = sealed.is_none() && exists && control.store.secret(R::KIND, id).await?.is_some();
        // ...but never for another identity provider: the verifier and sign-in send
        // it to whatever `issuer_url` names.
        if kept && R::KIND == IdentityProvider::KIND {
            let new_issuer = serde_json::to_value(&spec)
                .ok()
                .and_then(|v| v.get("issuer_url").cloned());
            if let Some(old) = control.store.get(R::KIND, id).await? {
                if old.body.get("issuer_url") != new_issuer.as_ref() {
                    return Err(Problem::invalid_field(
                        "/client_secret",
                        "changing issuer_url needs the client secret again: the stored one is never sent to another issuer",
                    ));
                }
            }
        }
        let stored = sealed.is_some() || kept;
        (secret.mark)(&mut spec, stored);
    }
    let entity = Entity {
        kind: R::KIND.into(),
        id: id.into(),
        key: checked.key,
        body: serde_json::to_value(&spec).map_err(|_| Problem::internal())?,
        secret: None,
        refs: checked.refs,
    };
    Ok((entity, sealed))
}

/// Reads a resource's document from the body; `id` is the one in the URL, if any.
async fn read_spec<R: Resource>(
    headers: &HeaderMap,
    body: Body,
    id: Option<&str>,
) -> Result<R::Spec, Problem> {
    let mut value = read_json(headers, body, false).await?;
    strip_meta::<R>(&mut value, id)?;
    typed(value)
}

/// `POST /v1/{kind}`.
pub async fn create<R: Resource>(
    State(c): State<Control>,
    admin: Admin,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    admin.require(R::WRITE_ROLE)?;
    let spec = read_spec::<R>(&headers, body, None).await?;
    let id = new_id::<R>(&spec)?;
    let (mut entity, sealed) = prepare::<R>(&c, spec, &id, false).await?;
    let issued = issue_token::<R>(&c, &id);
    let token = issued.as_ref().map(|(t, _)| t.clone());
    entity.secret = issued.map(|(_, stored)| stored).or(sealed);
    let rec = commit_one(&c, &admin, None, Op::Create(entity)).await?;
    Ok(respond(
        &admin,
        StatusCode::CREATED,
        &rec,
        token,
        Some(format!("/v1/{}/{}", R::PATH, rec.id)),
    ))
}

/// A new token for entity `id` of a kind that has tokens, and what the store
/// keeps of it. Service accounts' tokens are signed by the control plane
/// ([`vigil_snapshot::satoken`]); admin and join tokens are random.
fn issue_token<R: Resource>(c: &Control, id: &str) -> Option<(String, String)> {
    let prefix = R::TOKEN_PREFIX?;
    Some(if R::KIND == ServiceAccount::KIND {
        service_account_token(&c.token_signer(), id)
    } else {
        let token = new_token(prefix);
        let stored = token_hash(&token);
        (token, stored)
    })
}

/// A stored document as its kind's spec (the store only holds checked documents).
pub(crate) fn stored<R: Resource>(body: Value) -> Result<R::Spec, Problem> {
    serde_json::from_value(body).map_err(|_| Problem::internal())
}

async fn current<R: Resource>(c: &Control, id: &str) -> Result<Record, Problem> {
    c.store
        .get(R::KIND, id)
        .await?
        .ok_or_else(|| Problem::not_found(format!("{} `{id}` does not exist", R::SINGULAR)))
}

/// `GET /v1/{kind}/{id}`.
pub async fn get<R: Resource>(
    State(c): State<Control>,
    admin: Admin,
    Id(id): Id,
) -> Result<Response, Problem> {
    admin.require(R::READ_ROLE)?;
    let rec = current::<R>(&c, &id).await?;
    Ok(respond(&admin, StatusCode::OK, &rec, None, None))
}

/// The op replacing entity `id`'s document with `spec`.
pub(crate) async fn replace_op<R: Resource>(
    c: &Control,
    id: &str,
    spec: R::Spec,
    if_version: Option<i64>,
) -> Result<Op, Problem> {
    let (entity, sealed) = prepare::<R>(c, spec, id, true).await?;
    Ok(Op::Replace {
        entity,
        if_version,
        secret: sealed.map_or(SecretChange::Keep, |s| SecretChange::Set(Some(s))),
    })
}

async fn store_replace<R: Resource>(
    c: &Control,
    admin: &Admin,
    id: &str,
    spec: R::Spec,
    version: Option<i64>,
    action: Option<&str>,
) -> Result<Response, Problem> {
    let op = replace_op::<R>(c, id, spec, version).await?;
    let rec = commit_one(c, admin, action, op).await?;
    Ok(respond(admin, StatusCode::OK, &rec, None, None))
}

/// `PUT /v1/{kind}/{id}`: replaces the document; needs `If-Match`.
pub async fn replace<R: Resource>(
    State(c): State<Control>,
    admin: Admin,
    Id(id): Id,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    admin.require(R::WRITE_ROLE)?;
    let asked = require_if_match(&headers)?;
    let spec = read_spec::<R>(&headers, body, Some(&id)).await?;
    let version = asked.expect::<R>(&c, &id).await?;
    store_replace::<R>(&c, &admin, &id, spec, version, None).await
}

/// RFC 7396 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// `PATCH /v1/{kind}/{id}`: a JSON merge patch onto the document; needs `If-Match`.
pub async fn patch<R: Resource>(
    State(c): State<Control>,
    admin: Admin,
    Id(id): Id,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    admin.require(R::WRITE_ROLE)?;
    let asked = require_if_match(&headers)?;
    let mut patch_doc = read_json(&headers, body, true).await?;
    strip_meta::<R>(&mut patch_doc, Some(&id))?;
    let cur = current::<R>(&c, &id).await?;
    asked.admits::<R>(&id, cur.version)?;
    // Stored documents hold no metadata, so the patch applies to them as they are.
    let mut doc = cur.body;
    merge_patch(&mut doc, &patch_doc);
    let spec: R::Spec = typed(doc)?;
    store_replace::<R>(&c, &admin, &id, spec, Some(cur.version), None).await
}

/// `DELETE /v1/{kind}/{id}`; `If-Match` optional.
pub async fn delete<R: Resource>(
    State(c): State<Control>,
    admin: Admin,
    Id(id): Id,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    admin.require(R::WRITE_ROLE)?;
    let version = match if_match(&headers)? {
        Some(asked) => asked.expect::<R>(&c, &id).await?,
        None => None,
    };
    let op = Op::Delete {
        kind: R::KIND.into(),
        id,
        if_version: version,
    };
    c.write(&admin.actor, None, vec![op]).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Parses `?limit=&cursor=&<filter>=` strictly: unknown parameters are errors that
/// say what `lister` (`this list`, `audit`) takes.
fn page_query(
    raw: Option<&str>,
    filters: &'static [&'static str],
    lister: &str,
) -> Result<ListQuery, Problem> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or(""))
        .map_err(|e| Problem::bad_request(format!("malformed query string: {e}")))?;
    let mut q = ListQuery::default();
    let mut seen = std::collections::BTreeSet::new();
    for (k, v) in pairs {
        if k.contains('\0') || v.contains('\0') {
            return Err(Problem::field(
                format!("/query/{}", crate::body::pointer_token(&k)),
                crate::body::NUL,
            ));
        }
        if !seen.insert(k.clone()) {
            return Err(Problem::field(
                format!("/query/{}", crate::body::pointer_token(&k)),
                "given more than once",
            ));
        }
        match k.as_str() {
            "limit" => {
                let n: u32 = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| {
                        Problem::field("/query/limit", "must be a whole number from 1 to 1000")
                    })?;
                q.limit = Some(n);
            }
            "cursor" => q.cursor = Some(v),
            other => match filters.iter().find(|f| **f == other) {
                Some(f) => q.fields.push((f, v)),
                None => {
                    let allowed: Vec<&str> =
                        ["limit", "cursor"].iter().chain(filters).copied().collect();
                    return Err(Problem::field(
                        format!("/query/{}", crate::body::pointer_token(other)),
                        format!("unknown parameter; {lister} takes {}", allowed.join(", ")),
                    ));
                }
            },
        }
    }
    Ok(q)
}

/// `GET /v1/{kind}`.
pub async fn list<R: Resource>(
    State(c): State<Control>,
    admin: Admin,
    RawQuery(raw): RawQuery,
) -> Result<Response, Problem> {
    admin.require(R::READ_ROLE)?;
    let q = page_query(raw.as_deref(), R::FILTERS, "this list")?;
    let page = c.store.list(R::KIND, &q).await?;
    let items: Vec<Value> = page.items.iter().map(|r| render_for(&admin, r)).collect();
    Ok(Json(serde_json::json!({ "items": items, "next_cursor": page.next })).into_response())
}

/// `GET /v1/proxies`: every proxy this replica has streamed to, with the version it
/// holds and its last refusal.
pub async fn proxies(State(c): State<Control>, admin: Admin) -> Result<Response, Problem> {
    admin.require(Role::Viewer)?;
    let hub = c.hub().ok_or_else(|| {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no-snapshots",
            "this control plane does not serve snapshots",
        )
    })?;
    Ok(Json(serde_json::json!({
        "snapshot_version": hub.version(),
        "items": hub.fleet(&c).await?,
    }))
    .into_response())
}

/// `GET /v1/audit`.
pub async fn audit(
    State(c): State<Control>,
    admin: Admin,
    RawQuery(raw): RawQuery,
) -> Result<Response, Problem> {
    admin.require(Role::Viewer)?;
    let page = page_query(raw.as_deref(), &["kind", "entity_id", "actor"], "audit")?;
    let mut q = vigil_store::AuditQuery {
        cursor: page.cursor,
        limit: page.limit,
        ..Default::default()
    };
    for (k, v) in page.fields {
        match k {
            "kind" => q.kind = Some(v),
            "entity_id" => q.entity_id = Some(v),
            "actor" => q.actor = Some(v),
            _ => {}
        }
    }
    // Admin tokens are readable by owners only; their history is too.
    if admin.require(AdminToken::READ_ROLE).is_err() {
        q.hide_kinds.push(AdminToken::KIND.to_owned());
    }
    let page = c.store.audit(&q).await?;
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|e| {
            let mut v = serde_json::to_value(e).unwrap_or(Value::Null);
            for doc in ["before", "after"] {
                if let Some(d) = v.get_mut(doc) {
                    shown_to(&admin, &e.kind, d);
                }
            }
            if let Value::Object(o) = &mut v {
                o.insert("at".into(), Value::String(time::from_unix_millis(e.at)));
            }
            v
        })
        .collect();
    Ok(Json(serde_json::json!({ "items": items, "next_cursor": page.next })).into_response())
}

/// `POST /v1/{kind}/{id}/rotate-token`: a new token, shown once; the old one stops working.
pub async fn rotate_token<R: Resource>(
    State(c): State<Control>,
    admin: Admin,
    Id(id): Id,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    admin.require(R::WRITE_ROLE)?;
    let cur = current::<R>(&c, &id).await?;
    if let Some(asked) = if_match(&headers)? {
        asked.admits::<R>(&id, cur.version)?;
    }
    let (token, kept) =
        issue_token::<R>(&c, &id).ok_or_else(|| Problem::not_found("this kind has no token"))?;
    // The document is written again as it is, with only the token changed.
    let spec = stored::<R>(cur.body)?;
    let (entity, _) = prepare::<R>(&c, spec, &id, true).await?;
    let op = Op::Replace {
        entity,
        // The document read is written back: a write in between must not be undone.
        if_version: Some(cur.version),
        secret: SecretChange::Set(Some(kept)),
    };
    let rec = commit_one(&c, &admin, Some("rotate-token"), op).await?;
    Ok(respond(&admin, StatusCode::OK, &rec, Some(token), None))
}

/// `POST /v1/sessions/{id}/revoke`.
pub async fn revoke_session(
    State(c): State<Control>,
    admin: Admin,
    Id(id): Id,
) -> Result<Response, Problem> {
    admin.require(Role::Editor)?;
    let cur = current::<Session>(&c, &id).await?;
    let mut spec = stored::<Session>(cur.body)?;
    if spec.revoked_at.is_none() {
        spec.revoked_at = Some(time::secs(chrono::Utc::now()));
    }
    store_replace::<Session>(&c, &admin, &id, spec, Some(cur.version), Some("revoke")).await
}

/// `POST /v1/users/{id}/revoke-sessions`: revokes every live session of the user at once.
pub async fn revoke_user_sessions(
    State(c): State<Control>,
    admin: Admin,
    Id(id): Id,
) -> Result<Response, Problem> {
    admin.require(Role::Editor)?;
    current::<User>(&c, &id).await?;
    let now = time::secs(chrono::Utc::now());
    let mut ops = Vec::new();
    for rec in list_all(&c.store, Session::KIND, vec![("user_id", id)]).await? {
        let mut spec = stored::<Session>(rec.body)?;
        if spec.revoked_at.is_some() {
            continue;
        }
        spec.revoked_at = Some(now.clone());
        ops.push(replace_op::<Session>(&c, &rec.id, spec, Some(rec.version)).await?);
    }
    let revoked = ops.len();
    let revision = if ops.is_empty() {
        None
    } else {
        Some(c.write(&admin.actor, Some("revoke"), ops).await?.revision)
    };
    Ok(Json(serde_json::json!({ "revoked": revoked, "revision": revision })).into_response())
}

/// `POST /v1/policies/validate`: checks a document without storing it.
pub async fn validate_policy(
    State(c): State<Control>,
    admin: Admin,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    admin.require(Role::Viewer)?;
    let value = read_json(&headers, body, false).await?;
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Req {
        document: Value,
    }
    let req: Req = typed(value)?;
    let lib = Policy::context(&c).await?;
    let mut spec = PolicySpec {
        name: "validate".into(),
        description: None,
        document: req.document,
    };
    Policy::check(&mut spec, "", &lib)?;
    Ok(Json(serde_json::json!({ "valid": true })).into_response())
}

/// How long a posture report counts when the reporter gives no expiry.
pub const DEFAULT_POSTURE_TTL_S: u64 = 3600;
/// The longest a posture report may count.
pub const MAX_POSTURE_TTL_S: u64 = 30 * 86_400;

/// `PUT /v1/devices/{id}/posture`: a device-management integration reports a
/// device's posture. Needs the `posture` role (a token that can do nothing
/// else) or `editor`. The report replaces the previous one and always expires
/// (`expires_at`, or `ttl_s` from now, default one hour): stale posture is not
/// compliant, so a reporter that stops reporting stops vouching.
pub async fn put_posture(
    State(c): State<Control>,
    admin: Admin,
    Id(id): Id,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    if admin.role != Role::Posture {
        admin.require(Role::Editor)?;
    }
    let value = read_json(&headers, body, false).await?;
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Report {
        #[serde(default)]
        attributes: std::collections::BTreeMap<String, Value>,
        #[serde(default)]
        expires_at: Option<String>,
        #[serde(default)]
        ttl_s: Option<u64>,
    }
    let report: Report = typed(value)?;
    let expires_at = match (report.expires_at, report.ttl_s) {
        (Some(_), Some(_)) => {
            return Err(Problem::invalid_field(
                "/ttl_s",
                "give expires_at or ttl_s, not both",
            ))
        }
        (Some(at), None) => at,
        (None, ttl) => {
            let ttl = ttl.unwrap_or(DEFAULT_POSTURE_TTL_S);
            if ttl == 0 || ttl > MAX_POSTURE_TTL_S {
                return Err(Problem::invalid_field(
                    "/ttl_s",
                    format!("from 1 to {MAX_POSTURE_TTL_S} seconds"),
                ));
            }
            time::secs(chrono::Utc::now() + chrono::Duration::seconds(ttl as i64))
        }
    };
    let cur = current::<Device>(&c, &id).await?;
    let mut spec = stored::<Device>(cur.body)?;
    spec.posture = PostureSpec {
        attributes: report.attributes,
        expires_at: Some(expires_at),
    };
    if let Some(at) = spec.posture.expires_at.as_deref() {
        if chrono::DateTime::parse_from_rfc3339(at).is_err() {
            return Err(Problem::invalid_field(
                "/expires_at",
                "expected an RFC 3339 time, e.g. 2030-01-01T00:00:00Z",
            ));
        }
        let latest = chrono::Utc::now() + chrono::Duration::seconds(MAX_POSTURE_TTL_S as i64);
        if crate::time::parse(at).is_some_and(|t| t > latest) {
            return Err(Problem::invalid_field(
                "/expires_at",
                format!("at most {MAX_POSTURE_TTL_S} seconds from now"),
            ));
        }
        if is_past(at) {
            return Err(Problem::invalid_field(
                "/expires_at",
                "is in the past: a report must count for some time",
            ));
        }
    }
    // Errors in the attributes come back located under /posture/attributes.
    store_replace::<Device>(&c, &admin, &id, spec, Some(cur.version), Some("posture")).await
}
