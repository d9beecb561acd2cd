//! Vigil's data plane. This crate holds the proxy's side of the snapshot stream:
//! it subscribes to the control plane, verifies and applies updates off the request
//! path, swaps the result in atomically, and persists the last good snapshot. It
//! also holds the request path itself (`serve`): edge checks, canonical paths, the
//! route table, authentication, the decision and forwarding; and browser sign-in
//! (`login`) through one authenticate host for the fleet.

pub mod assertion;
pub mod clientcert;
pub mod clock;
pub mod conns;
pub mod cookie;
pub mod decide;
pub mod edge;
pub mod framing;
pub mod index;
pub mod jwt;
pub mod login;
pub mod metrics;
pub mod normalize;
pub mod persist;
pub mod routes;
pub mod serve;
pub mod streams;
pub mod subscriber;
pub mod tls;
pub mod tunnel;
pub mod upstream;
