//! The control-plane ↔ proxy contract, generated at build time from `proto/vigil/v1/`.

/// `vigil.v1`: snapshot messages and the `ControlPlane` service.
#[allow(missing_docs, clippy::all, clippy::pedantic, rust_2018_idioms)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/vigil.v1.rs"));
}
