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
    /// The browser's earlier sessions (id, user) at the authenticate host, which
    /// route hosts may still hold: signing out of this one ends them too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier: Vec<(String, String)>,
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
        self.open_value_within(context, value, host, MAX_LEN)
    }

    /// [`CookieKeys::open_value`] for a value that may be up to `max_len` bytes
    /// long (one that travels in a URL rather than a cookie).
    pub fn open_value_within<T: serde::de::DeserializeOwned>(
        &self,
        context: &[u8],
        value: &str,
        host: &str,
        max_len: usize,
    ) -> Result<T, CookieError> {
        if value.len() > max_len {
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

/// The start of the name of every cookie of Vigil's (the session's, and the
/// sign-in's bind and login cookies).
const OWN_PREFIX: &str = "__Host-vigil_";

/// Readies a request's `Cookie` fields for an upstream: Vigil's own cookies (the
/// session cookie, and the bind value of a sign-in in progress), which an
/// upstream must never see, are taken out, and what is left goes as one field,
/// `; `-separated (an HTTP/2 client may send each cookie as a field of its own,
/// and HTTP/1.1 servers read one `Cookie` line: RFC 9113 section 8.2.3). Works
/// on bytes, so a field holding non-ASCII bytes is kept, and searched, like any
/// other. A single field without one of Vigil's cookies is left untouched.
pub fn for_upstream(headers: &mut http::HeaderMap) {
    let cookie = http::header::COOKIE;
    let several = headers.get_all(&cookie).iter().nth(1).is_some();
    let holds_own = || {
        headers.get_all(&cookie).iter().any(|v| {
            v.as_bytes()
                .windows(OWN_PREFIX.len())
                .any(|w| w == OWN_PREFIX.as_bytes())
        })
    };
    if !several && !holds_own() {
        return;
    }
    let mut joined = Vec::new();
    for value in &headers.get_all(&cookie) {
        for pair in value.as_bytes().split(|&b| b == b';') {
            let pair = pair.trim_ascii();
            // The name as `find_named` reads it: up to the first `=`, or the whole
            // pair when it has none.
            let name = pair.split(|&b| b == b'=').next().unwrap_or(pair);
            if pair.is_empty() || name.starts_with(OWN_PREFIX.as_bytes()) {
                continue;
            }
            if !joined.is_empty() {
                joined.extend_from_slice(b"; ");
            }
            joined.extend_from_slice(pair);
        }
    }
    headers.remove(&cookie);
    // Pieces of valid field values joined with `; ` are a valid field value.
    if joined.is_empty() {
        return;
    }
    if let Ok(v) = http::HeaderValue::from_bytes(&joined) {
        headers.insert(&cookie, v);
    }
}

/// Takes out of an upstream's response every `Set-Cookie` that names a cookie in
/// Vigil's namespace: only the proxy sets those. An upstream (or anyone who can
/// make one echo a header) could otherwise clear a user's session on its host, or
/// plant a bind value of its choosing for a sign-in in progress. Names are
/// compared without regard to case or surrounding blanks, as browsers may read
/// them; a cookie without `=` is all name here.
pub fn strip_own_set_cookies(headers: &mut http::HeaderMap) {
    let set_cookie = http::header::SET_COOKIE;
    let ours = |v: &http::HeaderValue| {
        let b = v.as_bytes();
        let name = b.split(|&c| c == b'=').next().unwrap_or(b).trim_ascii();
        name.len() >= OWN_PREFIX.len()
            && name[..OWN_PREFIX.len()].eq_ignore_ascii_case(OWN_PREFIX.as_bytes())
    };
    if !headers.get_all(&set_cookie).iter().any(ours) {
        return;
    }
    let kept: Vec<http::HeaderValue> = headers
        .get_all(&set_cookie)
        .iter()
        .filter(|v| !ours(v))
        .cloned()
        .collect();
    headers.remove(&set_cookie);
    for v in kept {
        headers.append(&set_cookie, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_cannot_set_vigils_cookies() {
        let mut h = http::HeaderMap::new();
        for v in [
            "a=1; Path=/",
            "__Host-vigil_session=; Max-Age=0; Path=/; Secure",
            " __host-VIGIL_bind=evil; Path=/; Secure",
            "__Host-vigil_login",
            "b=2",
            "__Host-vigilant=3",
        ] {
            h.append("set-cookie", http::HeaderValue::from_static(v));
        }
        h.insert("x-other", http::HeaderValue::from_static("kept"));
        strip_own_set_cookies(&mut h);
        let left: Vec<&str> = h
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap_or(""))
            .collect();
        assert_eq!(left, ["a=1; Path=/", "b=2", "__Host-vigilant=3"]);
        assert_eq!(h["x-other"], "kept");
        // Nothing to take out: nothing changes.
        let mut h = http::HeaderMap::new();
        h.append("set-cookie", http::HeaderValue::from_static("a=1"));
        strip_own_set_cookies(&mut h);
        assert_eq!(h["set-cookie"], "a=1");
    }

    fn upstream_cookies(fields: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut h = http::HeaderMap::new();
        for f in fields {
            h.append(
                "cookie",
                http::HeaderValue::from_bytes(f).unwrap_or_else(|e| panic!("{e}")),
            );
        }
        for_upstream(&mut h);
        h.get_all("cookie")
            .iter()
            .map(|v| v.as_bytes().to_vec())
            .collect()
    }

    #[test]
    fn cookie_fields_are_joined_into_one() {
        assert_eq!(upstream_cookies(&[b"a=1"]), [b"a=1".to_vec()]);
        assert_eq!(upstream_cookies(&[b" a=1 ;;"]), [b" a=1 ;;".to_vec()]);
        assert_eq!(
            upstream_cookies(&[b"a=1", b"b=2; c=3"]),
            [b"a=1; b=2; c=3".to_vec()]
        );
        assert!(upstream_cookies(&[]).is_empty());
    }

    #[test]
    fn the_session_cookie_never_goes_upstream() {
        let session = format!("{NAME}=secret");
        let with = format!("a=1; {session};b=2");
        assert_eq!(upstream_cookies(&[with.as_bytes()]), [b"a=1; b=2".to_vec()]);
        assert!(upstream_cookies(&[session.as_bytes()]).is_empty());
        assert!(upstream_cookies(&[NAME.as_bytes(), b"; ;"]).is_empty());
        assert_eq!(
            upstream_cookies(&[b"a=1", with.as_bytes(), session.as_bytes()]),
            [b"a=1; a=1; b=2".to_vec()]
        );
        // Non-ASCII bytes in a field (a browser sends a cookie's bytes as set):
        // the field is searched and kept like any other.
        let mut odd = "n=caf\u{e9}; ".to_owned().into_bytes();
        odd.extend_from_slice(session.as_bytes());
        assert_eq!(
            upstream_cookies(&[&odd, b"z=9"]),
            [b"n=caf\xc3\xa9; z=9".to_vec()]
        );
        // Nor do the sign-in's cookies.
        assert_eq!(
            upstream_cookies(&[b"__Host-vigil_bind=b; a=1; __Host-vigil_login=l"]),
            [b"a=1".to_vec()]
        );
        // Anything named in Vigil's namespace is taken out, even a name the
        // session lookup would not take; a name merely like it stays.
        let spaced = format!("{NAME} =x");
        assert!(upstream_cookies(&[spaced.as_bytes(), session.as_bytes()]).is_empty());
        assert_eq!(
            upstream_cookies(&[b"_Host-vigil_session=x", session.as_bytes()]),
            [b"_Host-vigil_session=x".to_vec()]
        );
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
