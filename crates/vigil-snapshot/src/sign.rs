//! Ed25519 signing of updates (control plane) and verification (proxy).

use std::collections::BTreeMap;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use prost::Message as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};

use crate::{Envelope, SnapshotError, Update};

/// Domain separation: a signature over an update can never be replayed as anything else.
const CONTEXT: &[u8] = b"vigil.v1.Update\0";

fn message(payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(CONTEXT.len() + payload.len());
    m.extend_from_slice(CONTEXT);
    m.extend_from_slice(payload);
    m
}

/// The id of a public key: the first 16 bytes of its SHA-256, base64url.
fn key_id(public_key: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, public_key);
    URL_SAFE_NO_PAD.encode(&digest.as_ref()[..16])
}

/// Holds the control plane's private key and signs updates with it.
pub struct Signer {
    pair: Ed25519KeyPair,
    key_id: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// From a 32-byte Ed25519 seed, given as standard base64.
    pub fn from_seed_base64(seed: &str) -> Result<Signer, SnapshotError> {
        let bytes = STANDARD
            .decode(seed.trim())
            .map_err(|e| SnapshotError::Key(format!("not base64: {e}")))?;
        Signer::from_seed(&bytes)
    }

    /// From a 32-byte Ed25519 seed.
    pub fn from_seed(seed: &[u8]) -> Result<Signer, SnapshotError> {
        if seed.len() != 32 {
            return Err(SnapshotError::Key(format!(
                "an Ed25519 seed is 32 bytes, got {}",
                seed.len()
            )));
        }
        let pair = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|e| SnapshotError::Key(e.to_string()))?;
        let key_id = key_id(pair.public_key().as_ref());
        Ok(Signer { pair, key_id })
    }

    /// A fresh random key, and its seed (base64) so it can be saved.
    pub fn generate() -> Result<(Signer, String), SnapshotError> {
        let mut seed = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .map_err(|_| SnapshotError::Key("no randomness".into()))?;
        Ok((Signer::from_seed(&seed)?, STANDARD.encode(seed)))
    }

    /// This key's id.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The public key, base64, for proxies' trust lists.
    pub fn public_key_base64(&self) -> String {
        STANDARD.encode(self.pair.public_key().as_ref())
    }

    /// Encodes and signs an update.
    pub fn seal(&self, update: &Update) -> Envelope {
        let payload = update.encode_to_vec();
        let signature = self.pair.sign(&message(&payload)).as_ref().to_vec();
        Envelope {
            payload: payload.into(),
            signature,
            key_id: self.key_id.clone(),
        }
    }
}

/// The public keys a proxy trusts. Several at once, so keys can be rotated.
#[derive(Debug, Clone, Default)]
pub struct Verifier {
    keys: BTreeMap<String, Vec<u8>>,
}

impl Verifier {
    /// Trusts the given base64 Ed25519 public keys.
    pub fn from_base64<'a>(
        keys: impl IntoIterator<Item = &'a str>,
    ) -> Result<Verifier, SnapshotError> {
        let mut v = Verifier::default();
        for k in keys {
            let bytes = STANDARD
                .decode(k.trim())
                .map_err(|e| SnapshotError::Key(format!("public key is not base64: {e}")))?;
            if bytes.len() != 32 {
                return Err(SnapshotError::Key(format!(
                    "an Ed25519 public key is 32 bytes, got {}",
                    bytes.len()
                )));
            }
            v.keys.insert(key_id(&bytes), bytes);
        }
        Ok(v)
    }

    /// Checks the signature, then decodes the payload.
    pub fn open(&self, envelope: &Envelope) -> Result<Update, SnapshotError> {
        let key = self
            .keys
            .get(&envelope.key_id)
            .ok_or_else(|| SnapshotError::UnknownKey(envelope.key_id.clone()))?;
        UnparsedPublicKey::new(&ED25519, key)
            .verify(&message(&envelope.payload), &envelope.signature)
            .map_err(|_| SnapshotError::BadSignature(envelope.key_id.clone()))?;
        Update::decode(&envelope.payload[..]).map_err(|e| SnapshotError::Decode(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn update() -> Update {
        Update {
            version: 7,
            full: true,
            ..Default::default()
        }
    }

    #[test]
    fn seal_and_open() {
        let (signer, _) = Signer::generate().unwrap();
        let v = Verifier::from_base64([signer.public_key_base64().as_str()]).unwrap();
        let env = signer.seal(&update());
        assert_eq!(v.open(&env).unwrap(), update());
        // Deterministic: the same update always gives the same envelope.
        assert_eq!(signer.seal(&update()), env);
    }

    #[test]
    fn tampering_is_refused() {
        let (signer, _) = Signer::generate().unwrap();
        let (other, _) = Signer::generate().unwrap();
        let v = Verifier::from_base64([signer.public_key_base64().as_str()]).unwrap();
        let mut env = signer.seal(&update());
        let mut tampered = env.payload.to_vec();
        tampered[1] ^= 1;
        env.payload = tampered.into();
        assert!(matches!(v.open(&env), Err(SnapshotError::BadSignature(_))));
        let env = other.seal(&update());
        assert!(matches!(v.open(&env), Err(SnapshotError::UnknownKey(_))));
        // Claiming a trusted key id does not help a foreign signature.
        let mut env = other.seal(&update());
        env.key_id = signer.key_id().to_owned();
        assert!(matches!(v.open(&env), Err(SnapshotError::BadSignature(_))));
        let mut env = signer.seal(&update());
        env.signature.truncate(10);
        assert!(v.open(&env).is_err());
    }

    #[test]
    fn rotation_trusts_old_and_new() {
        let (old, old_seed) = Signer::generate().unwrap();
        let new = Signer::from_seed_base64(&old_seed).unwrap();
        assert_eq!(new.key_id(), old.key_id());
        let (next, _) = Signer::generate().unwrap();
        let v = Verifier::from_base64([
            old.public_key_base64().as_str(),
            next.public_key_base64().as_str(),
        ])
        .unwrap();
        assert!(v.open(&old.seal(&update())).is_ok());
        assert!(v.open(&next.seal(&update())).is_ok());
        assert!(Signer::from_seed(&[0; 31]).is_err());
        assert!(Verifier::from_base64(["AAAA"]).is_err());
    }
}
