//! Where an allowed request goes: each route's upstreams and forwarding settings,
//! prepared once when a snapshot update brings the route, so that a request only
//! reads them (no URL parsing, header-name checks or settings copies per request).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::uri::Authority;
use http::{HeaderName, HeaderValue, Uri};
use vigil_proto::v1::route::Path as RoutePath;
use vigil_proto::v1::Route;

use crate::normalize::normalize_path;

/// Requests whose route sets no timeout get this long for the upstream's response head.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// One usable upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Host and port.
    pub authority: Authority,
    /// The upstream URL's path, without a trailing `/` (empty for the root).
    pub base_path: String,
}

/// A route's forwarding, as requests read it.
#[derive(Debug)]
pub struct Forwarding {
    /// Each configured upstream, or why it cannot be used (answered with 502).
    upstreams: Vec<Result<Upstream, &'static str>>,
    /// Round-robin position.
    next: AtomicUsize,
    /// The route's path prefix (no trailing `/`) and what replaces it, when the
    /// route rewrites it.
    rewrite: Option<(String, String)>,
    /// Keep the client's `Host` (else the upstream's authority).
    pub preserve_host: bool,
    /// How long the upstream has for its response head.
    pub timeout: Duration,
    /// Headers set on every forwarded request.
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    /// Headers removed from every forwarded request.
    pub remove_headers: Vec<HeaderName>,
}

fn upstream(url: &str) -> Result<Upstream, &'static str> {
    let uri: Uri = url
        .parse()
        .map_err(|_| "the route's upstream is not a URL")?;
    if uri.scheme_str() != Some("http") {
        return Err("only http:// upstreams are supported by this proxy version");
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or("the route's upstream has no host")?;
    Ok(Upstream {
        authority,
        base_path: uri.path().trim_end_matches('/').to_owned(),
    })
}

impl Forwarding {
    /// The forwarding of `route`; names and values that are not valid HTTP are
    /// left out (the control plane validates them first).
    pub fn new(route: &Route) -> Forwarding {
        let settings = route.settings.clone().unwrap_or_default();
        let rewrite = match (&settings.prefix_rewrite, &route.path) {
            // The prefix as the route table matched it: canonical.
            (Some(to), Some(RoutePath::Prefix(prefix))) => Some((
                normalize_path(prefix)
                    .unwrap_or_else(|_| prefix.clone())
                    .trim_end_matches('/')
                    .to_owned(),
                to.trim_end_matches('/').to_owned(),
            )),
            _ => None,
        };
        Forwarding {
            upstreams: route.upstreams.iter().map(|u| upstream(u)).collect(),
            next: AtomicUsize::new(0),
            rewrite,
            preserve_host: settings.preserve_host,
            timeout: match settings.timeout_ms {
                0 => DEFAULT_TIMEOUT,
                ms => Duration::from_millis(ms),
            },
            set_headers: settings
                .set_request_headers
                .iter()
                .filter_map(|h| {
                    Some((
                        HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                        HeaderValue::from_str(&h.value).ok()?,
                    ))
                })
                .collect(),
            remove_headers: settings
                .remove_request_headers
                .iter()
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect(),
        }
    }

    /// The upstream for the next request (round robin), or why there is none.
    pub fn pick(&self) -> Result<&Upstream, &'static str> {
        if self.upstreams.is_empty() {
            return Err("the route has no upstream");
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.upstreams.len();
        self.upstreams[i].as_ref().map_err(|e| *e)
    }

    /// The URL a request for canonical `path` and `query` is sent to on `to`, with
    /// the route's prefix rewritten when it says so.
    pub fn target(&self, to: &Upstream, path: &str, query: Option<&str>) -> String {
        let mut target = format!("http://{}{}", to.authority, to.base_path);
        match self
            .rewrite
            .as_ref()
            .and_then(|(prefix, with)| Some((path.strip_prefix(prefix.as_str())?, with)))
        {
            Some((rest, with)) => {
                let start = target.len();
                target.push_str(with);
                target.push_str(rest);
                if !target[start..].starts_with('/') {
                    target.insert(start, '/');
                }
            }
            None => target.push_str(path),
        }
        if let Some(q) = query {
            target.push('?');
            target.push_str(q);
        }
        target
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_proto::v1::{Header, RouteSettings};

    fn route(path: RoutePath, upstreams: &[&str], settings: RouteSettings) -> Route {
        Route {
            host: "app.test".into(),
            path: Some(path),
            upstreams: upstreams.iter().map(|u| (*u).to_owned()).collect(),
            settings: Some(settings),
            ..Route::default()
        }
    }

    #[test]
    fn targets_keep_the_canonical_path_and_rewrite_the_prefix() {
        let plain = Forwarding::new(&route(
            RoutePath::Prefix("/".into()),
            &["http://10.0.0.1:8080/base/"],
            RouteSettings::default(),
        ));
        let to = plain.pick().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(to.base_path, "/base");
        assert_eq!(
            plain.target(to, "/a/b", Some("x=1")),
            "http://10.0.0.1:8080/base/a/b?x=1"
        );
        for (prefix, rewrite, path, want) in [
            ("/api/", "/v2", "/api/users", "http://u/v2/users"),
            ("//api/./", "/v2", "/api/users", "http://u/v2/users"),
            ("/api/", "/", "/api/users", "http://u/users"),
            ("/api/", "/", "/api", "http://u/"),
            ("/api/", "v2/", "/api/x", "http://u/v2/x"),
        ] {
            let f = Forwarding::new(&route(
                RoutePath::Prefix(prefix.into()),
                &["http://u"],
                RouteSettings {
                    prefix_rewrite: Some(rewrite.into()),
                    ..RouteSettings::default()
                },
            ));
            let to = f.pick().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(f.target(to, path, None), want, "{rewrite} {path}");
        }
    }

    #[test]
    fn upstreams_take_turns_and_bad_ones_are_answered() {
        let f = Forwarding::new(&route(
            RoutePath::Prefix("/".into()),
            &["http://a", "https://b", "not a url"],
            RouteSettings {
                set_request_headers: vec![Header {
                    name: "x-team".into(),
                    value: "blue".into(),
                }],
                remove_request_headers: vec!["cookie".into(), "bad name".into()],
                timeout_ms: 250,
                ..RouteSettings::default()
            },
        ));
        assert_eq!(f.pick().map(|u| u.authority.as_str()), Ok("a"));
        assert!(f.pick().unwrap_err().contains("only http://"));
        assert!(f.pick().unwrap_err().contains("not a URL"));
        assert_eq!(f.pick().map(|u| u.authority.as_str()), Ok("a"));
        assert_eq!(f.timeout, Duration::from_millis(250));
        assert_eq!(f.set_headers.len(), 1);
        assert_eq!(f.remove_headers, vec![HeaderName::from_static("cookie")]);
        let none = Forwarding::new(&route(
            RoutePath::Prefix("/".into()),
            &[],
            RouteSettings::default(),
        ));
        assert_eq!(none.pick(), Err("the route has no upstream"));
    }
}
