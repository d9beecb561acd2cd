//! The control-plane ↔ proxy contract, generated at build time from `proto/vigil/v1/`,
//! and the bearer-credential convention both sides read.

pub mod parts;

/// How often each end of the snapshot stream says it is alive.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(10);

// Bearer credentials, read the same way by the control plane (admin API, the
// stream's join tokens) and by the proxy (service-account tokens).

/// Why a request's credential cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BearerError {
    /// No `Authorization` header, or more than one.
    NotOne,
    /// The header is not visible ASCII.
    Malformed,
    /// Not `Bearer <token>`.
    NotBearer,
}

/// The token of the one `Authorization: Bearer <token>` header in `headers` (gRPC
/// metadata is a header map too).
pub fn sole_bearer(headers: &http::HeaderMap) -> Result<&str, BearerError> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(BearerError::NotOne);
    };
    let value = value.to_str().map_err(|_| BearerError::Malformed)?;
    bearer_token(value).ok_or(BearerError::NotBearer)
}

/// The token of a `Bearer <token>` credential (scheme case-insensitive).
fn bearer_token(value: &str) -> Option<&str> {
    match value.split_once(' ') {
        Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") && !t.trim().is_empty() => {
            Some(t.trim())
        }
        _ => None,
    }
}

/// `vigil.v1`: snapshot messages and the `ControlPlane` service.
#[allow(missing_docs, clippy::all, clippy::pedantic, rust_2018_idioms)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/vigil.v1.rs"));
}
