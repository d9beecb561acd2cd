//! The admin API over HTTP: requests with the bearer token, problem+json
//! (RFC 9457) answers turned into errors people can read.

use std::fmt;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use reqwest::header::{self, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use serde_json::Value;

/// A client of one control plane. Its `Debug` never shows the token.
pub struct Client {
    http: reqwest::Client,
    base: Url,
    endpoint: String,
    auth: Option<HeaderValue>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.endpoint)
            .field("token", &self.auth.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A request's body and its media type.
pub enum Body<'a> {
    /// `application/json`.
    Json(&'a Value),
    /// `application/merge-patch+json` (RFC 7396).
    MergePatch(&'a Value),
}

/// One located error of a problem.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct FieldError {
    /// JSON Pointer into the request body (or `/query/...`).
    #[serde(default)]
    pub pointer: String,
    /// What is wrong there.
    #[serde(default)]
    pub detail: String,
}

/// An error answer of the API.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Problem {
    /// The HTTP status.
    #[serde(skip)]
    pub status: u16,
    /// Short summary of the problem type.
    #[serde(default)]
    pub title: String,
    /// This occurrence, in words.
    #[serde(default)]
    pub detail: String,
    /// Located errors, when there are any.
    #[serde(default)]
    pub errors: Vec<FieldError>,
}

impl Problem {
    /// The problem in an answer of `status` whose body is `body`; an answer that is
    /// not problem+json (say, from a load balancer) becomes one with a snippet of it.
    pub fn from_answer(status: StatusCode, body: &[u8]) -> Problem {
        if let Ok(mut p) = serde_json::from_slice::<Problem>(body) {
            if !p.title.is_empty() || !p.detail.is_empty() {
                p.status = status.as_u16();
                if p.title.is_empty() {
                    p.title = reason(status);
                }
                return p;
            }
        }
        let text: String = String::from_utf8_lossy(body)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let mut detail: String = text.chars().take(200).collect();
        if detail.len() < text.len() {
            detail.push('…');
        }
        Problem {
            status: status.as_u16(),
            title: reason(status),
            detail,
            errors: Vec::new(),
        }
    }
}

fn reason(status: StatusCode) -> String {
    status
        .canonical_reason()
        .map_or_else(|| format!("HTTP {}", status.as_u16()), str::to_owned)
}

/// `<title>: <detail>`, then every located error when there are several (a single
/// one is already the detail), then a hint for the statuses a user can fix.
impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.title)?;
        if !self.detail.is_empty() {
            write!(f, ": {}", self.detail)?;
        }
        let shown = |e: &FieldError| {
            self.errors.len() == 1 && self.detail.starts_with(&format!("{}:", e.pointer))
        };
        for e in self.errors.iter().filter(|e| !shown(e)) {
            let at = if e.pointer.is_empty() {
                "/"
            } else {
                &e.pointer
            };
            write!(f, "\n  at {at}: {}", e.detail)?;
        }
        match self.status {
            401 => write!(
                f,
                "\nhint: check the token (--token, VIGIL_TOKEN, or `vigilctl config set --token`)"
            ),
            412 => write!(
                f,
                "\nhint: someone changed it since you read it: `get` it again and redo your change"
            ),
            _ => Ok(()),
        }
    }
}

impl std::error::Error for Problem {}

impl Client {
    /// A client of the admin API at `endpoint` (checked) authenticating with `token`.
    pub fn new(endpoint: &str, token: Option<&str>) -> anyhow::Result<Client> {
        let endpoint = crate::config::check_endpoint(endpoint)?;
        let base = Url::parse(&endpoint).with_context(|| format!("`{endpoint}` is not a URL"))?;
        let auth = match token {
            Some(t) => {
                // The error names no part of the token.
                let mut v = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                    anyhow!("the token holds characters an HTTP header cannot carry")
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let http = reqwest::Client::builder()
            .user_agent(concat!("vigilctl/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .build()
            .context("building the HTTP client")?;
        Ok(Client {
            http,
            base,
            endpoint,
            auth,
        })
    }

    /// The URL of `segments` (each percent-encoded as one segment) under the endpoint.
    /// A segment that the URL would not carry as it is (empty, `.` or `..`, which
    /// name another path, or holding a tab or line break, which URL parsing drops)
    /// is refused rather than sent to some other resource.
    pub fn url(&self, segments: &[&str], query: &[(String, String)]) -> anyhow::Result<Url> {
        if let Some(bad) = segments
            .iter()
            .find(|s| matches!(**s, "" | "." | "..") || s.chars().any(|c| c.is_control()))
        {
            anyhow::bail!("{bad:?} cannot be an id: no resource has an empty id, `.`, `..` or control characters in its id");
        }
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| anyhow!("`{}` cannot be a base URL", self.endpoint))?
            .pop_if_empty()
            .extend(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        Ok(url)
    }

    /// Sends one request and returns the answer's JSON (`Null` when there is none,
    /// as for `204`); a non-2xx answer is a [`Problem`] error, a failure to talk
    /// to the control plane an error naming the endpoint.
    pub async fn send(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(String, String)],
        body: Option<Body<'_>>,
        if_match: Option<&str>,
    ) -> anyhow::Result<Value> {
        let Some(auth) = &self.auth else {
            return Err(anyhow!(
                "no token: pass --token, set VIGIL_TOKEN, or run `vigilctl config set --token -`"
            ));
        };
        let url = self.url(segments, query)?;
        let mut req = self
            .http
            .request(method, url)
            .header(header::AUTHORIZATION, auth.clone())
            .header(header::ACCEPT, "application/json, application/problem+json");
        if let Some(m) = if_match {
            req = req.header(header::IF_MATCH, m);
        }
        req = match body {
            Some(Body::Json(v)) => req
                .header(header::CONTENT_TYPE, "application/json")
                .body(serde_json::to_vec(v)?),
            Some(Body::MergePatch(v)) => req
                .header(header::CONTENT_TYPE, "application/merge-patch+json")
                .body(serde_json::to_vec(v)?),
            None => req,
        };
        let unreachable = || format!("cannot reach the control plane at {}", self.endpoint);
        let res = req
            .send()
            .await
            .map_err(reqwest::Error::without_url)
            .with_context(unreachable)?;
        let status = res.status();
        let bytes = res
            .bytes()
            .await
            .map_err(reqwest::Error::without_url)
            .with_context(unreachable)?;
        if !status.is_success() {
            return Err(Problem::from_answer(status, &bytes).into());
        }
        let body = if bytes.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "the control plane at {} answered {status} with a body that is not JSON",
                    self.endpoint
                )
            })?
        };
        Ok(body)
    }

    /// `GET`.
    pub async fn get(
        &self,
        segments: &[&str],
        query: &[(String, String)],
    ) -> anyhow::Result<Value> {
        self.send(Method::GET, segments, query, None, None).await
    }
}

/// The status of the API problem behind `err`, if it is one.
pub fn status_of(err: &anyhow::Error) -> Option<u16> {
    err.downcast_ref::<Problem>().map(|p| p.status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_shows_title_detail_and_fields() {
        let body = br#"{"type":"https://vigil.dev/problems/validation","title":"Unprocessable Entity","status":422,
            "detail":"/host: bad host (and 1 more)",
            "errors":[{"pointer":"/host","detail":"bad host"},{"pointer":"/upstreams/0","detail":"no scheme"}]}"#;
        let p = Problem::from_answer(StatusCode::UNPROCESSABLE_ENTITY, body);
        assert_eq!(
            p.to_string(),
            "Unprocessable Entity: /host: bad host (and 1 more)\n  at /host: bad host\n  at /upstreams/0: no scheme"
        );
    }

    #[test]
    fn a_single_field_error_already_in_the_detail_is_not_repeated() {
        let body = br#"{"title":"Bad Request","status":400,"detail":"/bogus: unknown field","errors":[{"pointer":"/bogus","detail":"unknown field"}]}"#;
        let p = Problem::from_answer(StatusCode::BAD_REQUEST, body);
        assert_eq!(p.to_string(), "Bad Request: /bogus: unknown field");
    }

    #[test]
    fn unauthorized_gets_a_hint() {
        let body = br#"{"title":"Unauthorized","status":401,"detail":"unknown or revoked token"}"#;
        let p = Problem::from_answer(StatusCode::UNAUTHORIZED, body);
        let text = p.to_string();
        assert!(
            text.starts_with("Unauthorized: unknown or revoked token\nhint:"),
            "{text}"
        );
    }

    #[test]
    fn a_body_that_is_not_a_problem_is_summarised() {
        let p = Problem::from_answer(
            StatusCode::BAD_GATEWAY,
            b"<html>\n  <h1>bad gateway</h1></html>",
        );
        assert_eq!(
            p.to_string(),
            "Bad Gateway: <html> <h1>bad gateway</h1></html>"
        );
        let p = Problem::from_answer(StatusCode::BAD_GATEWAY, b"");
        assert_eq!(p.to_string(), "Bad Gateway");
    }

    #[test]
    fn urls_encode_each_segment_and_keep_a_base_path() {
        let c = Client::new("http://h:1/admin/", Some("t")).unwrap();
        let u = c
            .url(&["v1", "users", "a/b?c"], &[("limit".into(), "5".into())])
            .unwrap();
        assert_eq!(u.as_str(), "http://h:1/admin/v1/users/a%2Fb%3Fc?limit=5");
        let c = Client::new("http://h:1", None).unwrap();
        assert_eq!(
            c.url(&["v1", "proxies"], &[]).unwrap().as_str(),
            "http://h:1/v1/proxies"
        );
    }

    #[test]
    fn ids_the_url_would_change_are_refused() {
        let c = Client::new("http://h:1", None).unwrap();
        for id in ["", ".", "..", "en\tg", "en\ng", "a\rb", "a\0b"] {
            let e = c.url(&["v1", "groups", id], &[]).unwrap_err();
            assert!(e.to_string().contains("cannot be an id"), "{id:?}: {e}");
        }
        assert_eq!(
            c.url(&["v1", "groups", "%2e%2e", ".a"], &[])
                .unwrap()
                .as_str(),
            "http://h:1/v1/groups/%252e%252e/.a"
        );
    }

    #[test]
    fn debug_hides_the_token() {
        let c = Client::new("http://h:1", Some("sekrit-123")).unwrap();
        assert!(!format!("{c:?}").contains("sekrit"));
    }
}
