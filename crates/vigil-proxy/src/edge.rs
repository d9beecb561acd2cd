//! Edge hardening: what a request must look like before it is authenticated, and
//! what is stripped from it before anything trusts its headers.
//!
//! Refused with 400:
//! - a header name with `_` (it may become a `-` behind the proxy and slip past
//!   a check made on the other spelling);
//! - more than one `Host` or `Authorization`;
//! - a `Host` that disagrees with the request target's authority (absolute-form on
//!   HTTP/1.1, `:authority` on HTTP/2), or a request with neither;
//! - `Content-Length` together with `Transfer-Encoding`, several `Content-Length`
//!   values that differ, or a `Transfer-Encoding` other than a final `chunked`
//!   (the connection is closed after these: request smuggling). On HTTP/1.1,
//!   hyper, which parses the head, settles `Content-Length` with `chunked` before
//!   this check could see both (`Transfer-Encoding` wins, `Content-Length` is
//!   dropped, the connection is closed after the response); the transport below
//!   hyper follows the framing and marks that request ([`crate::framing`]), which
//!   is refused here like the rest. HTTP/2 refuses `Transfer-Encoding`.
//!
//! Stripped from every request: hop-by-hop headers (`Connection` and the headers
//! it names, `Keep-Alive`, `Proxy-Connection`, `HTTP2-Settings`, `TE`, `Trailer`,
//! `Transfer-Encoding`, `Upgrade` unless the request is a WebSocket upgrade),
//! every `X-Vigil-*` header, the headers some servers take to override the method
//! or the path the policy decided on ([`OVERRIDES`]), and `X-Forwarded-*`,
//! `Forwarded` and the other headers that carry a client's address
//! ([`CLIENT_ADDRESS`]: `X-Real-IP`, `True-Client-IP`, …) unless the peer is a
//! trusted proxy (none by default). Request trailers are never forwarded
//! ([`WithoutTrailers`]).

use std::fmt;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use http::header::{self, HeaderMap, HeaderName};
use http::request::Parts;
use ipnet::IpNet;

use crate::routes::canonical_host;

/// Why a request was refused at the edge (400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeError {
    /// A header name with `_`.
    Underscore(String),
    /// `Host` or `Authorization` sent more than once.
    Duplicate(&'static str),
    /// No host at all, or one that is not a host name.
    BadHost,
    /// `Host` and the request target's authority disagree.
    HostMismatch,
    /// Conflicting or unsupported framing; the connection must be closed.
    Framing(&'static str),
    /// A head longer than the proxy serves (431); the connection is closed.
    HeadTooLarge,
}

impl EdgeError {
    /// Whether the connection must be closed after the response.
    pub fn closes_connection(&self) -> bool {
        matches!(self, EdgeError::Framing(_) | EdgeError::HeadTooLarge)
    }

    /// The status to refuse with: 431 for a head too large, else 400.
    pub fn status(&self) -> http::StatusCode {
        match self {
            EdgeError::HeadTooLarge => http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            _ => http::StatusCode::BAD_REQUEST,
        }
    }
}

impl fmt::Display for EdgeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EdgeError::Underscore(h) => write!(f, "header `{h}` has an underscore in its name"),
            EdgeError::Duplicate(h) => write!(f, "header `{h}` was sent more than once"),
            EdgeError::BadHost => f.write_str("the request has no valid host"),
            EdgeError::HostMismatch => {
                f.write_str("the Host header disagrees with the request target")
            }
            EdgeError::Framing(why) => f.write_str(why),
            EdgeError::HeadTooLarge => write!(
                f,
                "the request head is longer than {} KiB",
                crate::framing::MAX_HEAD / 1024
            ),
        }
    }
}

impl std::error::Error for EdgeError {}

/// Checks a request's head; returns its canonical host.
pub fn check(parts: &Parts) -> Result<String, EdgeError> {
    let headers = &parts.headers;
    if parts
        .extensions
        .get::<crate::framing::HeadTooLarge>()
        .is_some()
    {
        return Err(EdgeError::HeadTooLarge);
    }
    if let Some(name) = headers.keys().find(|n| n.as_str().contains('_')) {
        return Err(EdgeError::Underscore(name.as_str().to_owned()));
    }
    for (name, label) in [
        (header::HOST, "Host"),
        (header::AUTHORIZATION, "Authorization"),
    ] {
        if headers.get_all(&name).iter().nth(1).is_some() {
            return Err(EdgeError::Duplicate(label));
        }
    }
    if parts
        .extensions
        .get::<crate::framing::ConflictingFraming>()
        .is_some()
    {
        return Err(EdgeError::Framing(BOTH_LENGTHS));
    }
    framing(headers)?;
    let from_header = headers
        .get(header::HOST)
        .map(|h| {
            h.to_str()
                .ok()
                .and_then(canonical_host)
                .ok_or(EdgeError::BadHost)
        })
        .transpose()?;
    let from_target = parts
        .uri
        .authority()
        .map(|a| canonical_host(a.as_str()).ok_or(EdgeError::BadHost))
        .transpose()?;
    match (from_header, from_target) {
        (Some(h), Some(t)) if h != t => Err(EdgeError::HostMismatch),
        (Some(h), _) | (None, Some(h)) => Ok(h),
        (None, None) => Err(EdgeError::BadHost),
    }
}

/// Why a request with both `Content-Length` and `Transfer-Encoding` is refused.
const BOTH_LENGTHS: &str = "Content-Length and Transfer-Encoding were both sent";

fn framing(headers: &HeaderMap) -> Result<(), EdgeError> {
    let mut te = headers.get_all(header::TRANSFER_ENCODING).iter();
    let mut cl = headers.get_all(header::CONTENT_LENGTH).iter();
    match (te.next(), cl.next()) {
        (Some(_), Some(_)) => Err(EdgeError::Framing(BOTH_LENGTHS)),
        (None, Some(first)) if cl.any(|v| v != first) => {
            Err(EdgeError::Framing("Content-Length values disagree"))
        }
        (Some(coding), None)
            if te.next().is_some()
                || !coding
                    .to_str()
                    .is_ok_and(|c| c.trim().eq_ignore_ascii_case("chunked")) =>
        {
            Err(EdgeError::Framing(
                "Transfer-Encoding must be exactly `chunked`",
            ))
        }
        _ => Ok(()),
    }
}

/// Whether the request asks to become a WebSocket (or a `101` response says it
/// has): `Connection: upgrade` and one `Upgrade`, `websocket`. A second `Upgrade`
/// line (`h2c`, say) makes it no WebSocket upgrade at all, so that it is stripped
/// rather than sent on for the upstream to pick the other protocol.
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let connection_upgrade = headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
    });
    let mut upgrades = headers.get_all(header::UPGRADE).iter();
    let websocket = match (upgrades.next(), upgrades.next()) {
        (Some(v), None) => v
            .to_str()
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("websocket")),
        _ => false,
    };
    connection_upgrade && websocket
}

/// Peers whose `X-Forwarded-*` and `Forwarded` headers are believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(pub Vec<IpNet>);

impl TrustedProxies {
    /// Whether `peer` is one of them.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(&peer))
    }
}

/// Headers that frameworks read as the real method (Express's method-override,
/// Symfony, ASP.NET Core) or the real path (Symfony's `X-Original-URL`, IIS
/// rewrites): a `POST` with `X-HTTP-Method-Override: DELETE` would dodge a policy
/// that denies `DELETE`, a request for `/x` with `X-Original-URL: /admin` one
/// that guards `/admin`.
pub const OVERRIDES: [&str; 5] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
];

/// Headers that CDNs and load balancers use to pass on the client's address
/// beside `X-Forwarded-For`; an upstream that believes one would take a client's
/// word for its address. Like `X-Forwarded-*`, they pass only from a trusted peer.
pub const CLIENT_ADDRESS: [&str; 6] = [
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
    "x-cluster-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
];

/// Removes what no upstream or check may believe (see the module's doc). A
/// WebSocket upgrade keeps `Connection: upgrade` and `Upgrade`.
pub fn strip_inbound(headers: &mut HeaderMap, peer_trusted: bool) {
    let websocket = is_websocket_upgrade(headers);
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(websocket && n == header::UPGRADE))
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHORIZATION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        // h2c's settings: connection-specific (RFC 7540 section 3.2.1), though a
        // client may leave it out of `Connection`.
        HeaderName::from_static("http2-settings"),
    ] {
        headers.remove(n);
    }
    if websocket {
        headers.insert(
            header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
    } else {
        // h2c and any other protocol switch never pass.
        headers.remove(header::UPGRADE);
    }
    let untrusted: Vec<HeaderName> = headers
        .keys()
        .filter(|n| {
            let s = n.as_str();
            s.starts_with("x-vigil-")
                || OVERRIDES.contains(&s)
                || (!peer_trusted
                    && (s.starts_with("x-forwarded-")
                        || s == "forwarded"
                        || CLIENT_ADDRESS.contains(&s)))
        })
        .cloned()
        .collect();
    for n in untrusted {
        headers.remove(n);
    }
}

/// A request body without its trailer fields, which are never forwarded: nothing
/// checks them, and over HTTP/2 an upstream would get them as sent (`X-Vigil-*`
/// included). An HTTP/1.1 upstream gets none either way, since the `Trailer`
/// header that announces them is stripped.
#[derive(Debug)]
pub struct WithoutTrailers(pub Incoming);

impl Body for WithoutTrailers {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        loop {
            match std::task::ready!(Pin::new(&mut self.0).poll_frame(cx)) {
                Some(Ok(frame)) if frame.is_trailers() => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(target: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().uri(target);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(())
            .map(|r| r.into_parts().0)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn good_requests_pass_with_a_canonical_host() {
        assert_eq!(
            check(&parts("/x", &[("host", "App.Example.com:443")])),
            Ok("app.example.com".into())
        );
        assert_eq!(
            check(&parts("https://app.example.com/x", &[])),
            Ok("app.example.com".into())
        );
        assert_eq!(
            check(&parts(
                "https://app.example.com./x",
                &[("host", "APP.example.com")]
            )),
            Ok("app.example.com".into())
        );
        assert_eq!(
            check(&parts(
                "/x",
                &[("host", "a.example"), ("transfer-encoding", "chunked")]
            )),
            Ok("a.example".into())
        );
        assert_eq!(
            check(&parts(
                "/x",
                &[
                    ("host", "a.example"),
                    ("content-length", "3"),
                    ("content-length", "3")
                ]
            )),
            Ok("a.example".into())
        );
    }

    #[test]
    fn ambiguous_requests_are_refused() {
        let cases: Vec<(Parts, EdgeError)> = vec![
            (
                parts("/x", &[("host", "a.example"), ("x_user", "admin")]),
                EdgeError::Underscore("x_user".into()),
            ),
            (
                parts("/x", &[("host", "a.example"), ("host", "b.example")]),
                EdgeError::Duplicate("Host"),
            ),
            (
                parts(
                    "/x",
                    &[
                        ("host", "a.example"),
                        ("authorization", "Bearer a"),
                        ("authorization", "Bearer b"),
                    ],
                ),
                EdgeError::Duplicate("Authorization"),
            ),
            (parts("/x", &[]), EdgeError::BadHost),
            (parts("/x", &[("host", "a..example")]), EdgeError::BadHost),
            (
                parts("/x", &[("host", "a.example/evil")]),
                EdgeError::BadHost,
            ),
            (
                parts("https://admin.example/x", &[("host", "public.example")]),
                EdgeError::HostMismatch,
            ),
            (
                parts(
                    "/x",
                    &[
                        ("host", "a.example"),
                        ("content-length", "3"),
                        ("transfer-encoding", "chunked"),
                    ],
                ),
                EdgeError::Framing("Content-Length and Transfer-Encoding were both sent"),
            ),
            (
                parts(
                    "/x",
                    &[
                        ("host", "a.example"),
                        ("content-length", "3"),
                        ("content-length", "4"),
                    ],
                ),
                EdgeError::Framing("Content-Length values disagree"),
            ),
            (
                parts(
                    "/x",
                    &[
                        ("host", "a.example"),
                        ("transfer-encoding", "gzip, chunked"),
                    ],
                ),
                EdgeError::Framing("Transfer-Encoding must be exactly `chunked`"),
            ),
            (
                parts(
                    "/x",
                    &[
                        ("host", "a.example"),
                        ("transfer-encoding", "chunked"),
                        ("transfer-encoding", "chunked"),
                    ],
                ),
                EdgeError::Framing("Transfer-Encoding must be exactly `chunked`"),
            ),
        ];
        for (p, want) in cases {
            let got = check(&p);
            assert_eq!(got, Err(want.clone()), "{:?}", p.headers);
            assert_eq!(
                want.closes_connection(),
                matches!(want, EdgeError::Framing(_))
            );
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        parts("/", pairs).headers
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut v: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn spoofable_and_hop_by_hop_headers_are_stripped() {
        let mut h = headers(&[
            ("host", "a.example"),
            ("x-vigil-user", "admin"),
            ("X-Vigil-Jwt-Assertion", "forged"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-host", "admin.example"),
            ("forwarded", "for=10.0.0.1"),
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "s"),
            ("keep-alive", "timeout=5"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQAAP__"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic x"),
            ("x-http-method-override", "DELETE"),
            ("X-HTTP-Method", "DELETE"),
            ("x-method-override", "DELETE"),
            ("x-original-url", "/admin"),
            ("x-rewrite-url", "/admin"),
            ("X-Real-IP", "10.0.0.1"),
            ("true-client-ip", "10.0.0.1"),
            ("x-client-ip", "10.0.0.1"),
            ("x-cluster-client-ip", "10.0.0.1"),
            ("cf-connecting-ip", "10.0.0.1"),
            ("fastly-client-ip", "10.0.0.1"),
            ("accept", "*/*"),
        ]);
        strip_inbound(&mut h, false);
        assert_eq!(names(&h), ["accept", "host"]);

        let mut h = headers(&[
            ("host", "a.example"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-real-ip", "10.0.0.1"),
            ("x-vigil-user", "admin"),
        ]);
        strip_inbound(&mut h, true);
        assert_eq!(
            names(&h),
            ["host", "x-forwarded-for", "x-real-ip"],
            "a trusted peer's forwarding headers stay; X-Vigil-* never"
        );
    }

    #[test]
    fn websocket_upgrades_keep_their_upgrade() {
        let mut h = headers(&[
            ("host", "a.example"),
            ("connection", "Upgrade, x-secret"),
            ("upgrade", "websocket"),
            ("x-secret", "s"),
        ]);
        assert!(is_websocket_upgrade(&h));
        strip_inbound(&mut h, false);
        assert_eq!(names(&h), ["connection", "host", "upgrade"]);
        assert_eq!(h[header::CONNECTION], "upgrade");

        // A second protocol on its own line, or in the same one: no WebSocket,
        // and no Upgrade goes on.
        for second in [&[("upgrade", "h2c")][..], &[]] {
            let mut pairs = vec![("host", "a.example"), ("connection", "Upgrade")];
            pairs.push((
                "upgrade",
                if second.is_empty() {
                    "websocket, h2c"
                } else {
                    "websocket"
                },
            ));
            pairs.extend_from_slice(second);
            let mut h = headers(&pairs);
            assert!(!is_websocket_upgrade(&h), "{h:?}");
            strip_inbound(&mut h, false);
            assert_eq!(names(&h), ["host"]);
        }
    }

    #[test]
    fn trusted_proxies_are_by_network() {
        let t = TrustedProxies(vec!["10.0.0.0/8".parse().unwrap_or_else(|e| panic!("{e}"))]);
        assert!(t.trusts("10.1.2.3".parse().unwrap_or_else(|e| panic!("{e}"))));
        assert!(!t.trusts("192.168.1.1".parse().unwrap_or_else(|e| panic!("{e}"))));
        assert!(!TrustedProxies::default()
            .trusts("127.0.0.1".parse().unwrap_or_else(|e| panic!("{e}"))));
    }
}
