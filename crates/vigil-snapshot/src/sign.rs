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

    /// From the text of a key file or variable: a base64 32-byte seed, or a PEM
    /// `PRIVATE KEY` (PKCS#8 Ed25519, as `openssl genpkey -algorithm ed25519` or
    /// Helm's `genPrivateKey "ed25519"` write it).
    pub fn from_text(text: &str) -> Result<Signer, SnapshotError> {
        let blocks = pem_blocks(text)?;
        if blocks.is_empty() {
            return Signer::from_seed_base64(text);
        }
        match blocks.as_slice() {
            [(label, der)] if label == "PRIVATE KEY" => {
                let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(|e| {
                    SnapshotError::Key(format!("not a PKCS#8 Ed25519 private key: {e}"))
                })?;
                let key_id = key_id(pair.public_key().as_ref());
                Ok(Signer { pair, key_id })
            }
            _ => Err(SnapshotError::Key(
                "expected one PEM `PRIVATE KEY` block (PKCS#8 Ed25519) or a base64 seed".into(),
            )),
        }
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

    /// The raw 32-byte public key.
    pub fn public_key(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    /// Signs a JWS signing input (`base64url(header).base64url(claims)`), for
    /// service-account tokens ([`crate::satoken`]). Such an input starts with
    /// `eyJ`, never with the update context, so the two cannot be confused.
    pub(crate) fn sign_jws(&self, input: &[u8]) -> Vec<u8> {
        debug_assert!(input.starts_with(b"eyJ"));
        self.pair.sign(input).as_ref().to_vec()
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

    /// From the text of a key file or variable: base64 public keys separated by
    /// commas or white space, or PEM blocks, each a `PUBLIC KEY` (SPKI) or a
    /// `CERTIFICATE` whose subject key is Ed25519 (only the key is used: the
    /// certificate's names, issuer and dates mean nothing here).
    pub fn from_text(text: &str) -> Result<Verifier, SnapshotError> {
        let blocks = pem_blocks(text)?;
        if blocks.is_empty() {
            let keys: Vec<&str> = text
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|k| !k.is_empty())
                .collect();
            if keys.is_empty() {
                return Err(SnapshotError::Key("no public key given".into()));
            }
            return Verifier::from_base64(keys);
        }
        let mut v = Verifier::default();
        for (label, der) in blocks {
            let key = match label.as_str() {
                "PUBLIC KEY" => der
                    .strip_prefix(ED25519_SPKI_PREFIX)
                    .filter(|k| k.len() == 32)
                    .map(<[u8]>::to_vec),
                "CERTIFICATE" => certificate_ed25519_key(&der),
                other => {
                    return Err(SnapshotError::Key(format!(
                        "a `{other}` PEM block is not a public key; expected `PUBLIC KEY` or `CERTIFICATE`"
                    )))
                }
            }
            .ok_or_else(|| {
                SnapshotError::Key(format!("the `{label}` PEM block holds no Ed25519 public key"))
            })?;
            v.keys.insert(key_id(&key), key);
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

/// The DER of an Ed25519 SubjectPublicKeyInfo up to the key (RFC 8410): a
/// SEQUENCE of the algorithm (OID 1.3.101.112, no parameters) and a 33-byte
/// BIT STRING holding the 32-byte key.
const ED25519_SPKI_PREFIX: &[u8] = &[
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// One DER element at the start of `der`: (tag, contents, the rest). Definite
/// lengths only (DER has no other kind).
fn der_element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The Ed25519 key of a DER certificate, taken from the certificate's own
/// `subjectPublicKeyInfo` (RFC 5280: the seventh field of the TBSCertificate,
/// after the optional `[0]` version): the same bytes anywhere else (an
/// extension, a name) mean nothing. `None` when that key is not Ed25519.
fn certificate_ed25519_key(der: &[u8]) -> Option<Vec<u8>> {
    const SEQUENCE: u8 = 0x30;
    let (tag, cert, _) = der_element(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, mut tbs, _) = der_element(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    // [0] EXPLICIT version, when present.
    if tbs.first() == Some(&0xa0) {
        tbs = der_element(tbs)?.2;
    }
    // serialNumber, signature, issuer, validity, subject.
    for _ in 0..5 {
        tbs = der_element(tbs)?.2;
    }
    let (tag, _, rest) = der_element(tbs)?;
    if tag != SEQUENCE {
        return None;
    }
    tbs[..tbs.len() - rest.len()]
        .strip_prefix(ED25519_SPKI_PREFIX)
        .filter(|k| k.len() == 32)
        .map(<[u8]>::to_vec)
}

/// The PEM blocks of `text` as (label, DER); none when the text is not PEM.
fn pem_blocks(text: &str) -> Result<Vec<(String, Vec<u8>)>, SnapshotError> {
    let mut blocks = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines().map(str::trim) {
        if let Some(label) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
        {
            if current.is_some() {
                return Err(SnapshotError::Key("a PEM block is not closed".into()));
            }
            current = Some((label.to_owned(), String::new()));
        } else if let Some(label) = line
            .strip_prefix("-----END ")
            .and_then(|l| l.strip_suffix("-----"))
        {
            let (open, body) = current
                .take()
                .ok_or_else(|| SnapshotError::Key("a PEM END line without BEGIN".into()))?;
            if open != label {
                return Err(SnapshotError::Key(format!(
                    "PEM block `{open}` ends as `{label}`"
                )));
            }
            let der = STANDARD.decode(&body).map_err(|e| {
                SnapshotError::Key(format!("PEM block `{open}` is not base64: {e}"))
            })?;
            blocks.push((open, der));
        } else if let Some((_, body)) = current.as_mut() {
            body.push_str(line);
        }
    }
    if current.is_some() {
        return Err(SnapshotError::Key("a PEM block is not closed".into()));
    }
    Ok(blocks)
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

    /// PKCS#8 v1 (no public key), as Go and OpenSSL write an Ed25519 key, and
    /// the SPKI and a certificate carrying its public key.
    #[test]
    fn pem_keys() {
        let seed = [7u8; 32];
        let mut pkcs8 = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        pkcs8.extend_from_slice(&seed);
        let pem = |label: &str, der: &[u8]| {
            format!(
                "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
                STANDARD.encode(der)
            )
        };
        let signer = Signer::from_text(&pem("PRIVATE KEY", &pkcs8)).unwrap();
        let by_seed = Signer::from_seed(&seed).unwrap();
        assert_eq!(signer.key_id(), by_seed.key_id());
        let public = STANDARD.decode(signer.public_key_base64()).unwrap();
        let mut spki = ED25519_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(&public);
        let v = Verifier::from_text(&pem("PUBLIC KEY", &spki)).unwrap();
        assert!(v.open(&signer.seal(&update())).is_ok());
        // A certificate: only its subjectPublicKeyInfo counts, found by position.
        let cert = |spki: &[u8], extra: &[u8]| {
            let mut tbs = vec![0xa0, 0x03, 0x02, 0x01, 0x02]; // version
            tbs.extend_from_slice(&[0x02, 0x01, 0x01]); // serial
            tbs.extend_from_slice(&[0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70]); // signature
            tbs.extend_from_slice(&[0x30, 0x00]); // issuer
            tbs.extend_from_slice(&[0x30, 0x00]); // validity
            tbs.extend_from_slice(&[0x30, 0x00]); // subject
            tbs.extend_from_slice(spki);
            tbs.extend_from_slice(extra);
            let mut t = vec![0x30, 0x81, tbs.len() as u8];
            t.extend_from_slice(&tbs);
            let mut c = vec![0x30, 0x81, (t.len() + 2) as u8];
            c.extend_from_slice(&t);
            c.extend_from_slice(&[0x30, 0x00]); // signatureAlgorithm, shortened
            c
        };
        let v = Verifier::from_text(&pem("CERTIFICATE", &cert(&spki, &[]))).unwrap();
        assert!(v.open(&signer.seal(&update())).is_ok());
        // The Ed25519 SPKI bytes elsewhere (here after a P-256 key) are not the key.
        let p256 = [
            0x30, 0x13, 0x30, 0x09, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x03,
            0x06, 0x00, 0x04, 0x01, 0x02, 0x03, 0x04,
        ];
        let mut smuggled = vec![0x04, spki.len() as u8];
        smuggled.extend_from_slice(&spki);
        assert!(Verifier::from_text(&pem("CERTIFICATE", &cert(&p256, &smuggled))).is_err());
        assert!(Verifier::from_text(&pem("CERTIFICATE", &[0x30, 0x03, 0x02, 0x01])).is_err());
        // Lists of base64 keys, and the refusals.
        let list = format!(
            "{},\n{}",
            signer.public_key_base64(),
            by_seed.public_key_base64()
        );
        assert!(Verifier::from_text(&list).is_ok());
        assert!(Verifier::from_text(" \n").is_err());
        assert!(Verifier::from_text(&pem("PRIVATE KEY", &pkcs8)).is_err());
        assert!(Signer::from_text(&pem("PUBLIC KEY", &spki)).is_err());
        assert!(Signer::from_text("-----BEGIN PRIVATE KEY-----\nAAAA").is_err());
        assert!(Signer::from_text(&STANDARD.encode(seed)).is_ok());
    }
}
