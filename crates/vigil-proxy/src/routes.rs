//! The route table, compiled once per snapshot (off the request path): which route
//! a request is for.
//!
//! **Host.** The exact name first. Then wildcards, the longest suffix first: for
//! `a.b.example.com` that is `*.b.example.com`, then `*.example.com`. A wildcard
//! covers subdomains of any depth, but never the bare domain. Hosts compare without
//! case, trailing dot or port.
//!
//! **Path**, among the host's routes, always on the canonical path
//! ([`crate::normalize`]): an exact match first, then a regular expression matching
//! the whole path, then the longest prefix. A prefix matches on a segment boundary:
//! `/api` matches `/api` and `/api/x`, never `/apix`. Ties go to the route whose id
//! sorts first. A route whose path cannot be compiled matches nothing, so its
//! requests are refused rather than sent through without its policy.

use std::collections::HashMap;

use regex::Regex;
use vigil_proto::v1::entry::Body;
use vigil_proto::v1::route::Path;
use vigil_snapshot::{Kind, Snapshot};

use crate::normalize::normalize_path;

/// Compiled regexes are capped at this size (bytes of program).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// The routes of one host.
#[derive(Debug, Default)]
struct HostRoutes {
    exact: HashMap<String, String>,
    regexes: Vec<(Regex, String)>,
    /// Longest first, then by route id.
    prefixes: Vec<(String, String)>,
}

impl HostRoutes {
    fn find(&self, path: &str) -> Option<&str> {
        if let Some(id) = self.exact.get(path) {
            return Some(id);
        }
        if let Some((_, id)) = self.regexes.iter().find(|(re, _)| re.is_match(path)) {
            return Some(id);
        }
        self.prefixes
            .iter()
            .find(|(p, _)| prefix_matches(p, path))
            .map(|(_, id)| id.as_str())
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    path.starts_with(prefix)
        && (prefix.ends_with('/')
            || path.len() == prefix.len()
            || path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

/// Which route serves a (host, path).
#[derive(Debug, Default)]
pub struct RouteTable {
    exact: HashMap<String, HostRoutes>,
    /// By the suffix after `*.` (`example.com` for `*.example.com`).
    wildcard: HashMap<String, HostRoutes>,
    routes: usize,
}

/// A host name as routes are matched on: lower case, no port, no trailing dot.
/// `None` when it is not a host name (or bracketed IPv6 literal).
pub fn canonical_host(authority: &str) -> Option<String> {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        let end = rest.find(']')?;
        let after = &rest[end + 1..];
        if !(after.is_empty() || port_ok(after.strip_prefix(':')?)) {
            return None;
        }
        return rest[..end]
            .parse::<std::net::Ipv6Addr>()
            .ok()
            .map(|ip| format!("[{ip}]"));
    } else {
        match authority.rsplit_once(':') {
            Some((h, port)) if port_ok(port) => h,
            Some(_) => return None,
            None => authority,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    vigil_snapshot::is_host_name(host).then(|| host.to_ascii_lowercase())
}

fn port_ok(port: &str) -> bool {
    !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit())
}

impl RouteTable {
    /// Compiles every route of `snapshot`.
    pub fn build(snapshot: &Snapshot) -> RouteTable {
        let mut table = RouteTable::default();
        // Entries come in id order, so the first of equals is the lowest id.
        for entry in snapshot.of_kind(Kind::Route) {
            let Some(Body::Route(route)) = &entry.body else {
                continue;
            };
            let Some(pattern) = route.host.strip_prefix("*.").map_or_else(
                || canonical_host(&route.host).map(|h| (false, h)),
                |suffix| canonical_host(suffix).map(|h| (true, h)),
            ) else {
                tracing::warn!(route = %entry.id, host = %route.host, "Route host does not compile; the route matches nothing");
                continue;
            };
            let (wild, host) = pattern;
            let routes = if wild {
                table.wildcard.entry(host).or_default()
            } else {
                table.exact.entry(host).or_default()
            };
            let id = entry.id.clone();
            let added = match &route.path {
                None => {
                    routes.prefixes.push(("/".into(), id));
                    true
                }
                Some(Path::Prefix(p)) => normalize_path(p)
                    .map(|p| routes.prefixes.push((p, id)))
                    .is_ok(),
                Some(Path::Exact(p)) => normalize_path(p)
                    .map(|p| {
                        routes.exact.entry(p).or_insert(id);
                    })
                    .is_ok(),
                Some(Path::Regex(re)) => regex::RegexBuilder::new(&format!("^(?:{re})$"))
                    .size_limit(REGEX_SIZE_LIMIT)
                    .build()
                    .map(|re| routes.regexes.push((re, id)))
                    .is_ok(),
            };
            if added {
                table.routes += 1;
            } else {
                tracing::warn!(route = %entry.id, "Route path does not compile; the route matches nothing");
            }
        }
        for routes in table.exact.values_mut().chain(table.wildcard.values_mut()) {
            // Stable: equal lengths keep id order.
            routes
                .prefixes
                .sort_by_key(|p| std::cmp::Reverse(p.0.len()));
        }
        table
    }

    /// Routes compiled.
    pub fn len(&self) -> usize {
        self.routes
    }

    /// Whether no route compiled.
    pub fn is_empty(&self) -> bool {
        self.routes == 0
    }

    /// The id of the route serving `host` (canonical, see [`canonical_host`]) and
    /// `path` (canonical, see [`normalize_path`]).
    pub fn find(&self, host: &str, path: &str) -> Option<&str> {
        if let Some(id) = self.exact.get(host).and_then(|r| r.find(path)) {
            return Some(id);
        }
        let mut rest = host;
        while let Some((_, suffix)) = rest.split_once('.') {
            if let Some(id) = self.wildcard.get(suffix).and_then(|r| r.find(path)) {
                return Some(id);
            }
            rest = suffix;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_proto::v1::{Entry, Route};

    fn route(id: &str, host: &str, path: Option<Path>) -> Entry {
        Entry {
            id: id.into(),
            body: Some(Body::Route(Route {
                host: host.into(),
                path,
                ..Route::default()
            })),
        }
    }

    fn table(routes: Vec<Entry>) -> RouteTable {
        RouteTable::build(&Snapshot::new(1, routes))
    }

    fn prefix(p: &str) -> Option<Path> {
        Some(Path::Prefix(p.into()))
    }

    #[test]
    fn the_most_specific_route_wins() {
        let t = table(vec![
            route("all", "app.example.com", prefix("/")),
            route("api", "app.example.com", prefix("/api")),
            route("api-v2", "app.example.com", prefix("/api/v2/")),
            route(
                "health",
                "app.example.com",
                Some(Path::Exact("/api/health".into())),
            ),
            route(
                "ids",
                "app.example.com",
                Some(Path::Regex("/api/users/[0-9]+".into())),
            ),
            route("wild", "*.example.com", prefix("/")),
            route("deep-wild", "*.b.example.com", prefix("/")),
            route("wild-admin", "*.example.com", prefix("/admin")),
        ]);
        assert_eq!(t.len(), 8);
        for (host, path, want) in [
            ("app.example.com", "/", Some("all")),
            ("app.example.com", "/apix", Some("all")),
            ("app.example.com", "/api", Some("api")),
            ("app.example.com", "/api/x", Some("api")),
            ("app.example.com", "/api/v2", Some("api")),
            ("app.example.com", "/api/v2/x", Some("api-v2")),
            ("app.example.com", "/api/health", Some("health")),
            ("app.example.com", "/api/health/", Some("api")),
            ("app.example.com", "/api/users/42", Some("ids")),
            ("app.example.com", "/api/users/42/x", Some("api")),
            ("other.example.com", "/x", Some("wild")),
            ("other.example.com", "/admin/x", Some("wild-admin")),
            ("a.b.example.com", "/admin", Some("deep-wild")),
            ("x.y.example.com", "/", Some("wild")),
            ("example.com", "/", None),
            ("app.example.org", "/", None),
        ] {
            assert_eq!(t.find(host, path), want, "{host}{path}");
        }
    }

    #[test]
    fn ties_go_to_the_lowest_id_and_bad_paths_match_nothing() {
        let t = table(vec![
            route("b", "h.example", prefix("/x")),
            route("a", "h.example", prefix("/x")),
            route("bad-re", "h.example", Some(Path::Regex("(".into()))),
            route("bad-prefix", "h.example", prefix("/a%2Fb")),
            route("bad-host", "h_x.example", prefix("/")),
        ]);
        assert_eq!(t.find("h.example", "/x"), Some("a"));
        assert_eq!(t.len(), 2);
        assert_eq!(t.find("h.example", "/a"), None);
    }

    #[test]
    fn route_paths_are_canonical_too() {
        let t = table(vec![
            route("p", "h.example", prefix("//admin/./")),
            route("e", "h.example", Some(Path::Exact("/%61bout".into()))),
        ]);
        assert_eq!(t.find("h.example", "/admin/x"), Some("p"));
        assert_eq!(t.find("h.example", "/about"), Some("e"));
    }

    #[test]
    fn hosts_are_made_canonical() {
        for (raw, want) in [
            ("App.Example.COM", Some("app.example.com")),
            ("app.example.com.", Some("app.example.com")),
            ("app.example.com:8443", Some("app.example.com")),
            ("app.example.com.:443", Some("app.example.com")),
            ("[::1]:8080", Some("[::1]")),
            ("[::1]", Some("[::1]")),
            ("10.0.0.1:80", Some("10.0.0.1")),
            ("", None),
            ("app..example.com", None),
            ("app.example.com:", None),
            ("app.example.com:http", None),
            ("a_b.example.com", None),
            ("[::1", None),
            ("[zz]", None),
            ("app.example.com/x", None),
            ("user@app.example.com", None),
        ] {
            assert_eq!(canonical_host(raw).as_deref(), want, "{raw:?}");
        }
    }
}
