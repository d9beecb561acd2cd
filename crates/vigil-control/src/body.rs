//! Reading request bodies strictly: size, media type, UTF-8, duplicate keys,
//! unknown fields and wrong types each become a located 4xx problem.

use axum::body::Bytes;
use axum::http::{header, HeaderMap};
use serde::de::DeserializeOwned;

use crate::problem::Problem;

/// Largest request body accepted.
pub const MAX_BODY: usize = 1 << 20;

/// Escapes one JSON Pointer token.
pub fn pointer_token(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

fn path_to_pointer(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in path.iter() {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("/{index}")),
            Segment::Map { key } => out.push_str(&format!("/{}", pointer_token(key))),
            Segment::Enum { variant } => out.push_str(&format!("/{}", pointer_token(variant))),
            Segment::Unknown => out.push_str("/?"),
        }
    }
    out
}

/// Checks media type, size and UTF-8, refuses duplicate keys anywhere, and returns the JSON.
pub fn json_value(
    headers: &HeaderMap,
    body: &Bytes,
    merge_patch: bool,
) -> Result<serde_json::Value, Problem> {
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
            axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            format!("Content-Type must be {want}"),
        ));
    }
    if body.len() > MAX_BODY {
        return Err(too_large());
    }
    let text = std::str::from_utf8(body).map_err(|e| {
        Problem::bad_request(format!(
            "the body is not valid UTF-8 (byte {})",
            e.valid_up_to()
        ))
    })?;
    // The policy crate's reader refuses duplicate keys, which serde_json would silently merge.
    vigil_policy::doc::from_json(text).map_err(|e| Problem::bad_request(e.to_string()))?;
    // Parsed again by serde_json so every number keeps its exact value (the policy
    // reader folds integers beyond i64 into floats).
    serde_json::from_str(text).map_err(|e| Problem::bad_request(format!("malformed JSON: {e}")))
}

/// Deserialises a typed body from JSON, naming the offending field on error.
pub fn typed<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, Problem> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let pointer = path_to_pointer(e.path());
        let detail = e.inner().to_string();
        Problem::field(
            if pointer.is_empty() {
                String::new()
            } else {
                pointer
            },
            detail,
        )
    })
}

/// 413.
pub fn too_large() -> Problem {
    Problem::new(
        axum::http::StatusCode::PAYLOAD_TOO_LARGE,
        "payload-too-large",
        format!("the body is larger than {MAX_BODY} bytes"),
    )
}
