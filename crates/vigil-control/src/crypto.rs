//! Tokens (random, shown once, stored as SHA-256) and secrets encrypted at rest
//! (AES-256-GCM with a versioned key id).

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::rand::{SecureRandom, SystemRandom};

/// `N` random bytes from the operating system.
fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    // SystemRandom only fails if the OS has no randomness at all.
    if SystemRandom::new().fill(&mut bytes).is_err() {
        panic!("the operating system's random number generator failed");
    }
    bytes
}

/// A new random token with a readable prefix, e.g. `vgl_admin_...`.
pub fn new_token(prefix: &str) -> String {
    format!("vgl_{prefix}_{}", B64.encode(random::<32>()))
}

/// A new service-account token for `id`, signed by `signer`
/// ([`vigil_snapshot::satoken`]), and what the store keeps of it: its SHA-256
/// (hex), a space, and the signer's public key (base64url).
pub fn service_account_token(signer: &vigil_snapshot::Signer, id: &str) -> (String, String) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let token = vigil_snapshot::satoken::issue(signer, id, now, random::<16>());
    let stored = format!("{} {}", token_hash(&token), B64.encode(signer.public_key()));
    (token, stored)
}

/// The parts of a stored service-account secret: the token's SHA-256 (hex) and
/// the public key that signed it (raw bytes; empty for an unsigned token).
pub fn service_account_secret(stored: &str) -> (&str, Vec<u8>) {
    match stored.split_once(' ') {
        Some((hash, key)) => (hash, B64.decode(key).unwrap_or_default()),
        None => (stored, Vec::new()),
    }
}

/// How a token is stored: SHA-256, hex. Tokens carry 256 random bits, so a fast
/// hash is enough; no password hashing needed.
pub fn token_hash(token: &str) -> String {
    vigil_policy::to_hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

/// Encrypts and decrypts secrets stored in the database.
pub struct SecretBox {
    key_id: String,
    key: LessSafeKey,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretBox")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// Why a secret could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The key is not 32 bytes of base64.
    #[error("the secret key must be 32 bytes, base64-encoded")]
    BadKey,
    /// The stored value was sealed with another key or is corrupt.
    #[error("the stored secret cannot be decrypted with key `{0}`")]
    Open(String),
}

impl SecretBox {
    /// A box from a base64 (standard or URL-safe) 32-byte key.
    pub fn from_base64(key_id: &str, key: &str) -> Result<SecretBox, SecretError> {
        let raw = B64
            .decode(key.trim().trim_end_matches('='))
            .or_else(|_| base64::engine::general_purpose::STANDARD.decode(key.trim()))
            .map_err(|_| SecretError::BadKey)?;
        let unbound = UnboundKey::new(&AES_256_GCM, &raw).map_err(|_| SecretError::BadKey)?;
        Ok(SecretBox {
            key_id: key_id.to_owned(),
            key: LessSafeKey::new(unbound),
        })
    }

    /// Encrypts: `v1.<key id>.<nonce>.<ciphertext>`.
    pub fn seal(&self, plaintext: &str) -> String {
        let nonce = random::<12>();
        let mut buf = plaintext.as_bytes().to_vec();
        // Sealing with a valid key and a fresh nonce cannot fail for inputs this small.
        if self
            .key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(self.key_id.as_bytes()),
                &mut buf,
            )
            .is_err()
        {
            panic!("AES-GCM sealing failed");
        }
        format!(
            "v1.{}.{}.{}",
            self.key_id,
            B64.encode(nonce),
            B64.encode(buf)
        )
    }

    /// Decrypts a value from [`SecretBox::seal`].
    pub fn open(&self, sealed: &str) -> Result<String, SecretError> {
        let err = || SecretError::Open(self.key_id.clone());
        let mut parts = sealed.splitn(4, '.');
        let (Some("v1"), Some(kid), Some(n), Some(c)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(err());
        };
        if kid != self.key_id {
            return Err(err());
        }
        let nonce: [u8; 12] = B64
            .decode(n)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(err)?;
        let mut buf = B64.decode(c).map_err(|_| err())?;
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(kid.as_bytes()),
                &mut buf,
            )
            .map_err(|_| err())?;
        String::from_utf8(plain.to_vec()).map_err(|_| err())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_hash_and_secrets_round_trip() {
        let t = new_token("admin");
        assert!(t.starts_with("vgl_admin_") && t.len() > 40);
        assert_ne!(t, new_token("admin"));
        assert_eq!(token_hash(&t).len(), 64);
        let key = B64.encode([7u8; 32]);
        let b = SecretBox::from_base64("k1", &key).unwrap();
        let sealed = b.seal("s3cret");
        assert!(!sealed.contains("s3cret"));
        assert_eq!(b.open(&sealed).unwrap(), "s3cret");
        let other = SecretBox::from_base64("k2", &key).unwrap();
        assert!(other.open(&sealed).is_err());
        let mut tampered = sealed.clone();
        tampered.pop();
        assert!(b.open(&tampered).is_err());
        assert!(SecretBox::from_base64("k", "short").is_err());
    }
}
