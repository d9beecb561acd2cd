//! What the evaluator knows about one request: resolved identity, device, HTTP
//! facts, time and session. Built by the proxy; borrowed, never copied.

use std::net::IpAddr;

use crate::amr::Amr;
use crate::ast::Scalar;
use crate::symbols::Sym;

/// An interned entity together with its name.
#[derive(Debug, Clone, Copy)]
pub struct Id<'a> {
    /// The interned id ([`Sym::NONE`] when the snapshot does not know the name).
    pub sym: Sym,
    /// The id as text.
    pub name: &'a str,
}

/// An authenticated user.
#[derive(Debug, Clone, Copy)]
pub struct User<'a> {
    /// The user's id.
    pub id: Id<'a>,
    /// Email address as the IdP gave it.
    pub email: Option<&'a str>,
    /// Whether the IdP vouched for the email; email and domain criteria ignore unverified ones.
    pub email_verified: bool,
    /// The email's domain, interned: [`crate::Symbols::domain_of`].
    pub domain: Sym,
    /// Interned groups, from the directory and the IdP's claims.
    pub groups: &'a [Sym],
    /// The IdP's claims (a JSON object), for `claim` criteria.
    pub claims: Option<&'a serde_json::Value>,
}

/// Posture reported for a device.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Posture {
    /// When the report stops counting (Unix seconds); `None` for attributes set by an admin.
    pub expires_at: Option<i64>,
    /// Attribute values by interned name, sorted by name id.
    pub attributes: Vec<(Sym, Scalar)>,
}

impl Posture {
    /// The value of one attribute.
    pub fn get(&self, attr: Sym) -> Option<&Scalar> {
        self.attributes
            .binary_search_by_key(&attr, |(s, _)| *s)
            .ok()
            .map(|i| &self.attributes[i].1)
    }

    /// Whether the report still counts at `now`.
    pub fn is_fresh(&self, now: i64) -> bool {
        self.expires_at.is_none_or(|e| now < e)
    }
}

/// A known device.
#[derive(Debug, Clone, Copy)]
pub struct Device<'a> {
    /// The device's id.
    pub id: Id<'a>,
    /// Approved by an admin (and not revoked).
    pub approved: bool,
    /// Its latest posture.
    pub posture: &'a Posture,
}

/// A verified client certificate.
#[derive(Debug, Clone, Copy)]
pub struct ClientCertificate<'a> {
    /// SHA-256 of the certificate's SubjectPublicKeyInfo.
    pub spki_sha256: [u8; 32],
    /// The issuer's distinguished name (RFC 4514 form).
    pub issuer: &'a str,
}

/// A just-in-time access grant's window, in Unix seconds: `start` inclusive, `end` exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantWindow {
    /// First second of access.
    pub start: i64,
    /// First second without access.
    pub end: i64,
}

/// One header's value as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderValue<'a> {
    /// Not sent.
    Absent,
    /// Sent once.
    One(&'a str),
    /// Sent more than once: ambiguous, so criteria on it are *unknown* — never
    /// enough to allow, always enough for a deny rule to fire.
    Repeated,
}

/// Request headers, looked up by lowercase name.
pub trait Headers {
    /// The header's value.
    fn get(&self, name: &str) -> HeaderValue<'_>;
}

/// Headers as a list of (name, value) pairs, names in any case.
#[derive(Debug, Clone, Copy)]
pub struct HeaderList<'a>(pub &'a [(&'a str, &'a str)]);

impl Headers for HeaderList<'_> {
    fn get(&self, name: &str) -> HeaderValue<'_> {
        let mut found = self.0.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name));
        match (found.next(), found.next()) {
            (None, _) => HeaderValue::Absent,
            (Some((_, v)), None) => HeaderValue::One(v),
            (Some(_), Some(_)) => HeaderValue::Repeated,
        }
    }
}

/// No headers at all.
pub struct NoHeaders;

impl Headers for NoHeaders {
    fn get(&self, _: &str) -> HeaderValue<'_> {
        HeaderValue::Absent
    }
}

/// Session facts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Session {
    /// When the user last authenticated (Unix seconds).
    pub auth_time: Option<i64>,
    /// Methods used to authenticate.
    pub amr: Amr,
}

/// Everything a policy may look at for one request.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    /// The user, when the principal is a user.
    pub user: Option<User<'a>>,
    /// The service account, when the principal is one.
    pub service_account: Option<Id<'a>>,
    /// The device, when one is identified.
    pub device: Option<Device<'a>>,
    /// The client certificate, when one was presented and verified.
    pub client_certificate: Option<ClientCertificate<'a>>,
    /// HTTP method as received.
    pub method: &'a str,
    /// The normalised path (the one the upstream receives).
    pub path: &'a str,
    /// Request headers.
    pub headers: &'a dyn Headers,
    /// The client's address (IPv4-mapped IPv6 is treated as IPv4).
    pub source_ip: Option<IpAddr>,
    /// The evaluation instant, Unix seconds.
    pub now: i64,
    /// Session facts.
    pub session: Session,
    /// The principal's grants for the route being evaluated.
    pub grants: &'a [GrantWindow],
}

impl<'a> Request<'a> {
    /// An anonymous request with nothing but a method, a path and a time.
    pub fn anonymous(method: &'a str, path: &'a str, now: i64) -> Self {
        Request {
            user: None,
            service_account: None,
            device: None,
            client_certificate: None,
            method,
            path,
            headers: &NoHeaders,
            source_ip: None,
            now,
            session: Session::default(),
            grants: &[],
        }
    }

    /// The verified email, if any.
    pub fn verified_email(&self) -> Option<&'a str> {
        self.user.filter(|u| u.email_verified).and_then(|u| u.email)
    }

    /// The domain of the verified email.
    pub fn email_domain(&self) -> Option<&'a str> {
        self.verified_email()
            .and_then(|e| e.rsplit_once('@'))
            .map(|(_, d)| d)
    }

    /// Whether some grant is active at `now`.
    pub fn has_active_grant(&self) -> bool {
        self.grants
            .iter()
            .any(|g| g.start <= self.now && self.now < g.end)
    }

    /// The source address with IPv4-mapped IPv6 turned into IPv4.
    pub fn canonical_ip(&self) -> Option<IpAddr> {
        self.source_ip.map(|ip| ip.to_canonical())
    }
}
