//! Reading request bodies strictly: size, media type, UTF-8, duplicate keys,
//! unknown fields and wrong types each become a located 4xx problem.

use std::fmt::{self, Write as _};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::problem::Problem;

/// Largest request body accepted.
pub const MAX_BODY: usize = 1 << 20;

/// A body must have arrived whole this long after its head: a client trickling
/// one byte at a time does not hold a connection and a task for ever.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Escapes one JSON Pointer token.
pub(crate) fn pointer_token(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

fn path_to_pointer(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in path.iter() {
        let _ = match seg {
            Segment::Seq { index } => write!(out, "/{index}"),
            Segment::Map { key } => write!(out, "/{}", pointer_token(key)),
            Segment::Enum { variant } => write!(out, "/{}", pointer_token(variant)),
            Segment::Unknown => write!(out, "/?"),
        };
    }
    out
}

/// Reads a JSON body of at most [`MAX_BODY`] bytes: checks the media type and
/// UTF-8, refuses duplicate keys anywhere, and returns the JSON.
pub async fn read_json(
    headers: &HeaderMap,
    body: Body,
    merge_patch: bool,
) -> Result<Value, Problem> {
    let read = tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY));
    let bytes = read
        .await
        .map_err(|_| {
            Problem::new(
                StatusCode::REQUEST_TIMEOUT,
                "request-timeout",
                format!(
                    "the body did not arrive within {} s",
                    BODY_TIMEOUT.as_secs()
                ),
            )
        })?
        .map_err(|e| {
            let msg = e.to_string();
            if msg.contains("length limit") {
                too_large()
            } else {
                Problem::bad_request(format!("could not read the body: {msg}"))
            }
        })?;
    json_value(headers, &bytes, merge_patch)
}

fn json_value(headers: &HeaderMap, body: &Bytes, merge_patch: bool) -> Result<Value, Problem> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let ok =
        media == "application/json" || (merge_patch && media == "application/merge-patch+json");
    if !ok {
        let want = if merge_patch {
            "application/merge-patch+json or application/json"
        } else {
            "application/json"
        };
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            format!("Content-Type must be {want}"),
        ));
    }
    let text = std::str::from_utf8(body).map_err(|e| {
        Problem::bad_request(format!(
            "the body is not valid UTF-8 (byte {})",
            e.valid_up_to()
        ))
    })?;
    let value = serde_json::from_str(text)
        .map(|Strict(v)| v)
        .map_err(|e| Problem::bad_request(format!("not a valid JSON document: {e}")))?;
    match nul_at(&value, "") {
        Some(pointer) => Err(Problem::field(pointer, NUL)),
        None => Ok(value),
    }
}

/// What is wrong with text holding NUL: the store cannot keep it (PostgreSQL's
/// `text` refuses it), and no name, address or policy needs it.
pub(crate) const NUL: &str = "must not contain the NUL character (U+0000)";

/// The JSON pointer of the first string in `v` (a member name or a value) that
/// holds NUL, under `at`.
fn nul_at(v: &Value, at: &str) -> Option<String> {
    match v {
        Value::String(s) => s.contains('\0').then(|| at.to_owned()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| nul_at(v, &format!("{at}/{i}"))),
        Value::Object(members) => members.iter().find_map(|(k, v)| {
            let here = format!("{at}/{}", pointer_token(k));
            if k.contains('\0') {
                Some(here)
            } else {
                nul_at(v, &here)
            }
        }),
        Value::Null | Value::Bool(_) | Value::Number(_) => None,
    }
}

/// A `serde_json::Value` read in one pass that refuses duplicate keys at any depth
/// (serde_json's own `Value` keeps the last); numbers are kept exactly as there.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Strict, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format_args!("duplicate key `{key}`")));
            }
            let Strict(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// Deserialises a typed body from JSON, naming the offending field on error.
pub fn typed<T: DeserializeOwned>(value: Value) -> Result<T, Problem> {
    serde_path_to_error::deserialize(value)
        .map_err(|e| Problem::field(path_to_pointer(e.path()), e.inner().to_string()))
}

/// 413.
pub(crate) fn too_large() -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload-too-large",
        format!("the body is larger than {MAX_BODY} bytes"),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::problem::FieldError;

    fn read(body: &str) -> Result<Value, Problem> {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        json_value(&h, &Bytes::from(body.to_owned()), false)
    }

    #[test]
    fn nul_anywhere_is_refused_where_it_is() {
        for (body, pointer) in [
            (r#"{"name": "a\u0000"}"#, "/name"),
            (r#"{"a": {"b": ["x", "y\u0000z"]}}"#, "/a/b/1"),
            (r#"{"a/b": {"c\u0000": 1}}"#, "/a~1b/c\u{0}"),
            (r#""\u0000""#, ""),
        ] {
            let p = read(body).unwrap_err();
            assert_eq!(p.status, 400, "{body}");
            assert_eq!(p.errors, [FieldError::new(pointer, NUL)], "{body}");
        }
        // An escaped backslash before `u0000` is no NUL.
        assert_eq!(
            read(r#"{"a": "\\u0000"}"#).unwrap(),
            serde_json::json!({"a": "\\u0000"})
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_ends_is_a_408() {
        let (_tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        let p = read_json(&h, body, false).await.unwrap_err();
        assert_eq!(p.status, 408, "{p:?}");
    }
}
