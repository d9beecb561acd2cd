//! The request path: every request is checked at the edge, its path made canonical,
//! its route found, its caller authenticated and the route's policy decided from the
//! snapshot held, with no call to the control plane; only then is it forwarded.
//! Anything that cannot be decided is refused (fail closed).
//!
//! Authentication, in order: the connection's verified client certificate (by the
//! SHA-256 of its public key: a service account's authenticates as that account, a
//! device's identifies the device while the caller authenticates otherwise), then
//! `Authorization: Bearer` (a service account's token, looked up by its SHA-256 in
//! the snapshot, else an identity provider's JWT verified against the keys in the
//! snapshot), then the session cookie (sealed with the fleet's cookie keys), else
//! anonymous. A bearer token that verifies as nothing, or that names another
//! principal than a service account's certificate, is refused outright rather than
//! treated as anonymous. A browser that must sign in is redirected to the
//! authenticate host (see `login`).
//!
//! A WebSocket upgrade (HTTP/1.1) is decided like any request; once allowed, it is
//! sent to the upstream on a connection of its own, and only an upstream's real
//! `101 Switching Protocols` opens a tunnel, which is registered in [`Tunnels`] and
//! decided again on every new snapshot until it ends.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::Incoming;
use vigil_policy::request::{HeaderValue as PolicyHeader, Headers};
use vigil_policy::Amr;
use vigil_proto::{sole_bearer, BearerError};

use crate::clientcert::ClientCert;
use crate::conns::{Conns, UpstreamBody};
use crate::cookie::{self, CookieKeys};
use crate::decide::{decide, Facts, Principal, SessionFacts, Verdict};
use crate::edge::{self, TrustedProxies};
use crate::framing::Heads;
use crate::index::{CertificateHolder, Index};
use crate::login::{self, Login};
use crate::normalize::normalize_path;
use crate::subscriber::Shared;
use crate::tunnel::{Recheck, TunnelInfo, Tunnels};
use crate::upstream::{certificate_error, Forwarding, Pools, Trust, Upstream};

/// What every response body is: an upstream's streamed body or one of ours.
pub type ProxyBody = BoxBody<Bytes, crate::streams::BodyError>;

/// How the proxy serves requests.
#[derive(Debug, Clone, Default)]
pub struct ServeConfig {
    /// Peers whose `X-Forwarded-*` headers are believed (none by default).
    pub trusted_proxies: TrustedProxies,
    /// Keys that open session cookies; without them no cookie is accepted.
    pub cookie_keys: Option<Arc<CookieKeys>>,
    /// Whether clients reach this listener over TLS (`X-Forwarded-Proto`).
    pub tls: bool,
    /// Browser sign-in; without it browsers get 401 like API clients.
    pub login: Option<Arc<Login>>,
    /// Signs `X-Vigil-Jwt-Assertion` for upstreams; none sent without it.
    pub assertions: Option<Arc<crate::assertion::Assertions>>,
    /// Where requests and decisions are counted.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    /// How long an HTTP/1 client may take to send a request's head, counted from
    /// its first byte or from the connection going idle (see [`serve`]).
    pub header_read_timeout: Duration,
    /// How many client connections are served at once (0: no limit); see
    /// [`ConnectionLimit`].
    pub max_connections: usize,
}

/// The request handler, shared by every connection.
#[derive(Debug, Clone)]
pub struct Proxy {
    index: Shared,
    config: Arc<ServeConfig>,
    /// Pooled connections to `https://` upstreams, per trusted CA.
    pools: Arc<Pools>,
    /// Pooled connections to plain `http://` upstreams, driven by their requests.
    conns: Arc<Conns>,
    /// Open WebSocket tunnels.
    tunnels: Arc<Tunnels>,
    /// Long streaming responses, re-verified like tunnels.
    streams: Arc<crate::streams::Streams>,
}

/// What every step of one request's handling needs to answer it.
struct Ask<'a> {
    /// The request id (in every refusal and the log).
    id: &'a str,
    /// Whether refusals are pages (else problem+json).
    html: bool,
    /// Canonical host and path.
    host: &'a str,
    path: &'a str,
    /// The route serving them.
    route: &'a str,
    /// The client's address.
    peer: IpAddr,
    /// Now (Unix seconds), read once per request.
    now: i64,
    /// The connection's verified client certificate.
    client: Option<&'a ClientCert>,
    /// The device the request comes from, once authentication knows it.
    device: Option<&'a str>,
    /// The connection's place under the connection limit.
    place: &'a Place,
}

impl Ask<'_> {
    fn refuse(&self, status: StatusCode, reason: &str) -> Response<ProxyBody> {
        refusal(status, reason, self.id, self.html)
    }
}

/// Request headers as the policy reads them.
struct RequestHeaders<'a>(&'a HeaderMap);

impl Headers for RequestHeaders<'_> {
    fn get(&self, name: &str) -> PolicyHeader<'_> {
        let mut values = self.0.get_all(name).iter();
        match (values.next(), values.next()) {
            (None, _) => PolicyHeader::Absent,
            (Some(v), None) => v.to_str().map_or(PolicyHeader::Repeated, PolicyHeader::One),
            _ => PolicyHeader::Repeated,
        }
    }
}

/// Who the request came from, after authentication.
enum Caller {
    Anonymous,
    /// A service account, with its token's SHA-256 when a token authenticated it
    /// (computed once, at authentication; `None` for a client certificate).
    ServiceAccount(String, Option<[u8; 32]>),
    User(cookie::SessionCookie, Amr),
    /// A user by an identity provider's bearer JWT: the user's id, and the token.
    Token(String, Box<crate::jwt::Verified>),
}

impl Caller {
    fn principal(&self) -> Principal<'_> {
        match self {
            Caller::Anonymous => Principal::Anonymous,
            Caller::ServiceAccount(id, _) => Principal::ServiceAccount { id },
            Caller::User(s, amr) => Principal::User {
                id: &s.uid,
                session: Some(SessionFacts {
                    id: &s.sid,
                    auth_time: s.auth_time,
                    expires_at: s.exp,
                    amr: *amr,
                }),
                email: s.email.as_deref(),
                email_verified: s.ev,
                claim_groups: &s.groups,
                claims_at: s.iat,
                claims: None,
            },
            Caller::Token(id, t) => Principal::User {
                id,
                session: None,
                email: t.email.as_deref(),
                email_verified: t.email_verified,
                claim_groups: &t.groups,
                // A token's own claims stand for its (short) lifetime.
                claims_at: i64::MAX,
                claims: Some(&t.claims),
            },
        }
    }

    /// The user's id, for a user however authenticated.
    fn user_id(&self) -> Option<&str> {
        match self {
            Caller::User(s, _) => Some(&s.uid),
            Caller::Token(id, _) => Some(id),
            Caller::Anonymous | Caller::ServiceAccount(..) => None,
        }
    }

    /// For the decision log: never a token or a cookie.
    fn describe(&self) -> String {
        match self {
            Caller::Anonymous => "anonymous".into(),
            Caller::ServiceAccount(id, _) => format!("service-account:{id}"),
            Caller::User(s, _) => format!("user:{}", s.uid),
            Caller::Token(id, t) => format!("user:{id} (token from {})", t.provider),
        }
    }
}

fn now_s() -> i64 {
    crate::clock::now()
}

/// A fresh request id: 16 random bytes, hex. The bytes come from the system RNG in
/// blocks of [`ID_BLOCK`] ids per thread, so a request costs no system call.
fn request_id() -> String {
    use ring::rand::SecureRandom as _;
    use std::cell::RefCell;
    thread_local! {
        static IDS: RefCell<(usize, [u8; 16 * ID_BLOCK])> =
            const { RefCell::new((16 * ID_BLOCK, [0; 16 * ID_BLOCK])) };
    }
    IDS.with_borrow_mut(|(used, block)| {
        if *used >= block.len() {
            // The system RNG failing leaves zeros: an id that is not unique, nothing worse.
            block.fill(0);
            let _ = ring::rand::SystemRandom::new().fill(block);
            *used = 0;
        }
        let id = vigil_policy::to_hex(&block[*used..*used + 16]);
        *used += 16;
        id
    })
}

/// Request ids drawn from the system RNG at once, per thread.
const ID_BLOCK: usize = 256;

pub(crate) fn full(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<ProxyBody> {
    let mut res = Response::new(
        Full::new(body.into())
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *res.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        res.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// Whether the client is a browser that wants a page (else it gets JSON).
fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A refusal: problem+json for APIs, a small page for browsers, always with the
/// request id so that an admin can find the decision in the log.
pub(crate) fn refusal(
    status: StatusCode,
    reason: &str,
    request_id: &str,
    html: bool,
) -> Response<ProxyBody> {
    let title = status.canonical_reason().unwrap_or("Refused");
    let mut res = if html {
        full(
            status,
            "text/html; charset=utf-8",
            format!(
                "<!doctype html><html><head><meta charset=\"utf-8\"><title>{code} {title}</title></head>\
                 <body><h1>{code} {title}</h1><p>{}</p><p>Request id: <code>{request_id}</code></p></body></html>\n",
                escape_html(reason),
                code = status.as_u16(),
            ),
        )
    } else {
        full(
            status,
            "application/problem+json",
            serde_json::json!({
                "type": "about:blank",
                "title": title,
                "status": status.as_u16(),
                "detail": reason,
                "request_id": request_id,
            })
            .to_string(),
        )
    };
    if let Ok(v) = HeaderValue::from_str(request_id) {
        res.headers_mut().insert(X_REQUEST_ID, v);
    }
    res
}

impl Proxy {
    /// A handler reading the index that `index` holds (the subscriber swaps it).
    pub fn new(index: Shared, config: ServeConfig) -> Proxy {
        Proxy {
            streams: crate::streams::Streams::new(index.clone(), config.metrics.clone()),
            index,
            tunnels: Tunnels::new(config.metrics.clone()),
            config: Arc::new(config),
            pools: Arc::new(Pools::new()),
            conns: {
                let conns = Conns::new();
                if tokio::runtime::Handle::try_current().is_ok() {
                    conns.reap_in_background();
                }
                conns
            },
        }
    }

    /// The WebSocket tunnels this proxy holds open (to list or close them, or to
    /// [`Tunnels::follow`] the subscriber's version watch).
    pub fn tunnels(&self) -> &Arc<Tunnels> {
        &self.tunnels
    }

    /// The long streaming responses being re-verified (to list them, or to
    /// [`Tunnels::follow`] the subscriber's version watch).
    pub fn streams(&self) -> &Arc<Tunnels> {
        &self.streams.registry
    }

    /// Handles one request on connection `conn`; never fails (errors become
    /// responses).
    pub async fn handle(&self, req: Request<Incoming>, conn: &Connection) -> Response<ProxyBody> {
        let started = Instant::now();
        let id = request_id();
        let (res, log) = self
            .decide_and_forward(req, conn.peer, conn.client.as_deref(), &conn.place, &id)
            .await;
        let elapsed = started.elapsed();
        let elapsed_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        if let Some(m) = &self.config.metrics {
            m.request(
                log.decision,
                log.route.as_deref(),
                res.status().as_u16(),
                elapsed.as_secs_f64(),
            );
        }
        tracing::info!(
            target: "vigil::decision",
            request_id = %id,
            route = log.route.as_deref().unwrap_or("-"),
            principal = %log.principal,
            device = log.device.as_deref().unwrap_or("-"),
            decision = log.decision,
            rule = log.rule.as_deref().unwrap_or("-"),
            reason = log.reason.as_deref().unwrap_or("-"),
            status = res.status().as_u16(),
            latency_us = elapsed_us,
            "decision"
        );
        res
    }

    async fn decide_and_forward(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        client: Option<&ClientCert>,
        place: &Place,
        id: &str,
    ) -> (Response<ProxyBody>, DecisionLog) {
        let mut log = DecisionLog::default();
        let (mut parts, body) = req.into_parts();
        let html = wants_html(&parts.headers);
        // Only HTTP/1.1 upgrades (HTTP/2's extended CONNECT is not served).
        let websocket =
            parts.version == http::Version::HTTP_11 && edge::is_websocket_upgrade(&parts.headers);
        // 1. The edge: a malformed request is refused before anything reads it.
        let host = match edge::check(&parts) {
            Ok(h) => h,
            Err(e) => {
                log.refuse("edge", e.to_string());
                let mut res = refusal(e.status(), &e.to_string(), id, html);
                if e.closes_connection() {
                    res.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                return (res, log);
            }
        };
        // 2. One canonical path for the route match, the policy and the upstream.
        let path = match normalize_path(parts.uri.path()) {
            Ok(p) => p,
            Err(e) => {
                log.refuse("path", e.to_string());
                return (
                    refusal(StatusCode::BAD_REQUEST, &e.to_string(), id, html),
                    log,
                );
            }
        };
        // 3. No snapshot, nothing is protected: refuse everything.
        let index = self.index.load_full();
        if index.version() == 0 {
            let reason = "no policy snapshot yet";
            log.refuse("no-snapshot", reason.into());
            let mut res = refusal(StatusCode::SERVICE_UNAVAILABLE, reason, id, html);
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            return (res, log);
        }
        // The assertion's public keys, on every host.
        if path == crate::assertion::JWKS_PATH {
            if let Some(a) = &self.config.assertions {
                log.decision = "jwks";
                let mut res = full(StatusCode::OK, "application/json", a.jwks().to_owned());
                res.headers_mut().insert(
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("public, max-age=300"),
                );
                return (res, log);
            }
        }
        // The proxy's own endpoints: sign-in on the authenticate host, the
        // handoff and sign-out on every host.
        let on_auth = self
            .config
            .login
            .as_ref()
            .is_some_and(|l| l.is_authenticate_host(&host));
        if on_auth || path.starts_with(login::PREFIX) {
            log.decision = "sign-in";
            let res = match &self.config.login {
                Some(login) => {
                    let asked = login::Asked {
                        host: &host,
                        path: &path,
                        query: parts.uri.query(),
                        headers: &parts.headers,
                        now: now_s(),
                        id,
                        html,
                    };
                    login.serve(&index, &asked).await
                }
                None => refusal(
                    StatusCode::NOT_FOUND,
                    "sign-in is not configured on this proxy",
                    id,
                    html,
                ),
            };
            return (res, log);
        }
        let Some(route) = index.routes.find(&host, &path) else {
            log.refuse("no-route", format!("no route for {host}{path}"));
            return (
                refusal(
                    StatusCode::NOT_FOUND,
                    "no route serves this address",
                    id,
                    html,
                ),
                log,
            );
        };
        log.route = Some(route.to_owned());
        // Servers that drop path parameters (Tomcat, Jetty) would serve
        // `/admin;x/panel` as `/admin/panel`: a path whose route changes without
        // its parameters is refused rather than decided as the other route.
        if path.contains(';')
            && index
                .routes
                .find(&host, &crate::normalize::without_params(&path))
                != Some(route)
        {
            let reason = "the path's parameters (`;`) change which route serves it";
            log.refuse("path", reason.into());
            return (refusal(StatusCode::BAD_REQUEST, reason, id, html), log);
        }
        let ask = Ask {
            id,
            html,
            host: &host,
            path: &path,
            route,
            peer: peer.ip(),
            now: now_s(),
            client,
            device: None,
            place,
        };
        edge::strip_inbound(
            &mut parts.headers,
            self.config.trusted_proxies.trusts(ask.peer),
        );
        if !websocket {
            parts.headers.remove(header::UPGRADE);
        }
        // A CORS preflight, on a route that opted in, goes on unauthenticated: the
        // upstream answers it (browsers send no credentials on a preflight).
        // The route's forwarding, looked up once for the preflight and for step 6.
        let route_forwarding = index.policies.get(route).map(|r| &r.forwarding);
        if let Some(forwarding) =
            route_forwarding.filter(|f| f.cors_preflight && is_cors_preflight(&parts, &body))
        {
            log.decision = "allow";
            log.rule = Some("cors-preflight".into());
            let res = self
                .forward_preflight(&index, forwarding, parts, body, &ask)
                .await;
            return (res, log);
        }
        // 4. Who is asking: the certificate's holder first.
        let now = ask.now;
        let holder = client.and_then(|c| index.certificate_holder(&c.spki_sha256));
        let caller = match self.authenticate(&index, &parts.headers, &host, now, holder) {
            Ok(c) => c,
            Err(reason) => {
                let res = self
                    .sign_in_first(&parts, false)
                    .unwrap_or_else(|| unauthorized(&ask, &reason, true));
                log.refuse("unauthenticated", reason);
                return (res, log);
            }
        };
        log.principal = caller.describe();
        // A device's certificate, proven on this connection, names the device over a
        // session's sign-in record.
        let device_id: Option<String> = match (holder, &caller) {
            (Some(CertificateHolder::Device(d)), _) => Some(d.to_owned()),
            (_, Caller::User(s, _)) => s.did.clone(),
            _ => None,
        };
        log.device.clone_from(&device_id);
        let ask = Ask {
            device: device_id.as_deref(),
            ..ask
        };
        // 5. The route's policy, with everything the request says.
        let verdict = decide(
            &index,
            route,
            caller.principal(),
            Facts {
                method: parts.method.as_str(),
                path: &path,
                headers: &RequestHeaders(&parts.headers),
                source_ip: Some(ask.peer),
                now,
                device_id: ask.device,
                client_certificate: client.map(ClientCert::facts),
            },
        );
        match verdict {
            Verdict::Allow { rule } => {
                log.decision = "allow";
                log.rule = Some(rule);
                if let (Caller::User(s, _), Some(login)) = (&caller, &self.config.login) {
                    login.note_use(s, ask.now);
                }
            }
            Verdict::Deny { reason, rule } => {
                log.decision = "deny";
                log.rule = rule;
                let res = ask.refuse(StatusCode::FORBIDDEN, &reason);
                log.reason = Some(reason);
                return (res, log);
            }
            Verdict::Unauthenticated {
                reason,
                reauthenticate,
            } => {
                let invalid = !matches!(caller, Caller::Anonymous);
                let browser = matches!(caller, Caller::Anonymous | Caller::User(..));
                let res = browser
                    .then(|| self.sign_in_first(&parts, reauthenticate))
                    .flatten()
                    .unwrap_or_else(|| unauthorized(&ask, &reason, invalid));
                log.refuse("unauthenticated", reason);
                return (res, log);
            }
        }
        // 6. Forward (`decide` allowed only a route it has a policy for).
        let Some(forwarding) = route_forwarding else {
            return (
                ask.refuse(StatusCode::BAD_GATEWAY, "the route is gone"),
                log,
            );
        };
        if websocket {
            if !forwarding.allow_websockets {
                let reason =
                    "WebSocket upgrades are off for this route (settings.allow_websockets)";
                log.decision = "deny";
                log.reason = Some(reason.into());
                return (ask.refuse(StatusCode::FORBIDDEN, reason), log);
            }
            let res = self
                .forward_websocket(&index, forwarding, parts, body, &ask, caller)
                .await;
            return (res, log);
        }
        // What deciding this request again takes, should its response last: kept
        // by value (the headers only when the policy reads them).
        let method = parts.method.clone();
        let headers = if index.policies.get(route).is_some_and(|r| r.reads_headers) {
            parts.headers.clone()
        } else {
            HeaderMap::new()
        };
        let res = match self
            .forward(&index, forwarding, parts, body, &ask, &caller)
            .await
        {
            Ok(res) => res,
            Err(refused) => return (refused, log),
        };
        let (head, body) = res.into_parts();
        let decided = index.version();
        let peer = ask.peer;
        let later = Decided {
            again: Again {
                caller,
                client_certificate: ask.client.cloned(),
                signed_out: self.config.login.clone(),
                route: String::new(),
                host,
                path,
                method,
                headers,
                peer,
                websocket: false,
            },
            request_id: RequestId::of(id),
            index: Some(index),
        };
        let body = crate::streams::Watched::new(body, &head, self.streams.clone(), later, decided);
        (Response::from_parts(head, body.boxed()), log)
    }

    /// The caller, or why its credential is refused. `holder` is whom the
    /// connection's client certificate names: a service account's certificate
    /// authenticates as that account (a bearer token alongside must be the same
    /// account's; a session cookie, which browsers send unasked, is not read).
    fn authenticate(
        &self,
        index: &Index,
        headers: &HeaderMap,
        host: &str,
        now: i64,
        holder: Option<CertificateHolder<'_>>,
    ) -> Result<Caller, String> {
        let by_certificate = match holder {
            Some(CertificateHolder::ServiceAccount(sa)) => Some(sa),
            _ => None,
        };
        // The edge refused a repeated Authorization: `NotOne` means none.
        match sole_bearer(headers) {
            Ok(token) => {
                let by_token = index.service_account_and_hash(token);
                if let Some(sa) = by_certificate {
                    if by_token.map(|(id, _)| id) != Some(sa) {
                        return Err(format!(
                            "the client certificate authenticates service account `{sa}`; the bearer token is not that account's"
                        ));
                    }
                }
                if let Some((sa, hash)) = by_token {
                    return Ok(Caller::ServiceAccount(sa.to_owned(), Some(hash)));
                }
                if !crate::jwt::looks_like_jwt(token) {
                    return Err("the bearer token is not valid".into());
                }
                let t = crate::jwt::verify(&index.issuers, token)?;
                let id = crate::login::find_user(index, &t.issuer, &t.subject)
                    .unwrap_or_else(|| vigil_snapshot::provisioned_user_id(&t.issuer, &t.subject));
                return Ok(Caller::Token(id, Box::new(t)));
            }
            Err(BearerError::NotOne) => {}
            Err(BearerError::Malformed) => {
                return Err("the Authorization header is not text".into())
            }
            Err(BearerError::NotBearer) => return Err("use `Authorization: Bearer <token>`".into()),
        }
        if let Some(sa) = by_certificate {
            return Ok(Caller::ServiceAccount(sa.to_owned(), None));
        }
        if let Some(keys) = &self.config.cookie_keys {
            if let Some(value) = cookie::session_value(headers) {
                // A cookie that does not open is no credential: sign in again.
                return match keys.open(value, host, now) {
                    Ok(s)
                        if self
                            .config
                            .login
                            .as_ref()
                            .is_some_and(|l| l.is_signed_out(&s.sid)) =>
                    {
                        Err("the session was signed out".into())
                    }
                    Ok(s) => {
                        let amr = Amr::from_values(s.amr.iter().map(String::as_str));
                        Ok(Caller::User(s, amr))
                    }
                    Err(e) => Err(format!("the session cookie is not valid ({e})")),
                };
            }
        }
        Ok(Caller::Anonymous)
    }

    /// For a browser's page load (`GET`/`HEAD` asking for HTML) when sign-in is
    /// configured: the redirect that signs the user in and brings them back here.
    fn sign_in_first(
        &self,
        parts: &http::request::Parts,
        reauth: bool,
    ) -> Option<Response<ProxyBody>> {
        let login = self.config.login.as_ref()?;
        let page_load = matches!(parts.method, http::Method::GET | http::Method::HEAD)
            && wants_html(&parts.headers);
        if !page_load {
            return None;
        }
        let authority = match parts.uri.authority() {
            Some(a) => a.as_str(),
            None => parts.headers.get(header::HOST)?.to_str().ok()?,
        };
        let scheme = if self.config.tls { "https" } else { "http" };
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        Some(login.redirect_to_sign_in(&format!("{scheme}://{authority}{path}"), reauth))
    }

    /// Sends an allowed request on to one of the route's upstreams; its response, or
    /// the refusal to give instead.
    async fn forward(
        &self,
        index: &Index,
        forwarding: &Forwarding,
        mut parts: http::request::Parts,
        body: Incoming,
        ask: &Ask<'_>,
        caller: &Caller,
    ) -> Result<Response<UpstreamBody>, Response<ProxyBody>> {
        let upstream = match self.outbound(index, forwarding, &mut parts, ask, caller) {
            Ok(u) => u,
            Err((status, reason)) => return Err(ask.refuse(status, reason)),
        };
        let mut res = self.send(forwarding, upstream, parts, body, ask).await?;
        edge::strip_inbound(res.headers_mut(), true);
        cookie::strip_own_set_cookies(res.headers_mut());
        Ok(res)
    }

    /// Sends a readied request to `upstream` through the pool for its trust, within
    /// the route's timeout; a failure comes back as the response to give instead.
    async fn send(
        &self,
        forwarding: &Forwarding,
        upstream: &Upstream,
        parts: http::request::Parts,
        body: Incoming,
        ask: &Ask<'_>,
    ) -> Result<Response<UpstreamBody>, Response<ProxyBody>> {
        // `https://` through hyper's pooled client for the route's trust; plain
        // `http://` on a connection of our own.
        let pool = if upstream.tls {
            let pool = self.pools.get(&forwarding.trust);
            Some(pool.map_err(|reason| ask.refuse(StatusCode::BAD_GATEWAY, &reason))?)
        } else {
            None
        };
        let req = Request::from_parts(parts, body);
        let sending = async {
            match pool {
                Some(pool) => Ok(pool
                    .client
                    .request(req.map(edge::WithoutTrailers))
                    .await?
                    .map(UpstreamBody::from)),
                None => self.conns.send(upstream, req).await,
            }
        };
        match tokio::time::timeout(forwarding.timeout, sending).await {
            Ok(Ok(res)) => Ok(res),
            Ok(Err(e)) => Err(upstream_failed(ask, &*e)),
            Err(_) => Err(ask.refuse(
                StatusCode::GATEWAY_TIMEOUT,
                "the upstream did not answer in time",
            )),
        }
    }

    /// Forwards an unauthenticated CORS preflight as a preflight and nothing more:
    /// only the preflight's own headers go (no cookies, no credentials, none of the
    /// route's `set_request_headers`, no body), and only the status and the
    /// `Access-Control-*` and `Vary` headers come back, so the route's content can
    /// never be read or changed through it.
    async fn forward_preflight(
        &self,
        index: &Index,
        forwarding: &Forwarding,
        mut parts: http::request::Parts,
        body: Incoming,
        ask: &Ask<'_>,
    ) -> Response<ProxyBody> {
        const KEEP: &[&str] = &[
            "host",
            "origin",
            "access-control-request-method",
            "access-control-request-headers",
            "access-control-request-private-network",
            "user-agent",
            "accept",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
        ];
        let upstream = match self.outbound(index, forwarding, &mut parts, ask, &Caller::Anonymous) {
            Ok(u) => u,
            Err((status, reason)) => return ask.refuse(status, reason),
        };
        let drop: Vec<HeaderName> = parts
            .headers
            .keys()
            .filter(|k| !KEEP.contains(&k.as_str()))
            .cloned()
            .collect();
        for name in drop {
            parts.headers.remove(name);
        }
        let res = match self.send(forwarding, upstream, parts, body, ask).await {
            Ok(res) => res,
            Err(refused) => return refused,
        };
        let mut out = Response::new(
            Empty::<Bytes>::new()
                .map_err(|never: Infallible| match never {})
                .boxed(),
        );
        *out.status_mut() = res.status();
        for (name, value) in res.headers() {
            let n = name.as_str();
            if n.starts_with("access-control-") || n == "vary" {
                out.headers_mut().append(name.clone(), value.clone());
            }
        }
        out
    }

    /// Sends an allowed WebSocket upgrade to one of the route's upstreams on a
    /// connection of its own (HTTP/1.1, whatever the pool negotiates), and opens a
    /// tunnel only when the upstream answers `101 Switching Protocols`; any other
    /// answer goes back as a plain response. The tunnel is registered with what
    /// decides `caller`'s request again, and closed when that no longer allows it.
    async fn forward_websocket(
        &self,
        index: &Index,
        forwarding: &Forwarding,
        mut parts: http::request::Parts,
        body: Incoming,
        ask: &Ask<'_>,
        caller: Caller,
    ) -> Response<ProxyBody> {
        let Some(from_client) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
            return ask.refuse(
                StatusCode::BAD_REQUEST,
                "this connection cannot be upgraded",
            );
        };
        // The request as the policy saw it, to decide it again later.
        let method = parts.method.clone();
        let headers = parts.headers.clone();
        let upstream = match self.outbound(index, forwarding, &mut parts, ask, &caller) {
            Ok(u) => u,
            Err((status, reason)) => return ask.refuse(status, reason),
        };
        let pool = match self.pools.get(trust_for(forwarding, upstream)) {
            Ok(p) => p,
            Err(reason) => return ask.refuse(StatusCode::BAD_GATEWAY, &reason),
        };
        // A connection of our own speaks origin-form.
        let Ok(origin) = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse::<Uri>()
        else {
            return ask.refuse(StatusCode::BAD_REQUEST, "the request target is not valid");
        };
        parts.uri = origin;
        let req = Request::from_parts(parts, body);
        let sent = tokio::time::timeout(
            forwarding.timeout,
            send_upgrade(upstream, pool.websocket_tls.clone(), req),
        )
        .await;
        let mut res = match sent {
            Ok(Ok(res)) => res,
            Ok(Err(e)) => return upstream_failed(ask, e.as_ref()),
            Err(_) => {
                return ask.refuse(
                    StatusCode::GATEWAY_TIMEOUT,
                    "the upstream did not answer in time",
                )
            }
        };
        if res.status() != StatusCode::SWITCHING_PROTOCOLS {
            // No switch, no tunnel: an ordinary response.
            let (mut parts, body) = res.into_parts();
            edge::strip_inbound(&mut parts.headers, true);
            cookie::strip_own_set_cookies(&mut parts.headers);
            parts.headers.remove(header::UPGRADE);
            return Response::from_parts(
                parts,
                body.map_err(crate::streams::BodyError::from).boxed(),
            );
        }
        if !edge::is_websocket_upgrade(res.headers()) {
            // A switch to anything else (`h2c`, say) would leave a tunnel carrying
            // requests that no one decides.
            return ask.refuse(
                StatusCode::BAD_GATEWAY,
                "the upstream switched to a protocol other than WebSocket",
            );
        }
        let from_upstream = hyper::upgrade::on(&mut res);
        let (mut head, _) = res.into_parts();
        edge::strip_inbound(&mut head.headers, true);
        cookie::strip_own_set_cookies(&mut head.headers);
        let info = TunnelInfo {
            request_id: ask.id.to_owned(),
            route: ask.route.to_owned(),
            principal: caller.describe(),
            session: match &caller {
                Caller::User(s, _) => Some(s.sid.clone()),
                _ => None,
            },
            user: caller.user_id().map(str::to_owned),
            service_account: match &caller {
                Caller::ServiceAccount(id, _) => Some(id.clone()),
                _ => None,
            },
            device: ask.device.map(str::to_owned),
        };
        let recheck = Again {
            caller,
            client_certificate: ask.client.cloned(),
            signed_out: self.config.login.clone(),
            route: ask.route.to_owned(),
            host: ask.host.to_owned(),
            path: ask.path.to_owned(),
            method,
            headers,
            peer: ask.peer,
            websocket: true,
        }
        .into_recheck();
        let registration = self
            .tunnels
            .open(info.clone(), recheck, &self.index, index.version());
        tokio::spawn(tunnel(
            from_client,
            from_upstream,
            registration,
            info,
            self.config.metrics.clone(),
            ask.place.clone(),
        ));
        let empty = Empty::<Bytes>::new()
            .map_err(|never: Infallible| match never {})
            .boxed();
        Response::from_parts(head, empty)
    }

    /// Readies an allowed request for its upstream (picked here): the target, the
    /// identity headers, the route's header settings and `Host`. Returns the
    /// upstream, or the status and reason to refuse with.
    fn outbound<'f>(
        &self,
        index: &Index,
        forwarding: &'f Forwarding,
        parts: &mut http::request::Parts,
        ask: &Ask<'_>,
        caller: &Caller,
    ) -> Result<&'f Upstream, (StatusCode, &'static str)> {
        let upstream = forwarding
            .pick()
            .map_err(|reason| (StatusCode::BAD_GATEWAY, reason))?;
        // hyper's pooled client (https://) takes the absolute URL; a connection of
        // our own, the origin form.
        let target = if upstream.tls {
            forwarding.target(upstream, ask.path, parts.uri.query())
        } else {
            forwarding.origin_form(upstream, ask.path, parts.uri.query())
        };
        let Ok(uri) = target.parse::<Uri>() else {
            return Err((StatusCode::BAD_REQUEST, "the request target is not valid"));
        };
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;
        let h = &mut parts.headers;
        // Vigil's own credentials stay here: the upstream gets identity headers.
        if matches!(caller, Caller::ServiceAccount(..)) {
            h.remove(header::AUTHORIZATION);
        }
        cookie::for_upstream(h);
        // What the upstream learns about the request and the caller.
        append_forwarded_for(h, ask.peer);
        set(
            h,
            X_FORWARDED_PROTO,
            if self.config.tls { "https" } else { "http" },
        );
        set(h, X_FORWARDED_HOST, ask.host);
        set(h, X_REQUEST_ID, ask.id);
        if let Caller::ServiceAccount(sa, _) = caller {
            set(h, X_VIGIL_SERVICE_ACCOUNT, sa);
        }
        if let Some(device) = ask.device {
            set(h, X_VIGIL_DEVICE, device);
        }
        if let Some(uid) = caller.user_id() {
            set(h, X_VIGIL_USER, uid);
            if let Some(email) = index.users.get(uid).and_then(|u| u.email.as_deref()) {
                set(h, X_VIGIL_EMAIL, email);
            }
        }
        if let Some(assertions) = &self.config.assertions {
            if let Some(jwt) = assert_caller(assertions, index, caller, ask.host, ask.now) {
                set(h, X_VIGIL_JWT_ASSERTION, &jwt);
            }
        }
        for name in &forwarding.remove_headers {
            h.remove(name);
        }
        for (name, value) in &forwarding.set_headers {
            h.insert(name.clone(), value.clone());
        }
        if !forwarding.preserve_host {
            if let Ok(v) = HeaderValue::from_str(upstream.authority.as_str()) {
                h.insert(header::HOST, v);
            }
        } else if !h.contains_key(header::HOST) {
            // An HTTP/2 client names the host in `:authority` only.
            if let Ok(v) = HeaderValue::from_str(ask.host) {
                h.insert(header::HOST, v);
            }
        }
        Ok(upstream)
    }
}

/// Whether the request is a CORS preflight: `OPTIONS` with `Origin` and
/// `Access-Control-Request-Method`, and no body.
fn is_cors_preflight(parts: &http::request::Parts, body: &Incoming) -> bool {
    // A preflight has no body; anything with one takes the authenticated path. The
    // body itself says so (the edge has stripped `Transfer-Encoding` by now, and an
    // HTTP/2 body needs no length header at all).
    let bodiless = hyper::body::Body::is_end_stream(body);
    parts.method == http::Method::OPTIONS
        && bodiless
        && parts.headers.contains_key(header::ORIGIN)
        && parts
            .headers
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// The roots `upstream` is verified against: the route's, for `https://` only.
fn trust_for<'f>(forwarding: &'f Forwarding, upstream: &Upstream) -> &'f Trust {
    if upstream.tls {
        &forwarding.trust
    } else {
        &Trust::Default
    }
}

/// 502 for an upstream that failed, saying so clearly when its TLS certificate
/// was refused; 400 when what failed was reading the client's own body (a bad
/// chunk, say), which is no fault of the upstream's.
fn upstream_failed(ask: &Ask<'_>, e: &(dyn std::error::Error + 'static)) -> Response<ProxyBody> {
    if client_body_failed(e) {
        return ask.refuse(
            StatusCode::BAD_REQUEST,
            "the request body is malformed or was cut short",
        );
    }
    match certificate_error(e) {
        Some(why) => {
            tracing::warn!(request_id = %ask.id, route = ask.route, error = %why, "Upstream certificate refused");
            ask.refuse(
                StatusCode::BAD_GATEWAY,
                &format!("the upstream's TLS certificate was not accepted: {why}"),
            )
        }
        None => {
            tracing::warn!(request_id = %ask.id, route = ask.route, error = %e, "Upstream failed");
            ask.refuse(StatusCode::BAD_GATEWAY, "the upstream did not answer")
        }
    }
}

/// Whether `e` (from sending a request upstream) is the request body failing: a
/// hyper "user" error (the body given to the client) caused by hyper's error
/// reading that body from the client.
fn client_body_failed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            return h.is_user()
                && std::error::Error::source(h)
                    .is_some_and(|cause| cause.downcast_ref::<hyper::Error>().is_some());
        }
        next = err.source();
    }
    false
}

/// What a WebSocket's upstream connection runs over: TCP, or TLS over it.
trait UpstreamIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> UpstreamIo for T {}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Connects to `upstream` (TLS with `tls` for `https://`; SNI is its host) and
/// sends `req` on an HTTP/1.1 connection that can be upgraded.
async fn send_upgrade(
    upstream: &Upstream,
    tls: Arc<rustls::ClientConfig>,
    req: Request<Incoming>,
) -> Result<Response<Incoming>, BoxError> {
    let tcp = crate::upstream::connect(upstream).await?;
    let io: Box<dyn UpstreamIo> = if upstream.tls {
        let name = rustls::pki_types::ServerName::try_from(upstream.host().to_owned())?;
        Box::new(
            tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await?,
        )
    } else {
        Box::new(tcp)
    };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "WebSocket upstream connection ended with an error");
        }
    });
    Ok(sender.send_request(req).await?)
}

/// A request id kept by value (it is 32 hex digits).
struct RequestId([u8; 32], usize);

impl RequestId {
    fn of(id: &str) -> RequestId {
        let mut b = [0u8; 32];
        let n = id.len().min(32);
        b[..n].copy_from_slice(&id.as_bytes()[..n]);
        RequestId(b, n)
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0[..self.1]).unwrap_or("-")
    }
}

/// A forwarded request, kept with its response's body to be decided again should
/// the body last (`streams`). Holds the index it was decided on until then, to
/// name its route without copying the name for every response.
struct Decided {
    again: Again,
    request_id: RequestId,
    index: Option<Arc<Index>>,
}

impl Decided {
    /// Names the route from the index the request was decided on (once).
    fn settle(&mut self) {
        if let Some(index) = self.index.take() {
            if let Some(route) = index.routes.find(&self.again.host, &self.again.path) {
                route.clone_into(&mut self.again.route);
            }
        }
    }
}

impl crate::streams::Later for Decided {
    fn check(&mut self, index: &Index, now: i64) -> Result<(), String> {
        self.settle();
        self.again.check(index, now)
    }

    fn into_watch(mut self) -> (TunnelInfo, crate::tunnel::Recheck) {
        self.settle();
        let caller = &self.again.caller;
        let info = TunnelInfo {
            request_id: self.request_id.as_str().to_owned(),
            route: self.again.route.clone(),
            principal: caller.describe(),
            session: match caller {
                Caller::User(s, _) => Some(s.sid.clone()),
                _ => None,
            },
            user: caller.user_id().map(str::to_owned),
            service_account: match caller {
                Caller::ServiceAccount(id, _) => Some(id.clone()),
                _ => None,
            },
            device: match caller {
                Caller::User(s, _) => s.did.clone(),
                _ => None,
            },
        };
        (info, self.again.into_recheck())
    }
}

/// Everything needed to decide a tunnel's or a long response's request again.
struct Again {
    /// Who asked; a service account's token hash must still be that account's.
    caller: Caller,
    /// The connection's client certificate: a service account's (without a token)
    /// must still be that account's, a device's still names the device.
    client_certificate: Option<ClientCert>,
    signed_out: Option<Arc<Login>>,
    route: String,
    host: String,
    path: String,
    method: http::Method,
    headers: HeaderMap,
    peer: IpAddr,
    /// A WebSocket tunnel (its route must still allow WebSockets).
    websocket: bool,
}

impl Again {
    /// Decides the request again as it was decided when the tunnel opened: the
    /// credential's standing, the route that serves the address and its settings,
    /// then the route's policy at `now`.
    fn check(&self, index: &Index, now: i64) -> Result<(), String> {
        let holder = self
            .client_certificate
            .as_ref()
            .and_then(|c| index.certificate_holder(&c.spki_sha256));
        match &self.caller {
            Caller::ServiceAccount(id, token_sha256) => {
                let (holder, credential) = match token_sha256.as_ref() {
                    Some(h) => (index.tokens.get(&h[..]).map(|t| t.id.as_str()), "token"),
                    None => match holder {
                        Some(CertificateHolder::ServiceAccount(sa)) => (Some(sa), "certificate"),
                        _ => (None, "certificate"),
                    },
                };
                if holder != Some(id.as_str()) {
                    return Err(format!(
                        "the service account's {credential} is no longer valid"
                    ));
                }
            }
            Caller::User(s, _) => {
                if self
                    .signed_out
                    .as_ref()
                    .is_some_and(|l| l.is_signed_out(&s.sid))
                {
                    return Err("the session was signed out".into());
                }
            }
            Caller::Token(_, t) => {
                if crate::jwt::expired(&t.claims, now) {
                    return Err("the bearer token has expired".into());
                }
            }
            Caller::Anonymous => {}
        }
        if index.routes.find(&self.host, &self.path) != Some(self.route.as_str()) {
            return Err("the route no longer serves this address".into());
        }
        match index.policies.get(&self.route) {
            Some(r) if r.forwarding.allow_websockets || !self.websocket => {}
            Some(_) => return Err("the route no longer allows WebSockets".into()),
            None => return Err("the route is gone".into()),
        }
        let device_id = match (holder, &self.caller) {
            (Some(CertificateHolder::Device(d)), _) => Some(d),
            (_, Caller::User(s, _)) => s.did.as_deref(),
            _ => None,
        };
        let verdict = decide(
            index,
            &self.route,
            self.caller.principal(),
            Facts {
                method: self.method.as_str(),
                path: &self.path,
                headers: &RequestHeaders(&self.headers),
                source_ip: Some(self.peer),
                now,
                device_id,
                client_certificate: self.client_certificate.as_ref().map(ClientCert::facts),
            },
        );
        match verdict {
            Verdict::Allow { .. } => Ok(()),
            Verdict::Deny { reason, .. } | Verdict::Unauthenticated { reason, .. } => Err(reason),
        }
    }

    fn into_recheck(self) -> Recheck {
        Box::new(move |index, now| self.check(index, now))
    }
}

/// Carries bytes both ways once both sides have switched, until either side ends
/// or the registry closes the tunnel (logged as a decision, `closed`).
async fn tunnel(
    from_client: hyper::upgrade::OnUpgrade,
    from_upstream: hyper::upgrade::OnUpgrade,
    mut registration: crate::tunnel::Registration,
    info: TunnelInfo,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    // The tunnel is the client's connection still: it keeps its place under the
    // connection limit until it closes.
    _place: Place,
) {
    use hyper_util::rt::TokioIo;
    use tokio::io::AsyncWriteExt as _;
    let opened = Instant::now();
    let (client, upstream) = match tokio::try_join!(from_client, from_upstream) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(request_id = %info.request_id, error = %e, "WebSocket upgrade did not complete");
            return;
        }
    };
    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
    let closed = registration.closed.take();
    let closed_by_proxy = async move {
        match closed {
            Some(rx) => rx.await.ok(),
            None => None,
        }
    };
    let closed = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(e) = r {
                tracing::debug!(request_id = %info.request_id, error = %e, "WebSocket tunnel ended with an error");
            }
            None
        }
        Some(why) = closed_by_proxy => Some(why),
    };
    if let Some(m) = &metrics {
        m.tunnel_closed(closed.is_some());
    }
    let Some(reason) = closed else { return };
    // Unregistered and logged before either side sees the end, so whoever sees
    // the connection close finds the gauge and the decision log already told.
    drop(registration);
    crate::tunnel::log_closed(&info, &reason, 101, opened.elapsed());
    // Both sides see the connection end (the streams are not at a frame
    // boundary, so no close frame can be added).
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = client.shutdown().await;
        let _ = upstream.shutdown().await;
    })
    .await;
}

/// The signed assertion of who `caller` is, for `host`: from the cache when one
/// is there, else built from the snapshot and the caller's credential.
fn assert_caller(
    assertions: &crate::assertion::Assertions,
    index: &Index,
    caller: &Caller,
    host: &str,
    now: i64,
) -> Option<String> {
    use crate::assertion::Subject;
    use vigil_proto::v1::entry::Body;
    use vigil_snapshot::Kind;
    let body = |kind: Kind, id: &str| index.snapshot.get(kind, id).and_then(|e| e.body.as_ref());
    // A user's directory email and groups, with the credential's own added.
    let user = |uid: &str, session: Option<&str>, email: Option<&str>, claimed: &[String]| {
        let (dir_email, mut groups) = match index.users.get(uid) {
            Some(u) => (u.email.clone(), index.group_names_of(u)),
            None => (None, Vec::new()),
        };
        groups.extend(claimed.iter().cloned());
        groups.sort();
        groups.dedup();
        Subject {
            id: uid.to_owned(),
            session: session.map(str::to_owned),
            email: dir_email.or_else(|| email.map(str::to_owned)),
            groups,
        }
    };
    match caller {
        Caller::Anonymous => None,
        // Cached by session id (`ses_…`), user id (`usr_…`) or this `sub`: the
        // three never collide.
        Caller::ServiceAccount(id, _) => {
            let sub = format!("service-account:{id}");
            assertions.assert(&sub, host, now, || Subject {
                id: sub.clone(),
                session: None,
                email: None,
                groups: match body(Kind::ServiceAccount, id) {
                    Some(Body::ServiceAccount(sa)) => sa.groups.clone(),
                    _ => Vec::new(),
                },
            })
        }
        Caller::User(s, _) => assertions.assert(&s.sid, host, now, || {
            user(&s.uid, Some(&s.sid), s.email.as_deref(), &s.groups)
        }),
        Caller::Token(id, t) => assertions.assert(id, host, now, || {
            user(id, None, t.email.as_deref(), &t.groups)
        }),
    }
}

// The headers the proxy sets on every request it forwards, parsed once.
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_VIGIL_SERVICE_ACCOUNT: HeaderName = HeaderName::from_static("x-vigil-service-account");
const X_VIGIL_DEVICE: HeaderName = HeaderName::from_static("x-vigil-device");
const X_VIGIL_USER: HeaderName = HeaderName::from_static("x-vigil-user");
const X_VIGIL_EMAIL: HeaderName = HeaderName::from_static("x-vigil-email");
const X_VIGIL_JWT_ASSERTION: HeaderName = HeaderName::from_static("x-vigil-jwt-assertion");

fn set(h: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

/// Appends the client to `X-Forwarded-For` (which only a trusted peer's request
/// still carries at this point).
fn append_forwarded_for(h: &mut HeaderMap, client: IpAddr) {
    let prior: Vec<String> = h
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_owned)
        .collect();
    let value = if prior.is_empty() {
        client.to_string()
    } else {
        format!("{}, {client}", prior.join(", "))
    };
    set(h, X_FORWARDED_FOR, &value);
}

/// 401 with `WWW-Authenticate` (RFC 6750: `invalid_token` when a credential was
/// presented and refused).
fn unauthorized(ask: &Ask<'_>, reason: &str, invalid: bool) -> Response<ProxyBody> {
    let mut res = ask.refuse(StatusCode::UNAUTHORIZED, reason);
    res.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(if invalid {
            "Bearer realm=\"vigil\", error=\"invalid_token\""
        } else {
            "Bearer realm=\"vigil\""
        }),
    );
    res
}

/// What the decision log line says about one request.
struct DecisionLog {
    route: Option<String>,
    principal: String,
    /// The device, when a client certificate or the session names one.
    device: Option<String>,
    decision: &'static str,
    rule: Option<String>,
    reason: Option<String>,
}

impl Default for DecisionLog {
    fn default() -> Self {
        DecisionLog {
            route: None,
            principal: "anonymous".into(),
            device: None,
            decision: "refuse",
            rule: None,
            reason: None,
        }
    }
}

impl DecisionLog {
    fn refuse(&mut self, decision: &'static str, reason: String) {
        self.decision = decision;
        self.reason = Some(reason);
    }
}

/// Serves HTTP/1.1 and HTTP/2 on `listener` (over TLS when `tls` is given, with
/// ALPN; else plain, HTTP/2 by prior knowledge) until `shutdown` resolves, then
/// lets in-flight requests finish (up to 30 s). An HTTP/1 connection is closed
/// when a request's head has not fully arrived within the configured
/// `header_read_timeout` of the connection becoming ready for it (a client sending
/// its headers slowly, or a keep-alive connection left idle).
pub async fn serve(
    listener: tokio::net::TcpListener,
    proxy: Proxy,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let header_read_timeout = proxy.config.header_read_timeout;
    let limit = ConnectionLimit::new(proxy.config.max_connections, proxy.config.metrics.clone());
    let proxy = Arc::new(proxy);
    serve_with(
        listener,
        tls,
        header_read_timeout,
        limit,
        shutdown,
        move |peer, client, place| {
            // One reference count to bump per request, not one per part.
            let conn = Arc::new(Connection {
                proxy: proxy.clone(),
                peer,
                client,
                place,
            });
            hyper::service::service_fn(move |req: Request<Incoming>| {
                let conn = conn.clone();
                async move { Ok::<_, Infallible>(conn.proxy.handle(req, &conn).await) }
            })
        },
    )
    .await;
}

/// Serves the plain-HTTP listener that only redirects (308) to the same URL over
/// HTTPS on `https_port`; request heads must arrive within `header_read_timeout`
/// (as in [`serve`]), and at most `max_connections` are open at once (0: no limit).
pub async fn serve_redirect(
    listener: tokio::net::TcpListener,
    https_port: u16,
    header_read_timeout: Duration,
    max_connections: usize,
    shutdown: impl std::future::Future<Output = ()>,
) {
    serve_with(
        listener,
        None,
        header_read_timeout,
        ConnectionLimit::new(max_connections, None),
        shutdown,
        move |_, _, _| {
            hyper::service::service_fn(move |req: Request<Incoming>| async move {
                Ok::<_, Infallible>(redirect_to_https(&req, https_port))
            })
        },
    )
    .await;
}

/// A TLS handshake must finish in this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The most an HTTP/1 connection buffers, which bounds a request head: a longer one
/// gets 431. hyper's default is about 400 KiB per connection; HTTP/2 heads are held
/// to 16 KiB (hyper's `SETTINGS_MAX_HEADER_LIST_SIZE`), Envoy's to 60 KiB.
const H1_MAX_BUFFER: usize = crate::framing::MAX_HEAD;

/// An HTTP/2 connection is pinged after this long without a frame from the peer,
/// and closed when the ping is not answered within [`H2_PING_TIMEOUT`].
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Which HTTP a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Http {
    One,
    Two,
}

/// Which HTTP a plain-text client speaks, from its first bytes (HTTP/2's
/// connection preface or anything else), looked at without taking them; `None`
/// when the connection ends, or nothing conclusive arrives `within`.
async fn sniff_http(stream: &tokio::net::TcpStream, within: Duration) -> Option<Http> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let deadline = tokio::time::Instant::now() + within;
    let mut seen = [0u8; PREFACE.len()];
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut seen))
            .await
            .ok()?
            .ok()?;
        match n {
            0 => return None,
            n if seen[..n] != PREFACE[..n] => return Some(Http::One),
            n if n == PREFACE.len() => return Some(Http::Two),
            // Part of the preface: the rest is on its way (peeking again at once
            // would only see the same bytes).
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
    }
}

/// How many client connections a listener serves at once. Every connection holds a
/// file descriptor and buffers, and a client (or a flood of them) that opens
/// connections faster than the header timeout closes them would otherwise run the
/// process out of descriptors, and then out of the ones its upstream connections,
/// certificate reloads and snapshot stream need. At the limit a new connection is
/// closed as soon as it is accepted (as Envoy's overload manager does), so that the
/// client, or the load balancer in front, can retry on another proxy at once
/// rather than wait in the listen queue; a warning says so at most every 10 s.
/// A WebSocket tunnel counts until it closes.
#[derive(Debug)]
pub struct ConnectionLimit {
    /// One permit per connection; `None`: no limit.
    permits: Option<Arc<tokio::sync::Semaphore>>,
    max: usize,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Connections closed since the last warning, and when that was.
    refused_since_warning: u64,
    warned: Option<Instant>,
}

impl ConnectionLimit {
    /// At most `max` connections at once (0: no limit), counted in `metrics`.
    pub fn new(max: usize, metrics: Option<Arc<crate::metrics::Metrics>>) -> ConnectionLimit {
        let max = max.min(tokio::sync::Semaphore::MAX_PERMITS);
        ConnectionLimit {
            permits: (max > 0).then(|| Arc::new(tokio::sync::Semaphore::new(max))),
            max,
            metrics,
            refused_since_warning: 0,
            warned: None,
        }
    }

    /// A place for one more connection, or `None` at the limit (counted, and
    /// warned about at most every 10 s).
    fn admit(&mut self) -> Option<Admitted> {
        let permit = match &self.permits {
            Some(p) => match p.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    self.refused();
                    return None;
                }
            },
            None => None,
        };
        if let Some(m) = &self.metrics {
            m.connections_open.inc();
        }
        Some(Admitted {
            _permit: permit,
            metrics: self.metrics.clone(),
        })
    }

    fn refused(&mut self) {
        if let Some(m) = &self.metrics {
            m.connections_refused.inc();
        }
        self.refused_since_warning += 1;
        if self
            .warned
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(10))
        {
            tracing::warn!(
                max_connections = self.max,
                closed = self.refused_since_warning,
                "At the connection limit: new connections are closed as they come (VIGIL_PROXY_MAX_CONNECTIONS)"
            );
            self.warned = Some(Instant::now());
            self.refused_since_warning = 0;
        }
    }
}

/// One client connection, as every request on it sees it.
#[derive(Debug)]
pub struct Connection {
    /// The proxy serving it.
    pub proxy: Arc<Proxy>,
    /// The client's address.
    pub peer: SocketAddr,
    /// The certificate the client presented and the handshake verified, if any.
    pub client: Option<Arc<ClientCert>>,
    /// Its place under the connection limit (a WebSocket tunnel made from it
    /// holds the place on).
    pub place: Place,
}

/// A connection's place under the connection limit, shared by what serves the
/// connection: given back when the last holder (the connection's task, or a
/// WebSocket tunnel made from it) is dropped.
#[derive(Clone)]
pub struct Place {
    _held: Arc<Admitted>,
}

impl std::fmt::Debug for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Place")
    }
}

/// One admitted connection's place, given back when it is dropped.
struct Admitted {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(m) = &self.metrics {
            m.connections_open.dec();
        }
    }
}

/// The accept loop both listeners share: each connection (after its TLS handshake,
/// when `tls` is given) is served by the service `service_for(peer, client, place)`
/// makes, `client` being the certificate the client presented and the handshake
/// verified, read once here for every request on the connection, and `place` the
/// connection's place under `limit`; with upgrades, until
/// `shutdown`; then in-flight requests get up to 30 s. `header_read_timeout` is as
/// in [`serve`].
async fn serve_with<S>(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    header_read_timeout: Duration,
    mut limit: ConnectionLimit,
    shutdown: impl std::future::Future<Output = ()>,
    service_for: impl Fn(SocketAddr, Option<Arc<ClientCert>>, Place) -> S + Send + Sync + 'static,
) where
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<ProxyBody>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    // Every connection holds a receiver: a value sent asks them to finish, and the
    // channel closes once the last of them has ended.
    let (stop, stopping) = tokio::sync::watch::channel(());
    let service_for = Arc::new(service_for);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "Accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(admitted) = limit.admit() else {
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service_for = service_for.clone();
        let stopping = stopping.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            // The connection's place is held until this task ends (and by a
            // tunnel made from it, until that closes).
            let place = Place {
                _held: Arc::new(admitted),
            };
            let result = match tls {
                None => {
                    // The client's first bytes say which HTTP it speaks; a client
                    // that sends none in time is not waited for.
                    let Some(http) = sniff_http(&stream, header_read_timeout).await else {
                        tracing::debug!(%peer, "No request in time; connection closed");
                        return;
                    };
                    let service = service_for(peer, None, place.clone());
                    serve_connection(stream, service, http, header_read_timeout, stopping).await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let client = match stream.get_ref().1.peer_certificates() {
                                Some([leaf, ..]) => match ClientCert::from_der(leaf) {
                                    Ok(c) => Some(Arc::new(c)),
                                    Err(e) => {
                                        tracing::debug!(%peer, error = %e, "Client certificate unreadable; connection closed");
                                        return;
                                    }
                                },
                                _ => None,
                            };
                            // Over TLS, ALPN has settled it.
                            let http = match stream.get_ref().1.alpn_protocol() {
                                Some(b"h2") => Http::Two,
                                _ => Http::One,
                            };
                            let service = service_for(peer, client, place.clone());
                            serve_connection(stream, service, http, header_read_timeout, stopping)
                                .await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "Connection ended with an error");
            }
        });
    }
    drop(stopping);
    let _ = stop.send(());
    tokio::select! {
        () = stop.closed() => {}
        () = tokio::time::sleep(Duration::from_secs(30)) => {
            tracing::warn!("In-flight requests still running after 30 s; stopping anyway");
        }
    }
}

/// Serves one connection (plain or TLS) with HTTP/1.1 or HTTP/2, until it ends; it is
/// asked to finish gracefully (requests in flight are answered, no new ones taken)
/// when `stopping` changes or closes, and an HTTP/2 connection also once it has had
/// no stream open for `idle` (an HTTP/1 one is closed by hyper's header timeout).
async fn serve_connection<I, S>(
    io: I,
    service: S,
    http: Http,
    idle: Duration,
    mut stopping: tokio::sync::watch::Receiver<()>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<ProxyBody>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let mut builder = match http {
        Http::One => builder.http1_only(),
        Http::Two => builder.http2_only(),
    };
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(idle)
        .max_buf_size(H1_MAX_BUFFER);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    let streams = (http == Http::Two).then(|| Arc::new(OpenStreams::default()));
    // HTTP/1.1 framing followed below hyper, for what its parser settles unseen.
    let heads = (http == Http::One).then(|| Arc::new(Heads::default()));
    let service = CountStreams {
        inner: service,
        streams: streams.clone(),
        heads: heads.clone(),
    };
    let io = crate::framing::Framed::new(io, heads);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let idle = async {
        match &streams {
            Some(streams) => streams.idle_for(idle).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        ended = conn.as_mut() => return ended,
        _ = stopping.changed() => {}
        () = idle => tracing::debug!("HTTP/2 connection idle; closing it"),
    }
    conn.as_mut().graceful_shutdown();
    conn.await
}

/// The streams open on one HTTP/2 connection: a stream counts from its request's
/// head until its response body has been sent (or dropped).
#[derive(Default)]
struct OpenStreams {
    open: std::sync::atomic::AtomicUsize,
    /// How many streams have ended so far.
    ends: std::sync::atomic::AtomicU64,
    ended: tokio::sync::Notify,
}

impl OpenStreams {
    /// Counts a stream as open until the guard is dropped.
    fn opened(self: &Arc<Self>) -> StreamOpen {
        self.open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        StreamOpen(self.clone())
    }

    /// Resolves once no stream has been open for `idle`.
    async fn idle_for(&self, idle: Duration) {
        use std::sync::atomic::Ordering::SeqCst;
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.open.load(SeqCst) > 0 {
                ended.await;
                continue;
            }
            // Woken as the last stream ended: idle from now on.
            let ends = self.ends.load(SeqCst);
            tokio::time::sleep(idle).await;
            if self.open.load(SeqCst) == 0 && self.ends.load(SeqCst) == ends {
                return;
            }
        }
    }
}

/// One open stream of an [`OpenStreams`]; ends it when dropped.
struct StreamOpen(Arc<OpenStreams>);

impl Drop for StreamOpen {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.0.ends.fetch_add(1, SeqCst);
        self.0.open.fetch_sub(1, SeqCst);
        self.0.ended.notify_waiters();
    }
}

/// A connection's service that, on HTTP/2, keeps each stream counted in `streams`
/// until its response body is done and, on HTTP/1.1, marks a request whose head
/// the transport saw conflicting (`heads`).
#[derive(Clone)]
struct CountStreams<S> {
    inner: S,
    streams: Option<Arc<OpenStreams>>,
    heads: Option<Arc<Heads>>,
}

impl<S> hyper::service::Service<Request<Incoming>> for CountStreams<S>
where
    S: hyper::service::Service<
        Request<Incoming>,
        Response = Response<ProxyBody>,
        Error = Infallible,
    >,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Counted<S::Future>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        // Once the framing below hyper is no longer followed (an upgrade was
        // asked for, say), nothing after this request would be measured or
        // checked: the connection ends with its response, unless that switches.
        // The follower stops at a head before hyper hands its request over.
        let last = self.heads.as_ref().is_some_and(|heads| {
            let place = heads.mark(&mut req);
            heads.stopped_by(place)
        });
        Counted {
            open: self.streams.as_ref().map(OpenStreams::opened),
            last,
            answer: self.inner.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    /// A request being answered, with its stream counted (on HTTP/2); the count goes
    /// on into the response body.
    struct Counted<F> {
        open: Option<StreamOpen>,
        // The connection is to close after this response (unless a 101).
        last: bool,
        #[pin]
        answer: F,
    }
}

impl<F> std::future::Future for Counted<F>
where
    F: std::future::Future<Output = Result<Response<ProxyBody>, Infallible>>,
{
    type Output = Result<Response<ProxyBody>, Infallible>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let mut res = std::task::ready!(this.answer.poll(cx))?;
        if *this.last && res.status() != StatusCode::SWITCHING_PROTOCOLS {
            res.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        std::task::Poll::Ready(Ok(match this.open.take() {
            None => res,
            Some(open) => res.map(|body| WhileOpen { body, _open: open }.boxed()),
        }))
    }
}

/// A response body that keeps its stream counted as open until it is dropped.
struct WhileOpen {
    body: ProxyBody,
    _open: StreamOpen,
}

impl hyper::body::Body for WhileOpen {
    type Data = Bytes;
    type Error = crate::streams::BodyError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// 308 to the HTTPS form of `req`'s URL; 400 when its host is not a host name.
fn redirect_to_https(req: &Request<Incoming>, https_port: u16) -> Response<ProxyBody> {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
    let Some(host) = authority.as_deref().and_then(crate::routes::canonical_host) else {
        return full(StatusCode::BAD_REQUEST, "text/plain", "no valid host\n");
    };
    let port = if https_port == 443 {
        String::new()
    } else {
        format!(":{https_port}")
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{host}{port}{path}");
    let mut res = full(StatusCode::PERMANENT_REDIRECT, "text/plain", "use HTTPS\n");
    if let Ok(v) = HeaderValue::from_str(&location) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;
    use tokio::net::{TcpListener, TcpStream};

    /// Both ends of a fresh local TCP connection: (client, server).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn the_first_bytes_say_which_http_without_being_taken() {
        let short = Duration::from_millis(300);
        let (mut c, s) = pair().await;
        c.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert_eq!(sniff_http(&s, short).await, Some(Http::One));
        let mut first = [0u8; 3];
        s.peek(&mut first).await.unwrap();
        assert_eq!(&first, b"GET");
        // The preface in two parts: the second is waited for.
        let (mut c, s) = pair().await;
        c.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        let rest = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            c.write_all(b"\r\nSM\r\n\r\n").await.unwrap();
            c
        });
        assert_eq!(
            sniff_http(&s, Duration::from_secs(10)).await,
            Some(Http::Two)
        );
        drop(rest.await.unwrap());
        // Half a preface and no more, nothing at all, or a closed connection:
        // none is waited for past the limit.
        let (mut c, s) = pair().await;
        c.write_all(b"PRI * HTTP").await.unwrap();
        assert_eq!(sniff_http(&s, short).await, None);
        let (_c, s) = pair().await;
        assert_eq!(sniff_http(&s, short).await, None);
        let (c, s) = pair().await;
        drop(c);
        assert_eq!(sniff_http(&s, Duration::from_secs(10)).await, None);
    }

    #[tokio::test]
    async fn plain_listeners_serve_http2_by_prior_knowledge_and_http1() {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve_redirect(
            l,
            8443,
            Duration::from_secs(5),
            0,
            std::future::pending(),
        ));
        let ask = || {
            Request::get("http://app.test/x?y=1")
                .header(header::HOST, "app.test")
                .body(Empty::<Bytes>::new())
                .unwrap()
        };
        let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (mut h2, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        let res = h2.send_request(ask()).await.unwrap();
        assert_eq!(res.version(), http::Version::HTTP_2);
        assert_eq!(res.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(
            res.headers()[header::LOCATION],
            "https://app.test:8443/x?y=1"
        );
        let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (mut h1, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let mut req = ask();
        *req.uri_mut() = Uri::from_static("/x?y=1");
        let res = h1.send_request(req).await.unwrap();
        assert_eq!(res.version(), http::Version::HTTP_11);
        assert_eq!(res.status(), StatusCode::PERMANENT_REDIRECT);
    }

    /// A service whose `/slow` response sends "a", then "b" after `pause`; anything
    /// else gets an empty 200 at once.
    #[derive(Clone)]
    struct Slow {
        pause: Duration,
    }

    impl hyper::service::Service<Request<Incoming>> for Slow {
        type Response = Response<ProxyBody>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response<ProxyBody>, Infallible>>;

        fn call(&self, req: Request<Incoming>) -> Self::Future {
            if req.uri().path() != "/slow" {
                return std::future::ready(Ok(full(StatusCode::OK, "text/plain", "")));
            }
            let (tx, rx) = tokio::sync::mpsc::channel::<
                Result<hyper::body::Frame<Bytes>, crate::streams::BodyError>,
            >(2);
            let pause = self.pause;
            tokio::spawn(async move {
                let _ = tx
                    .send(Ok(hyper::body::Frame::data(Bytes::from("a"))))
                    .await;
                tokio::time::sleep(pause).await;
                let _ = tx
                    .send(Ok(hyper::body::Frame::data(Bytes::from("b"))))
                    .await;
            });
            let body =
                http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            std::future::ready(Ok(Response::new(body.boxed())))
        }
    }

    fn slow_service(
        pause: Duration,
    ) -> impl Fn(SocketAddr, Option<Arc<ClientCert>>, Place) -> Slow + Send + Sync + 'static {
        move |_, _, _| Slow { pause }
    }

    async fn h2_client(
        addr: SocketAddr,
    ) -> (
        hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
        tokio::task::JoinHandle<()>,
    ) {
        let io = hyper_util::rt::TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (h2, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .unwrap();
        (h2, tokio::spawn(async move { drop(conn.await) }))
    }

    /// Sends one HTTP/1.1 request on `c` and reads the answer's head (the
    /// service answers with no body) for its status, or `None` when the
    /// connection is closed first.
    async fn status_on(c: &mut TcpStream) -> Option<u16> {
        use tokio::io::AsyncReadExt as _;
        let sent = c
            .write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
            .await;
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            match tokio::time::timeout(Duration::from_secs(10), c.read(&mut byte)).await {
                Ok(Ok(0) | Err(_)) => return None,
                Ok(Ok(_)) => head.push(byte[0]),
                Err(_) => panic!("no answer and no close in 10 s"),
            }
        }
        sent.ok()?;
        std::str::from_utf8(head.get(9..12)?).ok()?.parse().ok()
    }

    #[tokio::test]
    async fn connections_over_the_limit_are_closed_at_once() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let metrics = crate::metrics::Metrics::new();
        tokio::spawn(serve_with(
            l,
            None,
            Duration::from_secs(30),
            ConnectionLimit::new(2, Some(metrics.clone())),
            std::future::pending(),
            slow_service(Duration::ZERO),
        ));
        let mut a = TcpStream::connect(addr).await.unwrap();
        let mut b = TcpStream::connect(addr).await.unwrap();
        assert_eq!(status_on(&mut a).await, Some(200));
        assert_eq!(status_on(&mut b).await, Some(200));
        // Both places taken (keep-alive): a third is closed without an answer,
        // and the two served ones go on.
        let mut c = TcpStream::connect(addr).await.unwrap();
        assert_eq!(status_on(&mut c).await, None);
        assert_eq!(status_on(&mut a).await, Some(200));
        let text = metrics.render();
        assert!(text.contains("vigil_proxy_connections_open 2"), "{text}");
        assert!(
            text.contains("vigil_proxy_connections_refused_total 1"),
            "{text}"
        );
        // Once one ends, its place is free again.
        drop(a);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !metrics.render().contains("vigil_proxy_connections_open 1") {
            assert!(
                Instant::now() < deadline,
                "the closed connection still counts"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut d = TcpStream::connect(addr).await.unwrap();
        assert_eq!(status_on(&mut d).await, Some(200));
        assert_eq!(status_on(&mut b).await, Some(200));
    }

    fn get(path: &str) -> Request<Empty<Bytes>> {
        Request::get(format!("http://app.test{path}"))
            .body(Empty::new())
            .unwrap()
    }

    #[tokio::test]
    async fn idle_http2_connections_are_closed_but_not_while_a_stream_is_open() {
        let idle = Duration::from_millis(400);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve_with(
            l,
            None,
            idle,
            ConnectionLimit::new(0, None),
            std::future::pending(),
            slow_service(idle * 4),
        ));
        // A response streaming for four idle periods is not cut.
        let (mut h2, conn) = h2_client(addr).await;
        let res = h2.send_request(get("/slow")).await.unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "ab");
        // The connection was not asked to close meanwhile (no GOAWAY): it takes more.
        let res = h2.send_request(get("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        // Then, with no stream open, the connection is closed after the idle period
        // (and not before).
        let quiet = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .expect("an idle HTTP/2 connection is closed")
            .unwrap();
        assert!(quiet.elapsed() >= idle - Duration::from_millis(50));
        // Requests keep a connection open as long as they come.
        let (mut h2, conn) = h2_client(addr).await;
        for _ in 0..6 {
            let res = h2.send_request(get("/")).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            tokio::time::sleep(idle / 2).await;
        }
        assert!(!conn.is_finished());
    }

    #[tokio::test]
    async fn shutdown_lets_responses_in_flight_finish() {
        let pause = Duration::from_millis(600);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_with(
            l,
            None,
            Duration::from_secs(30),
            ConnectionLimit::new(0, None),
            async move {
                let _ = stopped.await;
            },
            slow_service(pause),
        ));
        let (mut h2, _conn2) = h2_client(addr).await;
        let io = hyper_util::rt::TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (mut h1, conn1) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn1);
        let mut slow1 = get("/slow");
        *slow1.uri_mut() = Uri::from_static("/slow");
        let slow1 = h1.send_request(slow1).await.unwrap();
        let slow2 = h2.send_request(get("/slow")).await.unwrap();
        // Both responses have begun; the server is asked to stop.
        stop.send(()).unwrap();
        for res in [slow1, slow2] {
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "ab");
        }
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server stops once its connections have finished")
            .unwrap();
        // And takes no new connection.
        assert!(TcpStream::connect(addr).await.is_err());
    }
}
