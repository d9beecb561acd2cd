//! Where an allowed request goes: each route's upstreams and forwarding settings,
//! prepared once when a snapshot update brings the route, so that a request only
//! reads them (no URL parsing, header-name checks, PEM parsing or settings copies
//! per request); and the pooled clients that reach `https://` upstreams, one per
//! trusted CA (plain `http://` upstreams are reached through [`crate::conns`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use http::{HeaderName, HeaderValue, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use vigil_proto::v1::route::Path as RoutePath;
use vigil_proto::v1::Route;

use crate::edge::WithoutTrailers;
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
    /// `https://`: TLS, verified against the route's CA (else the webpki roots).
    pub tls: bool,
}

impl Upstream {
    /// The host to connect to and to name in SNI (an IPv6 address without brackets).
    pub fn host(&self) -> &str {
        self.authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
    }
}

/// The CAs a route trusts for its `https://` upstreams (`upstream_ca_pem`).
#[derive(Debug)]
pub struct UpstreamCa {
    /// SHA-256 of the PEM text: connections are pooled per (upstream, CA).
    pub id: [u8; 32],
    /// The certificates, as roots.
    pub roots: Arc<RootCertStore>,
}

/// Which roots verify a route's `https://` upstreams.
#[derive(Debug, Clone)]
pub enum Trust {
    /// The webpki (Mozilla) roots.
    Default,
    /// The route's `upstream_ca_pem`.
    Ca(Arc<UpstreamCa>),
    /// `upstream_ca_pem` is set but holds no usable certificate: every `https://`
    /// request of the route gets 502 rather than falling back to other roots.
    Invalid(String),
}

impl Trust {
    /// The trust `upstream_ca_pem` asks for.
    pub fn from_pem(pem: Option<&str>) -> Trust {
        let Some(pem) = pem else {
            return Trust::Default;
        };
        let certs: Result<Vec<CertificateDer<'static>>, _> =
            CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
        let certs = match certs {
            Ok(c) => c,
            Err(e) => {
                return Trust::Invalid(format!("the route's upstream_ca_pem is not PEM: {e}"))
            }
        };
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Trust::Invalid(
                "the route's upstream_ca_pem holds no usable certificate".into(),
            );
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, pem.as_bytes());
        let mut id = [0u8; 32];
        id.copy_from_slice(digest.as_ref());
        Trust::Ca(Arc::new(UpstreamCa {
            id,
            roots: Arc::new(roots),
        }))
    }
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
    /// WebSocket upgrades pass (else they are refused with 403).
    pub allow_websockets: bool,
    /// CORS preflights go to the upstream without authentication.
    pub cors_preflight: bool,
    /// The roots that verify `https://` upstreams.
    pub trust: Trust,
}

fn upstream(url: &str) -> Result<Upstream, &'static str> {
    let uri: Uri = url
        .parse()
        .map_err(|_| "the route's upstream is not a URL")?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err("the route's upstream is neither http:// nor https://"),
    };
    let authority = uri
        .authority()
        .cloned()
        .ok_or("the route's upstream has no host")?;
    Ok(Upstream {
        authority,
        base_path: uri.path().trim_end_matches('/').to_owned(),
        tls,
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
            allow_websockets: settings.allow_websockets,
            cors_preflight: settings.cors_preflight,
            trust: Trust::from_pem(settings.upstream_ca_pem.as_deref()),
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
        let scheme = if to.tls { "https" } else { "http" };
        let mut target = format!("{scheme}://{}", to.authority);
        self.push_path(&mut target, to, path, query);
        target
    }

    /// The same target in origin form (path and query only), as it goes on a
    /// connection to `to`.
    pub fn origin_form(&self, to: &Upstream, path: &str, query: Option<&str>) -> String {
        let mut target = String::with_capacity(to.base_path.len() + path.len() + 16);
        self.push_path(&mut target, to, path, query);
        target
    }

    fn push_path(&self, target: &mut String, to: &Upstream, path: &str, query: Option<&str>) {
        target.push_str(&to.base_path);
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
    }
}

/// A TCP connection to `upstream` (no TLS), within [`CONNECT_TIMEOUT`], with
/// Nagle's delay off.
pub async fn connect(
    upstream: &Upstream,
) -> Result<tokio::net::TcpStream, Box<dyn std::error::Error + Send + Sync>> {
    let host = upstream.host();
    let port = upstream
        .authority
        .port_u16()
        .unwrap_or(if upstream.tls { 443 } else { 80 });
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect((host, port)),
    )
    .await
    .map_err(|_| "connecting to the upstream timed out")??;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// The pooled client the proxy forwards to `https://` upstreams with: HTTP/1.1 and,
/// by ALPN, HTTP/2.
pub type PooledClient = Client<HttpsConnector<HttpConnector>, WithoutTrailers>;

/// What reaches the upstreams trusting one set of roots.
#[derive(Debug, Clone)]
pub struct Pool {
    /// Pooled connections, per upstream (scheme and authority).
    pub client: PooledClient,
    /// TLS for a WebSocket's own connection: the same roots, ALPN `http/1.1` only
    /// (an upgrade needs HTTP/1.1).
    pub websocket_tls: Arc<ClientConfig>,
}

/// How long a TCP connection to an upstream may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// At most this many CA-specific pools are kept; past it the least recently made
/// one is dropped (CAs change rarely; this only bounds a churning configuration).
const MAX_CA_POOLS: usize = 64;

/// The pools, one per trusted CA (the webpki roots, or a route's
/// `upstream_ca_pem`), so connections are pooled per (upstream, CA): routes that
/// name the same upstream with different CAs never share a connection.
#[derive(Debug)]
pub struct Pools {
    default: Result<Pool, String>,
    by_ca: parking_lot::Mutex<HashMap<[u8; 32], (u64, Pool)>>,
    made: AtomicUsize,
}

fn tls_config(roots: Arc<RootCertStore>) -> Result<ClientConfig, String> {
    Ok(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS to upstreams: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

fn pool(roots: Arc<RootCertStore>) -> Result<Pool, String> {
    let config = tls_config(roots)?;
    let mut websocket_tls = config.clone();
    websocket_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.enforce_http(false);
    // SNI is the upstream's host; ALPN offers h2 and http/1.1.
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    let client = Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector);
    Ok(Pool {
        client,
        websocket_tls: Arc::new(websocket_tls),
    })
}

impl Pools {
    /// The default pool (webpki roots); CA pools are made when first needed.
    pub fn new() -> Pools {
        let roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        Pools {
            default: pool(Arc::new(roots)),
            by_ca: parking_lot::Mutex::new(HashMap::new()),
            made: AtomicUsize::new(0),
        }
    }

    /// The pool for `trust`, or why there is none (answered with 502).
    pub fn get(&self, trust: &Trust) -> Result<Pool, String> {
        let ca = match trust {
            Trust::Default => return self.default.clone(),
            Trust::Invalid(why) => return Err(why.clone()),
            Trust::Ca(ca) => ca,
        };
        let mut by_ca = self.by_ca.lock();
        if let Some((_, p)) = by_ca.get(&ca.id) {
            return Ok(p.clone());
        }
        let p = pool(ca.roots.clone())?;
        if by_ca.len() >= MAX_CA_POOLS {
            if let Some(oldest) = by_ca.iter().min_by_key(|(_, (n, _))| *n).map(|(k, _)| *k) {
                by_ca.remove(&oldest);
            }
        }
        let n = self.made.fetch_add(1, Ordering::Relaxed) as u64;
        by_ca.insert(ca.id, (n, p.clone()));
        Ok(p)
    }
}

impl Default for Pools {
    fn default() -> Self {
        Pools::new()
    }
}

/// Why a request to an upstream failed, when its certificate was refused: the
/// rustls error somewhere in `e`'s chain. An `io::Error`'s `source` skips the
/// error it wraps, so the walk steps into it instead (the TLS connectors wrap the
/// rustls error in one or two of them).
pub fn certificate_error(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(
            t @ (rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::UnsupportedNameType),
        ) = err.downcast_ref::<rustls::Error>()
        {
            return Some(t.to_string());
        }
        next = match err.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
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
            &["http://a", "ftp://b", "not a url"],
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
        assert!(f
            .pick()
            .unwrap_err()
            .contains("neither http:// nor https://"));
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

    #[test]
    fn https_upstreams_keep_their_scheme_and_the_route_s_trust() {
        let f = Forwarding::new(&route(
            RoutePath::Prefix("/".into()),
            &["https://app.internal:8443/base"],
            RouteSettings {
                allow_websockets: true,
                cors_preflight: true,
                ..RouteSettings::default()
            },
        ));
        let to = f.pick().unwrap_or_else(|e| panic!("{e}"));
        assert!(to.tls);
        assert_eq!(f.target(to, "/x", None), "https://app.internal:8443/base/x");
        assert!(f.allow_websockets && f.cors_preflight);
        assert!(matches!(f.trust, Trust::Default));
        assert!(matches!(Trust::from_pem(None), Trust::Default));
        for bad in [
            "not a certificate",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "-----BEGIN CERTIFICATE-----\nnot base64!\n",
        ] {
            assert!(
                matches!(Trust::from_pem(Some(bad)), Trust::Invalid(_)),
                "{bad}"
            );
        }
    }

    #[test]
    fn refused_certificates_are_found_behind_io_errors() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        // As tokio-rustls and then hyper-rustls wrap it.
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        let io = std::io::Error::other(io);
        let why = certificate_error(&io).unwrap_or_else(|| panic!("not found"));
        assert!(why.contains("UnknownIssuer"), "{why}");
        let other = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(certificate_error(&other), None);
    }

    #[test]
    fn pools_are_shared_per_ca() {
        let pools = Pools::new();
        assert!(pools.get(&Trust::Default).is_ok());
        assert_eq!(
            pools.get(&Trust::Invalid("bad".into())).err(),
            Some("bad".to_owned())
        );
        let ca = Arc::new(UpstreamCa {
            id: [7; 32],
            roots: Arc::new(RootCertStore::empty()),
        });
        assert!(pools.get(&Trust::Ca(ca.clone())).is_ok());
        assert!(pools.get(&Trust::Ca(ca)).is_ok());
        assert_eq!(pools.by_ca.lock().len(), 1);
    }
}
