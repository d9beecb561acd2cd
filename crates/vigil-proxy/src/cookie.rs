//! The session cookie: the session's facts, encrypted and authenticated with the
//! fleet's cookie key (AES-256-GCM), bound to the host it was issued for.
//!
//! The value is `base64url(key id ‖ nonce ‖ ciphertext ‖ tag)`. The additional
//! authenticated data is a fixed context and the host, so a cookie lifted from one
//! route host is refused on every other. Keys rotate: the first key seals, every
//! key opens. The cookie is named `__Host-vigil_session` and always set with
//! `Secure; HttpOnly; SameSite=Lax; Path=/` and no `Domain`, which browsers enforce
//! for the `__Host-` prefix.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// The cookie's name.
pub const NAME: &str = "__Host-vigil_session";
const CONTEXT: &[u8] = b"vigil.session.v1\0";
/// Cookies longer than this are refused unopened (browsers keep 4096 bytes).
const MAX_LEN: usize = 4096;

/// What a session cookie carries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionCookie {
    /// Session id (`ses_…`), checked against the snapshot's revocations.
    pub sid: String,
    /// User id.
    pub uid: String,
    /// Device id, when one was identified at sign-in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub did: Option<String>,
    /// When the user authenticated (Unix seconds).
    pub auth_time: i64,
    /// When the session ends (Unix seconds).
    pub exp: i64,
    /// Authentication methods (RFC 8176).
    #[serde(default)]
    pub amr: Vec<String>,
    /// The identity provider the user signed in with (its name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idp: Option<String>,
    /// The email the identity provider gave, and whether it vouched for it (the
    /// directory's, when it has one, wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Whether the identity provider verified `email`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ev: bool,
    /// Groups named in the identity provider's claims at sign-in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// When the session was made (Unix seconds; 0 in cookies from before this
    /// field): `groups` are as of then, and a user record whose provider groups
    /// changed later wins over them.
    #[serde(default)]
    pub iat: i64,
}

/// Why a cookie was refused: the request is then unauthenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CookieError {
    /// Not base64url, too short or too long.
    Malformed,
    /// Sealed with a key this proxy does not hold.
    UnknownKey,
    /// Tampered with, or issued for another host.
    Forged,
    /// Past its `exp`.
    Expired,
    /// Sealing failed (the system's random source or the cipher).
    Crypto,
}

impl fmt::Display for CookieError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CookieError::Malformed => "the session cookie is malformed",
            CookieError::UnknownKey => "the session cookie was sealed with an unknown key",
            CookieError::Forged => "the session cookie does not authenticate for this host",
            CookieError::Expired => "the session has expired",
            CookieError::Crypto => "the session cookie could not be sealed",
        })
    }
}

impl std::error::Error for CookieError {}

/// A cookie key could not be made.
#[derive(Debug, thiserror::Error)]
#[error("a cookie key must be 32 bytes, base64-encoded")]
pub struct BadKey;

/// The fleet's cookie keys.
pub struct CookieKeys {
    /// (id, key); the first seals.
    keys: Vec<(u8, LessSafeKey)>,
    rng: SystemRandom,
}

impl fmt::Debug for CookieKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<u8> = self.keys.iter().map(|k| k.0).collect();
        f.debug_struct("CookieKeys").field("ids", &ids).finish()
    }
}

impl CookieKeys {
    /// Keys from `(id, base64 32-byte key)`, the sealing key first.
    pub fn new<'a>(keys: impl IntoIterator<Item = (u8, &'a str)>) -> Result<CookieKeys, BadKey> {
        let keys = keys
            .into_iter()
            .map(|(id, b64)| {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .map_err(|_| BadKey)?;
                let key = UnboundKey::new(&AES_256_GCM, &raw).map_err(|_| BadKey)?;
                Ok((id, LessSafeKey::new(key)))
            })
            .collect::<Result<Vec<_>, BadKey>>()?;
        if keys.is_empty() {
            return Err(BadKey);
        }
        Ok(CookieKeys {
            keys,
            rng: SystemRandom::new(),
        })
    }

    fn aad(context: &[u8], host: &str) -> Vec<u8> {
        [context, host.as_bytes()].concat()
    }

    /// The cookie value for `session` on `host` (canonical).
    pub fn seal(&self, session: &SessionCookie, host: &str) -> Result<String, CookieError> {
        self.seal_value(CONTEXT, session, host)
    }

    /// The session in `value`, if it was sealed by one of our keys for `host` and
    /// has not expired at `now` (Unix seconds).
    pub fn open(&self, value: &str, host: &str, now: i64) -> Result<SessionCookie, CookieError> {
        let session: SessionCookie = self.open_value(CONTEXT, value, host)?;
        if session.exp <= now {
            return Err(CookieError::Expired);
        }
        Ok(session)
    }

    /// Seals any value for `host` under `context` (which keeps values of one kind
    /// from ever opening as another): `base64url(key id ‖ nonce ‖ ciphertext ‖ tag)`.
    pub fn seal_value<T: Serialize>(
        &self,
        context: &[u8],
        value: &T,
        host: &str,
    ) -> Result<String, CookieError> {
        let (id, key) = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| CookieError::Crypto)?;
        let mut data = serde_json::to_vec(value).map_err(|_| CookieError::Malformed)?;
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(Self::aad(context, host)),
            &mut data,
        )
        .map_err(|_| CookieError::Crypto)?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + data.len());
        out.push(*id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&data);
        Ok(URL_SAFE_NO_PAD.encode(out))
    }

    /// Opens what [`CookieKeys::seal_value`] sealed for `host` under `context`.
    pub fn open_value<T: serde::de::DeserializeOwned>(
        &self,
        context: &[u8],
        value: &str,
        host: &str,
    ) -> Result<T, CookieError> {
        if value.len() > MAX_LEN {
            return Err(CookieError::Malformed);
        }
        let mut raw = URL_SAFE_NO_PAD
            .decode(value)
            .map_err(|_| CookieError::Malformed)?;
        if raw.len() < 1 + NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(CookieError::Malformed);
        }
        // Opened in place: the decoded bytes are ours already.
        let (head, sealed) = raw.split_at_mut(1 + NONCE_LEN);
        let (id, nonce) = head.split_at(1);
        let key = self
            .keys
            .iter()
            .find(|(k, _)| *k == id[0])
            .map(|(_, k)| k)
            .ok_or(CookieError::UnknownKey)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| CookieError::Malformed)?;
        let plain = key
            .open_in_place(nonce, Aad::from(Self::aad(context, host)), sealed)
            .map_err(|_| CookieError::Forged)?;
        serde_json::from_slice(plain).map_err(|_| CookieError::Forged)
    }
}

/// The `Set-Cookie` value that stores `value` until `max_age_s` from now.
pub fn set_cookie(value: &str, max_age_s: i64) -> String {
    set_named(NAME, value, max_age_s)
}

/// The `Set-Cookie` value that deletes the session cookie.
pub fn clear_cookie() -> String {
    set_named(NAME, "", 0)
}

/// The `Set-Cookie` value for host-bound cookie `name` (every cookie of Vigil's is
/// `Secure; HttpOnly; SameSite=Lax; Path=/` with no `Domain`).
pub fn set_named(name: &str, value: &str, max_age_s: i64) -> String {
    format!(
        "{name}={value}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age={}",
        max_age_s.max(0)
    )
}

/// The session cookie's value among `Cookie` header values; `None` when absent,
/// and also when it was sent twice (which one to believe is ambiguous).
pub fn find<'a>(cookie_headers: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    find_named(cookie_headers, NAME)
}

/// The session cookie's value in a request's headers (see [`find`]).
pub fn session_value(headers: &http::HeaderMap) -> Option<&str> {
    in_headers(headers, NAME)
}

/// Cookie `name`'s value in a request's headers (see [`find_named`]).
pub fn in_headers<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    let values = headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok());
    find_named(values, name)
}

/// Cookie `name`'s value among `Cookie` header values; `None` when absent or sent
/// twice.
pub fn find_named<'a>(
    cookie_headers: impl IntoIterator<Item = &'a str>,
    wanted: &str,
) -> Option<&'a str> {
    let mut found = None;
    for header in cookie_headers {
        for pair in header.split(';') {
            if let Some((name, value)) = pair.trim().split_once('=') {
                if name == wanted {
                    if found.is_some() {
                        return None;
                    }
                    found = Some(value);
                }
            }
        }
    }
    found
}

/// Takes the session cookie (which an upstream must never see) out of `headers`'
/// `Cookie` values, dropping values left empty; touches nothing when none holds it.
pub fn strip_session(headers: &mut http::HeaderMap) {
    let cookie = http::header::COOKIE;
    if !headers.get_all(&cookie).iter().any(|v| {
        v.as_bytes()
            .windows(NAME.len())
            .any(|w| w == NAME.as_bytes())
    }) {
        return;
    }
    let kept: Vec<String> = headers
        .get_all(&cookie)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(without_session)
        .collect();
    headers.remove(&cookie);
    for c in kept {
        if let Ok(v) = http::HeaderValue::from_str(&c) {
            headers.append(&cookie, v);
        }
    }
}

/// Joins several `Cookie` fields into one, `; `-separated. An HTTP/2 client may
/// split its cookies into one field each, which must be joined before they go
/// on over HTTP/1.1 (RFC 9113 section 8.2.3): many servers read only one `Cookie`
/// line.
pub fn join_fields(headers: &mut http::HeaderMap) {
    let cookie = http::header::COOKIE;
    if headers.get_all(&cookie).iter().nth(1).is_none() {
        return;
    }
    let joined = headers
        .get_all(&cookie)
        .iter()
        .map(http::HeaderValue::as_bytes)
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    // Valid field values joined with `; ` are a valid field value.
    if let Ok(v) = http::HeaderValue::from_bytes(&joined) {
        headers.insert(&cookie, v);
    }
}

/// A `Cookie` header value without the session cookie; `None` when nothing else is left.
fn without_session(cookie_header: &str) -> Option<String> {
    let kept: Vec<&str> = cookie_header
        .split(';')
        .map(str::trim)
        .filter(|pair| !pair.is_empty() && pair.split_once('=').map_or(*pair, |p| p.0) != NAME)
        .collect();
    (!kept.is_empty()).then(|| kept.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_fields_are_joined_into_one() {
        let mut h = http::HeaderMap::new();
        h.append("cookie", http::HeaderValue::from_static("a=1"));
        join_fields(&mut h);
        assert_eq!(h["cookie"], "a=1");
        h.append("cookie", http::HeaderValue::from_static("b=2; c=3"));
        join_fields(&mut h);
        let all: Vec<_> = h.get_all("cookie").iter().collect();
        assert_eq!(all, ["a=1; b=2; c=3"]);
    }

    #[test]
    fn the_session_cookie_never_goes_upstream() {
        let with = format!("a=1; {NAME}=secret;b=2");
        assert_eq!(without_session(&with).as_deref(), Some("a=1; b=2"));
        assert_eq!(without_session(&format!("{NAME}=x")), None);
        assert_eq!(without_session("a=1").as_deref(), Some("a=1"));
        let mut h = http::HeaderMap::new();
        h.append("cookie", http::HeaderValue::from_static("a=1"));
        h.append(
            "cookie",
            http::HeaderValue::from_str(&with).unwrap_or_else(|e| panic!("{e}")),
        );
        h.append(
            "cookie",
            http::HeaderValue::from_str(&format!("{NAME}=x")).unwrap_or_else(|e| panic!("{e}")),
        );
        strip_session(&mut h);
        let left: Vec<&str> = h
            .get_all("cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        assert_eq!(left, ["a=1", "a=1; b=2"]);
    }

    const K1: &str = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";
    const K2: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

    fn keys(list: &[(u8, &str)]) -> CookieKeys {
        CookieKeys::new(list.iter().copied()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn session() -> SessionCookie {
        SessionCookie {
            sid: "ses_abc".into(),
            uid: "usr_1".into(),
            did: Some("dev_1".into()),
            auth_time: 1_000,
            exp: 5_000,
            amr: vec!["pwd".into(), "otp".into()],
            email: Some("ada@example.com".into()),
            ev: true,
            groups: vec!["eng".into()],
            ..SessionCookie::default()
        }
    }

    #[test]
    fn sealed_cookies_open_on_their_host_only() {
        let k = keys(&[(1, K1)]);
        let v = k
            .seal(&session(), "app.example.com")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(k.open(&v, "app.example.com", 2_000), Ok(session()));
        assert_eq!(
            k.open(&v, "other.example.com", 2_000),
            Err(CookieError::Forged)
        );
        assert_eq!(
            k.open(&v, "app.example.com", 5_000),
            Err(CookieError::Expired)
        );
        // Each seal uses a fresh nonce.
        assert_ne!(k.seal(&session(), "app.example.com").ok(), Some(v));
    }

    #[test]
    fn tampering_and_garbage_are_refused() {
        let k = keys(&[(1, K1)]);
        let v = k.seal(&session(), "h").unwrap_or_else(|e| panic!("{e}"));
        let mut raw = URL_SAFE_NO_PAD.decode(&v).unwrap_or_default();
        for i in [1, 13, raw.len() - 1] {
            raw[i] ^= 1;
            assert_eq!(
                k.open(&URL_SAFE_NO_PAD.encode(&raw), "h", 0),
                Err(CookieError::Forged),
                "byte {i}"
            );
            raw[i] ^= 1;
        }
        raw[0] = 9;
        assert_eq!(
            k.open(&URL_SAFE_NO_PAD.encode(&raw), "h", 0),
            Err(CookieError::UnknownKey)
        );
        for bad in ["", "!!!", "AAAA", &"A".repeat(5000)] {
            assert_eq!(
                k.open(bad, "h", 0),
                Err(CookieError::Malformed),
                "{bad:.10}"
            );
        }
    }

    #[test]
    fn keys_rotate() {
        let old = keys(&[(1, K1)]);
        let both = keys(&[(2, K2), (1, K1)]);
        let new_only = keys(&[(2, K2)]);
        let v_old = old.seal(&session(), "h").unwrap_or_else(|e| panic!("{e}"));
        assert!(both.open(&v_old, "h", 0).is_ok(), "the old key still opens");
        let v_new = both.seal(&session(), "h").unwrap_or_else(|e| panic!("{e}"));
        assert!(new_only.open(&v_new, "h", 0).is_ok(), "the new key seals");
        assert_eq!(new_only.open(&v_old, "h", 0), Err(CookieError::UnknownKey));
        assert!(CookieKeys::new([(1, "c2hvcnQ=")]).is_err());
        assert!(CookieKeys::new(std::iter::empty()).is_err());
    }

    #[test]
    fn the_cookie_is_found_once_or_not_at_all() {
        assert_eq!(find(["a=1; __Host-vigil_session=xyz; b=2"]), Some("xyz"));
        assert_eq!(find(["a=1", "__Host-vigil_session=xyz"]), Some("xyz"));
        assert_eq!(find(["vigil_session=xyz"]), None);
        assert_eq!(
            find(["__Host-vigil_session=a; __Host-vigil_session=b"]),
            None
        );
        assert_eq!(
            find(["__Host-vigil_session=a", "__Host-vigil_session=b"]),
            None
        );
        let set = set_cookie("v", 3600);
        for attr in [
            "Secure",
            "HttpOnly",
            "SameSite=Lax",
            "Path=/",
            "Max-Age=3600",
        ] {
            assert!(set.contains(attr), "{set}");
        }
        assert!(!set.contains("Domain"));
        assert!(clear_cookie().contains("Max-Age=0"));
    }
}
