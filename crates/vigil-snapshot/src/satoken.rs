//! Service-account bearer tokens, signed by the control plane.
//!
//! A token is `vgl_sa_` followed by a compact JWS (RFC 7515) with `alg: EdDSA`
//! (Ed25519, RFC 8037), signed with the control plane's snapshot signing key.
//! Its claims name the service account (`sub`) and carry 128 random bits (`jti`),
//! so every token is unguessable and unique. The prefix lets secret scanners
//! recognise a leaked token.
//!
//! The control plane stores only the token's SHA-256 and the public key that
//! signed it; both reach proxies in the (signed) snapshot. A proxy accepts a
//! bearer token as a service account's only when its hash is that account's
//! current one **and** its signature verifies under the key the snapshot names
//! for that account **and** its `sub` is that account. Rotating the signing key
//! therefore does not invalidate tokens already issued: each account's entry
//! keeps the key its token was signed with until the token is rotated.
//!
//! The signing input of a JWS starts with `eyJ` (base64url of `{"`), so it can
//! never be mistaken for a signed snapshot update (which starts with the
//! update context string).

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use ring::signature::{UnparsedPublicKey, ED25519};

use crate::Signer;

/// What every service-account token starts with.
pub const PREFIX: &str = "vgl_sa_";

/// `typ` of the token's JWS header.
const TYP: &str = "vigil-sa+jwt";

/// Why a token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not `vgl_sa_` + three base64url parts.
    #[error("not a service-account token")]
    Malformed,
    /// The header is not `alg: EdDSA` with Vigil's `typ`.
    #[error("the token's header is not Vigil's (alg EdDSA, typ {TYP})")]
    Header,
    /// The claims do not name this service account.
    #[error("the token names another service account")]
    Subject,
    /// The signature does not verify under the account's key.
    #[error("the token's signature does not verify")]
    Signature,
}

/// A new token for `service_account`, issued at `now` (Unix seconds), signed
/// by `signer`; `nonce` is 16 random bytes (the caller's randomness source).
pub fn issue(signer: &Signer, service_account: &str, now: i64, nonce: [u8; 16]) -> String {
    let header = serde_json::json!({ "alg": "EdDSA", "typ": TYP, "kid": signer.key_id() });
    let claims = serde_json::json!({
        "iss": "vigil",
        "sub": service_account,
        "iat": now,
        "jti": B64.encode(nonce),
    });
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let signature = signer.sign_jws(input.as_bytes());
    format!("{PREFIX}{input}.{}", B64.encode(signature))
}

/// Checks that `token` is `service_account`'s, signed by `public_key` (a raw
/// 32-byte Ed25519 key). The caller has already matched the token's hash.
pub fn verify(token: &str, service_account: &str, public_key: &[u8]) -> Result<(), TokenError> {
    let jws = token.strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
    let mut parts = jws.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let decode = |p: &str| B64.decode(p).map_err(|_| TokenError::Malformed);
    let signature = decode(s)?;
    // The signature first: nothing unauthenticated is parsed as JSON.
    let input = &jws[..h.len() + 1 + c.len()];
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(input.as_bytes(), &signature)
        .map_err(|_| TokenError::Signature)?;
    let header: serde_json::Value =
        serde_json::from_slice(&decode(h)?).map_err(|_| TokenError::Malformed)?;
    if header["alg"] != "EdDSA" || header["typ"] != TYP {
        return Err(TokenError::Header);
    }
    let claims: serde_json::Value =
        serde_json::from_slice(&decode(c)?).map_err(|_| TokenError::Malformed)?;
    if claims["sub"] != service_account || claims["iss"] != "vigil" {
        return Err(TokenError::Subject);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Signer {
        Signer::from_seed(&[7; 32]).unwrap()
    }

    #[test]
    fn a_token_verifies_for_its_account_and_key_only() {
        let s = signer();
        let t = issue(&s, "sa-build", 1_900_000_000, [1; 16]);
        assert!(t.starts_with("vgl_sa_eyJ"));
        assert_eq!(verify(&t, "sa-build", s.public_key()), Ok(()));
        assert_eq!(
            verify(&t, "sa-other", s.public_key()),
            Err(TokenError::Subject)
        );
        let other = Signer::from_seed(&[8; 32]).unwrap();
        assert_eq!(
            verify(&t, "sa-build", other.public_key()),
            Err(TokenError::Signature)
        );
        // Two tokens for one account differ.
        assert_ne!(issue(&s, "sa-build", 1_900_000_000, [2; 16]), t);
    }

    #[test]
    fn tampering_and_other_shapes_are_refused() {
        let s = signer();
        let t = issue(&s, "sa-build", 1_900_000_000, [1; 16]);
        let key = s.public_key();
        assert_eq!(verify(&t[3..], "sa-build", key), Err(TokenError::Malformed));
        assert_eq!(
            verify("vgl_sa_abc", "sa-build", key),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            verify(&format!("{t}.x"), "sa-build", key),
            Err(TokenError::Malformed)
        );
        // Claims swapped for another account's, signature kept.
        let parts: Vec<&str> = t[PREFIX.len()..].split('.').collect();
        let forged_claims = B64.encode(r#"{"iss":"vigil","sub":"sa-admin","iat":1,"jti":"x"}"#);
        let forged = format!("{PREFIX}{}.{forged_claims}.{}", parts[0], parts[2]);
        assert_eq!(verify(&forged, "sa-admin", key), Err(TokenError::Signature));
        // A validly signed token with another alg/typ (what a snapshot key never signs).
        let header = B64.encode(r#"{"alg":"none","typ":"JWT"}"#);
        let input = format!("{header}.{}", parts[1]);
        let sig = B64.encode(s.sign_jws(input.as_bytes()));
        assert_eq!(
            verify(&format!("{PREFIX}{input}.{sig}"), "sa-build", key),
            Err(TokenError::Header)
        );
        // The old opaque format.
        assert_eq!(
            verify(
                "vgl_sa_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                "sa-build",
                key
            ),
            Err(TokenError::Malformed)
        );
    }
}
