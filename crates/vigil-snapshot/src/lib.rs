//! The snapshot model both planes share.
//!
//! A snapshot is a set of entries keyed by (kind, id) at one version (the control
//! plane's database revision). The control plane ships it whole or as a delta,
//! wrapped in an Ed25519-signed [`Envelope`]; the proxy verifies the envelope before
//! it decodes a single byte of the payload, then applies the update to what it holds.

mod history;
mod policy;
pub mod satoken;
mod sign;
mod snapshot;

pub use history::History;
pub use policy::{decode_policy, encode_policy};
pub use sign::{Signer, Verifier};
pub use snapshot::{kind_of, Key, Snapshot};
pub use vigil_proto::v1::{Entry, EntryKey, Envelope, Kind, Update};

/// Whether `host` is a DNS host name as routes name hosts: dot-separated labels of
/// ASCII letters, digits and `-` (not first or last), 1 to 63 bytes each, 253 in
/// all. The control plane checks route hosts with it, the proxy request hosts.
pub fn is_host_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// Why an update was refused. The holder keeps what it had.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// No trusted key has this id.
    #[error("unknown signing key `{0}`")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("bad signature from key `{0}`")]
    BadSignature(String),
    /// The payload is not an `Update`.
    #[error("undecodable update: {0}")]
    Decode(String),
    /// The update is a delta from a version other than the one held.
    #[error("delta from version {base} does not apply to version {held}")]
    WrongBase {
        /// The delta's base.
        base: u64,
        /// The version held.
        held: u64,
    },
    /// The update breaks a rule of the format (order, duplicates, missing bodies).
    #[error("invalid update: {0}")]
    Invalid(String),
    /// A signing key could not be read.
    #[error("signing key: {0}")]
    Key(String),
}

/// The id a user signing in for the first time gets, derived from who the identity
/// provider says they are, so that every proxy and the control plane agree on it
/// without asking one another: `usr_` and 32 hex digits of SHA-256(issuer, subject).
pub fn provisioned_user_id(issuer: &str, subject: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"vigil.user.v1\0");
    ctx.update(issuer.as_bytes());
    ctx.update(b"\0");
    ctx.update(subject.as_bytes());
    let digest = ctx.finish();
    format!("usr_{}", vigil_policy::to_hex(&digest.as_ref()[..16]))
}
