//! Bearer JWTs issued by an identity provider, verified offline against the keys
//! (JWKS) the control plane fetched into the snapshot.
//!
//! Pinned: the issuer must be a configured provider and match exactly (a trailing
//! slash aside); the audience must be its client id or one of its configured
//! audiences; `exp` is required and `nbf` honoured (30 s leeway); the algorithm
//! must be asymmetric (RSA, RSA-PSS, ECDSA or EdDSA) and agree with the key's type
//! and, when the key names one, with the key's algorithm. `alg: none` and every
//! HMAC algorithm are refused, so a public key can never be used as an HMAC secret.

use std::collections::HashMap;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use vigil_proto::v1::entry::Body;
use vigil_snapshot::{Kind, Snapshot};

/// A provider whose bearer JWTs are accepted.
#[derive(Debug)]
pub struct TokenIssuer {
    /// The provider's name.
    pub provider: String,
    /// Its issuer URL, as configured.
    pub issuer: String,
    audiences: Vec<String>,
    keys: Vec<Jwk>,
    groups_claim: String,
}

/// What a verified token says.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The provider's name.
    pub provider: String,
    /// `iss`.
    pub issuer: String,
    /// `sub`.
    pub subject: String,
    /// `email`, lowercased.
    pub email: Option<String>,
    /// `email_verified`.
    pub email_verified: bool,
    /// Groups from the provider's groups claim.
    pub groups: Vec<String>,
    /// Every claim, for policies that read claims.
    pub claims: Value,
}

/// Issuers by issuer URL (without a trailing slash).
pub type Issuers = HashMap<String, Arc<TokenIssuer>>;

/// The issuers of `snapshot`'s identity providers that have keys.
pub fn issuers(snapshot: &Snapshot) -> Issuers {
    snapshot
        .of_kind(Kind::IdentityProvider)
        .filter_map(|e| {
            let Some(Body::IdentityProvider(p)) = &e.body else {
                return None;
            };
            let set: Value = serde_json::from_str(&p.jwks_json).ok()?;
            // Keys this proxy cannot use (encryption keys, unknown types) are skipped,
            // not fatal: the others still verify.
            let keys: Vec<Jwk> = set
                .get("keys")?
                .as_array()?
                .iter()
                .filter_map(|k| serde_json::from_value::<Jwk>(k.clone()).ok())
                .filter(|k| !matches!(k.common.public_key_use, Some(PublicKeyUse::Encryption)))
                .collect();
            let groups_claim = mapped_claim(&p.claim_mapping_json, "groups");
            let mut audiences = vec![p.client_id.clone()];
            audiences.extend(p.audiences.iter().cloned());
            let issuer = TokenIssuer {
                provider: e.id.clone(),
                issuer: p.issuer_url.clone(),
                audiences,
                keys,
                groups_claim,
            };
            Some((
                p.issuer_url.trim_end_matches('/').to_owned(),
                Arc::new(issuer),
            ))
        })
        .collect()
}

/// The claim a provider's claim mapping (JSON, as in the snapshot) names for
/// `key` (`groups`, `email`, `name`); the claim of that name when it names none.
pub fn mapped_claim(mapping_json: &str, key: &str) -> String {
    serde_json::from_str::<Value>(mapping_json)
        .ok()
        .and_then(|m| m.get(key).and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| key.to_owned())
}

/// The strings a claim holds: an array's strings, or the one string.
pub fn claim_strings(claim: Option<&Value>) -> Vec<String> {
    match claim {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|g| g.as_str().map(str::to_owned))
            .collect(),
        Some(Value::String(one)) => vec![one.clone()],
        _ => Vec::new(),
    }
}

/// Whether `token` has the shape of a JWS (three base64url parts).
pub fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3 && token.starts_with("ey")
}

fn key_fits(alg: Algorithm, key: &Jwk) -> bool {
    use Algorithm::*;
    let family = match &key.algorithm {
        AlgorithmParameters::RSA(_) => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
        AlgorithmParameters::EllipticCurve(_) => matches!(alg, ES256 | ES384),
        AlgorithmParameters::OctetKeyPair(_) => alg == EdDSA,
        AlgorithmParameters::OctetKey(_) => false,
    };
    let named = key
        .common
        .key_algorithm
        .is_none_or(|k| format!("{k:?}") == format!("{alg:?}"));
    family && named
}

/// Clock skew allowed for `exp` and `nbf` when a token is first verified.
const LEEWAY_S: i64 = 30;

/// A NumericDate claim (RFC 7519 §2: seconds since the epoch, not necessarily a
/// whole number, so `1.9e9` and `1900000000.5` count as much as `1900000000`).
pub fn numeric_date(claim: Option<&Value>) -> Option<f64> {
    claim?.as_f64().filter(|t| t.is_finite())
}

/// Whether `claims` are past their `exp` at `now` (Unix seconds); claims without
/// a numeric `exp` count as expired, since verification requires one.
pub fn expired(claims: &Value, now: i64) -> bool {
    numeric_date(claims.get("exp")).is_none_or(|exp| exp <= now as f64)
}

/// Verifies `token` against `issuers`, at the proxy's clock; why not, otherwise
/// (for the 401).
pub fn verify(issuers: &Issuers, token: &str) -> Result<Verified, String> {
    let header = jsonwebtoken::decode_header(token)
        .map_err(|e| format!("the bearer token is not a valid JWT ({e})"))?;
    let alg = header.alg;
    if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
        return Err("HMAC-signed tokens are not accepted".into());
    }
    // The issuer picks the keys; the signature check below confirms it.
    let unverified: Value = token
        .split('.')
        .nth(1)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or("the bearer token's claims are not JSON")?;
    let iss = unverified
        .get("iss")
        .and_then(Value::as_str)
        .ok_or("the bearer token has no issuer")?;
    let issuer = issuers
        .get(iss.trim_end_matches('/'))
        .ok_or_else(|| format!("tokens from `{iss}` are not accepted"))?;
    let key = match &header.kid {
        Some(kid) => issuer
            .keys
            .iter()
            .find(|k| k.common.key_id.as_deref() == Some(kid.as_str())),
        None if issuer.keys.len() == 1 => issuer.keys.first(),
        None => None,
    }
    .ok_or("the bearer token's signing key is unknown")?;
    if !key_fits(alg, key) {
        return Err(format!("algorithm {alg:?} does not fit the signing key"));
    }
    let decoding =
        DecodingKey::from_jwk(key).map_err(|e| format!("the signing key is not usable: {e}"))?;
    let mut v = Validation::new(alg);
    v.algorithms = vec![alg];
    // `exp` and `nbf` are checked below, by the proxy's clock.
    v.validate_exp = false;
    v.validate_nbf = false;
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    v.set_issuer(&[iss]);
    v.set_audience(&issuer.audiences);
    let data = jsonwebtoken::decode::<Value>(token, &decoding, &v)
        .map_err(|e| format!("the bearer token is not valid ({e})"))?;
    let claims = data.claims;
    let now = crate::clock::now();
    if expired(&claims, now.saturating_sub(LEEWAY_S)) {
        return Err("the bearer token has expired".into());
    }
    if numeric_date(claims.get("nbf"))
        .is_some_and(|nbf| nbf > (now.saturating_add(LEEWAY_S)) as f64)
    {
        return Err("the bearer token is not valid yet".into());
    }
    let subject = claims
        .get("sub")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or("the bearer token has no subject")?
        .to_owned();
    let groups = claim_strings(claims.get(&issuer.groups_claim));
    Ok(Verified {
        provider: issuer.provider.clone(),
        issuer: issuer.issuer.clone(),
        subject,
        email: claims
            .get("email")
            .and_then(Value::as_str)
            .map(str::to_ascii_lowercase),
        email_verified: claims.get("email_verified").and_then(Value::as_bool) == Some(true),
        groups,
        claims,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};

    const ISS: &str = "https://idp.example";

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    /// An ES256 key: (encoding key, public JWK).
    fn es256(kid: &str) -> (EncodingKey, Value, Vec<u8>) {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let public = pair.public_key().as_ref().to_vec();
        let (x, y) = (&public[1..33], &public[33..65]);
        let jwk = serde_json::json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
            "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y)});
        (EncodingKey::from_ec_der(pkcs8.as_ref()), jwk, public)
    }

    fn issuers_with(jwk: &Value) -> Issuers {
        let set = serde_json::json!({"keys": [jwk, {"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"}]});
        let p = vigil_proto::v1::IdentityProvider {
            issuer_url: format!("{ISS}/"),
            client_id: "vigil".into(),
            jwks_json: set.to_string(),
            audiences: vec!["api".into()],
            ..Default::default()
        };
        let snap = Snapshot::new(
            1,
            [vigil_proto::v1::Entry {
                id: "corp".into(),
                body: Some(Body::IdentityProvider(p)),
            }],
        );
        issuers(&snap)
    }

    fn claims(iss: &str, aud: &str, exp: i64, nbf: Option<i64>) -> Value {
        let mut c = serde_json::json!({"iss": iss, "aud": aud, "sub": "u1", "exp": exp,
            "email": "Ada@Example.com", "email_verified": true, "groups": ["eng", "sre"]});
        if let Some(n) = nbf {
            c["nbf"] = n.into();
        }
        c
    }

    fn sign(key: &EncodingKey, kid: &str, c: &Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.into());
        encode(&h, c, key).unwrap()
    }

    #[test]
    fn good_tokens_verify_and_say_who() {
        let (key, jwk, _) = es256("k1");
        let iss = issuers_with(&jwk);
        for aud in ["vigil", "api"] {
            let t = sign(&key, "k1", &claims(ISS, aud, now() + 300, None));
            assert!(looks_like_jwt(&t));
            let v = verify(&iss, &t).unwrap();
            assert_eq!(v.subject, "u1");
            assert_eq!(v.provider, "corp");
            assert_eq!(v.email.as_deref(), Some("ada@example.com"));
            assert!(v.email_verified);
            assert_eq!(v.groups, vec!["eng", "sre"]);
        }
    }

    #[test]
    fn bad_tokens_are_refused() {
        let (key, jwk, public) = es256("k1");
        let (other, _, _) = es256("k1");
        let iss = issuers_with(&jwk);
        let n = now();
        let refused = |t: &str| verify(&iss, t).is_err();
        assert!(refused(&sign(
            &key,
            "k1",
            &claims("https://evil", "vigil", n + 300, None)
        )));
        assert!(refused(&sign(
            &key,
            "k1",
            &claims(ISS, "someone-else", n + 300, None)
        )));
        assert!(refused(&sign(
            &key,
            "k1",
            &claims(ISS, "vigil", n - 120, None)
        )));
        assert!(refused(&sign(
            &key,
            "k1",
            &claims(ISS, "vigil", n + 300, Some(n + 120))
        )));
        assert!(refused(&sign(
            &key,
            "k2",
            &claims(ISS, "vigil", n + 300, None)
        )));
        assert!(refused(&sign(
            &other,
            "k1",
            &claims(ISS, "vigil", n + 300, None)
        )));
        // No expiry at all.
        let mut c = claims(ISS, "vigil", n, None);
        c.as_object_mut().unwrap().remove("exp");
        assert!(refused(&sign(&key, "k1", &c)));
        // alg none, with and without a signature.
        let body = URL_SAFE_NO_PAD.encode(claims(ISS, "vigil", n + 300, None).to_string());
        let none = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"k1"}"#);
        assert!(refused(&format!("{none}.{body}.")));
        assert!(refused(&format!("{none}.{body}.c2ln")));
        // HS256 with the public key as the secret (key confusion).
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("k1".into());
        let confused = encode(
            &h,
            &claims(ISS, "vigil", n + 300, None),
            &EncodingKey::from_secret(&public),
        )
        .unwrap();
        assert!(refused(&confused));
        // RS256 claimed over an EC key.
        let rs = format!(
            "{}.{body}.c2ln",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","kid":"k1"}"#)
        );
        assert!(refused(&rs));
        assert!(refused("not.a.jwt"));
    }

    #[test]
    fn expiry_is_any_numeric_date() {
        let at = |exp: Value| serde_json::json!({ "exp": exp });
        let now = 1_900_000_000;
        // Integers, fractions and exponents alike.
        for exp in [
            serde_json::json!(1_900_000_001),
            serde_json::json!(1_900_000_000.5),
            serde_json::json!(1.9000000005e9),
        ] {
            assert!(!expired(&at(exp.clone()), now), "{exp}");
            assert!(expired(&at(exp.clone()), now + 1), "{exp}");
        }
        assert!(expired(&at(serde_json::json!(1.9e9)), now));
        assert!(!expired(&at(serde_json::json!(1.9e9)), now - 1));
        // Absent or not a number: expired.
        assert!(expired(&serde_json::json!({}), now));
        assert!(expired(&at(serde_json::json!("1900000001")), now));
    }

    #[test]
    fn fractional_expiry_verifies() {
        let (key, jwk, _) = es256("k1");
        let iss = issuers_with(&jwk);
        let mut c = claims(ISS, "vigil", 0, None);
        c["exp"] = serde_json::json!(now() as f64 + 300.5);
        assert!(verify(&iss, &sign(&key, "k1", &c)).is_ok());
        c["exp"] = serde_json::json!(now() as f64 - 120.5);
        assert!(verify(&iss, &sign(&key, "k1", &c)).is_err());
    }
}
