//! What each command does; every one returns the text for standard output.

use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, bail, Context as _};
use reqwest::Method;
use serde_json::{json, Map, Value};

use crate::cli::{
    Action, AuditArgs, Builtin, ConfigCommand, Input, Invocation, KindCommand, ListArgs, Output,
    Parsed, UpdateArgs, Verb,
};
use crate::client::{Body, Client};
use crate::config::{self, Env, Settings};
use crate::kinds::{self, Kind};
use crate::output;

/// The API's largest page.
const PAGE: u32 = 1000;

/// Fields the server owns in every resource (sent back, they are ignored).
pub const META: &[&str] = &["id", "version", "created_at", "updated_at"];

/// Runs a parsed command line in `env`.
pub async fn run(parsed: Parsed, env: &Env) -> anyhow::Result<String> {
    let Parsed { global, invocation } = parsed;
    let output = global.output;
    let settings = || -> anyhow::Result<Settings> {
        let file = match config::path(env) {
            Ok(p) => config::load(&p)?,
            // Without a place for the file, flags and environment still work.
            Err(_) => config::FileConfig::default(),
        };
        Ok(config::resolve(
            global.endpoint.as_deref(),
            global.token.as_deref(),
            env,
            &file,
        ))
    };
    let client = || -> anyhow::Result<Client> {
        let s = settings()?;
        Client::new(&s.endpoint, s.token.as_deref()).with_context(|| {
            format!(
                "the endpoint from {}",
                s.endpoint_source.describe("endpoint")
            )
        })
    };
    match invocation {
        Invocation::Builtin(Builtin::Config(ConfigCommand::Set)) => config_set(
            &config::path(env)?,
            global.endpoint.as_deref(),
            global.token.as_deref(),
        ),
        Invocation::Builtin(Builtin::Config(ConfigCommand::Show)) => {
            config_show(&config::path(env)?, &settings()?, output)
        }
        Invocation::Builtin(Builtin::Fleet) => fleet(&client()?, output).await,
        Invocation::Builtin(Builtin::Audit(args)) => audit(&client()?, &args, output).await,
        Invocation::Builtin(Builtin::Apply(args)) => {
            let docs = crate::apply::parse(&read_source(&args.file)?)?;
            crate::apply::apply(&client()?, docs, output).await
        }
        Invocation::Kind(kind, KindCommand::Verb(verb)) => {
            let c = client()?;
            match verb {
                Verb::List(args) => list(&c, kind, &args, output).await,
                Verb::Get { id } => get(&c, kind, &id, output).await,
                Verb::Create(input) => create(&c, kind, &input, output).await,
                Verb::Update(args) => update(&c, kind, &args, output).await,
                Verb::Delete { id, if_match } => {
                    delete(&c, kind, &id, if_match.as_deref(), output).await
                }
            }
        }
        Invocation::Kind(kind, KindCommand::Action(action)) => {
            action_run(&client()?, kind, action, output).await
        }
    }
}

// ---------- config ----------

fn config_set(path: &Path, endpoint: Option<&str>, token: Option<&str>) -> anyhow::Result<String> {
    if endpoint.is_none() && token.is_none() {
        bail!("nothing to set: pass --endpoint URL and/or --token TOKEN (`--token -` reads it from standard input)");
    }
    let mut file = config::load(path)?;
    if let Some(e) = endpoint {
        file.endpoint = Some(config::check_endpoint(e)?);
    }
    if let Some(t) = token {
        let t = if t == "-" {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the token from standard input")?;
            s.trim().to_owned()
        } else {
            t.to_owned()
        };
        if t.is_empty() {
            bail!("the token is empty");
        }
        file.token = Some(t);
    }
    config::save(path, &file)?;
    Ok(format!("saved {}\n", path.display()))
}

fn config_show(path: &Path, s: &Settings, output: Option<Output>) -> anyhow::Result<String> {
    let token = s.token.as_ref().map(|_| "<redacted>");
    if output == Some(Output::Json) {
        return Ok(output::json(&json!({
            "path": path,
            "endpoint": s.endpoint,
            "endpoint_source": s.endpoint_source,
            "token": token,
            "token_source": s.token.as_ref().map(|_| s.token_source),
        })));
    }
    let token_line = match token {
        Some(t) => format!("{t} (from {})", s.token_source.describe("token")),
        None => "not set".into(),
    };
    Ok(format!(
        "config file: {}\nendpoint:    {} (from {})\ntoken:       {token_line}\n",
        path.display(),
        s.endpoint,
        s.endpoint_source.describe("endpoint"),
    ))
}

// ---------- reading documents ----------

/// The most `-f` reads: 64 documents of the API's largest (1 MiB each). A larger
/// or endless input (`-f /dev/zero`, a log file by mistake) is refused rather
/// than read into memory until the machine runs out.
pub const MAX_SOURCE: u64 = 64 << 20;

/// The contents of `path`, or of standard input for `-`, at most [`MAX_SOURCE`] bytes.
pub fn read_source(path: &Path) -> anyhow::Result<String> {
    if path == Path::new("-") {
        read_limited(std::io::stdin().lock(), "standard input")
    } else {
        let file =
            std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
        read_limited(file, &path.display().to_string())
    }
}

/// Reads `from` (named `what` in errors) as UTF-8 text of at most [`MAX_SOURCE`] bytes.
fn read_limited(from: impl Read, what: &str) -> anyhow::Result<String> {
    let mut bytes = Vec::new();
    from.take(MAX_SOURCE + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {what}"))?;
    if bytes.len() as u64 > MAX_SOURCE {
        bail!("{what} is larger than {} MiB", MAX_SOURCE >> 20);
    }
    String::from_utf8(bytes).with_context(|| format!("reading {what}: not UTF-8 text"))
}

/// The JSON object given with `-f` or `--data`; a `kind` field, as `apply` files
/// have, must name `kind` and is removed.
fn read_document(input: &Input, kind: &Kind) -> anyhow::Result<Map<String, Value>> {
    let (text, from) = match (&input.file, &input.data) {
        (Some(path), _) => (read_source(path)?, path.display().to_string()),
        (None, Some(data)) => (data.clone(), "--data".to_owned()),
        (None, None) => bail!("give the document with -f FILE or --data JSON"),
    };
    let value: Value =
        serde_json::from_str(&text).with_context(|| format!("{from} is not valid JSON"))?;
    let Value::Object(mut doc) = value else {
        bail!("{from} must hold a JSON object");
    };
    if let Some(k) = doc.remove("kind") {
        let named = k.as_str().and_then(kinds::resolve);
        if !named.is_some_and(|n| std::ptr::eq(n, kind)) {
            bail!("{from} has `kind` {k}, not {}", kind.path);
        }
    }
    Ok(doc)
}

// ---------- kinds ----------

/// Every page of `segments` (up to `limit` items) with `query`, as one `{items, next_cursor}`.
async fn pages(
    c: &Client,
    segments: &[&str],
    query: &[(String, String)],
    limit: Option<u32>,
    cursor: Option<String>,
) -> anyhow::Result<Value> {
    let mut items: Vec<Value> = Vec::new();
    let mut cursor = cursor;
    loop {
        let want = limit.map_or(PAGE, |l| {
            (l as usize).saturating_sub(items.len()).min(PAGE as usize) as u32
        });
        let mut q = query.to_vec();
        q.push(("limit".into(), want.to_string()));
        if let Some(cur) = &cursor {
            q.push(("cursor".into(), cur.clone()));
        }
        let page = c.get(segments, &q).await?;
        let got = page
            .get("items")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("the control plane answered a list without `items`"))?;
        items.extend(got.iter().cloned());
        cursor = page
            .get("next_cursor")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let full = limit.is_some_and(|l| items.len() >= l as usize);
        if cursor.is_none() || full {
            return Ok(json!({ "items": items, "next_cursor": cursor }));
        }
    }
}

async fn list(
    c: &Client,
    kind: &Kind,
    args: &ListArgs,
    output: Option<Output>,
) -> anyhow::Result<String> {
    let page = pages(
        c,
        &["v1", kind.path],
        &args.filter,
        args.limit,
        args.cursor.clone(),
    )
    .await?;
    if output == Some(Output::Json) {
        return Ok(output::json(&page));
    }
    let headers: Vec<&str> = kind.columns.iter().map(|c| c.header).collect();
    let pointers: Vec<&str> = kind.columns.iter().map(|c| c.pointer).collect();
    let items = page["items"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    Ok(output::table(&headers, &output::rows(items, &pointers)))
}

async fn get(c: &Client, kind: &Kind, id: &str, output: Option<Output>) -> anyhow::Result<String> {
    let v = c.get(&["v1", kind.path, id], &[]).await?;
    Ok(match output {
        Some(Output::Table) => output::fields(&v),
        _ => output::json(&v),
    })
}

/// One line saying what was done to a resource, and its token when one was
/// issued (it is shown only once).
pub fn summary(kind: &Kind, done: &str, v: &Value) -> String {
    let id = v.get("id").and_then(Value::as_str).unwrap_or("?");
    let mut s = format!("{} {id} {done}", kind.singular);
    if let Some(version) = v.get("version") {
        s.push_str(&format!(" (version {version})"));
    }
    s.push('\n');
    if let Some(t) = v.get("token").and_then(Value::as_str) {
        s.push_str(&format!(
            "token: {t}\n(shown once: store it now; `rotate-token` issues a new one)\n"
        ));
    }
    s
}

async fn create(
    c: &Client,
    kind: &Kind,
    input: &Input,
    output: Option<Output>,
) -> anyhow::Result<String> {
    let doc = Value::Object(read_document(input, kind)?);
    let v = c
        .send(
            Method::POST,
            &["v1", kind.path],
            &[],
            Some(Body::Json(&doc)),
            None,
        )
        .await?;
    Ok(match output {
        Some(Output::Json) => output::json(&v),
        _ => summary(kind, "created", &v),
    })
}

/// An `If-Match` value from what the user typed: `12`, `"12"` or `*`.
fn etag(version: &str) -> anyhow::Result<String> {
    let v = version.trim();
    if v == "*" {
        return Ok("*".into());
    }
    let n: i64 = v
        .trim_matches('"')
        .parse()
        .map_err(|_| anyhow!("`{version}` is not a version (a number such as 12, or *)"))?;
    Ok(format!("\"{n}\""))
}

/// The `If-Match` of an update: `--if-match`, else `*` with `--force`, else the
/// document's `version`. Without any, the write is refused here: fetching the
/// current version now would overwrite whatever was written since the document
/// was read, which is what versions exist to prevent.
fn update_etag(args: &UpdateArgs, doc: &Map<String, Value>) -> anyhow::Result<String> {
    if let Some(v) = &args.if_match {
        return etag(v);
    }
    if args.force {
        return Ok("*".into());
    }
    match doc.get("version") {
        Some(Value::Number(n)) => etag(&n.to_string()),
        Some(other) => bail!("the document's `version` is {other}, not a number"),
        None => bail!(
            "the document has no `version`: keep the one `get` printed, pass --if-match VERSION, \
             or --force to overwrite whatever is stored"
        ),
    }
}

async fn update(
    c: &Client,
    kind: &Kind,
    args: &UpdateArgs,
    output: Option<Output>,
) -> anyhow::Result<String> {
    let doc = read_document(&args.input, kind)?;
    let if_match = update_etag(args, &doc)?;
    let doc = Value::Object(doc);
    let (method, body) = if args.merge {
        (Method::PATCH, Body::MergePatch(&doc))
    } else {
        (Method::PUT, Body::Json(&doc))
    };
    let v = c
        .send(
            method,
            &["v1", kind.path, &args.id],
            &[],
            Some(body),
            Some(&if_match),
        )
        .await?;
    Ok(match output {
        Some(Output::Json) => output::json(&v),
        _ => summary(kind, "updated", &v),
    })
}

async fn delete(
    c: &Client,
    kind: &Kind,
    id: &str,
    if_match: Option<&str>,
    output: Option<Output>,
) -> anyhow::Result<String> {
    let if_match = if_match.map(etag).transpose()?;
    c.send(
        Method::DELETE,
        &["v1", kind.path, id],
        &[],
        None,
        if_match.as_deref(),
    )
    .await?;
    Ok(match output {
        Some(Output::Json) => {
            output::json(&json!({ "kind": kind.path, "id": id, "deleted": true }))
        }
        _ => format!("{} {id} deleted\n", kind.singular),
    })
}

async fn action_run(
    c: &Client,
    kind: &Kind,
    action: Action,
    output: Option<Output>,
) -> anyhow::Result<String> {
    let json_out = output == Some(Output::Json);
    match action {
        Action::Validate(input) => {
            let mut doc = read_document(&input, kind)?;
            // A policy resource or `{"document": ...}` carries the document; else it is one.
            let document = match doc.remove("document") {
                Some(d) => d,
                None => Value::Object(doc),
            };
            let body = json!({ "document": document });
            let v = c
                .send(
                    Method::POST,
                    &["v1", kind.path, "validate"],
                    &[],
                    Some(Body::Json(&body)),
                    None,
                )
                .await?;
            Ok(if json_out {
                output::json(&v)
            } else {
                "valid\n".into()
            })
        }
        Action::RotateToken { id, if_match } => {
            let if_match = if_match.as_deref().map(etag).transpose()?;
            let v = c
                .send(
                    Method::POST,
                    &["v1", kind.path, &id, "rotate-token"],
                    &[],
                    None,
                    if_match.as_deref(),
                )
                .await?;
            Ok(if json_out {
                output::json(&v)
            } else {
                summary(kind, "has a new token", &v)
            })
        }
        Action::Revoke { id } => {
            let v = c
                .send(
                    Method::POST,
                    &["v1", kind.path, &id, "revoke"],
                    &[],
                    None,
                    None,
                )
                .await?;
            Ok(if json_out {
                output::json(&v)
            } else {
                summary(kind, "revoked", &v)
            })
        }
        Action::RevokeSessions { id } => {
            let v = c
                .send(
                    Method::POST,
                    &["v1", kind.path, &id, "revoke-sessions"],
                    &[],
                    None,
                    None,
                )
                .await?;
            Ok(if json_out {
                output::json(&v)
            } else {
                format!("revoked {} session(s) of {id}\n", v["revoked"])
            })
        }
    }
}

// ---------- fleet and audit ----------

async fn fleet(c: &Client, output: Option<Output>) -> anyhow::Result<String> {
    let v = c.get(&["v1", "proxies"], &[]).await?;
    if output == Some(Output::Json) {
        return Ok(output::json(&v));
    }
    let current = v["snapshot_version"].as_u64();
    let items = v["items"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|p| {
            let held = p["version"].as_u64();
            let behind = match (current, held) {
                (Some(c), Some(h)) => c.saturating_sub(h).to_string(),
                _ => "-".into(),
            };
            let status = if p["connected"].as_bool() == Some(true) {
                format!("connected since {}", output::cell(p.get("connected_since")))
            } else {
                "disconnected".into()
            };
            let nack = match p.get("last_nack") {
                Some(Value::Object(n)) => format!(
                    "v{}: {}",
                    output::cell(n.get("version")),
                    output::cell(n.get("error"))
                ),
                _ => "-".into(),
            };
            vec![
                output::cell(p.get("id")),
                output::cell(p.get("version")),
                behind,
                status,
                output::cell(p.get("last_seen")),
                nack,
            ]
        })
        .collect();
    Ok(output::table(
        &[
            "ID",
            "VERSION",
            "BEHIND",
            "STATUS",
            "LAST SEEN",
            "LAST NACK",
        ],
        &rows,
    ))
}

async fn audit(c: &Client, args: &AuditArgs, output: Option<Output>) -> anyhow::Result<String> {
    let mut q = Vec::new();
    if let Some(k) = &args.kind {
        let kind = kinds::resolve(k)
            .ok_or_else(|| anyhow!("unknown kind `{k}`; kinds are {}", kinds::known()))?;
        q.push(("kind".to_owned(), kind.store_kind.to_owned()));
    }
    if let Some(id) = &args.entity_id {
        q.push(("entity_id".to_owned(), id.clone()));
    }
    if let Some(a) = &args.actor {
        q.push(("actor".to_owned(), a.clone()));
    }
    let page = pages(c, &["v1", "audit"], &q, args.limit, None).await?;
    if output == Some(Output::Json) {
        return Ok(output::json(&page));
    }
    let items = page["items"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    Ok(output::table(
        &["REVISION", "AT", "ACTOR", "ACTION", "KIND", "ID"],
        &output::rows(
            items,
            &[
                "/revision",
                "/at",
                "/actor",
                "/action",
                "/kind",
                "/entity_id",
            ],
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn endless_or_huge_input_is_refused() {
        let e = read_limited(std::io::repeat(b' '), "/dev/zero").unwrap_err();
        assert!(e.to_string().contains("larger than 64 MiB"), "{e}");
        let e = read_limited(&b"{\"name\": \"\xff\"}"[..], "f.json").unwrap_err();
        assert!(format!("{e:#}").contains("not UTF-8"), "{e:#}");
        assert_eq!(read_limited(&b"{}"[..], "f.json").unwrap(), "{}");
    }

    fn update_args(if_match: Option<&str>, force: bool) -> UpdateArgs {
        UpdateArgs {
            id: "p".into(),
            input: Input {
                file: None,
                data: Some("{}".into()),
            },
            merge: false,
            if_match: if_match.map(str::to_owned),
            force,
        }
    }

    fn doc(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(o) => o,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn update_uses_flag_then_force_then_document_version() {
        let with = doc(json!({"version": 7}));
        let without = doc(json!({"name": "p"}));
        assert_eq!(
            update_etag(&update_args(Some("3"), false), &with).unwrap(),
            "\"3\""
        );
        assert_eq!(
            update_etag(&update_args(Some("\"3\""), false), &with).unwrap(),
            "\"3\""
        );
        assert_eq!(update_etag(&update_args(None, true), &with).unwrap(), "*");
        assert_eq!(
            update_etag(&update_args(None, false), &with).unwrap(),
            "\"7\""
        );
        let err = update_etag(&update_args(None, false), &without).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        assert!(update_etag(&update_args(Some("x"), false), &without).is_err());
        assert!(update_etag(&update_args(None, false), &doc(json!({"version": "7"}))).is_err());
    }

    #[test]
    fn a_kind_field_must_name_the_kind_and_is_removed() {
        let policy = kinds::resolve("policy").unwrap();
        let input = |data: &str| Input {
            file: None,
            data: Some(data.into()),
        };
        let d = read_document(&input(r#"{"kind": "Policy", "name": "p"}"#), policy).unwrap();
        assert_eq!(Value::Object(d), json!({"name": "p"}));
        assert!(read_document(&input(r#"{"kind": "route", "name": "p"}"#), policy).is_err());
        assert!(read_document(&input("[1]"), policy).is_err());
        assert!(read_document(&input("{"), policy).is_err());
        let missing = Input {
            file: Some(PathBuf::from("/nonexistent/vigilctl.json")),
            data: None,
        };
        assert!(read_document(&missing, policy).is_err());
    }

    #[test]
    fn config_show_never_prints_the_token() {
        let s = config::resolve(
            None,
            Some("sekrit-123"),
            &Env::default(),
            &config::FileConfig::default(),
        );
        for out in [None, Some(Output::Json), Some(Output::Table)] {
            let text = config_show(Path::new("/c/vigilctl.json"), &s, out).unwrap();
            assert!(!text.contains("sekrit"), "{text}");
            assert!(text.contains("<redacted>"), "{text}");
        }
    }

    #[test]
    fn summaries_show_issued_tokens() {
        let sa = kinds::resolve("sa").unwrap();
        let s = summary(
            sa,
            "created",
            &json!({"id": "ci", "version": 4, "token": "sa_x"}),
        );
        assert!(
            s.starts_with("service-account ci created (version 4)\ntoken: sa_x\n"),
            "{s}"
        );
    }
}
