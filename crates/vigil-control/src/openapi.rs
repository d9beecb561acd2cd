//! The OpenAPI 3.1 document, generated from the resource definitions and the
//! schemas derived from their Rust types, so the document cannot drift from the
//! code (a test also probes every documented operation against the router).

use serde_json::{json, Map, Value};
use utoipa::openapi::{RefOr, Schema};
use utoipa::ToSchema;

use crate::problem::Problem;
use crate::resources::*;

struct Doc {
    paths: Map<String, Value>,
    schemas: Map<String, Value>,
}

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// The response for an error status.
fn problem_response(code: &str) -> Value {
    let desc = match code {
        "400" => "Malformed request: the problem names the field",
        "401" => "Missing or invalid bearer token",
        "403" => "The token's role is not enough",
        "404" => "No such resource",
        "408" => "The body did not arrive within 30 s",
        "409" => "Conflicts with existing state (name taken, still referenced)",
        "412" => "If-Match does not match the current ETag",
        "413" => "Body larger than 1 MiB",
        "415" => "Body is not JSON",
        "422" => "Well-formed but invalid: every error with its JSON Pointer",
        "428" => "If-Match is required",
        "503" => "The database is unavailable; retry after Retry-After seconds",
        _ => "Error",
    };
    json!({ "description": desc, "content": { "application/problem+json": { "schema": schema_ref("Problem") } } })
}

fn problem_responses(codes: &[&str]) -> Map<String, Value> {
    codes
        .iter()
        .map(|code| ((*code).to_owned(), problem_response(code)))
        .collect()
}

fn add_schemas<T: ToSchema>(doc: &mut Doc) {
    let mut nested: Vec<(String, RefOr<Schema>)> = Vec::new();
    T::schemas(&mut nested);
    nested.push((T::name().into_owned(), T::schema()));
    for (name, schema) in nested {
        doc.schemas
            .insert(name, serde_json::to_value(schema).unwrap_or(Value::Null));
    }
}

fn id_param() -> Value {
    json!({ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } })
}

fn if_match(required: bool) -> Value {
    json!({
        "name": "If-Match", "in": "header", "required": required,
        "description": "The ETag from a read (`\"12\"`), or `*` to overwrite",
        "schema": { "type": "string" }
    })
}

impl Kinds for Doc {
    fn kind<R: Resource>(mut self) -> Doc {
        resource::<R>(&mut self);
        self
    }
}

fn resource<R: Resource>(doc: &mut Doc) {
    add_schemas::<R::Spec>(doc);
    let spec = R::Spec::name().into_owned();
    let res = format!("{spec}Resource");
    let extra = if R::TOKEN_PREFIX.is_some() {
        json!({ "token": { "type": "string", "description": "The bearer token; returned once, on create and rotate-token" } })
    } else {
        json!({})
    };
    doc.schemas.insert(
        res.clone(),
        json!({ "allOf": [ schema_ref(&spec), schema_ref("Meta"), { "type": "object", "properties": extra } ] }),
    );
    let tag = R::TITLE;
    let base = format!("/v1/{}", R::PATH);
    let mut list_params = vec![
        json!({ "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 1000, "default": 100 } }),
        json!({ "name": "cursor", "in": "query", "schema": { "type": "string" }, "description": "`next_cursor` of the previous page" }),
    ];
    for f in R::FILTERS {
        list_params.push(json!({ "name": f, "in": "query", "schema": { "type": "string" }, "description": format!("Only items whose `{f}` equals this") }));
    }
    let ok = |status: &str, desc: &str, schema: Value, etag: bool| {
        let mut r =
            json!({ "description": desc, "content": { "application/json": { "schema": schema } } });
        if etag {
            r["headers"] = json!({ "ETag": { "schema": { "type": "string" } } });
        }
        let mut m = Map::new();
        m.insert(status.into(), r);
        m
    };
    let list_schema = json!({ "type": "object", "required": ["items"], "properties": {
        "items": { "type": "array", "items": schema_ref(&res) },
        "next_cursor": { "type": ["string", "null"] } } });
    let body = |schema: &str, merge: bool| {
        let mut content = json!({ "application/json": { "schema": schema_ref(schema) } });
        if merge {
            content["application/merge-patch+json"] = json!({ "schema": { "type": "object" } });
            content["application/json"] = json!({ "schema": { "type": "object" } });
        }
        json!({ "required": true, "content": content })
    };
    let with = |mut m: Map<String, Value>, codes: &[&str]| {
        m.extend(problem_responses(codes));
        Value::Object(m)
    };
    let role_note = format!(
        "needs the `{}` role to read and `{}` to write.",
        R::READ_ROLE.name(),
        R::WRITE_ROLE.name()
    );
    doc.paths.insert(
        base.clone(),
        json!({
            "get": { "tags": [tag], "operationId": format!("list_{}", R::KIND), "summary": format!("List {}", tag.to_lowercase()),
                     "description": role_note, "parameters": list_params,
                     "responses": with(ok("200", "A page", list_schema, false), &["400", "401", "403", "503"]) },
            "post": { "tags": [tag], "operationId": format!("create_{}", R::KIND), "summary": format!("Create one of {}", tag.to_lowercase()),
                      "requestBody": body(&spec, false),
                      "responses": with(ok("201", "Created", schema_ref(&res), true), &["400", "401", "403", "408", "409", "413", "415", "422", "503"]) }
        }),
    );
    doc.paths.insert(
        format!("{base}/{{id}}"),
        json!({
            "parameters": [id_param()],
            "get": { "tags": [tag], "operationId": format!("get_{}", R::KIND), "summary": "Read one",
                     "responses": with(ok("200", "The resource", schema_ref(&res), true), &["401", "403", "404", "503"]) },
            "put": { "tags": [tag], "operationId": format!("replace_{}", R::KIND), "summary": "Replace the document",
                     "parameters": [if_match(true)], "requestBody": body(&spec, false),
                     "responses": with(ok("200", "Replaced", schema_ref(&res), true), &["400", "401", "403", "404", "408", "409", "412", "413", "415", "422", "428", "503"]) },
            "patch": { "tags": [tag], "operationId": format!("patch_{}", R::KIND), "summary": "Apply a JSON merge patch (RFC 7396)",
                       "parameters": [if_match(true)], "requestBody": body(&spec, true),
                       "responses": with(ok("200", "Patched", schema_ref(&res), true), &["400", "401", "403", "404", "408", "409", "412", "413", "415", "422", "428", "503"]) },
            "delete": { "tags": [tag], "operationId": format!("delete_{}", R::KIND), "summary": "Delete (dependent sessions and grants go with it)",
                        "parameters": [if_match(false)],
                        "responses": with({ let mut m = Map::new(); m.insert("204".into(), json!({"description": "Deleted"})); m }, &["401", "403", "404", "409", "412", "503"]) }
        }),
    );
    if R::TOKEN_PREFIX.is_some() {
        doc.paths.insert(
            format!("{base}/{{id}}/rotate-token"),
            json!({ "post": { "tags": [tag], "operationId": format!("rotate_{}_token", R::KIND), "summary": "Issue a new token; the old one stops working",
                "parameters": [id_param(), if_match(false)],
                "responses": with(ok("200", "The resource with its new token", schema_ref(&res), true), &["401", "403", "404", "412", "503"]) } }),
        );
    }
}

/// The document served at `/v1/openapi.json` and kept in `docs/api/openapi.json`.
pub fn document() -> Value {
    let mut doc = Doc {
        paths: Map::new(),
        schemas: Map::new(),
    };
    add_schemas::<Problem>(&mut doc);
    doc.schemas.insert(
        "Meta".into(),
        json!({ "type": "object", "required": ["id", "version", "created_at", "updated_at"], "properties": {
            "id": { "type": "string" },
            "version": { "type": "integer", "description": "Revision of the last write; the ETag" },
            "created_at": { "type": "string", "format": "date-time" },
            "updated_at": { "type": "string", "format": "date-time" } } }),
    );
    let mut doc = each_kind(doc);
    for (path, item) in [
        (
            "/healthz",
            json!({ "get": { "tags": ["Health"], "operationId": "healthz", "summary": "The process is alive", "security": [],
            "responses": { "200": { "description": "Alive", "content": { "text/plain": { "schema": { "type": "string" } } } } } } }),
        ),
        (
            "/readyz",
            json!({ "get": { "tags": ["Health"], "operationId": "readyz", "summary": "The store answers", "security": [],
            "responses": { "200": { "description": "Ready", "content": { "text/plain": { "schema": { "type": "string" } } } },
                           "503": problem_response("503") } } }),
        ),
        (
            "/v1/openapi.json",
            json!({ "get": { "tags": ["Meta"], "operationId": "openapi", "summary": "This document", "security": [],
            "responses": { "200": { "description": "OpenAPI 3.1", "content": { "application/json": { "schema": { "type": "object" } } } } } } }),
        ),
        (
            "/v1/proxies",
            json!({ "get": { "tags": ["Fleet"], "operationId": "list_proxies",
            "summary": "Proxies streaming from this replica: labels, version held (acked), last nack with its error, connected since, last seen",
            "responses": { "200": { "description": "The snapshot version and the proxies", "content": { "application/json": { "schema": {
                "type": "object", "properties": { "snapshot_version": { "type": "integer" }, "items": { "type": "array", "items": { "type": "object" } } } } } } },
                           "401": problem_response("401"), "403": problem_response("403"), "503": problem_response("503") } } }),
        ),
        (
            "/v1/audit",
            json!({ "get": { "tags": ["Audit"], "operationId": "list_audit", "summary": "The audit trail, oldest first",
            "parameters": [
                { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 1000 } },
                { "name": "cursor", "in": "query", "schema": { "type": "string" } },
                { "name": "kind", "in": "query", "schema": { "type": "string" } },
                { "name": "entity_id", "in": "query", "schema": { "type": "string" } },
                { "name": "actor", "in": "query", "schema": { "type": "string" } } ],
            "responses": { "200": { "description": "A page of events", "content": { "application/json": { "schema": { "type": "object" } } } },
                           "400": problem_response("400"), "401": problem_response("401"), "503": problem_response("503") } } }),
        ),
        (
            "/v1/policies/validate",
            json!({ "post": { "tags": ["Policies"], "operationId": "validate_policy", "summary": "Check a policy document without storing it",
            "requestBody": { "required": true, "content": { "application/json": { "schema": { "type": "object", "required": ["document"],
                "properties": { "document": { "type": "object" } }, "additionalProperties": false } } } },
            "responses": { "200": { "description": "Valid", "content": { "application/json": { "schema": { "type": "object" } } } },
                           "400": problem_response("400"), "401": problem_response("401"), "422": problem_response("422") } } }),
        ),
        (
            "/v1/sessions/{id}/revoke",
            json!({ "post": { "tags": ["Sessions"], "operationId": "revoke_session", "summary": "Revoke one session everywhere",
            "parameters": [id_param()],
            "responses": { "200": { "description": "The revoked session", "content": { "application/json": { "schema": schema_ref("SessionSpecResource") } } },
                           "401": problem_response("401"), "403": problem_response("403"), "404": problem_response("404") } } }),
        ),
        (
            "/v1/users/{id}/revoke-sessions",
            json!({ "post": { "tags": ["Users"], "operationId": "revoke_user_sessions", "summary": "Revoke every session of a user",
            "parameters": [id_param()],
            "responses": { "200": { "description": "How many were revoked", "content": { "application/json": { "schema": { "type": "object",
                "properties": { "revoked": { "type": "integer" }, "revision": { "type": ["integer", "null"] } } } } } },
                           "401": problem_response("401"), "403": problem_response("403"), "404": problem_response("404") } } }),
        ),
        (
            "/v1/devices/{id}/posture",
            json!({ "put": { "tags": ["Devices"], "operationId": "put_device_posture",
            "summary": "Report a device's posture (role `posture` or `editor`); it always expires",
            "parameters": [id_param()],
            "requestBody": { "required": true, "content": { "application/json": { "schema": { "type": "object", "additionalProperties": false,
                "properties": {
                    "attributes": { "type": "object", "description": "Attribute values (booleans, numbers, strings), e.g. managed, disk_encrypted, os" },
                    "expires_at": { "type": "string", "format": "date-time", "description": "When the report stops counting" },
                    "ttl_s": { "type": "integer", "minimum": 1, "maximum": 2_592_000, "description": "Or: seconds from now (default 3600)" } } } } } },
            "responses": { "200": { "description": "The device with its new posture", "content": { "application/json": { "schema": schema_ref("DeviceSpecResource") } } },
                           "400": problem_response("400"), "401": problem_response("401"), "403": problem_response("403"), "404": problem_response("404"),
                           "409": problem_response("409"), "422": problem_response("422") } } }),
        ),
    ] {
        doc.paths.insert(path.into(), item);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Vigil admin API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Routes, policies, identities, devices, grants, sessions and tokens of a Vigil deployment. \
                Every error is application/problem+json. Writes need If-Match (see ETag) and are audited."
        },
        "servers": [ { "url": "/" } ],
        "security": [ { "bearer": [] } ],
        "paths": Value::Object(doc.paths),
        "components": {
            "schemas": Value::Object(doc.schemas),
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer", "description": "An admin token (posture, viewer, editor or owner)" } }
        }
    })
}
