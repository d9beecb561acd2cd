//! RFC 9457 problem details: every API error leaves through here.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use vigil_store::StoreError;

/// One located error inside the request body.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct FieldError {
    /// JSON Pointer into the request body.
    pub pointer: String,
    /// What is wrong there.
    pub detail: String,
}

impl FieldError {
    /// An error at `pointer`.
    pub fn new(pointer: impl Into<String>, detail: impl Into<String>) -> FieldError {
        FieldError {
            pointer: pointer.into(),
            detail: detail.into(),
        }
    }
}

/// An `application/problem+json` response.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// A URI naming the problem type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary of the type.
    pub title: String,
    /// HTTP status.
    pub status: u16,
    /// This occurrence, in words.
    pub detail: String,
    /// Located errors in the request body, when there are any.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// Seconds after which a retry may succeed (also sent as `Retry-After`).
    #[serde(skip)]
    pub retry_after: Option<u32>,
    /// Whether to send a `WWW-Authenticate: Bearer` challenge.
    #[serde(skip)]
    pub www_authenticate: bool,
}

impl Problem {
    /// A problem with a status, a type slug and a detail.
    pub fn new(status: StatusCode, slug: &str, detail: impl Into<String>) -> Problem {
        Problem {
            kind: format!("https://vigil.dev/problems/{slug}"),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            errors: Vec::new(),
            retry_after: None,
            www_authenticate: false,
        }
    }

    /// 400: the body or a parameter is malformed.
    pub fn bad_request(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, "bad-request", detail)
    }

    /// 400 with one located error.
    pub fn field(pointer: impl Into<String>, detail: impl Into<String>) -> Problem {
        let error = FieldError::new(pointer, detail);
        let mut p = Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-field",
            format!("{}: {}", error.pointer, error.detail),
        );
        p.errors.push(error);
        p
    }

    /// 422: well-formed but invalid, with every located error.
    pub fn invalid(errors: Vec<FieldError>) -> Problem {
        let detail = match errors.as_slice() {
            [one] => format!("{}: {}", one.pointer, one.detail),
            [first, rest @ ..] => format!(
                "{}: {} (and {} more)",
                first.pointer,
                first.detail,
                rest.len()
            ),
            [] => "invalid request".to_owned(),
        };
        let mut p = Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "validation", detail);
        p.errors = errors;
        p
    }

    /// 422 for one field.
    pub fn invalid_field(pointer: impl Into<String>, detail: impl Into<String>) -> Problem {
        Problem::invalid(vec![FieldError::new(pointer, detail)])
    }

    /// 404.
    pub fn not_found(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::NOT_FOUND, "not-found", detail)
    }

    /// 409.
    pub fn conflict(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::CONFLICT, "conflict", detail)
    }

    /// 401 with a `WWW-Authenticate` challenge.
    pub fn unauthorized(detail: impl Into<String>) -> Problem {
        let mut p = Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", detail);
        p.www_authenticate = true;
        p
    }

    /// 403.
    pub fn forbidden(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }

    /// 500 without internals.
    pub fn internal() -> Problem {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the control plane's log",
        )
    }
}

/// A store kind in words (`service_account` → `service account`).
fn words(kind: &str) -> String {
    kind.replace('_', " ")
}

/// The store's error with its kinds in words, for messages people read.
fn in_words(e: StoreError) -> StoreError {
    match e {
        StoreError::NotFound { kind, id } => StoreError::NotFound {
            kind: words(&kind),
            id,
        },
        StoreError::AlreadyExists { kind, key } => StoreError::AlreadyExists {
            kind: words(&kind),
            key,
        },
        StoreError::VersionMismatch { kind, id, current } => StoreError::VersionMismatch {
            kind: words(&kind),
            id,
            current,
        },
        StoreError::Referenced { kind, id, by } => StoreError::Referenced {
            kind: words(&kind),
            id,
            by: by.into_iter().map(|(k, i)| (words(&k), i)).collect(),
        },
        StoreError::MissingReference { kind, id } => StoreError::MissingReference {
            kind: words(&kind),
            id,
        },
        other => other,
    }
}

impl From<StoreError> for Problem {
    fn from(e: StoreError) -> Problem {
        let e = in_words(e);
        match &e {
            StoreError::NotFound { .. } => Problem::not_found(e.to_string()),
            StoreError::InvalidCursor => Problem::field("/query/cursor", "invalid cursor"),
            // The API refuses NUL where it is sent, naming the field; this is for
            // writes that do not come from a request body (e.g. session reports).
            StoreError::Nul(_) => Problem::bad_request(e.to_string()),
            StoreError::AlreadyExists { .. } | StoreError::Referenced { .. } => {
                Problem::conflict(e.to_string())
            }
            StoreError::VersionMismatch { current, .. } => Problem::new(
                StatusCode::PRECONDITION_FAILED,
                "precondition-failed",
                format!("{e}; current ETag is \"{current}\": re-read and retry"),
            ),
            StoreError::MissingReference { .. } => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "missing-reference",
                e.to_string(),
            ),
            StoreError::Unavailable(_) => {
                tracing::warn!(error = %e, "Store unavailable");
                let mut p = Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the database is unavailable; retry shortly",
                );
                p.retry_after = Some(2);
                p
            }
            StoreError::Schema(_) | StoreError::Database(_) | StoreError::Retry(_) => {
                tracing::error!(error = %e, "Store error");
                Problem::internal()
            }
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut res = (status, body).into_response();
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(s) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.www_authenticate {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"vigil\""),
            );
        }
        res
    }
}
