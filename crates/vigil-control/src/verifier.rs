//! Continuous verification: every live browser session that holds a refresh token is
//! checked with its identity provider about once per interval (refresh-token grant,
//! then userinfo). What the provider refuses is revoked, which reaches every proxy in
//! the next delta; what it confirms refreshes the user's record.
//!
//! Replicas sharing a database never use one refresh token at once: a session is
//! claimed first, by a write conditional on the version just read (`if_version`)
//! that stamps a claim expiry into the sealed token state. A replica that loses the
//! race, or sees an unexpired claim, leaves the session alone. The claim outlives
//! any verification ([`CLAIM`] against three requests of at most [`TIMEOUT`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use vigil_store::{Op, SecretChange, StoreError};

use crate::resources::{
    list_all, ClaimMapping, IdentityProvider, Resource as _, Session, SessionSpec, User, UserSpec,
};
use crate::time;
use crate::Control;

/// Verifications started per second at most, per identity provider, by default.
/// Beyond `PER_PROVIDER_PER_SECOND × interval` sessions of one provider, each is
/// checked less often than once per interval.
pub const PER_PROVIDER_PER_SECOND: u32 = 10;
/// Verifications in flight at once, per provider, by default.
pub const IN_FLIGHT: u32 = 4;
/// How long a claim keeps other replicas away from a session's refresh token.
const CLAIM: Duration = Duration::from_secs(60);
/// Each request to a provider.
const TIMEOUT: Duration = Duration::from_secs(10);
/// How long a provider's endpoints (from its discovery document) are reused.
const DISCOVERY_TTL: Duration = Duration::from_secs(15 * 60);
/// A provider's answer larger than this is refused.
const MAX_BYTES: usize = 256 * 1024;
/// Who the audit trail names for the verifier's writes.
const ACTOR: &str = "verifier";
/// Sentinel "never due again" (no token, revoked, gone).
const NEVER: i64 = i64::MAX;

/// A refresh token, redacted from `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Token(pub(crate) String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

/// What a session's secret column holds, sealed: the refresh token, when it was last
/// verified (or signed in), and the claim of the replica verifying it now.
#[derive(Serialize, Deserialize)]
pub(crate) struct Held {
    rt: String,
    /// Last verification claimed, or the sign-in (Unix seconds).
    at: i64,
    /// A replica uses the token until then (Unix seconds); 0: nobody.
    #[serde(default)]
    until: i64,
}

impl Held {
    /// The state of a token just issued at `at`.
    pub(crate) fn new(rt: String, at: i64) -> Held {
        Held { rt, at, until: 0 }
    }

    /// Sealed for the secret column; `None` without a secret key.
    pub(crate) fn seal(&self, control: &Control) -> Option<String> {
        control.seal(&serde_json::to_string(self).ok()?).ok()
    }

    fn open(control: &Control, sealed: &str) -> Option<Held> {
        serde_json::from_str(&control.open(sealed)?).ok()
    }
}

/// The claims a provider asserts about the user now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Claims {
    pub(crate) email: Option<String>,
    pub(crate) email_verified: bool,
    pub(crate) display_name: Option<String>,
    pub(crate) groups: Vec<String>,
}

/// What one verification found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The provider still vouches for the session: with its rotated refresh token,
    /// if it issued one, and the user's claims, if it has a userinfo endpoint.
    Valid {
        refresh_token: Option<Token>,
        claims: Option<Claims>,
    },
    /// The provider refuses (the reason): the session ends.
    Refused(String),
    /// No answer that tells (network, 5xx, configuration): kept, tried next interval.
    Unknown(String),
}

/// The token endpoint's answer, classified.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Refreshed {
    access_token: String,
    refresh_token: Option<Token>,
}

/// Classifies the token endpoint's answer to a refresh-token grant. Only
/// `invalid_grant` (RFC 6749 §5.2: the grant is invalid, expired or revoked, or the
/// user is gone) ends a session; a client misconfiguration or an outage does not.
pub(crate) fn token_answer(status: u16, body: &[u8]) -> Result<Refreshed, Outcome> {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    if (200..300).contains(&status) {
        let access_token = json
            .as_ref()
            .and_then(|j| j.get("access_token"))
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Outcome::Unknown("the token answer has no access_token".into()))?;
        let refresh_token = json
            .as_ref()
            .and_then(|j| j.get("refresh_token"))
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .map(|t| Token(t.to_owned()));
        return Ok(Refreshed {
            access_token: access_token.to_owned(),
            refresh_token,
        });
    }
    let error = json
        .as_ref()
        .and_then(|j| j.get("error"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if matches!(status, 400 | 401) && error == "invalid_grant" {
        return Err(Outcome::Refused(
            "the identity provider refused the refresh token (invalid_grant)".into(),
        ));
    }
    Err(Outcome::Unknown(if error.is_empty() {
        format!("the token endpoint answered HTTP {status}")
    } else {
        format!("the token endpoint answered HTTP {status} `{error}`")
    }))
}

/// Classifies the userinfo answer: the claims, or why the session ends (another
/// subject, an email no longer in the provider's allowed domains).
pub(crate) fn userinfo_answer(
    status: u16,
    body: &[u8],
    subject: &str,
    mapping: &ClaimMapping,
    allowed_domains: &[String],
) -> Result<Claims, Outcome> {
    if status == 401 {
        return Err(Outcome::Refused(
            "the identity provider's userinfo refused a fresh access token".into(),
        ));
    }
    if !(200..300).contains(&status) {
        return Err(Outcome::Unknown(format!(
            "the userinfo endpoint answered HTTP {status}"
        )));
    }
    let info: serde_json::Map<String, Value> = serde_json::from_slice(body)
        .map_err(|_| Outcome::Unknown("the userinfo answer is not a JSON object".into()))?;
    if info.get("sub").and_then(Value::as_str) != Some(subject) {
        return Err(Outcome::Refused(
            "the identity provider's userinfo names another subject".into(),
        ));
    }
    let email = info
        .get(&mapping.email)
        .and_then(Value::as_str)
        .map(str::to_ascii_lowercase);
    let email_verified = info
        .get("email_verified")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if !allowed_domains.is_empty() {
        let admitted = email_verified
            && email
                .as_deref()
                .and_then(|e| e.rsplit_once('@'))
                .is_some_and(|(_, d)| allowed_domains.iter().any(|a| a == d));
        if !admitted {
            return Err(Outcome::Refused(
                "the user's verified email is no longer in a domain the identity provider admits"
                    .into(),
            ));
        }
    }
    let mut groups: Vec<String> = match info.get(&mapping.groups) {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        Some(Value::String(g)) => vec![g.clone()],
        _ => Vec::new(),
    };
    groups.sort();
    groups.dedup();
    Ok(Claims {
        email,
        email_verified,
        display_name: info
            .get(&mapping.name)
            .and_then(Value::as_str)
            .map(str::to_owned),
        groups,
    })
}

/// Where, in `attributes`, a user's record keeps the groups its provider asserted
/// (local `groups` name directory groups, which must exist).
pub const IDP_GROUPS: &str = "idp_groups";

/// When (Unix seconds) [`IDP_GROUPS`] last changed: proxies prefer these groups
/// to the ones a session cookie carries from an earlier sign-in.
pub const IDP_GROUPS_AT: &str = "idp_groups_at";

/// `user` with `claims`, seen at `now` (Unix seconds), applied; `None` when
/// nothing changed.
pub(crate) fn updated_user(user: &UserSpec, claims: &Claims, now: i64) -> Option<UserSpec> {
    let mut next = user.clone();
    // An address is taken only when the provider vouches for it; one it stops
    // vouching for loses its `email_verified`; a missing claim changes nothing.
    match &claims.email {
        Some(e) if claims.email_verified => {
            next.email = Some(e.clone());
            next.email_verified = true;
        }
        Some(e) if user.email.as_deref() == Some(e.as_str()) => next.email_verified = false,
        _ => {}
    }
    if claims.display_name.is_some() {
        next.display_name.clone_from(&claims.display_name);
    }
    let groups = Value::from(claims.groups.clone());
    if claims.groups.is_empty() {
        next.attributes.remove(IDP_GROUPS);
    } else {
        next.attributes.insert(IDP_GROUPS.into(), groups);
    }
    if next.attributes.get(IDP_GROUPS) != user.attributes.get(IDP_GROUPS) {
        next.attributes
            .insert(IDP_GROUPS_AT.into(), Value::from(now));
    }
    let same = next.email == user.email
        && next.email_verified == user.email_verified
        && next.display_name == user.display_name
        && next.attributes == user.attributes;
    (!same).then_some(next)
}

/// When a session last verified at `at_ms` is due again: `interval` × [0.75, 1.25),
/// the jitter derived from the session id and `at_ms`, so every replica computes the
/// same time and sessions signed in together spread out.
pub(crate) fn next_due(id: &str, at_ms: i64, interval: Duration) -> i64 {
    let digest = ring::digest::digest(&ring::digest::SHA256, format!("{id}/{at_ms}").as_bytes());
    let d = digest.as_ref();
    let r = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) % 1000;
    let ms = i64::try_from(interval.as_millis()).unwrap_or(i64::MAX / 4);
    at_ms.saturating_add(ms * 3 / 4 + ms / 2 * i64::from(r) / 1000)
}

/// Paces the verifications of one provider to at most `per_second`.
#[derive(Debug)]
pub(crate) struct Pace {
    gap: Duration,
    next: Instant,
}

impl Pace {
    pub(crate) fn new(per_second: u32, now: Instant) -> Pace {
        Pace {
            gap: Duration::from_secs(1) / per_second.max(1),
            next: now,
        }
    }

    /// When the next verification may start, reserving that slot.
    pub(crate) fn reserve(&mut self, now: Instant) -> Instant {
        let at = self.next.max(now);
        self.next = at + self.gap;
        at
    }
}

/// How hard the verifier may press each identity provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Verifications started per second at most (at least 1).
    pub per_second: u32,
    /// Verifications in flight at once (at least 1).
    pub in_flight: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            per_second: PER_PROVIDER_PER_SECOND,
            in_flight: IN_FLIGHT,
        }
    }
}

/// What the verifier needs of a provider.
struct Provider {
    name: String,
    /// The provider's issuer now; a session signed in at another is never sent.
    issuer: String,
    client_id: String,
    client_secret: Option<String>,
    token_endpoint: String,
    userinfo_endpoint: Option<String>,
    mapping: ClaimMapping,
    allowed_domains: Vec<String>,
}

struct Verifier {
    control: Control,
    http: reqwest::Client,
    interval: Duration,
    limits: Limits,
    /// Session id → when it is due (Unix ms).
    due: HashMap<String, i64>,
    paces: HashMap<String, Pace>,
    /// Issuer → (token endpoint, userinfo endpoint), and when fetched.
    endpoints: HashMap<String, ((String, Option<String>), Instant)>,
}

/// Verifies sessions until the process ends, within `limits` per provider;
/// `interval` zero disables it.
pub(crate) async fn run(control: Control, interval: Duration, limits: Limits) {
    if interval.is_zero() {
        tracing::info!("Session re-verification is disabled");
        return;
    }
    let http = match reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(TIMEOUT)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "Cannot make the HTTP client for session re-verification");
            return;
        }
    };
    tracing::info!(
        interval_s = interval.as_secs_f64(),
        per_provider_per_s = limits.per_second,
        per_provider_in_flight = limits.in_flight,
        "Re-verifying sessions with their identity providers"
    );
    let tick = (interval / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
    let mut v = Verifier {
        control,
        http,
        interval,
        limits,
        due: HashMap::new(),
        paces: HashMap::new(),
        endpoints: HashMap::new(),
    };
    loop {
        if let Err(e) = v.cycle().await {
            tracing::warn!(error = %e, "Session re-verification cycle failed");
        }
        tokio::time::sleep(tick).await;
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Verifier {
    /// Starts every due session's verification, paced per provider, and waits for them.
    async fn cycle(&mut self) -> Result<(), String> {
        let now = now_ms();
        let sessions = list_all(&self.control.store, Session::KIND, Vec::new())
            .await
            .map_err(|e| e.to_string())?;
        let mut live = HashSet::new();
        let mut work: HashMap<String, Vec<String>> = HashMap::new();
        for rec in sessions {
            let Ok(spec) = crate::api::stored::<Session>(rec.body) else {
                continue;
            };
            let expires = time::unix(&spec.expires_at)
                .unwrap_or(0)
                .saturating_mul(1000);
            let (None, Some(idp)) = (&spec.revoked_at, spec.identity_provider) else {
                continue;
            };
            if expires <= now {
                continue;
            }
            live.insert(rec.id.clone());
            let due = *self.due.entry(rec.id.clone()).or_insert_with(|| {
                let signed_in = time::unix(&spec.auth_time)
                    .unwrap_or(0)
                    .saturating_mul(1000);
                next_due(&rec.id, signed_in, self.interval)
            });
            if due <= now {
                work.entry(idp).or_default().push(rec.id);
            }
        }
        self.due.retain(|id, _| live.contains(id));
        let mut tasks = JoinSet::new();
        let started = Instant::now();
        for (idp, ids) in work {
            let provider = match self.provider(&idp).await {
                Ok(p) => Arc::new(p),
                Err(e) => {
                    tracing::warn!(provider = %idp, error = %e, "Cannot re-verify this identity provider's sessions; trying again next interval");
                    let later = now.saturating_add(self.interval.as_millis() as i64);
                    for id in ids {
                        self.due.insert(id, later);
                    }
                    continue;
                }
            };
            let pace = self
                .paces
                .entry(idp)
                .or_insert_with(|| Pace::new(self.limits.per_second, started));
            let slots = Arc::new(Semaphore::new(self.limits.in_flight.max(1) as usize));
            for id in ids {
                let at = pace.reserve(Instant::now());
                let (control, http, provider, slots) = (
                    self.control.clone(),
                    self.http.clone(),
                    provider.clone(),
                    slots.clone(),
                );
                let interval = self.interval;
                tasks.spawn(async move {
                    tokio::time::sleep_until(at.into()).await;
                    let _slot = slots.acquire_owned().await;
                    let due = verify(&control, &http, &provider, &id, interval).await;
                    (id, due)
                });
            }
        }
        while let Some(done) = tasks.join_next().await {
            if let Ok((id, due)) = done {
                self.due.insert(id, due);
            }
        }
        Ok(())
    }

    /// The provider named `name`, with its client secret and endpoints.
    async fn provider(&mut self, name: &str) -> Result<Provider, String> {
        let store = &self.control.store;
        let rec = store
            .get(IdentityProvider::KIND, name)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the identity provider no longer exists")?;
        let spec =
            crate::api::stored::<IdentityProvider>(rec.body).map_err(|p| p.detail.clone())?;
        let client_secret = match store
            .secret(IdentityProvider::KIND, name)
            .await
            .map_err(|e| e.to_string())?
        {
            Some(sealed) => Some(
                self.control
                    .open(&sealed)
                    .ok_or("its client secret cannot be decrypted with the configured key")?,
            ),
            None => None,
        };
        let fresh = self
            .endpoints
            .get(&spec.issuer_url)
            .filter(|(_, at)| at.elapsed() < DISCOVERY_TTL)
            .map(|(e, _)| e.clone());
        let (token_endpoint, userinfo_endpoint) = match fresh {
            Some(e) => e,
            None => {
                let e = discover(&self.http, &spec.issuer_url).await?;
                self.endpoints
                    .insert(spec.issuer_url.clone(), (e.clone(), Instant::now()));
                e
            }
        };
        Ok(Provider {
            name: spec.name,
            issuer: spec.issuer_url.clone(),
            client_id: spec.client_id,
            client_secret,
            token_endpoint,
            userinfo_endpoint,
            mapping: spec.claim_mapping,
            allowed_domains: spec.allowed_domains,
        })
    }
}

async fn read(res: reqwest::Response) -> Result<(u16, Vec<u8>), String> {
    let status = res.status().as_u16();
    let body = res.bytes().await.map_err(|e| e.to_string())?;
    if body.len() > MAX_BYTES {
        return Err(format!("an answer larger than {MAX_BYTES} bytes"));
    }
    Ok((status, body.to_vec()))
}

/// The token and userinfo endpoints, from the discovery document at `issuer`.
async fn discover(
    http: &reqwest::Client,
    issuer: &str,
) -> Result<(String, Option<String>), String> {
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let res = http
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let (status, body) = read(res).await.map_err(|e| format!("{url}: {e}"))?;
    if !(200..300).contains(&status) {
        return Err(format!("{url}: HTTP {status}"));
    }
    let meta: Value = serde_json::from_slice(&body).map_err(|e| format!("{url}: {e}"))?;
    let said = meta.get("issuer").and_then(Value::as_str).unwrap_or("");
    if said.trim_end_matches('/') != issuer.trim_end_matches('/') {
        return Err(format!(
            "the discovery document names issuer `{said}`, not `{issuer}`"
        ));
    }
    let token = meta
        .get("token_endpoint")
        .and_then(Value::as_str)
        .ok_or("the discovery document has no `token_endpoint`")?;
    let userinfo = meta
        .get("userinfo_endpoint")
        .and_then(Value::as_str)
        .map(str::to_owned);
    // Refresh tokens and the client secret never leave over plain HTTP when the
    // issuer itself is HTTPS.
    if issuer.starts_with("https://") {
        for endpoint in std::iter::once(token).chain(userinfo.as_deref()) {
            if !endpoint.starts_with("https://") {
                return Err(format!(
                    "the discovery document's endpoint `{endpoint}` is not HTTPS"
                ));
            }
        }
    }
    Ok((token.to_owned(), userinfo))
}

/// Asks the provider about the session holding `refresh_token` of `subject`.
async fn ask(http: &reqwest::Client, p: &Provider, refresh_token: &str, subject: &str) -> Outcome {
    let mut form = vec![
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh_token),
    ];
    // client_secret_basic (RFC 6749 §2.3.1: both parts form-encoded), as the proxy's
    // code exchange authenticates; a public client names itself in the form.
    let enc = |s: &str| {
        serde_urlencoded::to_string([("", s)])
            .map(|v| v.trim_start_matches('=').to_owned())
            .unwrap_or_default()
    };
    if p.client_secret.is_none() {
        form.push(("client_id", p.client_id.as_str()));
    }
    let mut req = http.post(&p.token_endpoint).form(&form);
    if let Some(secret) = &p.client_secret {
        req = req.basic_auth(enc(&p.client_id), Some(enc(secret)));
    }
    let refreshed = match req.send().await {
        Ok(res) => match read(res).await {
            Ok((status, body)) => token_answer(status, &body),
            Err(e) => Err(Outcome::Unknown(format!("the token endpoint: {e}"))),
        },
        Err(e) => Err(Outcome::Unknown(format!(
            "the token endpoint: {}",
            without_url(&e)
        ))),
    };
    let refreshed = match refreshed {
        Ok(r) => r,
        Err(o) => return o,
    };
    let claims = match &p.userinfo_endpoint {
        None => None,
        Some(url) => {
            let answer = match http
                .get(url)
                .bearer_auth(&refreshed.access_token)
                .send()
                .await
            {
                Ok(res) => read(res)
                    .await
                    .map_err(|e| format!("the userinfo endpoint: {e}")),
                Err(e) => Err(format!("the userinfo endpoint: {}", without_url(&e))),
            };
            let claims = answer.map_err(Outcome::Unknown).and_then(|(status, body)| {
                userinfo_answer(status, &body, subject, &p.mapping, &p.allowed_domains)
            });
            match claims {
                Ok(c) => Some(c),
                // The refresh worked: keep its rotated token even if userinfo is
                // down (a token used once is gone at the provider).
                Err(Outcome::Unknown(why)) => {
                    tracing::warn!(provider = %p.name, why, "Cannot read userinfo; the user's record is not updated");
                    None
                }
                Err(o) => return o,
            }
        }
    };
    Outcome::Valid {
        refresh_token: refreshed.refresh_token,
        claims,
    }
}

/// A request error without its URL's query (none here, but the habit is cheap).
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(url.as_str(), "");
    }
    s
}

/// Verifies one session; when it is due next (Unix ms).
async fn verify(
    control: &Control,
    http: &reqwest::Client,
    p: &Provider,
    id: &str,
    interval: Duration,
) -> i64 {
    match verify_once(control, http, p, id, interval).await {
        Ok(due) => due,
        Err(e) => {
            tracing::warn!(session = %id, provider = %p.name, error = %e, "Cannot re-verify a session; trying again later");
            let wait = (interval / 4).max(Duration::from_secs(1));
            now_ms().saturating_add(wait.as_millis() as i64)
        }
    }
}

async fn verify_once(
    control: &Control,
    http: &reqwest::Client,
    p: &Provider,
    id: &str,
    interval: Duration,
) -> Result<i64, String> {
    let started = Instant::now();
    let store = &control.store;
    let Some(rec) = store
        .get(Session::KIND, id)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(NEVER);
    };
    let spec = crate::api::stored::<Session>(rec.body.clone()).map_err(|p| p.detail)?;
    let now = now_ms();
    let expired = time::unix(&spec.expires_at)
        .unwrap_or(0)
        .saturating_mul(1000)
        <= now;
    if spec.revoked_at.is_some() || expired {
        return Ok(NEVER);
    }
    let Some(sealed) = store
        .secret(Session::KIND, id)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(NEVER);
    };
    let held = Held::open(control, &sealed)
        .ok_or("its refresh token cannot be decrypted with the configured key")?;
    let secs = now / 1000;
    if held.until > secs {
        // Another replica is on it.
        return Ok(held.until.saturating_mul(1000));
    }
    let due = next_due(id, held.at.saturating_mul(1000), interval);
    if due > now {
        // Verified since this replica looked (by another one).
        return Ok(due);
    }
    let (issuer, subject) = subject_of(control, &spec.user_id).await?;
    if issuer.trim_end_matches('/') != p.issuer.trim_end_matches('/') {
        // The provider was pointed at another issuer since this sign-in: the
        // refresh token is not that issuer's to see, and the session cannot be
        // verified any more.
        revoke(
            control,
            id,
            "the identity provider now names another issuer than the one the session signed in with",
        )
        .await?;
        return Ok(NEVER);
    }
    // Claim it: only the replica whose conditional write lands uses the token.
    let claim = Held {
        rt: held.rt,
        at: secs,
        until: secs.saturating_add(CLAIM.as_secs() as i64),
    };
    let op = with_secret(
        crate::api::replace_op::<Session>(control, id, spec.clone(), Some(rec.version))
            .await
            .map_err(|p| p.detail)?,
        claim.seal(control).ok_or("no secret key")?,
    );
    let claimed = match control.write(ACTOR, Some("claim"), vec![op]).await {
        Ok(c) => c.revision,
        Err(StoreError::VersionMismatch { .. }) => return Ok(now.saturating_add(1000)),
        Err(e) => return Err(e.to_string()),
    };
    let asked = Instant::now();
    let outcome = ask(http, p, &claim.rt, &subject).await;
    let idp = asked.elapsed();
    match outcome {
        Outcome::Refused(reason) => {
            revoke(control, id, &reason).await?;
            timed(id, "refused", started, idp);
            Ok(NEVER)
        }
        Outcome::Unknown(why) => {
            tracing::warn!(session = %id, provider = %p.name, why, "The identity provider gave no answer; the session is kept and tried again next interval");
            release(control, id, &claim, claimed, None, None).await?;
            timed(id, "unknown", started, idp);
            Ok(next_due(id, claim.at.saturating_mul(1000), interval))
        }
        Outcome::Valid {
            refresh_token,
            claims,
        } => {
            release(control, id, &claim, claimed, refresh_token, claims).await?;
            timed(id, "valid", started, idp);
            Ok(next_due(id, claim.at.saturating_mul(1000), interval))
        }
    }
}

/// Logs (at debug) how long one verification took, end to end and at the provider,
/// in milliseconds: `make bench-verifier` reads these lines.
fn timed(id: &str, outcome: &str, started: Instant, idp: Duration) {
    tracing::debug!(
        session = %id,
        outcome,
        ms = started.elapsed().as_secs_f64() * 1000.0,
        idp_ms = idp.as_secs_f64() * 1000.0,
        "Verified a session"
    );
}

fn with_secret(op: Op, sealed: String) -> Op {
    match op {
        Op::Replace {
            entity, if_version, ..
        } => Op::Replace {
            entity,
            if_version,
            secret: SecretChange::Set(Some(sealed)),
        },
        other => other,
    }
}

/// The issuer and subject of user `user_id`.
async fn subject_of(control: &Control, user_id: &str) -> Result<(String, String), String> {
    let rec = control
        .store
        .get(User::KIND, user_id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("user `{user_id}` does not exist"))?;
    let user = crate::api::stored::<User>(rec.body).map_err(|p| p.detail)?;
    Ok((user.issuer, user.subject))
}

/// Ends the session (and forgets its token), audited as the verifier's `reverify`.
async fn revoke(control: &Control, id: &str, reason: &str) -> Result<(), String> {
    for _ in 0..4 {
        let Some(rec) = control
            .store
            .get(Session::KIND, id)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(());
        };
        let mut spec: SessionSpec =
            crate::api::stored::<Session>(rec.body).map_err(|p| p.detail)?;
        if spec.revoked_at.is_none() {
            spec.revoked_at = Some(time::secs(chrono::Utc::now()));
        }
        let op =
            match crate::api::replace_op::<Session>(control, id, spec.clone(), Some(rec.version))
                .await
                .map_err(|p| p.detail)?
            {
                Op::Replace {
                    entity, if_version, ..
                } => Op::Replace {
                    entity,
                    if_version,
                    secret: SecretChange::Set(None),
                },
                other => other,
            };
        match control.write(ACTOR, Some("reverify"), vec![op]).await {
            Ok(_) => {
                tracing::warn!(session = %id, user = %spec.user_id, reason, "Revoked a session its identity provider no longer vouches for");
                return Ok(());
            }
            Err(StoreError::VersionMismatch { .. }) => continue,
            Err(e) => return Err(e.to_string()),
        }
    }
    Err("the session kept changing; it is revoked next cycle".into())
}

/// Stores the verification's result: the claim released, the rotated token if one
/// came, and the user's record when the provider's claims changed. Written only
/// while this replica's claim stands (the sealed state is still the claim).
async fn release(
    control: &Control,
    id: &str,
    claim: &Held,
    claimed: i64,
    rotated: Option<Token>,
    claims: Option<Claims>,
) -> Result<(), String> {
    let store = &control.store;
    let done = Held {
        rt: rotated.map_or_else(|| claim.rt.clone(), |t| t.0),
        at: claim.at,
        until: 0,
    };
    let sealed = done.seal(control).ok_or("no secret key")?;
    for attempt in 0..4 {
        let rec = store
            .get(Session::KIND, id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the session is gone")?;
        let ours = match store
            .secret(Session::KIND, id)
            .await
            .map_err(|e| e.to_string())?
        {
            Some(s) => Held::open(control, &s).is_some_and(|h| {
                h.at == claim.at && h.until == claim.until && rec.version >= claimed
            }),
            None => false,
        };
        if !ours {
            return Err("the claim was lost before the result was stored".into());
        }
        let spec = crate::api::stored::<Session>(rec.body).map_err(|p| p.detail)?;
        let mut ops = vec![with_secret(
            crate::api::replace_op::<Session>(control, id, spec.clone(), Some(rec.version))
                .await
                .map_err(|p| p.detail)?,
            sealed.clone(),
        )];
        // After two conflicts, the token alone: it must not be lost to an admin's edit.
        if let (Some(c), true) = (&claims, attempt < 2) {
            if let Some(user_op) = user_update(control, &spec.user_id, c).await? {
                ops.push(user_op);
            }
        }
        let user_updated = ops.len() > 1;
        match control.write(ACTOR, Some("reverify"), ops).await {
            Ok(_) => {
                if user_updated {
                    tracing::info!(session = %id, user = %spec.user_id, "Updated the user's record from the identity provider's claims");
                }
                return Ok(());
            }
            Err(StoreError::VersionMismatch { .. }) => continue,
            Err(e) => return Err(e.to_string()),
        }
    }
    Err("the session kept changing; its verification result was not stored".into())
}

async fn user_update(
    control: &Control,
    user_id: &str,
    claims: &Claims,
) -> Result<Option<Op>, String> {
    let Some(rec) = control
        .store
        .get(User::KIND, user_id)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(None);
    };
    let user = crate::api::stored::<User>(rec.body).map_err(|p| p.detail)?;
    let Some(next) = updated_user(&user, claims, chrono::Utc::now().timestamp()) else {
        return Ok(None);
    };
    crate::api::replace_op::<User>(control, user_id, next, Some(rec.version))
        .await
        .map(Some)
        .map_err(|p| p.detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping() -> ClaimMapping {
        ClaimMapping::default()
    }

    #[test]
    fn token_answers_are_classified() {
        let ok = token_answer(200, br#"{"access_token":"a","refresh_token":"r2"}"#).unwrap();
        assert_eq!(ok.refresh_token, Some(Token("r2".into())));
        assert_eq!(
            token_answer(200, br#"{"access_token":"a"}"#)
                .unwrap()
                .refresh_token,
            None
        );
        for (status, body) in [
            (
                400,
                &br#"{"error":"invalid_grant","error_description":"grant request is invalid"}"#[..],
            ),
            (401, br#"{"error":"invalid_grant"}"#),
        ] {
            assert!(matches!(
                token_answer(status, body),
                Err(Outcome::Refused(_))
            ));
        }
        for (status, body) in [
            (400, &br#"{"error":"invalid_request"}"#[..]),
            (401, br#"{"error":"invalid_client"}"#),
            (400, br#"{"error":"unauthorized_client"}"#),
            (500, br#"{"error":"server_error"}"#),
            (502, b"<html>bad gateway</html>"),
            (503, b""),
            (200, b"not json"),
            (200, br#"{"refresh_token":"r"}"#),
        ] {
            assert!(
                matches!(token_answer(status, body), Err(Outcome::Unknown(_))),
                "{status}"
            );
        }
    }

    #[test]
    fn userinfo_answers_are_classified() {
        let body = br#"{"sub":"alice","email":"Alice@Example.com","email_verified":true,"name":"Alice","groups":["b","a","a"]}"#;
        let c = userinfo_answer(200, body, "alice", &mapping(), &[]).unwrap();
        assert_eq!(c.email.as_deref(), Some("alice@example.com"));
        assert!(c.email_verified);
        assert_eq!(c.display_name.as_deref(), Some("Alice"));
        assert_eq!(c.groups, ["a", "b"]);
        let domains = ["example.com".to_owned()];
        assert!(userinfo_answer(200, body, "alice", &mapping(), &domains).is_ok());
        let other = ["example.org".to_owned()];
        assert!(matches!(
            userinfo_answer(200, body, "alice", &mapping(), &other),
            Err(Outcome::Refused(_))
        ));
        let unverified = br#"{"sub":"alice","email":"alice@example.com","email_verified":false}"#;
        assert!(matches!(
            userinfo_answer(200, unverified, "alice", &mapping(), &domains),
            Err(Outcome::Refused(_))
        ));
        assert!(matches!(
            userinfo_answer(200, body, "bob", &mapping(), &[]),
            Err(Outcome::Refused(_))
        ));
        assert!(matches!(
            userinfo_answer(401, b"", "alice", &mapping(), &[]),
            Err(Outcome::Refused(_))
        ));
        for status in [403, 500, 503] {
            assert!(matches!(
                userinfo_answer(status, b"", "alice", &mapping(), &[]),
                Err(Outcome::Unknown(_))
            ));
        }
        let custom = ClaimMapping {
            email: "mail".into(),
            groups: "roles".into(),
            name: "display".into(),
        };
        let c = userinfo_answer(
            200,
            br#"{"sub":"a","mail":"a@x.io","roles":"admin","display":"A"}"#,
            "a",
            &custom,
            &[],
        )
        .unwrap();
        assert_eq!(
            (c.email.as_deref(), c.groups, c.display_name.as_deref()),
            (Some("a@x.io"), vec!["admin".to_owned()], Some("A"))
        );
    }

    #[test]
    fn users_change_only_when_claims_do() {
        let user = UserSpec {
            issuer: "https://idp".into(),
            subject: "alice".into(),
            email: Some("alice@example.com".into()),
            email_verified: true,
            display_name: Some("Alice".into()),
            status: Default::default(),
            groups: vec!["local".into()],
            attributes: serde_json::Map::new(),
        };
        let mut claims = Claims {
            email: Some("alice@example.com".into()),
            email_verified: true,
            display_name: Some("Alice".into()),
            groups: Vec::new(),
        };
        assert!(updated_user(&user, &claims, 100).is_none());
        claims.groups = vec!["eng".into()];
        let next = updated_user(&user, &claims, 100).unwrap();
        assert_eq!(next.attributes[IDP_GROUPS], serde_json::json!(["eng"]));
        assert_eq!(next.attributes[IDP_GROUPS_AT], serde_json::json!(100));
        assert_eq!(next.groups, ["local"], "directory groups are the admins'");
        assert!(updated_user(&next, &claims, 200).is_none());
        // Losing every group is a change too, and is dated.
        let none = Claims {
            groups: Vec::new(),
            ..claims.clone()
        };
        let emptied = updated_user(&next, &none, 300).unwrap();
        assert!(emptied.attributes.get(IDP_GROUPS).is_none());
        assert_eq!(emptied.attributes[IDP_GROUPS_AT], serde_json::json!(300));
        claims.email = Some("alice@new.example".into());
        assert_eq!(
            updated_user(&next, &claims, 400).unwrap().email.as_deref(),
            Some("alice@new.example")
        );
    }

    #[test]
    fn due_times_are_jittered_within_a_quarter_and_agree() {
        let interval = Duration::from_secs(300);
        let mut seen = HashSet::new();
        for i in 0..200 {
            let id = format!("ses_{i}");
            let due = next_due(&id, 1_000_000, interval);
            assert!((1_000_000 + 225_000..1_000_000 + 375_000).contains(&due));
            assert_eq!(due, next_due(&id, 1_000_000, interval), "replicas agree");
            seen.insert(due / 10_000);
        }
        assert!(seen.len() > 10, "spread out: {seen:?}");
    }

    #[test]
    fn pace_spaces_verifications() {
        let t0 = Instant::now();
        let mut p = Pace::new(10, t0);
        let slots: Vec<_> = (0..25).map(|_| p.reserve(t0)).collect();
        assert_eq!(slots[0], t0);
        for w in slots.windows(2) {
            assert_eq!(w[1] - w[0], Duration::from_millis(100));
        }
        // 25 verifications take 2.4 s: at most 10 start in any second.
        assert_eq!(slots[24] - t0, Duration::from_millis(2400));
        // An idle provider is not owed a burst.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(p.reserve(later), later);
        assert_eq!(p.reserve(later), later + Duration::from_millis(100));
    }

    #[test]
    fn tokens_stay_out_of_debug() {
        let o = Outcome::Valid {
            refresh_token: Some(Token("secret-rt".into())),
            claims: None,
        };
        assert!(!format!("{o:?}").contains("secret-rt"));
    }
}
