//! Sign-in, through one authenticate host for the whole fleet.
//!
//! A browser without a session on a route host is sent to the authenticate host's
//! `/.vigil/sign_in` with the URL it wanted (`rd`) and the hash of a random value
//! (`bh`) that the route host keeps in a host-bound cookie. The authenticate host
//! checks that `rd` is served by a route (no open redirect), then either reuses the
//! session it holds for the browser or signs the user in with the route's identity
//! provider: OpenID Connect authorization code with PKCE, `state` and `nonce`, the
//! ID token verified by the `openidconnect` crate (signature against the provider's
//! keys, issuer, audience, expiry, nonce). It then hands the session to the route
//! host by a code: sealed with the fleet's cookie keys for that host only, valid
//! for 60 seconds, redeemed once, and only in the browser holding the value whose
//! hash it carries. A stolen code is worthless elsewhere, and nobody can log a
//! victim in as themselves by sending them a code of their own.
//!
//! Users are found in the snapshot by (issuer, subject); one the directory does
//! not know gets an id derived from those two, and the control plane adds the user
//! when the session is reported (just-in-time). Sign-out ends the session on every
//! host and every proxy: this proxy forgets it at once, the others when the
//! revocation arrives in their next snapshot delta.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use openidconnect::core::{
    CoreAuthDisplay, CoreAuthPrompt, CoreAuthenticationFlow, CoreClaimName, CoreClaimType,
    CoreClient, CoreClientAuthMethod, CoreGrantType, CoreJsonWebKey,
    CoreJweContentEncryptionAlgorithm, CoreJweKeyManagementAlgorithm, CoreResponseMode,
    CoreResponseType, CoreSubjectIdentifierType,
};
use openidconnect::url::{form_urlencoded, Url};
use openidconnect::{
    AdditionalProviderMetadata, AuthorizationCode, ClientId, ClientSecret, CsrfToken,
    EndSessionUrl, EndpointMaybeSet, EndpointNotSet, EndpointSet, IssuerUrl,
    LogoutProviderMetadata, LogoutRequest, Nonce, OAuth2TokenResponse as _, PkceCodeChallenge,
    PkceCodeVerifier, PostLogoutRedirectUrl, ProviderMetadata, RedirectUrl, Scope,
    TokenResponse as _,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use vigil_proto::v1::entry::Body;
use vigil_proto::v1::SessionReport;
use vigil_snapshot::Kind;

use crate::cookie::{self, CookieKeys, SessionCookie};
use crate::index::Index;
use crate::normalize::normalize_path;
use crate::serve::{full, refusal, ProxyBody};

/// Every path under this prefix, on every host, is the proxy's own.
pub const PREFIX: &str = "/.vigil/";
/// The authenticate host's cookie holding a sign-in in progress.
const LOGIN_COOKIE: &str = "__Host-vigil_login";
/// A route host's cookie holding the value a handoff code must be bound to.
const BIND_COOKIE: &str = "__Host-vigil_bind";
const LOGIN_CONTEXT: &[u8] = b"vigil.login.v1\0";
const HANDOFF_CONTEXT: &[u8] = b"vigil.handoff.v1\0";
/// A sign-in must finish in this long (seconds).
const LOGIN_TTL: i64 = 600;
/// A handoff code is good for this long (seconds).
const HANDOFF_TTL: i64 = 60;
/// Provider metadata and keys are fetched again after this long.
const DISCOVERY_TTL: Duration = Duration::from_secs(3600);
/// A discovery whose refresh fails stays in use at most this long: keys the
/// provider withdrew must not stay trusted because its discovery is unreachable.
const DISCOVERY_STALE_MAX: Duration = Duration::from_secs(24 * 3600);
/// After a failed discovery, sign-ins with that provider fail at once for this
/// long (rather than each waiting out the HTTP timeout in turn).
const DISCOVERY_RETRY: Duration = Duration::from_secs(5);
/// New-session and sign-out reports that may wait for room in a full report queue.
const REPORTS_WAITING: usize = 100_000;
/// Claim groups kept in a session (the cookie must stay under 4 KiB).
const MAX_GROUPS_BYTES: usize = 1500;
/// The longest return URL: the sign-in in progress, sealed in a cookie, must
/// stay under a browser's 4 KiB, and the handoff code too.
const MAX_RETURN_URL: usize = 2048;
/// The longest handoff code: a session with its groups and a return URL, sealed
/// (it travels in a URL, not a cookie).
const MAX_CODE: usize = 8192;
/// Earlier sessions of a browser that a session carries, to end them with it.
const MAX_EARLIER: usize = 8;
/// The longest reason a refusal shows and logs.
const MAX_REASON: usize = 300;

type Client = CoreClient<
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

/// How sign-in is set up.
#[derive(Debug, Clone)]
pub struct LoginConfig {
    /// The authenticate host's public URL (`https://auth.example.com`): every proxy
    /// of the fleet serves it, and it is the redirect URI registered at the IdPs
    /// (with `/.vigil/callback`).
    pub authenticate_url: String,
    /// The ports, besides the authenticate URL's, on which browsers reach route
    /// hosts: a return URL on any other port is refused.
    pub return_ports: Vec<u16>,
    /// How long a session lasts after sign-in.
    pub session_lifetime: Duration,
}

/// What discovery says beyond OpenID Connect Discovery itself: whether the
/// provider names itself in every authorization answer (RFC 9207).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
struct IssMetadata {
    #[serde(default)]
    authorization_response_iss_parameter_supported: bool,
}

impl AdditionalProviderMetadata for IssMetadata {}

/// A discovery document, with RP-Initiated Logout's and RFC 9207's fields.
type Metadata = ProviderMetadata<
    LogoutProviderMetadata<IssMetadata>,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

/// An identity provider as discovered, with what the snapshot says of it.
struct Provider {
    /// What it was built from: rebuilt when the snapshot's entry changes.
    source: vigil_proto::v1::IdentityProvider,
    client: Client,
    /// Where to end the user's session at the provider too (OpenID Connect
    /// RP-Initiated Logout), when its discovery document names one.
    end_session: Option<EndSessionUrl>,
    /// The provider says it names itself (`iss`) in every authorization answer
    /// (RFC 9207): an answer without it is refused.
    sends_iss: bool,
    groups_claim: String,
    name_claim: String,
    fetched: Instant,
}

/// Ids seen here, each until its expiry (handoff codes redeemed, sessions signed
/// out), and the same in the order they came, so that forgetting the expired
/// ones costs nothing per use beyond them (ids come nearly in order of expiry;
/// one that expired behind a later one waits for it).
#[derive(Default)]
struct Expiring {
    ids: HashMap<String, i64>,
    order: std::collections::VecDeque<(i64, String)>,
}

impl Expiring {
    /// Whether `id` was seen (and not forgotten yet).
    fn contains(&self, id: &str) -> bool {
        self.ids.contains_key(id)
    }

    /// Records `id` (good until `exp`) as seen at `now`; false when it was
    /// already, and has not expired.
    fn first_use(&mut self, id: &str, exp: i64, now: i64) -> bool {
        while let Some((e, _)) = self.order.front() {
            if *e > now {
                break;
            }
            if let Some((e, old)) = self.order.pop_front() {
                if self.ids.get(&old) == Some(&e) {
                    self.ids.remove(&old);
                }
            }
        }
        if self.ids.get(id).is_some_and(|e| *e > now) {
            return false;
        }
        self.ids.insert(id.to_owned(), exp);
        self.order.push_back((exp, id.to_owned()));
        true
    }
}

/// What is known of one provider: its discovery, and its last failure.
#[derive(Default)]
struct ProviderSlot {
    provider: Option<Arc<Provider>>,
    /// The last discovery that failed: when, for which configuration, and why.
    failed: Option<(Instant, vigil_proto::v1::IdentityProvider, String)>,
}

/// The sign-in endpoints, and what they remember.
pub struct Login {
    /// `scheme://authority` of the authenticate host, no trailing slash.
    base: String,
    /// Its canonical host name.
    host: String,
    /// The ports a return URL may name (the authenticate URL's, and the
    /// configured ones).
    ports: Vec<u16>,
    lifetime_s: i64,
    keys: Arc<CookieKeys>,
    reports: mpsc::Sender<SessionReport>,
    /// New-session and sign-out reports waiting for room in `reports`.
    reports_waiting: Arc<AtomicUsize>,
    http: openidconnect::reqwest::Client,
    /// One slot per configured provider, each with its own lock: discovering one
    /// provider never makes sign-ins with another wait.
    providers: parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Mutex<ProviderSlot>>>>,
    /// Handoff codes redeemed here, so each works once.
    redeemed: parking_lot::Mutex<Expiring>,
    /// Sessions signed out here (until they expire), denied before the
    /// revocation comes back in a snapshot.
    signed_out: parking_lot::Mutex<Expiring>,
    /// When each session's use was last reported from here (id → Unix seconds).
    reported_use: parking_lot::Mutex<HashMap<String, i64>>,
}

/// A session's use is reported at most this often (seconds), per proxy; the
/// control plane records it at the same pace.
pub const USE_EVERY_S: i64 = 60;
/// Sessions whose last report is remembered; beyond, the memory starts again
/// (at worst, one extra report per session).
const USE_TRACKED: usize = 100_000;

impl fmt::Debug for Login {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Login").field("base", &self.base).finish()
    }
}

/// A sign-in in progress, sealed in the authenticate host's login cookie.
#[derive(Serialize, Deserialize)]
struct Pending {
    state: String,
    nonce: String,
    pkce: String,
    rd: String,
    bh: String,
    idp: String,
    started: i64,
    reauth: bool,
}

/// What a handoff code carries.
#[derive(Serialize, Deserialize)]
struct Handoff {
    s: SessionCookie,
    rd: String,
    bh: String,
    jti: String,
    exp: i64,
}

/// What the sign-in endpoints read of a request.
pub struct Asked<'a> {
    /// Canonical host.
    pub host: &'a str,
    /// Canonical path.
    pub path: &'a str,
    /// Raw query.
    pub query: Option<&'a str>,
    /// Headers.
    pub headers: &'a HeaderMap,
    /// Now (Unix seconds).
    pub now: i64,
    /// The request id.
    pub id: &'a str,
    /// Whether refusals are pages.
    pub html: bool,
}

/// A return URL that a route serves.
struct Target {
    url: String,
    origin: String,
    host: String,
    route: String,
}

fn random_hex(bytes: usize) -> String {
    use ring::rand::SecureRandom as _;
    let mut b = vec![0u8; bytes];
    // Without randomness there is no safe sign-in: the caller sees an error.
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        return String::new();
    }
    vigil_policy::to_hex(&b)
}

fn sha256_hex(s: &str) -> String {
    vigil_policy::to_hex(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()).as_ref())
}

fn params(query: Option<&str>) -> HashMap<String, String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

fn redirect(location: &str, cookies: &[String]) -> Response<ProxyBody> {
    let mut res = full(
        StatusCode::FOUND,
        "text/plain; charset=utf-8",
        "redirecting\n",
    );
    if let Ok(v) = HeaderValue::from_str(location) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    for c in cookies {
        if let Ok(v) = HeaderValue::from_str(c) {
            res.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    res
}

/// `s` with every control character replaced by `?`, cut at `max` characters.
fn printable(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .take(max)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Login {
    /// Sign-in with `keys` sealing sessions and codes; new sessions and sign-outs
    /// are reported on `reports`.
    pub fn new(
        config: LoginConfig,
        keys: Arc<CookieKeys>,
        reports: mpsc::Sender<SessionReport>,
    ) -> Result<Login, String> {
        let url = Url::parse(&config.authenticate_url)
            .map_err(|e| format!("the authenticate URL is not a URL: {e}"))?;
        if !matches!(url.scheme(), "https" | "http") || url.path() != "/" && !url.path().is_empty()
        {
            return Err("the authenticate URL must be `https://host[:port]`, with no path".into());
        }
        let authority = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            (None, _) => return Err("the authenticate URL has no host".into()),
        };
        let host = crate::routes::canonical_host(&authority)
            .ok_or("the authenticate URL's host is not a host name")?;
        let mut ports = config.return_ports.clone();
        ports.extend(url.port_or_known_default());
        let http = openidconnect::reqwest::ClientBuilder::new()
            // The OpenID library's advice: redirects followed by the client would
            // let a provider's redirect send the client secret elsewhere.
            .redirect(openidconnect::reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("cannot make the HTTP client: {e}"))?;
        Ok(Login {
            base: format!("{}://{authority}", url.scheme()),
            host,
            ports,
            lifetime_s: i64::try_from(config.session_lifetime.as_secs()).unwrap_or(i64::MAX),
            keys,
            reports,
            reports_waiting: Arc::new(AtomicUsize::new(0)),
            http,
            providers: parking_lot::Mutex::new(HashMap::new()),
            redeemed: parking_lot::Mutex::new(Expiring::default()),
            signed_out: parking_lot::Mutex::new(Expiring::default()),
            reported_use: parking_lot::Mutex::new(HashMap::new()),
        })
    }

    /// Whether `host` (canonical) is the authenticate host.
    pub fn is_authenticate_host(&self, host: &str) -> bool {
        host == self.host
    }

    /// Notes that session `s` was used (an allowed request) at `now`: reported to
    /// the control plane at most once a minute per session, for its idle timeout
    /// and the sessions' `last_seen_at`.
    pub fn note_use(&self, s: &cookie::SessionCookie, now: i64) {
        {
            let mut seen = self.reported_use.lock();
            if seen.get(&s.sid).is_some_and(|&t| now - t < USE_EVERY_S) {
                return;
            }
            if seen.len() >= USE_TRACKED {
                seen.clear();
            }
            seen.insert(s.sid.clone(), now);
        }
        self.report(session_report(s, now));
    }

    /// Whether session `sid` was signed out at this proxy.
    pub fn is_signed_out(&self, sid: &str) -> bool {
        self.signed_out.lock().contains(sid)
    }

    /// Sends a browser to sign in and come back to `here` (the URL it asked for);
    /// `reauth` asks the identity provider for a fresh sign-in.
    pub fn redirect_to_sign_in(&self, here: &str, reauth: bool) -> Response<ProxyBody> {
        let bind = random_hex(32);
        let mut location = format!(
            "{}/.vigil/sign_in?{}",
            self.base,
            form_urlencoded::Serializer::new(String::new())
                .append_pair("rd", here)
                .append_pair("bh", &sha256_hex(&bind))
                .finish()
        );
        if reauth {
            location.push_str("&reauth=1");
        }
        redirect(
            &location,
            &[cookie::set_named(BIND_COOKIE, &bind, LOGIN_TTL)],
        )
    }

    /// Serves a request for [`PREFIX`]`…` on any host.
    pub async fn serve(&self, index: &Index, a: &Asked<'_>) -> Response<ProxyBody> {
        let on_auth = self.is_authenticate_host(a.host);
        let result = match a.path.strip_prefix(PREFIX).unwrap_or("") {
            "sign_in" if on_auth => self.sign_in(index, a).await,
            "callback" if on_auth => self.callback(index, a).await,
            "handoff" if !on_auth => self.handoff(index, a),
            "sign_out" => Ok(self.sign_out(index, a).await),
            "signed_out" if on_auth => Ok(signed_out_page(None)),
            _ => Err((StatusCode::NOT_FOUND, "no such sign-in endpoint".to_owned())),
        };
        result.unwrap_or_else(|(status, reason)| {
            // Reasons quote what the request (or the provider's answer) said: no
            // control character may forge a log line, and no length fill a page.
            let reason = printable(&reason, MAX_REASON);
            tracing::info!(request_id = %a.id, host = a.host, path = a.path, reason = %reason, "Sign-in refused");
            refusal(status, &reason, a.id, a.html)
        })
    }

    /// The session this host's cookie holds, if it is still good here.
    fn session_on(&self, index: &Index, a: &Asked<'_>) -> Option<SessionCookie> {
        let s = self
            .keys
            .open(cookie::session_value(a.headers)?, a.host, a.now)
            .ok()?;
        let revoked = index.snapshot.get(Kind::RevokedSession, &s.sid).is_some();
        (!revoked && !self.is_signed_out(&s.sid)).then_some(s)
    }

    /// Checks a return URL: absolute, over the scheme the fleet serves, and served
    /// by a route. Anything else would make the sign-in an open redirect.
    fn check_return(&self, index: &Index, rd: &str) -> Result<Target, String> {
        let bad = |why: &str| Err(format!("the return URL is refused: {why}"));
        if rd.len() > MAX_RETURN_URL {
            return bad("it is too long");
        }
        let Ok(url) = Url::parse(rd) else {
            return bad("not an absolute URL");
        };
        let scheme = url.scheme();
        if !(scheme == "https" || scheme == "http" && self.base.starts_with("http://")) {
            return bad("it must use https");
        }
        if !url.username().is_empty() || url.password().is_some() {
            return bad("it must not carry credentials");
        }
        let authority = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            (None, _) => return bad("it has no host"),
        };
        let Some(host) = crate::routes::canonical_host(&authority) else {
            return bad("its host is not a host name");
        };
        // Another port of a route host's name may be another service, which
        // would receive the handoff code (and the browser's bind cookie).
        if !url
            .port_or_known_default()
            .is_some_and(|p| self.ports.contains(&p))
        {
            return bad("its port is not one the fleet serves");
        }
        let Ok(path) = normalize_path(url.path()) else {
            return bad("its path is not valid");
        };
        let Some(route) = index.routes.find(&host, &path) else {
            return bad("no route serves it");
        };
        if url.as_str().len() > MAX_RETURN_URL {
            return bad("it is too long");
        }
        Ok(Target {
            url: url.to_string(),
            origin: format!("{scheme}://{authority}"),
            host,
            route: route.to_owned(),
        })
    }

    /// The identity provider of `route`: its own, else the only one there is.
    fn provider_for(index: &Index, route: &str) -> Result<String, String> {
        if let Some(name) = index
            .policies
            .get(route)
            .and_then(|r| r.identity_provider.clone())
        {
            return Ok(name);
        }
        let mut all = index.snapshot.of_kind(Kind::IdentityProvider);
        match (all.next(), all.next()) {
            (Some(only), None) => Ok(only.id.clone()),
            (None, _) => Err("no identity provider is configured".into()),
            (Some(_), Some(_)) => Err(format!(
                "route `{route}` must name its identity provider: several are configured"
            )),
        }
    }

    /// Identity provider `name` as the snapshot configures it.
    fn configured<'i>(
        index: &'i Index,
        name: &str,
    ) -> Option<&'i vigil_proto::v1::IdentityProvider> {
        match index
            .snapshot
            .get(Kind::IdentityProvider, name)
            .and_then(|e| e.body.as_ref())
        {
            Some(Body::IdentityProvider(p)) => Some(p),
            _ => None,
        }
    }

    /// The discovered provider `name`, fetched again when stale or changed. A
    /// provider whose discovery failed is not asked again for [`DISCOVERY_RETRY`];
    /// one that is only stale and cannot be reached stays in use meanwhile, up to
    /// [`DISCOVERY_STALE_MAX`] after it was fetched.
    async fn provider(&self, index: &Index, name: &str) -> Result<Arc<Provider>, String> {
        let Some(source) = Self::configured(index, name) else {
            return Err(format!("identity provider `{name}` is not configured"));
        };
        let slot = self
            .providers
            .lock()
            .entry(name.to_owned())
            .or_default()
            .clone();
        let mut slot = slot.lock().await;
        let cached = slot
            .provider
            .clone()
            .filter(|p| p.source == *source && p.fetched.elapsed() < DISCOVERY_STALE_MAX);
        if let Some(p) = cached
            .as_ref()
            .filter(|p| p.fetched.elapsed() < DISCOVERY_TTL)
        {
            return Ok(p.clone());
        }
        if let Some((at, failed_for, why)) = &slot.failed {
            if failed_for == source && at.elapsed() < DISCOVERY_RETRY {
                return cached.ok_or_else(|| why.clone());
            }
        }
        match self.discover(name, source).await {
            Ok(p) => {
                slot.provider = Some(p.clone());
                slot.failed = None;
                Ok(p)
            }
            Err(why) => {
                slot.failed = Some((Instant::now(), source.clone(), why.clone()));
                match cached {
                    Some(stale) => {
                        tracing::warn!(provider = %name, error = %why, "Identity provider discovery failed; its earlier discovery stays in use");
                        Ok(stale)
                    }
                    None => Err(why),
                }
            }
        }
    }

    /// Fetches provider `name`'s discovery document and keys.
    async fn discover(
        &self,
        name: &str,
        source: &vigil_proto::v1::IdentityProvider,
    ) -> Result<Arc<Provider>, String> {
        let issuer = IssuerUrl::new(source.issuer_url.clone())
            .map_err(|e| format!("identity provider `{name}`: bad issuer URL: {e}"))?;
        let metadata = Metadata::discover_async(issuer, &self.http)
            .await
            .map_err(|e| format!("identity provider `{name}`: discovery failed: {e}"))?;
        let end_session = metadata.additional_metadata().end_session_endpoint.clone();
        let sends_iss = metadata
            .additional_metadata()
            .additional_metadata
            .authorization_response_iss_parameter_supported;
        let secret = (!source.client_secret.is_empty())
            .then(|| ClientSecret::new(source.client_secret.clone()));
        let redirect = RedirectUrl::new(format!("{}/.vigil/callback", self.base))
            .map_err(|e| format!("bad redirect URL: {e}"))?;
        let client = CoreClient::from_provider_metadata(
            metadata,
            ClientId::new(source.client_id.clone()),
            secret,
        )
        .set_redirect_uri(redirect);
        let provider = Arc::new(Provider {
            source: source.clone(),
            client,
            end_session,
            sends_iss,
            groups_claim: crate::jwt::mapped_claim(&source.claim_mapping_json, "groups"),
            name_claim: crate::jwt::mapped_claim(&source.claim_mapping_json, "name"),
            fetched: Instant::now(),
        });
        tracing::info!(provider = %name, "Identity provider discovered");
        Ok(provider)
    }

    /// `GET /.vigil/sign_in?rd=…&bh=…[&reauth=1]` on the authenticate host.
    async fn sign_in(
        &self,
        index: &Index,
        a: &Asked<'_>,
    ) -> Result<Response<ProxyBody>, (StatusCode, String)> {
        let bad = |why: String| (StatusCode::BAD_REQUEST, why);
        let q = params(a.query);
        let rd = q
            .get("rd")
            .ok_or_else(|| bad("`rd` (the return URL) is missing".into()))?;
        let bh = q.get("bh").filter(|b| is_hex64(b)).ok_or_else(|| {
            bad("`bh` must be 64 hex digits (start from the page you wanted)".into())
        })?;
        let reauth = q.get("reauth").is_some_and(|v| v == "1");
        let target = self.check_return(index, rd).map_err(bad)?;
        let idp = Self::provider_for(index, &target.route)
            .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e))?;
        let max_age = index
            .policies
            .get(&target.route)
            .and_then(|r| r.max_auth_age_s);
        if !reauth {
            if let Some(s) = self.session_on(index, a) {
                let fresh = max_age.is_none_or(|m| {
                    u64::try_from(a.now.saturating_sub(s.auth_time)).unwrap_or(u64::MAX) <= m
                });
                if fresh && s.idp.as_deref() == Some(idp.as_str()) {
                    return self.hand_off(s, &target, bh, a.now, Vec::new());
                }
            }
        }
        let provider = self
            .provider(index, &idp)
            .await
            .map_err(|e| (StatusCode::BAD_GATEWAY, e))?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut req = provider
            .client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .set_pkce_challenge(challenge);
        for scope in provider.source.scopes.iter().filter(|s| *s != "openid") {
            req = req.add_scope(Scope::new(scope.clone()));
        }
        if reauth {
            req = req.add_prompt(CoreAuthPrompt::Login);
            if let Some(m) = max_age {
                req = req.set_max_age(Duration::from_secs(m));
            }
        }
        let (url, state, nonce) = req.url();
        let pending = Pending {
            state: state.secret().clone(),
            nonce: nonce.secret().clone(),
            pkce: verifier.secret().clone(),
            rd: target.url.clone(),
            bh: bh.clone(),
            idp,
            started: a.now,
            reauth,
        };
        let sealed = self
            .keys
            .seal_value(LOGIN_CONTEXT, &pending, &self.host)
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        Ok(redirect(
            url.as_str(),
            &[cookie::set_named(LOGIN_COOKIE, &sealed, LOGIN_TTL)],
        ))
    }

    /// `GET /.vigil/callback?code=…&state=…` on the authenticate host: the IdP's answer.
    async fn callback(
        &self,
        index: &Index,
        a: &Asked<'_>,
    ) -> Result<Response<ProxyBody>, (StatusCode, String)> {
        let q = params(a.query);
        let unauthorized = |why: String| (StatusCode::UNAUTHORIZED, why);
        let pending: Pending = cookie::in_headers(a.headers, LOGIN_COOKIE)
            .and_then(|v| self.keys.open_value(LOGIN_CONTEXT, v, &self.host).ok())
            .filter(|p: &Pending| a.now - p.started < LOGIN_TTL)
            .ok_or_else(|| {
                (
                    StatusCode::BAD_REQUEST,
                    "no sign-in is in progress in this browser (it expired, or was started elsewhere); go back to the page you wanted".to_owned(),
                )
            })?;
        if q.get("state") != Some(&pending.state) {
            return Err((
                StatusCode::BAD_REQUEST,
                "the sign-in answer does not match the sign-in in progress (`state`)".into(),
            ));
        }
        // RFC 9207: an answer that names its issuer must name this sign-in's
        // provider, so that one provider's answer is never taken for another's;
        // and a provider that says it always names itself must have done so.
        let iss = q.get("iss");
        if let Some(iss) = iss {
            let expected =
                Self::configured(index, &pending.idp).map(|p| p.issuer_url.trim_end_matches('/'));
            if expected != Some(iss.trim_end_matches('/')) {
                return Err((
                    StatusCode::BAD_REQUEST,
                    "the sign-in answer comes from another identity provider (`iss`)".into(),
                ));
            }
        }
        let provider = self
            .provider(index, &pending.idp)
            .await
            .map_err(|e| (StatusCode::BAD_GATEWAY, e))?;
        if iss.is_none() && provider.sends_iss {
            return Err((
                StatusCode::BAD_REQUEST,
                "the sign-in answer does not name its identity provider (`iss`), which this provider always does".into(),
            ));
        }
        if let Some(error) = q.get("error") {
            let detail = q.get("error_description").map_or("", String::as_str);
            return Err(unauthorized(format!(
                "the identity provider refused the sign-in: {error} {detail}"
            )));
        }
        let code = q.get("code").ok_or_else(|| {
            (
                StatusCode::BAD_REQUEST,
                "the answer has no `code`".to_owned(),
            )
        })?;
        let target = self
            .check_return(index, &pending.rd)
            .map_err(|e| (StatusCode::BAD_REQUEST, e))?;
        let tokens = provider
            .client
            .exchange_code(AuthorizationCode::new(code.clone()))
            .map_err(|e| {
                (
                    StatusCode::BAD_GATEWAY,
                    format!("the provider has no token endpoint: {e}"),
                )
            })?
            .set_pkce_verifier(PkceCodeVerifier::new(pending.pkce.clone()))
            .request_async(&self.http)
            .await
            .map_err(|e| match e {
                // The provider answered, and refused the code (used already,
                // expired, not this client's): the browser's doing, not a fault.
                openidconnect::RequestTokenError::ServerResponse(r) => unauthorized(format!(
                    "the identity provider refused the sign-in code: {}",
                    r.error()
                )),
                e => (
                    StatusCode::BAD_GATEWAY,
                    format!("the code exchange failed: {e}"),
                ),
            })?;
        let id_token = tokens
            .id_token()
            .ok_or_else(|| unauthorized("the provider returned no ID token".into()))?;
        // The ID token's expiry by the proxy's clock, like every other time check.
        let verifier = provider.client.id_token_verifier().set_time_fn(|| {
            chrono::DateTime::from_timestamp(crate::clock::now(), 0).unwrap_or_default()
        });
        let claims = match id_token.claims(&verifier, &Nonce::new(pending.nonce.clone())) {
            Ok(c) => c,
            Err(e) => {
                // Perhaps the provider rotated its keys: fetch them afresh next
                // time. Only then: a forged nonce, which any user of the provider
                // can send, must not make the next sign-ins wait for discovery.
                if matches!(
                    e,
                    openidconnect::ClaimsVerificationError::SignatureVerification(_)
                ) {
                    let slot = self.providers.lock().get(&pending.idp).cloned();
                    if let Some(slot) = slot {
                        slot.lock().await.provider = None;
                    }
                }
                return Err(unauthorized(format!("the ID token is not valid: {e}")));
            }
        };
        let issuer = claims.issuer().as_str().to_owned();
        let subject = claims.subject().as_str().to_owned();
        let email = claims.email().map(|e| e.as_str().to_ascii_lowercase());
        let email_verified = claims.email_verified().unwrap_or(false);
        let auth_time = signed_in_at(claims.auth_time().map(|t| t.timestamp()), &pending, a.now)
            .map_err(unauthorized)?;
        let domains = &provider.source.allowed_domains;
        if !domains.is_empty() {
            let domain_ok = email_verified
                && email
                    .as_deref()
                    .and_then(|e| e.rsplit_once('@'))
                    .is_some_and(|(_, d)| domains.iter().any(|allowed| allowed == d));
            if !domain_ok {
                return Err((
                    StatusCode::FORBIDDEN,
                    "your account's verified email is not in a domain this identity provider admits".into(),
                ));
            }
        }
        let amr: Vec<String> = claims
            .auth_method_refs()
            .map(|v| v.iter().map(|m| m.as_str().to_owned()).collect())
            .unwrap_or_default();
        // Claims the library does not model, read from the token it just verified.
        let extra = payload(&id_token.to_string()).unwrap_or_default();
        let groups = claim_groups(&extra, &provider.groups_claim);
        let display_name = extra
            .get(&provider.name_claim)
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        let uid = find_user(index, &issuer, &subject)
            .unwrap_or_else(|| vigil_snapshot::provisioned_user_id(&issuer, &subject));
        if index.users.get(&uid).is_some_and(|u| u.suspended) {
            return Err((StatusCode::FORBIDDEN, "your account is suspended".into()));
        }
        // The browser's session here until now (a step-up, another provider)
        // lives on at the route hosts it reached: it ends with this one.
        let earlier = cookie::session_value(a.headers)
            .and_then(|v| self.keys.open(v, &self.host, a.now).ok())
            .map(carried)
            .unwrap_or_default();
        let sid = format!("ses_{}", random_hex(16));
        if sid.len() != 36 {
            return Err((
                StatusCode::INTERNAL_SERVER_ERROR,
                "no randomness for a session id".into(),
            ));
        }
        let session = SessionCookie {
            sid,
            uid,
            did: None,
            auth_time,
            exp: a.now.saturating_add(self.lifetime_s),
            amr,
            idp: Some(pending.idp.clone()),
            email: email.clone(),
            ev: email_verified,
            groups,
            iat: a.now,
            earlier,
        };
        self.report_surely(SessionReport {
            session_id: session.sid.clone(),
            user_id: session.uid.clone(),
            device_id: None,
            identity_provider: session.idp.clone(),
            auth_time: session.auth_time,
            expires_at: session.exp,
            amr: session.amr.clone(),
            last_seen_at: a.now,
            issuer,
            subject,
            email,
            email_verified,
            display_name,
            signed_out: false,
            // Only for the control plane's re-verification; nowhere else.
            refresh_token: tokens
                .refresh_token()
                .map(|t| t.secret().clone())
                .unwrap_or_default(),
        });
        tracing::info!(request_id = %a.id, session = %session.sid, user = %session.uid, idp = %pending.idp, "Signed in");
        let own = self
            .keys
            .seal(&session, &self.host)
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let cookies = vec![
            cookie::set_cookie(&own, session.exp - a.now),
            cookie::set_named(LOGIN_COOKIE, "", 0),
        ];
        self.hand_off(session, &target, &pending.bh, a.now, cookies)
    }

    /// Redirects to the route host's handoff with a code for `session`.
    fn hand_off(
        &self,
        session: SessionCookie,
        target: &Target,
        bh: &str,
        now: i64,
        cookies: Vec<String>,
    ) -> Result<Response<ProxyBody>, (StatusCode, String)> {
        let handoff = Handoff {
            s: session,
            rd: target.url.clone(),
            bh: bh.to_owned(),
            jti: random_hex(16),
            exp: now + HANDOFF_TTL,
        };
        let code = self
            .keys
            .seal_value(HANDOFF_CONTEXT, &handoff, &target.host)
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        Ok(redirect(
            &format!("{}/.vigil/handoff?code={code}", target.origin),
            &cookies,
        ))
    }

    /// `GET /.vigil/handoff?code=…` on a route host: the session arrives.
    fn handoff(
        &self,
        index: &Index,
        a: &Asked<'_>,
    ) -> Result<Response<ProxyBody>, (StatusCode, String)> {
        let bad = |why: &str| (StatusCode::BAD_REQUEST, why.to_owned());
        let q = params(a.query);
        let code = q
            .get("code")
            .ok_or_else(|| bad("the sign-in code is missing"))?;
        let h: Handoff = self
            .keys
            .open_value_within(HANDOFF_CONTEXT, code, a.host, MAX_CODE)
            .map_err(|_| bad("the sign-in code is not valid for this host"))?;
        if h.exp <= a.now {
            return Err(bad(
                "the sign-in code has expired; go back to the page you wanted",
            ));
        }
        let bound = cookie::in_headers(a.headers, BIND_COOKIE).map(sha256_hex);
        if bound.as_deref() != Some(h.bh.as_str()) {
            return Err(bad("this sign-in was started in another browser"));
        }
        if !self.redeemed.lock().first_use(&h.jti, h.exp, a.now) {
            return Err(bad("the sign-in code was used already"));
        }
        let target = self
            .check_return(index, &h.rd)
            .map_err(|e| (StatusCode::BAD_REQUEST, e))?;
        if target.host != a.host {
            return Err(bad("the sign-in code is not for this host"));
        }
        if index.snapshot.get(Kind::RevokedSession, &h.s.sid).is_some()
            || self.is_signed_out(&h.s.sid)
        {
            return Err((StatusCode::UNAUTHORIZED, "the session was revoked".into()));
        }
        let value = self
            .keys
            .seal(&h.s, a.host)
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        Ok(redirect(
            &target.url,
            &[
                cookie::set_cookie(&value, h.s.exp - a.now),
                cookie::set_named(BIND_COOKIE, "", 0),
            ],
        ))
    }

    /// `/.vigil/sign_out` on any host: the session ends everywhere. A route host
    /// sends the browser on to the authenticate host, which then ends the user's
    /// session at the identity provider too when the provider supports
    /// RP-Initiated Logout (it comes back to `/.vigil/signed_out`).
    ///
    /// A browser that says the request comes from another site (`Sec-Fetch-Site:
    /// cross-site`: a link or form on someone else's page) gets a page asking
    /// first, so that no other site can sign users out of the fleet.
    async fn sign_out(&self, index: &Index, a: &Asked<'_>) -> Response<ProxyBody> {
        if a.headers
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes() == b"cross-site")
        {
            return sign_out_question_page();
        }
        let session =
            cookie::session_value(a.headers).and_then(|v| self.keys.open(v, a.host, a.now).ok());
        let idp = session.as_ref().and_then(|s| s.idp.clone());
        if let Some(s) = session {
            let mut ended = vec![SessionReport {
                signed_out: true,
                ..session_report(&s, a.now)
            }];
            // The browser's earlier sessions, still held by route hosts it
            // reached before a step-up or a sign-in with another provider.
            ended.extend(s.earlier.iter().map(|(sid, uid)| SessionReport {
                session_id: sid.clone(),
                user_id: uid.clone(),
                expires_at: s.exp,
                last_seen_at: a.now,
                signed_out: true,
                ..SessionReport::default()
            }));
            // Each session is reported once, however often its sign-out is asked.
            {
                let mut out = self.signed_out.lock();
                ended.retain(|report| out.first_use(&report.session_id, s.exp, a.now));
            }
            for report in ended {
                tracing::info!(request_id = %a.id, session = %report.session_id, user = %report.user_id, "Signed out");
                self.report_surely(report);
            }
        }
        let clear = cookie::clear_cookie();
        if !self.is_authenticate_host(a.host) {
            return redirect(&format!("{}/.vigil/sign_out", self.base), &[clear]);
        }
        if let Some(name) = idp {
            match self.provider_logout(index, &name).await {
                Ok(Some(url)) => return redirect(&url, &[clear]),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(request_id = %a.id, provider = %name, error = %e, "Cannot end the session at the identity provider");
                }
            }
        }
        signed_out_page(Some(&clear))
    }

    /// Where to send the browser to end its session at provider `name`, if the
    /// provider has an end-session endpoint.
    async fn provider_logout(&self, index: &Index, name: &str) -> Result<Option<String>, String> {
        let provider = self.provider(index, name).await?;
        let Some(end) = provider.end_session.clone() else {
            return Ok(None);
        };
        let back = PostLogoutRedirectUrl::new(format!("{}/.vigil/signed_out", self.base))
            .map_err(|e| format!("bad post-logout URL: {e}"))?;
        Ok(Some(
            LogoutRequest::from(end)
                .set_client_id(ClientId::new(provider.source.client_id.clone()))
                .set_post_logout_redirect_uri(back)
                .http_get_url()
                .to_string(),
        ))
    }

    /// Queues a session's activity for the control plane; dropped when the queue
    /// is full (the control plane away a while): activity is reported again.
    fn report(&self, report: SessionReport) {
        if let Err(e) = self.reports.try_send(report) {
            tracing::debug!(error = %e, "Session activity not queued for the control plane");
        }
    }

    /// Queues a new session or a sign-out for the control plane. When the queue
    /// is full, the report waits for room (up to [`REPORTS_WAITING`] of them)
    /// rather than being dropped: a sign-out the control plane never hears of
    /// would leave the session usable at the fleet's other proxies.
    fn report_surely(&self, report: SessionReport) {
        let report = match self.reports.try_send(report) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::warn!("Session report not queued: the subscriber has stopped");
                return;
            }
            Err(mpsc::error::TrySendError::Full(r)) => r,
        };
        let waiting = self.reports_waiting.clone();
        let runtime = tokio::runtime::Handle::try_current();
        let admitted = waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < REPORTS_WAITING).then_some(n + 1)
            })
            .is_ok();
        match runtime {
            Ok(rt) if admitted => {
                let reports = self.reports.clone();
                rt.spawn(async move {
                    let _ = reports.send(report).await;
                    waiting.fetch_sub(1, Ordering::AcqRel);
                });
            }
            _ => {
                if admitted {
                    waiting.fetch_sub(1, Ordering::AcqRel);
                }
                tracing::warn!(session = %report.session_id, signed_out = report.signed_out, "Session report dropped: too many wait for the control plane");
            }
        }
    }
}

/// Asks the user whether to sign out, with a link (same-origin) that does it; it
/// may not be framed.
fn sign_out_question_page() -> Response<ProxyBody> {
    let mut res = full(
        StatusCode::OK,
        "text/html; charset=utf-8",
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Sign out?</title></head>\
         <body><h1>Sign out?</h1><p>Another site sent you here. Sign out of every site behind this proxy?</p>\
         <p><a href=\"/.vigil/sign_out\">Sign out</a></p></body></html>\n",
    );
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("frame-ancestors 'none'"),
    );
    res
}

/// The authenticate host's page after sign-out, clearing its cookie when `clear`
/// is given.
fn signed_out_page(clear: Option<&str>) -> Response<ProxyBody> {
    let mut res = full(
        StatusCode::OK,
        "text/html; charset=utf-8",
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Signed out</title></head>\
         <body><h1>Signed out</h1><p>Your session has ended on every site behind this proxy.</p></body></html>\n",
    );
    if let Some(v) = clear.and_then(|c| HeaderValue::from_str(c).ok()) {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
    res
}

/// What the control plane is told of session `s`, seen at `now` (its use, or with
/// `signed_out`, its end).
fn session_report(s: &cookie::SessionCookie, now: i64) -> SessionReport {
    SessionReport {
        session_id: s.sid.clone(),
        user_id: s.uid.clone(),
        device_id: s.did.clone(),
        identity_provider: s.idp.clone(),
        auth_time: s.auth_time,
        expires_at: s.exp,
        amr: s.amr.clone(),
        last_seen_at: now,
        ..SessionReport::default()
    }
}

/// The user the directory knows as `subject` at `issuer` (a trailing slash on
/// the issuer aside).
pub fn find_user(index: &Index, issuer: &str, subject: &str) -> Option<String> {
    index
        .subjects
        .get(crate::index::subject_key(issuer, subject).as_str())
        .cloned()
}

/// When the user authenticated, by the ID token's `auth_time` (`now` without
/// one), for sign-in `pending`. A step-up needs an `auth_time` (OpenID Connect
/// requires it when `max_age` was asked), and one no older than the sign-in:
/// without it, a provider that ignored `prompt=login` would pass for one that
/// asked again.
fn signed_in_at(auth_time: Option<i64>, pending: &Pending, now: i64) -> Result<i64, String> {
    match auth_time {
        Some(t) if !pending.reauth || t >= pending.started - 5 => Ok(t),
        None if !pending.reauth => Ok(now),
        _ => {
            Err("the identity provider did not sign you in again, which this route requires".into())
        }
    }
}

/// What a new session carries of the browser's session `old` at the
/// authenticate host: its id and user, after the earlier ones it carried, the
/// last [`MAX_EARLIER`] of them.
fn carried(old: SessionCookie) -> Vec<(String, String)> {
    let mut earlier = old.earlier;
    earlier.retain(|(sid, _)| *sid != old.sid);
    earlier.push((old.sid, old.uid));
    let extra = earlier.len().saturating_sub(MAX_EARLIER);
    earlier.drain(..extra);
    earlier
}

/// A JWT's payload as JSON (the caller has verified the token already).
fn payload(jwt: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let part = jwt.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(part.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The groups a claim names (an array of strings, or one string), kept small
/// enough for the session cookie.
fn claim_groups(claims: &serde_json::Map<String, serde_json::Value>, name: &str) -> Vec<String> {
    let all = crate::jwt::claim_strings(claims.get(name));
    let mut bytes = 0;
    let kept: Vec<String> = all
        .iter()
        .take_while(|g| {
            bytes += g.len() + 3;
            bytes <= MAX_GROUPS_BYTES
        })
        .cloned()
        .collect();
    if kept.len() < all.len() {
        tracing::warn!(
            kept = kept.len(),
            of = all.len(),
            "Too many groups in the ID token for a session; kept the first ones"
        );
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Session `sid` of `usr_1`, signed in at 1,000 until 9,000.
    fn session(sid: &str) -> cookie::SessionCookie {
        cookie::SessionCookie {
            sid: sid.into(),
            uid: "usr_1".into(),
            auth_time: 1_000,
            exp: 9_000,
            ..Default::default()
        }
    }

    #[test]
    fn use_is_reported_once_a_minute_per_session() {
        let (login, mut rx) = login_with(&[]);
        let s = session;
        login.note_use(&s("ses_a"), 2_000);
        login.note_use(&s("ses_a"), 2_030);
        login.note_use(&s("ses_b"), 2_030);
        login.note_use(&s("ses_a"), 2_060);
        let seen: Vec<(String, i64)> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|r| (r.session_id, r.last_seen_at))
            .collect();
        assert_eq!(
            seen,
            [
                ("ses_a".into(), 2_000),
                ("ses_b".into(), 2_030),
                ("ses_a".into(), 2_060)
            ]
        );
    }

    #[test]
    fn groups_come_from_arrays_or_strings_and_stay_small() {
        let claims: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"groups":["a","b",3],"role":"admin","many":[]}"#).unwrap();
        assert_eq!(claim_groups(&claims, "groups"), vec!["a", "b"]);
        assert_eq!(claim_groups(&claims, "role"), vec!["admin"]);
        assert!(claim_groups(&claims, "missing").is_empty());
        let big: Vec<String> = (0..1000).map(|i| format!("group-{i:04}")).collect();
        let mut claims = serde_json::Map::new();
        claims.insert("groups".into(), serde_json::json!(big));
        let kept = claim_groups(&claims, "groups");
        assert!(!kept.is_empty() && kept.len() < 1000);
        assert_eq!(kept[0], "group-0000");
    }

    #[test]
    fn payloads_decode_and_issuers_compare_without_trailing_slash() {
        let body = URL_SAFE_NO_PAD.encode(br#"{"sub":"x"}"#);
        let p = payload(&format!("e30.{body}.sig")).unwrap();
        assert_eq!(p.get("sub").and_then(|v| v.as_str()), Some("x"));
        assert!(payload("nodots").is_none());
    }

    const KEY: &str = "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=";

    fn login_with(ports: &[u16]) -> (Login, mpsc::Receiver<SessionReport>) {
        let keys = Arc::new(CookieKeys::new([(1u8, KEY)]).unwrap());
        let (tx, rx) = mpsc::channel(16);
        let login = Login::new(
            LoginConfig {
                authenticate_url: "https://auth.example.com".into(),
                return_ports: ports.to_vec(),
                session_lifetime: Duration::from_secs(3600),
            },
            keys,
            tx,
        )
        .unwrap();
        (login, rx)
    }

    /// An index with one route, `app` on `app.example`.
    fn one_route() -> Index {
        use vigil_proto::v1::{Entry, Route};
        let doc = vigil_policy::parse_json(r#"{"allow": {"and": [{"authenticated_user": true}]}}"#)
            .unwrap_or_else(|e| panic!("{e:?}"));
        let mut symbols = vigil_policy::Symbols::default();
        let p = vigil_policy::compile_standalone(&doc, &mut symbols)
            .unwrap_or_else(|e| panic!("{e:?}"));
        Index::default()
            .apply(vigil_snapshot::Update {
                version: 1,
                base_version: 0,
                full: true,
                upserts: vec![Entry {
                    id: "app".into(),
                    body: Some(Body::Route(Route {
                        host: "app.example".into(),
                        policy: vigil_snapshot::encode_policy(&p, &symbols),
                        ..Route::default()
                    })),
                }],
                removals: vec![],
            })
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn return_urls_must_be_served_by_a_route_on_a_fleet_port() {
        let (login, _rx) = login_with(&[8443]);
        let index = one_route();
        for (rd, url) in [
            ("https://app.example/x?y=1", "https://app.example/x?y=1"),
            ("https://app.example:443/", "https://app.example/"),
            ("https://app.example:8443/a", "https://app.example:8443/a"),
            ("https://APP.Example/", "https://app.example/"),
            ("https://app.example./", "https://app.example./"),
            ("https://app%2Eexample/", "https://app.example/"),
            // A backslash is a slash in an https URL; tabs and newlines go.
            (
                "https://app.example\\evil.example/",
                "https://app.example/evil.example/",
            ),
            (
                "https://app.example/a\r\nSet-Cookie: x=1",
                "https://app.example/aSet-Cookie:%20x=1",
            ),
        ] {
            let t = login
                .check_return(&index, rd)
                .unwrap_or_else(|e| panic!("{rd:?}: {e}"));
            assert_eq!(t.url, url, "{rd:?}");
            assert_eq!((t.host.as_str(), t.route.as_str()), ("app.example", "app"));
        }
        let long = format!("https://app.example/{}", "a".repeat(MAX_RETURN_URL));
        // Short, but long once serialized.
        let grows = format!("https://app.example/?q={}x", " ".repeat(MAX_RETURN_URL / 2));
        for rd in [
            "https://app.example:8444/",
            "https://app.example:80/",
            "https://app.example:0/",
            "http://app.example/",
            "//evil.example/",
            "/\\evil.example/",
            "/x",
            "https:evil.example",
            "https://app.example@evil.example/",
            "https://app.example:443@evil.example/",
            "https://evil.example\\@app.example/",
            "https://app.example.evil.example/",
            "https://evil.example/https://app.example/",
            "https://app%2Eexample%2Eevil.example/",
            "javascript:alert(1)",
            "javascript://app.example/%0aalert(1)",
            "data:text/html,<script>alert(1)</script>",
            "https://app.example/%00",
            "https://app.example/a\0b",
            "",
            long.as_str(),
            grows.as_str(),
        ] {
            let e = login.check_return(&index, rd).err();
            assert!(
                e.as_deref().is_some_and(|e| e.contains("return URL")),
                "{rd:?} was let through: {e:?}"
            );
        }
        // Without configured ports, only the authenticate URL's.
        let (login, _rx) = login_with(&[]);
        assert!(login.check_return(&index, "https://app.example/").is_ok());
        assert!(login
            .check_return(&index, "https://app.example:8443/")
            .is_err());
    }

    #[test]
    fn refusal_reasons_are_one_short_line() {
        assert_eq!(printable("a\r\nb\0c\u{1b}[31m", 100), "a??b?c?[31m");
        assert_eq!(printable(&"x".repeat(10), 4), "xxxx…");
        assert_eq!(printable("abcd", 4), "abcd");
    }

    /// Request headers carrying `session`'s cookie for `app.example`.
    fn with_session(login: &Login, session: &cookie::SessionCookie) -> HeaderMap {
        let value = login.keys.seal(session, "app.example").unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("{}={value}", cookie::NAME)).unwrap(),
        );
        headers
    }

    fn asked<'a>(host: &'a str, headers: &'a HeaderMap) -> Asked<'a> {
        Asked {
            host,
            path: "/.vigil/sign_out",
            query: None,
            headers,
            now: 2_000,
            id: "req",
            html: true,
        }
    }

    #[tokio::test]
    async fn another_site_cannot_sign_a_user_out() {
        let (login, mut rx) = login_with(&[]);
        let index = one_route();
        let mut headers = with_session(&login, &session("ses_a"));
        headers.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        let res = login.serve(&index, &asked("app.example", &headers)).await;
        assert_eq!(res.status(), StatusCode::OK);
        assert!(res.headers().get(header::SET_COOKIE).is_none());
        assert_eq!(res.headers()[header::X_FRAME_OPTIONS], "DENY");
        assert!(!login.is_signed_out("ses_a") && rx.try_recv().is_err());
        // From the site itself (or typed), it signs out.
        for site in ["same-origin", "same-site", "none"] {
            headers.insert("sec-fetch-site", HeaderValue::from_static(site));
            let res = login.serve(&index, &asked("app.example", &headers)).await;
            assert_eq!(res.status(), StatusCode::FOUND, "{site}");
            assert!(login.is_signed_out("ses_a"));
        }
        headers.remove("sec-fetch-site");
        let res = login.serve(&index, &asked("app.example", &headers)).await;
        assert_eq!(res.status(), StatusCode::FOUND);
        let report = rx.try_recv().unwrap();
        assert!(report.signed_out && report.session_id == "ses_a");
    }

    #[test]
    fn a_step_up_needs_a_fresh_auth_time() {
        let pending = |reauth: bool| Pending {
            state: String::new(),
            nonce: String::new(),
            pkce: String::new(),
            rd: String::new(),
            bh: String::new(),
            idp: String::new(),
            started: 1_000,
            reauth,
        };
        assert_eq!(signed_in_at(None, &pending(false), 1_010), Ok(1_010));
        assert_eq!(signed_in_at(Some(10), &pending(false), 1_010), Ok(10));
        assert_eq!(signed_in_at(Some(1_001), &pending(true), 1_010), Ok(1_001));
        assert_eq!(signed_in_at(Some(996), &pending(true), 1_010), Ok(996));
        assert!(signed_in_at(Some(990), &pending(true), 1_010).is_err());
        // No `auth_time` at all is no proof of a fresh sign-in.
        assert!(signed_in_at(None, &pending(true), 1_010).is_err());
    }

    #[test]
    fn new_sessions_carry_the_browsers_earlier_ones() {
        let s = |sid: &str, earlier: Vec<(String, String)>| SessionCookie {
            sid: sid.into(),
            uid: "usr_1".into(),
            earlier,
            ..Default::default()
        };
        let pair = |sid: &str| (sid.to_owned(), "usr_1".to_owned());
        assert_eq!(carried(s("ses_a", vec![])), vec![pair("ses_a")]);
        assert_eq!(
            carried(s("ses_a", vec![pair("ses_a")])),
            vec![pair("ses_a")]
        );
        let many: Vec<_> = (0..MAX_EARLIER)
            .map(|i| pair(&format!("ses_{i}")))
            .collect();
        let kept = carried(s("ses_new", many));
        assert_eq!(kept.len(), MAX_EARLIER);
        assert_eq!(kept[0], pair("ses_1"));
        assert_eq!(kept[MAX_EARLIER - 1], pair("ses_new"));
    }

    #[tokio::test]
    async fn sign_out_ends_the_browsers_earlier_sessions_too() {
        let (login, mut rx) = login_with(&[]);
        let index = one_route();
        let session = cookie::SessionCookie {
            earlier: vec![("ses_old".into(), "usr_0".into())],
            ..session("ses_new")
        };
        let headers = with_session(&login, &session);
        let res = login.serve(&index, &asked("app.example", &headers)).await;
        assert_eq!(res.status(), StatusCode::FOUND);
        assert!(login.is_signed_out("ses_new") && login.is_signed_out("ses_old"));
        let ended: Vec<(String, String, bool)> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|r| (r.session_id, r.user_id, r.signed_out))
            .collect();
        assert_eq!(
            ended,
            [
                ("ses_new".into(), "usr_1".into(), true),
                ("ses_old".into(), "usr_0".into(), true)
            ]
        );
    }

    /// An index naming identity providers by issuer (in order of name).
    fn providers(issuers: &[(&str, &str)]) -> Index {
        use vigil_proto::v1::{Entry, IdentityProvider};
        Index::default()
            .apply(vigil_snapshot::Update {
                version: 1,
                base_version: 0,
                full: true,
                upserts: issuers
                    .iter()
                    .map(|(name, issuer)| Entry {
                        id: (*name).into(),
                        body: Some(Body::IdentityProvider(IdentityProvider {
                            issuer_url: (*issuer).into(),
                            client_id: "vigil".into(),
                            ..IdentityProvider::default()
                        })),
                    })
                    .collect(),
                removals: vec![],
            })
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A listener on a free local port, its URL, and how many connections it took;
    /// `answer` says what each connection gets: `None` closes it at once, and a
    /// connection whose answer is `Some("")` is held open and never answered.
    async fn local_provider(
        answer: fn(&str, &str) -> Option<String>,
    ) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let taken = Arc::new(AtomicUsize::new(0));
        let (issuer, count) = (url.clone(), taken.clone());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                match answer(&head, &issuer) {
                    None => drop(s),
                    Some(body) if body.is_empty() => held.push(s),
                    Some(body) => {
                        let res = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = s.write_all(res.as_bytes()).await;
                    }
                }
            }
        });
        (url, taken)
    }

    #[tokio::test]
    async fn one_providers_discovery_never_holds_up_another() {
        use std::sync::atomic::Ordering;
        let (up, _) = local_provider(|head, issuer| {
            Some(if head.starts_with("GET /jwks") {
                r#"{"keys":[]}"#.to_owned()
            } else {
                format!(
                    r#"{{"issuer":"{issuer}","authorization_endpoint":"{issuer}/auth","token_endpoint":"{issuer}/token","jwks_uri":"{issuer}/jwks","response_types_supported":["code"],"subject_types_supported":["public"],"id_token_signing_alg_values_supported":["RS256"]}}"#
                )
            })
        })
        .await;
        let (hung, _) = local_provider(|_, _| Some(String::new())).await;
        let (down, asked) = local_provider(|_, _| None).await;
        let index = Arc::new(providers(&[("down", &down), ("hung", &hung), ("up", &up)]));
        let (login, _rx) = login_with(&[]);
        let login = Arc::new(login);
        // A sign-in with the provider that never answers is under way...
        let waiting = tokio::spawn({
            let (login, index) = (login.clone(), index.clone());
            async move { login.provider(&index, "hung").await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished());
        // ...and one with another provider goes on meanwhile.
        let p = tokio::time::timeout(Duration::from_secs(5), login.provider(&index, "up"))
            .await
            .expect("held up by another provider's discovery");
        assert!(p.is_ok(), "{:?}", p.err());
        // A provider that cannot be reached is asked once, then its failure is
        // answered at once for a while, rather than every sign-in trying again.
        let first = login.provider(&index, "down").await.err().unwrap();
        assert!(first.contains("discovery failed"), "{first}");
        let again = tokio::time::timeout(Duration::from_secs(1), login.provider(&index, "down"))
            .await
            .unwrap();
        assert_eq!(again.err(), Some(first));
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        waiting.abort();
    }

    #[tokio::test]
    async fn a_full_report_queue_drops_activity_but_never_a_sign_out() {
        let (login, mut rx) = login_with(&[]);
        let index = one_route();
        // The control plane is away: activity fills the queue (16 here), and more
        // of it is dropped.
        for i in 0..20 {
            login.note_use(&session(&format!("ses_{i}")), 2_000);
        }
        let headers = with_session(&login, &session("ses_out"));
        let res = login.serve(&index, &asked("app.example", &headers)).await;
        assert_eq!(res.status(), StatusCode::FOUND);
        // It comes back: the queue drains, and the sign-out follows the activity.
        let mut got = Vec::new();
        while let Ok(Some(r)) = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
            got.push((r.session_id, r.signed_out));
        }
        assert_eq!(got.len(), 17, "{got:?}");
        assert_eq!(got.last(), Some(&("ses_out".to_owned(), true)));
        assert!(got[..16].iter().all(|(_, out)| !out));
    }

    #[test]
    fn each_code_is_redeemed_once_until_it_expires() {
        let mut r = Expiring::default();
        assert!(r.first_use("a", 160, 100));
        assert!(!r.first_use("a", 160, 130));
        assert!(r.first_use("b", 190, 130));
        // Expired codes are forgotten as time passes, out of order or not.
        assert!(r.first_use("c", 150, 140));
        assert!(!r.first_use("b", 190, 170));
        // a is forgotten; c, expired too but behind b, waits for b to go.
        assert_eq!(r.ids.len(), 2);
        assert!(!r.first_use("b", 190, 189));
        assert!(r.first_use("d", 260, 200));
        assert_eq!((r.ids.len(), r.order.len()), (1, 1));
    }

    #[test]
    fn bind_hashes_are_checked_for_shape() {
        assert!(is_hex64(&sha256_hex("x")));
        assert!(!is_hex64("ABC"));
        assert!(!is_hex64(&"g".repeat(64)));
    }
}
