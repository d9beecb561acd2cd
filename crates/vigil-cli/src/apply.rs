//! `vigilctl apply`: documents with a `kind` field, created or replaced by name
//! (or natural key), kinds that others refer to first.

use std::io::Write as _;

use anyhow::{anyhow, bail, Context as _};
use reqwest::Method;
use serde_json::{json, Map, Value};

use crate::cli::Output;
use crate::client::{status_of, Body, Client};
use crate::commands::{summary, META};
use crate::kinds::{self, Identity, Kind};
use crate::output;

/// One document of the file.
#[derive(Debug)]
pub struct Doc {
    /// Its kind.
    pub kind: &'static Kind,
    /// The document without `kind`.
    pub body: Map<String, Value>,
    /// Its position in the file, from 1, for messages.
    pub index: usize,
}

/// The documents of a file (one object, or an array of them), each with a known
/// `kind`, ordered so that what is referred to is applied before what refers to
/// it (groups and policies before routes and users); the file's order otherwise.
pub fn parse(text: &str) -> anyhow::Result<Vec<Doc>> {
    let value: Value = serde_json::from_str(text).context("the file is not valid JSON")?;
    let values = match value {
        Value::Array(a) => a,
        v @ Value::Object(_) => vec![v],
        _ => bail!("the file must hold a JSON object or an array of objects"),
    };
    let mut docs = values
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let index = i + 1;
            let Value::Object(mut body) = v else {
                bail!("document {index} is not a JSON object");
            };
            let kind = match body.remove("kind") {
                Some(Value::String(k)) => kinds::resolve(&k).ok_or_else(|| {
                    anyhow!(
                        "document {index}: unknown kind `{k}`; kinds are {}",
                        kinds::known()
                    )
                })?,
                _ => bail!("document {index} has no `kind` (e.g. \"kind\": \"policy\")"),
            };
            Ok(Doc { kind, body, index })
        })
        .collect::<anyhow::Result<Vec<Doc>>>()?;
    docs.sort_by_key(|d| d.kind.apply_rank);
    Ok(docs)
}

/// Applies `docs` in order, stopping at the first failure. With table output
/// each result is printed as it happens, so a failure leaves a record of what
/// was done before it.
pub async fn apply(c: &Client, docs: Vec<Doc>, out: Option<Output>) -> anyhow::Result<String> {
    let json_out = out == Some(Output::Json);
    let mut results = Vec::new();
    for d in &docs {
        let (done, v) = apply_one(c, d)
            .await
            .with_context(|| format!("document {} ({})", d.index, describe(d)))?;
        if json_out {
            let mut r = json!({
                "kind": d.kind.path,
                "id": v.get("id"),
                "action": done,
                "version": v.get("version"),
            });
            if let (Some(t), Value::Object(o)) = (v.get("token"), &mut r) {
                o.insert("token".into(), t.clone());
            }
            results.push(r);
        } else {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(summary(d.kind, done, &v).as_bytes());
            let _ = stdout.flush();
        }
    }
    Ok(if json_out {
        output::json(&Value::Array(results))
    } else {
        String::new()
    })
}

fn describe(d: &Doc) -> String {
    let name = ["name", "id"]
        .iter()
        .find_map(|f| d.body.get(*f).and_then(Value::as_str));
    match name {
        Some(n) => format!("{} {n}", d.kind.singular),
        None => d.kind.singular.to_owned(),
    }
}

fn required<'a>(body: &'a Map<String, Value>, field: &str) -> anyhow::Result<&'a str> {
    body.get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("no `{field}`"))
}

/// The id of the stored resource `d` describes, if there is one.
async fn find(c: &Client, d: &Doc) -> anyhow::Result<Option<Value>> {
    let explicit = d.body.get("id").and_then(Value::as_str);
    let id = match (&d.kind.identity, explicit) {
        (Identity::Name, _) => required(&d.body, "name")?.to_owned(),
        (_, Some(id)) => id.to_owned(),
        (Identity::NaturalKey(fields), None) => {
            let mut q = Vec::new();
            for f in *fields {
                q.push(((*f).to_owned(), required(&d.body, f)?.to_owned()));
            }
            q.push(("limit".into(), "2".into()));
            let page = c.get(&["v1", d.kind.path], &q).await?;
            match page["items"].as_array().map(Vec::as_slice) {
                Some([]) | None => return Ok(None),
                Some([one]) => return Ok(Some(one.clone())),
                Some(_) => bail!("several {} have this {}", d.kind.path, fields.join(" and ")),
            }
        }
        (Identity::Id, None) => return Ok(None),
    };
    match c.get(&["v1", d.kind.path, &id], &[]).await {
        Ok(v) => Ok(Some(v)),
        Err(e) if status_of(&e) == Some(404) && d.kind.identity == Identity::Name => Ok(None),
        // An explicit id that does not exist: creating would make a different one.
        Err(e) if status_of(&e) == Some(404) => Err(e.context(format!(
            "no {} has id `{id}`; leave `id` out to create one",
            d.kind.singular
        ))),
        Err(e) => Err(e),
    }
}

/// The document without the fields the server owns, for comparison.
fn without_meta(v: &Map<String, Value>) -> Map<String, Value> {
    v.iter()
        .filter(|(k, _)| !META.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

async fn apply_one(c: &Client, d: &Doc) -> anyhow::Result<(&'static str, Value)> {
    let body = Value::Object(d.body.clone());
    let Some(current) = find(c, d).await? else {
        let v = c
            .send(
                Method::POST,
                &["v1", d.kind.path],
                &[],
                Some(Body::Json(&body)),
                None,
            )
            .await?;
        return Ok(("created", v));
    };
    let cur = current
        .as_object()
        .ok_or_else(|| anyhow!("the control plane answered a resource that is not an object"))?;
    // Exactly what is stored: writing it again would only bump the version.
    if without_meta(cur) == without_meta(&d.body) {
        return Ok(("unchanged", current));
    }
    let id = cur
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("the stored resource has no id"))?;
    let version = cur
        .get("version")
        .and_then(Value::as_i64)
        .ok_or_else(|| anyhow!("the stored resource has no version"))?;
    // The version just read: a write in between makes this fail (412) rather than
    // be overwritten.
    let if_match = format!("\"{version}\"");
    let mut body = d.body.clone();
    body.remove("version");
    let v = c
        .send(
            Method::PUT,
            &["v1", d.kind.path, id],
            &[],
            Some(Body::Json(&Value::Object(body))),
            Some(&if_match),
        )
        .await?;
    Ok(("updated", v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_ordered_by_what_they_refer_to() {
        let docs = parse(
            r#"[{"kind": "route", "name": "app"}, {"kind": "user", "issuer": "i", "subject": "s"},
                {"kind": "policies", "name": "staff"}, {"kind": "group", "name": "eng"},
                {"kind": "route", "name": "app2"}]"#,
        )
        .unwrap();
        let order: Vec<(&str, usize)> = docs.iter().map(|d| (d.kind.path, d.index)).collect();
        assert_eq!(
            order,
            [
                ("groups", 4),
                ("policies", 3),
                ("routes", 1),
                ("routes", 5),
                ("users", 2)
            ]
        );
        assert!(docs.iter().all(|d| !d.body.contains_key("kind")));
    }

    #[test]
    fn a_single_object_is_one_document() {
        let docs = parse(r#"{"kind": "policy", "name": "p", "document": {}}"#).unwrap();
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0].kind.path, "policies");
    }

    #[test]
    fn bad_documents_are_named() {
        for (text, says) in [
            (r#"[{"name": "x"}]"#, "document 1 has no `kind`"),
            (
                r#"[{"kind": "policy"}, {"kind": "widget"}]"#,
                "document 2: unknown kind `widget`",
            ),
            ("[1]", "document 1 is not a JSON object"),
            ("3", "must hold a JSON object"),
            ("{", "not valid JSON"),
        ] {
            let err = format!("{:#}", parse(text).unwrap_err());
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn comparison_ignores_server_fields() {
        let stored =
            json!({"id": "p", "name": "p", "version": 3, "created_at": "x", "updated_at": "y"});
        let mine = json!({"name": "p", "version": 1});
        let (Value::Object(a), Value::Object(b)) = (stored, mine) else {
            panic!("objects");
        };
        assert_eq!(without_meta(&a), without_meta(&b));
    }
}
