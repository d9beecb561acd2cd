//! Vigil's state store: entities as validated JSON documents in PostgreSQL
//! (production, several replicas) or SQLite (single node), with foreign-key
//! enforced references, one revision counter, a change log and an audit trail.
//! Knows nothing of HTTP or of what the entities mean.

mod error;
mod store;

pub use error::StoreError;
pub use store::{
    AuditEvent, AuditQuery, Change, Committed, Dialect, Entity, ListQuery, Op, Page, RawRecord,
    Record, Ref, RevisionListener, SchemaStatus, SecretChange, Store, StoreOptions,
};
