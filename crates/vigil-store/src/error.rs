//! What can go wrong in the store, in terms the API maps to status codes.

/// A store operation's failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No entity of that kind and id.
    #[error("{kind} `{id}` does not exist")]
    NotFound {
        /// Entity kind.
        kind: String,
        /// Entity id.
        id: String,
    },
    /// Another entity of the kind already has this natural key (name).
    #[error("a {kind} named `{key}` already exists")]
    AlreadyExists {
        /// Entity kind.
        kind: String,
        /// The clashing key.
        key: String,
    },
    /// The entity changed since the version the writer read (lost race).
    #[error("{kind} `{id}` is at version {current}, not the one expected")]
    VersionMismatch {
        /// Entity kind.
        kind: String,
        /// Entity id.
        id: String,
        /// Its current version.
        current: i64,
    },
    /// Other entities still refer to the one being deleted.
    #[error("{kind} `{id}` is still referenced by {}", describe(.by))]
    Referenced {
        /// Entity kind.
        kind: String,
        /// Entity id.
        id: String,
        /// Up to 20 referring entities (kind, id).
        by: Vec<(String, String)>,
    },
    /// A reference names an entity that does not exist.
    #[error("{kind} `{id}` does not exist")]
    MissingReference {
        /// Referenced kind.
        kind: String,
        /// Referenced id.
        id: String,
    },
    /// A page cursor the store did not issue.
    #[error("invalid cursor")]
    InvalidCursor,
    /// Text holding the NUL character (U+0000), which PostgreSQL's `text` cannot
    /// hold and its JSON functions cannot read: refused on SQLite too, so that both
    /// stores keep the same documents.
    #[error("{0} contains the NUL character (U+0000)")]
    Nul(String),
    /// The database cannot be reached right now; retrying later may succeed.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A deadlock or serialisation failure; the whole write may simply be retried.
    #[error("write conflict: {0}")]
    Retry(String),
    /// The schema is not what this version expects.
    #[error("schema: {0}")]
    Schema(String),
    /// Anything else the database reported.
    #[error("database error: {0}")]
    Database(String),
}

fn describe(by: &[(String, String)]) -> String {
    by.iter()
        .map(|(k, i)| format!("{k} `{i}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl StoreError {
    /// Whether the failure is the database being away (worth a 503 and a retry).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// Sorts sqlx errors into unavailability and the rest.
pub(crate) fn classify(e: sqlx::Error) -> StoreError {
    use sqlx::Error as E;
    match &e {
        E::Io(_)
        | E::PoolTimedOut
        | E::PoolClosed
        | E::Tls(_)
        | E::WorkerCrashed
        | E::Protocol(_) => StoreError::Unavailable(e.to_string()),
        E::Database(db) => match db.code().as_deref() {
            // PostgreSQL: deadlock detected, serialisation failure.
            Some("40P01" | "40001") => StoreError::Retry(e.to_string()),
            // PostgreSQL: admin shutdown, crash shutdown, cannot connect now, too many
            // connections, and the connection exceptions.
            Some("57P01" | "57P02" | "57P03" | "53300" | "08006" | "08001" | "08003" | "08004") => {
                StoreError::Unavailable(e.to_string())
            }
            _ => StoreError::Database(e.to_string()),
        },
        _ => StoreError::Database(e.to_string()),
    }
}
