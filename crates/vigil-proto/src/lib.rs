//! The control-plane ↔ proxy contract, generated at build time from `proto/vigil/v1/`.

/// How often each end of the snapshot stream says it is alive.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(10);

/// `vigil.v1`: snapshot messages and the `ControlPlane` service.
#[allow(missing_docs, clippy::all, clippy::pedantic, rust_2018_idioms)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/vigil.v1.rs"));
}
