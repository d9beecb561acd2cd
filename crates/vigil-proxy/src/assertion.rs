//! The signed identity assertion upstreams can verify instead of trusting headers:
//! `X-Vigil-Jwt-Assertion`, an ES256 JWT naming the caller (`sub`, `email`,
//! `groups`, `sid`) for one route host (`aud`), valid for five minutes and cached
//! per caller and route until a minute before it expires. Every proxy serves the
//! public key at `/.well-known/vigil/jwks.json`; the fleet shares one key (from a
//! file) so that any proxy's JWKS verifies any proxy's assertion.

use std::collections::HashMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde::Serialize;

/// Where the public keys are served, on every host.
pub const JWKS_PATH: &str = "/.well-known/vigil/jwks.json";
/// How long an assertion is valid (seconds).
const LIFETIME: i64 = 300;
/// Cached assertions are replaced this long before they expire (seconds).
const RENEW_BEFORE: i64 = 60;
/// Cached assertions kept at most; beyond this the expired are dropped, then all.
const CACHE_MAX: usize = 50_000;

/// The fleet's assertion key and what it signed lately.
pub struct Assertions {
    key: EncodingKey,
    kid: String,
    jwks: String,
    issuer: String,
    /// By `caller\naudience`: (token, expiry).
    cache: parking_lot::Mutex<HashMap<String, (String, i64)>>,
}

impl std::fmt::Debug for Assertions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assertions")
            .field("kid", &self.kid)
            .finish()
    }
}

/// Who an assertion is about.
#[derive(Debug, Clone)]
pub struct Subject {
    /// `sub`: the user's id, or `service-account:<id>`.
    pub id: String,
    /// The session id, when the caller came through one.
    pub session: Option<String>,
    /// The email, if known.
    pub email: Option<String>,
    /// Groups (directory and claims).
    pub groups: Vec<String>,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: &'a str,
    iat: i64,
    exp: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    sid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    groups: &'a [String],
}

impl Assertions {
    /// From a P-256 private key in PKCS#8 DER; `issuer` is the `iss` every
    /// assertion carries (the authenticate URL, or `vigil`).
    pub fn from_pkcs8(der: &[u8], issuer: &str) -> Result<Assertions, String> {
        let rng = ring::rand::SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
            .map_err(|e| format!("the assertion key is not a P-256 PKCS#8 key: {e}"))?;
        let public = pair.public_key().as_ref();
        let kid = vigil_policy::to_hex(
            &ring::digest::digest(&ring::digest::SHA256, public).as_ref()[..8],
        );
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(&public[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&public[33..65]),
        }]})
        .to_string();
        Ok(Assertions {
            key: EncodingKey::from_ec_der(der),
            kid,
            jwks,
            issuer: issuer.to_owned(),
            cache: parking_lot::Mutex::new(HashMap::new()),
        })
    }

    /// From a PEM file's text (`-----BEGIN PRIVATE KEY-----`, PKCS#8).
    pub fn from_pem(pem: &str, issuer: &str) -> Result<Assertions, String> {
        let sec1 = pem.contains("-----BEGIN EC PRIVATE KEY-----");
        let body: String = pem
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with("-----") && !l.contains(':') && !l.is_empty())
            .collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|_| "the assertion key file is not PEM".to_owned())?;
        if sec1 {
            return Assertions::from_pkcs8(&sec1_to_pkcs8(&der), issuer);
        }
        Assertions::from_pkcs8(&der, issuer)
    }

    /// A fresh key (for development: each proxy then has its own).
    pub fn generate(issuer: &str) -> Result<Assertions, String> {
        let rng = ring::rand::SystemRandom::new();
        let der = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| "cannot generate an assertion key".to_owned())?;
        Assertions::from_pkcs8(der.as_ref(), issuer)
    }

    /// The JWKS document.
    pub fn jwks(&self) -> &str {
        &self.jwks
    }

    /// The assertion for `caller` (its session id, else its subject id) on
    /// `audience` (the route's host) at `now`. `who` is asked only when no
    /// assertion is cached, so a cached one costs a lookup and nothing else.
    pub fn assert(
        &self,
        caller: &str,
        audience: &str,
        now: i64,
        who: impl FnOnce() -> Subject,
    ) -> Option<String> {
        let cache_key = format!("{caller}\n{audience}");
        if let Some((token, exp)) = self.cache.lock().get(&cache_key) {
            if exp - RENEW_BEFORE > now {
                return Some(token.clone());
            }
        }
        let who = who();
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        let exp = now + LIFETIME;
        let claims = Claims {
            iss: &self.issuer,
            aud: audience,
            sub: &who.id,
            iat: now,
            exp,
            sid: who.session.as_deref(),
            email: who.email.as_deref(),
            groups: &who.groups,
        };
        let token = match jsonwebtoken::encode(&header, &claims, &self.key) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot sign an identity assertion");
                return None;
            }
        };
        let mut cache = self.cache.lock();
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, (_, e)| *e - RENEW_BEFORE > now);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(cache_key, (token.clone(), exp));
        Some(token)
    }
}

/// Wraps a SEC1 `ECPrivateKey` (`EC PRIVATE KEY` PEM, as OpenSSL's `ecparam`
/// and Helm's `genPrivateKey "ecdsa"` write it) as PKCS#8 for P-256 (RFC 5915,
/// RFC 5208); a key of another curve is then refused when the PKCS#8 is read.
fn sec1_to_pkcs8(sec1: &[u8]) -> Vec<u8> {
    fn der_len(n: usize, out: &mut Vec<u8>) {
        if n < 0x80 {
            out.push(n as u8);
        } else if n <= 0xff {
            out.extend_from_slice(&[0x81, n as u8]);
        } else {
            out.extend_from_slice(&[0x82, (n >> 8) as u8, n as u8]);
        }
    }
    // version 0, then AlgorithmIdentifier { id-ecPublicKey, prime256v1 }.
    const HEAD: &[u8] = &[
        0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
        0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ];
    let mut octets = vec![0x04];
    der_len(sec1.len(), &mut octets);
    octets.extend_from_slice(sec1);
    let mut out = vec![0x30];
    der_len(HEAD.len() + octets.len(), &mut out);
    out.extend_from_slice(HEAD);
    out.extend_from_slice(&octets);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::jwk::JwkSet;
    use jsonwebtoken::{DecodingKey, Validation};

    /// A throwaway key from `openssl ecparam -name prime256v1 -genkey -noout`
    /// (SEC1, with the curve and the public key).
    const SEC1: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIMA7rYa5BeAbM86gMlSOtsJ7vPYpirGKwnRAfJcKW6p1oAoGCCqGSM49
AwEHoUQDQgAE182TQ6mYMXElEQkyyNmpRV39Kvkf14GrQVCEOxvCrC6mnbYaSZwP
LS+z6kRt3jB01bWPEUMlln0Nii13FIQ0yA==
-----END EC PRIVATE KEY-----
";

    #[test]
    fn keys_in_sec1_and_pkcs8_pem() {
        let a = Assertions::from_pem(SEC1, "https://auth.example").unwrap();
        assert!(a.jwks().contains("\"crv\":\"P-256\""));
        assert!(Assertions::from_pem(
            "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n",
            "x"
        )
        .is_err());
        assert!(Assertions::from_pem("not a key", "x").is_err());
    }

    #[test]
    fn assertions_verify_with_the_served_jwks_and_are_cached() {
        let a = Assertions::generate("https://auth.example").unwrap();
        let who = || Subject {
            id: "usr_1".into(),
            session: Some("ses_1".into()),
            email: Some("ada@example.com".into()),
            groups: vec!["eng".to_owned()],
        };
        let now = 1_900_000_000;
        let t = a.assert("ses_1", "app.example", now, who).unwrap();
        assert_eq!(
            a.assert("ses_1", "app.example", now + 200, who),
            Some(t.clone())
        );
        assert_ne!(a.assert("ses_1", "app.example", now + 250, who).unwrap(), t);
        assert_ne!(a.assert("ses_1", "other.example", now, who).unwrap(), t);

        let set: JwkSet = serde_json::from_str(a.jwks()).unwrap();
        let key = DecodingKey::from_jwk(&set.keys[0]).unwrap();
        let mut v = Validation::new(Algorithm::ES256);
        v.set_audience(&["app.example"]);
        v.set_issuer(&["https://auth.example"]);
        v.validate_exp = false;
        let data = jsonwebtoken::decode::<serde_json::Value>(&t, &key, &v).unwrap();
        assert_eq!(data.claims["sub"], "usr_1");
        assert_eq!(data.claims["sid"], "ses_1");
        assert_eq!(data.claims["groups"][0], "eng");
        assert_eq!(data.claims["exp"], now + LIFETIME);
        v.set_audience(&["other.example"]);
        assert!(jsonwebtoken::decode::<serde_json::Value>(&t, &key, &v).is_err());
    }
}
