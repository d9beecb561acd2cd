//! The store proper: one code path over sqlx's `Any` driver for both backends.
//!
//! Every write transaction starts by bumping the single revision row. That row
//! lock serialises writers, so revision order is commit order: a reader that has
//! seen revision *n* has seen every change up to *n*, which snapshot deltas rely on.
//!
//! On PostgreSQL that lock would be held across each commit's WAL flush, making
//! durable writes queue on the disk one at a time. So writes commit with
//! `synchronous_commit = off` and then wait on a durability barrier (see
//! [`Store::flush_through`]) before they report success; readers that publish what they
//! read (snapshot builds) pass the same barrier first. A crash can lose only
//! commits that nobody was told about, and the WAL keeps them a prefix: a write
//! that depended on a lost one is lost with it.

use std::time::Duration;

use base64::Engine as _;
use serde_json::Value;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Row};

use crate::error::{classify, StoreError};

static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("../../migrations/postgres");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("../../migrations/sqlite");

/// Which database the store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// PostgreSQL: production, several control-plane replicas.
    Postgres,
    /// SQLite: the embedded single-node default.
    Sqlite,
}

/// Connection settings.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Most connections in the pool. The default is four per core, between 4 and 32:
    /// every write ends on the one revision row, so connections beyond what
    /// PostgreSQL can run at once only queue on that lock inside the database. On
    /// 2 cores with 16 writers, 32 connections gave a p99 of 44 ms, 8 gave 17 ms.
    pub max_connections: u32,
    /// How long a request waits for a connection before the database counts as unavailable.
    pub acquire_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        StoreOptions {
            max_connections: u32::try_from(cores * 4).unwrap_or(32).clamp(4, 32),
            acquire_timeout: Duration::from_secs(3),
        }
    }
}

/// One stored entity.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Entity kind, e.g. `route`.
    pub kind: String,
    /// Server-assigned id.
    pub id: String,
    /// Unique natural key within the kind (a name), if the kind has one.
    pub key: Option<String>,
    /// The document.
    pub body: Value,
    /// Revision of the entity's last write: its ETag.
    pub version: i64,
    /// Creation time, Unix milliseconds.
    pub created_at: i64,
    /// Last write, Unix milliseconds.
    pub updated_at: i64,
}

/// An entity as loaded for a snapshot build: the document undecoded, with its secret.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct RawRecord {
    /// Kind.
    pub kind: String,
    /// Id.
    pub id: String,
    /// The document as stored (JSON text).
    pub body: String,
    /// Revision of its last write.
    pub version: i64,
    /// Token hash or sealed secret.
    pub secret: Option<String>,
}

/// A reference from one entity to another, enforced by a foreign key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ref {
    /// Referenced kind.
    pub kind: String,
    /// Referenced id.
    pub id: String,
    /// Deleting the referenced entity deletes the referring one too (else it is refused).
    pub cascade: bool,
}

/// A new entity.
#[derive(Debug, Clone)]
pub struct Entity {
    /// Kind.
    pub kind: String,
    /// Id.
    pub id: String,
    /// Natural key, unique within the kind.
    pub key: Option<String>,
    /// Document (never holds secrets).
    pub body: Value,
    /// Token hash or encrypted secret, stored apart from the body and never listed.
    pub secret: Option<String>,
    /// Entities this one refers to.
    pub refs: Vec<Ref>,
}

/// What a replace does to the stored secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretChange {
    /// Leave it as it is.
    Keep,
    /// Replace it (or clear it with `None`).
    Set(Option<String>),
}

/// One change inside a write transaction.
#[derive(Debug, Clone)]
pub enum Op {
    /// Insert a new entity.
    Create(Entity),
    /// Replace an entity's document, key and references.
    Replace {
        /// The new state (its `secret` is ignored; see `secret`).
        entity: Entity,
        /// Refuse unless the entity is at this version.
        if_version: Option<i64>,
        /// What happens to the secret.
        secret: SecretChange,
    },
    /// Delete an entity, and the entities that refer to it with `cascade`.
    Delete {
        /// Kind.
        kind: String,
        /// Id.
        id: String,
        /// Refuse unless the entity is at this version.
        if_version: Option<i64>,
    },
}

/// The result of a committed write.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The revision the write created.
    pub revision: i64,
    /// Each op's resulting record (`None` for deletes), in order.
    pub records: Vec<Option<Record>>,
}

/// Listing parameters.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Opaque cursor from a previous page.
    pub cursor: Option<String>,
    /// Page size (clamped to 1..=1000; default 100).
    pub limit: Option<u32>,
    /// Exact natural key.
    pub key: Option<String>,
    /// Top-level string fields of the body that must equal the given values.
    pub fields: Vec<(&'static str, String)>,
}

/// One page of a listing.
#[derive(Debug, Clone)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// Cursor for the next page, if there may be one.
    pub next: Option<String>,
}

/// One audit trail entry.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AuditEvent {
    /// Position in the trail.
    pub seq: i64,
    /// Revision written.
    pub revision: i64,
    /// Unix milliseconds.
    pub at: i64,
    /// Who wrote.
    pub actor: String,
    /// What they did: `create`, `replace`, `delete`, `revoke`, ...
    pub action: String,
    /// Entity kind.
    pub kind: String,
    /// Entity id.
    pub entity_id: String,
    /// The document before (absent for creates).
    pub before: Option<Value>,
    /// The document after (absent for deletes).
    pub after: Option<Value>,
}

/// Audit listing parameters.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Opaque cursor from a previous page.
    pub cursor: Option<String>,
    /// Page size.
    pub limit: Option<u32>,
    /// Only this kind.
    pub kind: Option<String>,
    /// Only this entity id.
    pub entity_id: Option<String>,
    /// Only this actor.
    pub actor: Option<String>,
    /// Leave out events about these kinds (for readers not allowed to see them).
    pub hide_kinds: Vec<String>,
}

/// One change-log row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Change {
    /// Revision.
    pub revision: i64,
    /// Kind.
    pub kind: String,
    /// Id.
    pub id: String,
    /// `upsert` or `delete`.
    pub op: String,
}

/// How the database's schema compares with this build's migrations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaStatus {
    /// Versions applied in the database.
    pub applied: Vec<i64>,
    /// Versions this build knows.
    pub known: Vec<i64>,
}

impl SchemaStatus {
    /// Migrations this build has that the database lacks.
    pub fn pending(&self) -> Vec<i64> {
        self.known
            .iter()
            .copied()
            .filter(|v| !self.applied.contains(v))
            .collect()
    }
}

/// The store: a pool and its dialect. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
    url: String,
    /// Every revision up to this one is known durable (see [`Store::flush_through`]).
    durable: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

const MAX_PAGE: u32 = 1000;

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn encode_cursor(s: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

fn decode_cursor<T: std::str::FromStr>(s: &str) -> Result<T, StoreError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .filter(|s| !s.contains('\0'))
        .and_then(|s| s.parse().ok())
        .ok_or(StoreError::InvalidCursor)
}

/// The page size asked for, within bounds.
fn page_size(limit: Option<u32>) -> u32 {
    limit.unwrap_or(100).clamp(1, MAX_PAGE)
}

/// Cuts a fetch of `limit + 1` items to a page, with a cursor after its last item
/// when the extra one shows there is more.
fn page<T>(mut items: Vec<T>, limit: u32, cursor: impl Fn(&T) -> String) -> Page<T> {
    let limit = limit as usize;
    let next = if items.len() > limit {
        items.truncate(limit);
        items.last().map(cursor)
    } else {
        None
    };
    Page { items, next }
}

/// Whether any string in `v`, a member name or a value, holds NUL (U+0000).
/// Nothing stored does (see [`StoreError::Nul`]), so a lookup by such a value
/// finds nothing without asking the database, which would refuse the text.
fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(members) => members.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// Refuses an op that would store NUL anywhere (see [`StoreError::Nul`]).
fn check_text(op: &Op) -> Result<(), StoreError> {
    let nul = |what: &str| Err(StoreError::Nul(what.to_owned()));
    let (entity, secret) = match op {
        Op::Create(e) => (e, e.secret.as_deref()),
        Op::Replace { entity, secret, .. } => match secret {
            SecretChange::Set(s) => (entity, s.as_deref()),
            SecretChange::Keep => (entity, None),
        },
        // Nothing stored has such an id.
        Op::Delete { kind, id, .. } if kind.contains('\0') || id.contains('\0') => {
            return Err(StoreError::NotFound {
                kind: kind.clone(),
                id: id.clone(),
            })
        }
        Op::Delete { .. } => return Ok(()),
    };
    if entity.kind.contains('\0') || entity.id.contains('\0') {
        return nul("the id");
    }
    if entity.key.as_deref().is_some_and(|k| k.contains('\0')) {
        return nul("the name");
    }
    if has_nul(&entity.body) {
        return nul("the document");
    }
    if secret.is_some_and(|s| s.contains('\0')) {
        return nul("the secret");
    }
    if entity
        .refs
        .iter()
        .any(|r| r.kind.contains('\0') || r.id.contains('\0'))
    {
        return nul("a reference");
    }
    Ok(())
}

fn parse_json(text: &str) -> Result<Value, StoreError> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Database(format!("stored document is not JSON: {e}")))
}

const RECORD_COLUMNS: &str = "kind, id, natural_key, body, version, created_at, updated_at";

fn record(row: &AnyRow) -> Result<Record, StoreError> {
    let body: String = row.try_get("body").map_err(classify)?;
    Ok(Record {
        kind: row.try_get("kind").map_err(classify)?,
        id: row.try_get("id").map_err(classify)?,
        key: row.try_get("natural_key").map_err(classify)?,
        body: parse_json(&body)?,
        version: row.try_get("version").map_err(classify)?,
        created_at: row.try_get("created_at").map_err(classify)?,
        updated_at: row.try_get("updated_at").map_err(classify)?,
    })
}

/// The columns of a [`RawRecord`].
const RAW_COLUMNS: &str = "kind, id, body, version, secret";

fn audit_event(row: &AnyRow) -> Result<AuditEvent, StoreError> {
    let doc = |col: &str| -> Result<Option<Value>, StoreError> {
        let text: Option<String> = row.try_get(col).map_err(classify)?;
        text.as_deref().map(parse_json).transpose()
    };
    Ok(AuditEvent {
        seq: row.try_get("seq").map_err(classify)?,
        revision: row.try_get("revision").map_err(classify)?,
        at: row.try_get("at").map_err(classify)?,
        actor: row.try_get("actor").map_err(classify)?,
        action: row.try_get("action").map_err(classify)?,
        kind: row.try_get("kind").map_err(classify)?,
        entity_id: row.try_get("entity_id").map_err(classify)?,
        before: doc("before")?,
        after: doc("after")?,
    })
}

/// The current revision, read through `e` (the pool or a transaction).
async fn read_revision<'e>(
    e: impl sqlx::Executor<'e, Database = sqlx::Any>,
) -> Result<i64, StoreError> {
    sqlx::query_scalar("SELECT value FROM revision WHERE id = 1")
        .fetch_one(e)
        .await
        .map_err(classify)
}

/// Change-log rows after `revision`, in order.
async fn changes_after(tx: &mut Tx<'_>, revision: i64) -> Result<Vec<Change>, StoreError> {
    sqlx::query_as(
        "SELECT revision, kind, id, op FROM changes WHERE revision > $1 ORDER BY revision, kind, id",
    )
    .bind(revision)
    .fetch_all(&mut **tx)
    .await
    .map_err(classify)
}

type Tx<'a> = sqlx::Transaction<'a, sqlx::Any>;

impl std::fmt::Debug for Store {
    // Not the URL: it may hold a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dialect", &self.dialect)
            .finish_non_exhaustive()
    }
}

/// Revisions committed anywhere, as PostgreSQL announces them.
#[derive(Debug)]
pub struct RevisionListener(sqlx::postgres::PgListener);

impl RevisionListener {
    /// Waits for the next announced revision.
    pub async fn next(&mut self) -> Result<i64, StoreError> {
        let n = self.0.recv().await.map_err(classify)?;
        Ok(n.payload().parse().unwrap_or(0))
    }
}

impl Store {
    /// Connects to `postgres://...` or `sqlite://...` (created if missing).
    pub async fn connect(url: &str, opts: StoreOptions) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let dialect = if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Dialect::Postgres
        } else if url.starts_with("sqlite:") {
            Dialect::Sqlite
        } else {
            return Err(StoreError::Database(
                "database URL must start with postgres:// or sqlite://".into(),
            ));
        };
        let durable = std::sync::Arc::<std::sync::atomic::AtomicI64>::default();
        let mut pool = AnyPoolOptions::new().acquire_timeout(opts.acquire_timeout);
        pool = match dialect {
            // A new connection may follow a restart of the server (even onto a
            // restored backup, with lower revisions): forget what was known durable.
            Dialect::Postgres => {
                let durable = durable.clone();
                pool.max_connections(opts.max_connections)
                    .after_connect(move |_, _| {
                        durable.store(0, std::sync::atomic::Ordering::Release);
                        Box::pin(async { Ok(()) })
                    })
            }
            Dialect::Sqlite => pool
                .max_connections(opts.max_connections.min(8))
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        // WAL for concurrent readers; FULL so an acknowledged write survives power loss.
                        for pragma in [
                            "PRAGMA journal_mode = WAL",
                            "PRAGMA synchronous = FULL",
                            "PRAGMA foreign_keys = ON",
                            "PRAGMA busy_timeout = 10000",
                        ] {
                            sqlx::query(pragma).execute(&mut *conn).await?;
                        }
                        Ok(())
                    })
                }),
        };
        let pool = pool.connect_lazy(url).map_err(classify)?;
        Ok(Store {
            pool,
            dialect,
            url: url.to_owned(),
            durable,
        })
    }

    /// Announcements of revisions committed by any process sharing the database
    /// (PostgreSQL LISTEN/NOTIFY); `None` on SQLite, which only one process writes.
    /// Notifications can be lost while the connection is down: poll as well.
    pub async fn listen_revisions(&self) -> Result<Option<RevisionListener>, StoreError> {
        if self.dialect != Dialect::Postgres {
            return Ok(None);
        }
        let mut l = sqlx::postgres::PgListener::connect(&self.url)
            .await
            .map_err(classify)?;
        l.listen("vigil_revision").await.map_err(classify)?;
        Ok(Some(RevisionListener(l)))
    }

    /// The database behind the store.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    fn migrator(&self) -> &'static Migrator {
        match self.dialect {
            Dialect::Postgres => &POSTGRES_MIGRATIONS,
            Dialect::Sqlite => &SQLITE_MIGRATIONS,
        }
    }

    /// Applies pending migrations (forward only).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.migrator().run(&self.pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(e) => classify(e),
            other => StoreError::Schema(other.to_string()),
        })
    }

    /// Which migrations are applied and which this build knows.
    pub async fn schema_status(&self) -> Result<SchemaStatus, StoreError> {
        let known: Vec<i64> = self.migrator().iter().map(|m| m.version).collect();
        let rows = sqlx::query_scalar(
            "SELECT version FROM _sqlx_migrations WHERE success = TRUE ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await;
        let applied = match rows {
            Ok(versions) => versions,
            Err(sqlx::Error::Database(e)) if e.message().contains("_sqlx_migrations") => Vec::new(),
            Err(e) => return Err(classify(e)),
        };
        Ok(SchemaStatus { applied, known })
    }

    /// Checks the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(classify)
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// The current revision.
    pub async fn revision(&self) -> Result<i64, StoreError> {
        read_revision(&self.pool).await
    }

    /// Records what this replica knows of some proxies: `(id, status document, seen
    /// at in Unix milliseconds)`, newest wins; rows not seen since `forget_before`
    /// are dropped. Not a revision: the fleet is observed, not configured.
    pub async fn put_proxies(
        &self,
        rows: &[(String, String, i64)],
        forget_before: i64,
    ) -> Result<(), StoreError> {
        // One row an id (a statement may not touch a row twice), the newest.
        let mut newest: std::collections::BTreeMap<&str, &(String, String, i64)> =
            std::collections::BTreeMap::new();
        for row in rows {
            let kept = newest.entry(&row.0).or_insert(row);
            if kept.2 < row.2 {
                *kept = row;
            }
        }
        let rows: Vec<&(String, String, i64)> = newest.into_values().collect();
        let mut tx = self.pool.begin().await.map_err(classify)?;
        // One statement per thousand rows, not a round trip each.
        for chunk in rows.chunks(1000) {
            let sql = format!(
                "INSERT INTO proxies (id, status, seen_at) VALUES {} \
                 ON CONFLICT (id) DO UPDATE SET status = excluded.status, seen_at = excluded.seen_at \
                 WHERE proxies.seen_at <= excluded.seen_at",
                values(chunk.len(), 3, 1)
            );
            let mut q = sqlx::query(&sql);
            for (id, status, seen_at) in chunk.iter().copied() {
                q = q.bind(id).bind(status).bind(*seen_at);
            }
            q.execute(&mut *tx).await.map_err(classify)?;
        }
        sqlx::query("DELETE FROM proxies WHERE seen_at < $1")
            .bind(forget_before)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)
    }

    /// Every recorded proxy's status document, by id.
    pub async fn proxies(&self) -> Result<Vec<(String, String)>, StoreError> {
        sqlx::query_as("SELECT id, status FROM proxies ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(classify)
    }

    /// The entity of `kind` whose `column` (one of ours, never the caller's) equals `value`.
    async fn get_where(
        &self,
        kind: &str,
        column: &str,
        value: &str,
    ) -> Result<Option<Record>, StoreError> {
        if kind.contains('\0') || value.contains('\0') {
            return Ok(None);
        }
        let sql =
            format!("SELECT {RECORD_COLUMNS} FROM entities WHERE kind = $1 AND {column} = $2");
        let row = sqlx::query(&sql)
            .bind(kind)
            .bind(value)
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
        row.as_ref().map(record).transpose()
    }

    /// One entity.
    pub async fn get(&self, kind: &str, id: &str) -> Result<Option<Record>, StoreError> {
        self.get_where(kind, "id", id).await
    }

    /// One entity by natural key.
    pub async fn get_by_key(&self, kind: &str, key: &str) -> Result<Option<Record>, StoreError> {
        self.get_where(kind, "natural_key", key).await
    }

    /// The entity of a kind whose stored secret equals `secret` (a token hash).
    pub async fn find_by_secret(
        &self,
        kind: &str,
        secret: &str,
    ) -> Result<Option<Record>, StoreError> {
        self.get_where(kind, "secret", secret).await
    }

    /// The stored secret of one entity (for decryption by its owner, never for the API).
    pub async fn secret(&self, kind: &str, id: &str) -> Result<Option<String>, StoreError> {
        if kind.contains('\0') || id.contains('\0') {
            return Ok(None);
        }
        let secret: Option<Option<String>> =
            sqlx::query_scalar("SELECT secret FROM entities WHERE kind = $1 AND id = $2")
                .bind(kind)
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(classify)?;
        Ok(secret.flatten())
    }

    fn json_field(&self, field: &str) -> String {
        match self.dialect {
            Dialect::Postgres => format!("(body::jsonb ->> '{field}')"),
            Dialect::Sqlite => format!("json_extract(body, '$.{field}')"),
        }
    }

    /// A page of one kind's entities, in id order.
    pub async fn list(&self, kind: &str, q: &ListQuery) -> Result<Page<Record>, StoreError> {
        let limit = page_size(q.limit);
        let after: String = match &q.cursor {
            Some(c) => decode_cursor(c)?,
            None => String::new(),
        };
        let nul = |s: &str| s.contains('\0');
        if nul(kind) || q.key.as_deref().is_some_and(nul) || q.fields.iter().any(|(_, v)| nul(v)) {
            return Ok(Page {
                items: Vec::new(),
                next: None,
            });
        }
        let mut sql = format!("SELECT {RECORD_COLUMNS} FROM entities WHERE kind = $1 AND id > $2");
        let mut n = 3;
        if q.key.is_some() {
            sql.push_str(&format!(" AND natural_key = ${n}"));
            n += 1;
        }
        for (field, _) in &q.fields {
            if field.is_empty() || !field.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                return Err(StoreError::Database(format!(
                    "invalid filter field {field:?}"
                )));
            }
            sql.push_str(&format!(" AND {} = ${n}", self.json_field(field)));
            n += 1;
        }
        sql.push_str(&format!(" ORDER BY id LIMIT ${n}"));
        let mut query = sqlx::query(&sql).bind(kind).bind(after);
        if let Some(k) = &q.key {
            query = query.bind(k.as_str());
        }
        for (_, v) in &q.fields {
            query = query.bind(v.as_str());
        }
        let rows = query
            .bind(i64::from(limit) + 1)
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        let items = rows.iter().map(record).collect::<Result<Vec<_>, _>>()?;
        Ok(page(items, limit, |r| encode_cursor(&r.id)))
    }

    /// Begins a read-only transaction that sees one snapshot of the database, and
    /// reads the revision that snapshot is at. SQLite's read transactions always see
    /// one snapshot; PostgreSQL's default (read committed) does not, so there the
    /// `BEGIN` itself asks for repeatable read.
    async fn snapshot(&self) -> Result<(Tx<'static>, i64), StoreError> {
        let tx = match self.dialect {
            Dialect::Postgres => {
                self.pool
                    .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    .await
            }
            Dialect::Sqlite => self.pool.begin().await,
        };
        let mut tx = tx.map_err(classify)?;
        let revision = read_revision(&mut *tx).await?;
        Ok((tx, revision))
    }

    /// Every entity with its secret and its document as stored text, for building a
    /// snapshot: the caller decodes each document once, straight into its own types.
    pub async fn load_all(&self) -> Result<(i64, Vec<RawRecord>), StoreError> {
        let (mut tx, revision) = self.snapshot().await?;
        let records = sqlx::query_as(&format!(
            "SELECT {RAW_COLUMNS} FROM entities ORDER BY kind, id"
        ))
        .fetch_all(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        // What is read goes into snapshots: only once it is durable.
        self.flush_through(revision).await?;
        Ok((revision, records))
    }

    /// What changed after `revision`, consistently: the current revision, the change-log
    /// rows after `revision`, and the current form of every entity they name that still
    /// exists. An incremental snapshot build reads this instead of everything.
    pub async fn changed_since(
        &self,
        revision: i64,
    ) -> Result<(i64, Vec<Change>, Vec<RawRecord>), StoreError> {
        let (mut tx, current) = self.snapshot().await?;
        let changes = changes_after(&mut tx, revision).await?;
        let records = sqlx::query_as(&format!(
            "SELECT {RAW_COLUMNS} FROM entities e WHERE EXISTS \
             (SELECT 1 FROM changes c WHERE c.revision > $1 AND c.kind = e.kind AND c.id = e.id) \
             ORDER BY kind, id"
        ))
        .bind(revision)
        .fetch_all(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        self.flush_through(current).await?;
        Ok((current, changes, records))
    }

    /// A page of the audit trail, oldest first.
    pub async fn audit(&self, q: &AuditQuery) -> Result<Page<AuditEvent>, StoreError> {
        let limit = page_size(q.limit);
        let after: i64 = match &q.cursor {
            Some(c) => decode_cursor(c)?,
            None => 0,
        };
        let filters = [&q.kind, &q.entity_id, &q.actor];
        if filters
            .iter()
            .any(|f| f.as_deref().is_some_and(|v| v.contains('\0')))
        {
            return Ok(Page {
                items: Vec::new(),
                next: None,
            });
        }
        let mut sql = String::from(
            "SELECT seq, revision, at, actor, action, kind, entity_id, before, after FROM audit WHERE seq > $1",
        );
        let mut binds: Vec<&str> = Vec::new();
        for (col, v) in [
            ("kind", &q.kind),
            ("entity_id", &q.entity_id),
            ("actor", &q.actor),
        ] {
            if let Some(v) = v {
                binds.push(v);
                sql.push_str(&format!(" AND {col} = ${}", binds.len() + 1));
            }
        }
        for hidden in &q.hide_kinds {
            binds.push(hidden);
            sql.push_str(&format!(" AND kind <> ${}", binds.len() + 1));
        }
        sql.push_str(&format!(" ORDER BY seq LIMIT ${}", binds.len() + 2));
        let mut query = sqlx::query(&sql).bind(after);
        for b in binds {
            query = query.bind(b);
        }
        let rows = query
            .bind(i64::from(limit) + 1)
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        let items = rows
            .iter()
            .map(audit_event)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(page(items, limit, |e| encode_cursor(&e.seq.to_string())))
    }

    /// Applies `ops` in one transaction under a new revision, recording each change
    /// and an audit event (`action`, or the op's own name). Nothing is applied
    /// unless everything is.
    ///
    /// The revision row is the one lock every writer takes, so it is taken as late
    /// as possible: on PostgreSQL the work runs under row locks (`FOR UPDATE`) and a
    /// single final statement bumps the revision, stamps the written rows, announces
    /// the revision and logs the changes and audit events; SQLite serialises writers
    /// anyway and takes it first.
    pub async fn write(
        &self,
        actor: &str,
        action: Option<&str>,
        ops: Vec<Op>,
    ) -> Result<Committed, StoreError> {
        if actor.contains('\0') || action.is_some_and(|a| a.contains('\0')) {
            return Err(StoreError::Nul("the actor".into()));
        }
        for op in &ops {
            check_text(op)?;
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.write_once(actor, action, &ops).await {
                Err(StoreError::Retry(e)) if attempt < 4 => {
                    tracing::debug!(error = %e, attempt, "Write conflicted; retrying");
                }
                Err(StoreError::Retry(e)) => return Err(StoreError::Unavailable(e)),
                other => return other,
            }
        }
    }

    async fn write_once(
        &self,
        actor: &str,
        action: Option<&str>,
        ops: &[Op],
    ) -> Result<Committed, StoreError> {
        let mut tx = match self.dialect {
            // Commit without waiting for the WAL flush, so that the revision row
            // lock is not held across it; `flush_through` waits for it after the commit.
            Dialect::Postgres => {
                self.pool
                    .begin_with("BEGIN; SET LOCAL synchronous_commit = off")
                    .await
            }
            Dialect::Sqlite => self.pool.begin().await,
        }
        .map_err(classify)?;
        let mut w = Writer {
            dialect: self.dialect,
            revision: 0,
            now: now_millis(),
            actor,
            action,
            pending: Vec::new(),
        };
        if self.dialect == Dialect::Sqlite {
            // SQLite serialises writers anyway: take the revision first (PostgreSQL's
            // `finish` takes it last).
            w.revision = sqlx::query_scalar(
                "UPDATE revision SET value = value + 1 WHERE id = 1 RETURNING value",
            )
            .fetch_one(&mut *tx)
            .await
            .map_err(classify)?;
        }
        let mut records = Vec::with_capacity(ops.len());
        for op in ops {
            records.push(w.apply(&mut tx, op).await?);
        }
        let revision = w.finish(&mut tx).await?;
        for r in records.iter_mut().flatten() {
            r.version = revision;
        }
        tx.commit().await.map_err(classify)?;
        self.flush_through(revision).await?;
        Ok(Committed { revision, records })
    }

    /// Waits until `revision`, committed before the call, is durable. On PostgreSQL
    /// writes commit asynchronously (see `write_once`): this commits a one-row
    /// update with synchronous commit, whose WAL flush covers every earlier commit
    /// record, and concurrent calls share flushes. Revision order is commit order,
    /// so a flush that began after revision *n* committed makes every revision up
    /// to *n* durable: a revision at or below one already flushed that way needs no
    /// flush of its own. SQLite commits durably already.
    pub async fn flush_through(&self, revision: i64) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        if self.dialect != Dialect::Postgres || revision <= self.durable.load(Ordering::Acquire) {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO flush_barrier (slot, n) VALUES (pg_backend_pid() % 1024, 1) \
             ON CONFLICT (slot) DO UPDATE SET n = flush_barrier.n + 1",
        )
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        self.durable.fetch_max(revision, Ordering::AcqRel);
        Ok(())
    }
}

struct Writer<'a> {
    dialect: Dialect,
    /// Taken first on SQLite; 0 on PostgreSQL until `finish` takes it and stamps
    /// the rows written with it.
    revision: i64,
    now: i64,
    actor: &'a str,
    action: Option<&'a str>,
    /// Changes and audit events, written by `finish` once the revision is known.
    pending: Vec<Pending<'a>>,
}

struct Pending<'a> {
    kind: String,
    id: String,
    action: &'a str,
    before: Option<String>,
    /// `None` for a delete.
    after: Option<String>,
}

impl Pending<'_> {
    /// What the change log records for this event.
    fn change(&self) -> &'static str {
        if self.after.is_some() {
            "upsert"
        } else {
            "delete"
        }
    }
}

/// An entity as it stands, before a replace or delete.
#[derive(sqlx::FromRow)]
struct Current {
    version: i64,
    created_at: i64,
    /// The document as stored, for the audit trail.
    body: String,
    /// Its references as a JSON array of `[kind, id, cascade]`, in no order
    /// (PostgreSQL gives NULL for none; not read for deletes).
    refs: Option<String>,
}

/// A reference as the `refs` table holds it.
type RefRow = (String, String, i64);

impl Current {
    /// Whether it refers to exactly what `e` refers to (as `write_refs` would store it).
    fn same_refs(&self, e: &Entity) -> Result<bool, StoreError> {
        let mut stored: Vec<RefRow> = match &self.refs {
            Some(text) => serde_json::from_str(text)
                .map_err(|e| StoreError::Database(format!("unreadable references: {e}")))?,
            None => Vec::new(),
        };
        stored.sort();
        Ok(stored
            .iter()
            .map(|(k, i, c)| (k.as_str(), i.as_str(), *c))
            .eq(targets(e)
                .iter()
                .map(|r| (r.kind.as_str(), r.id.as_str(), i64::from(r.cascade)))))
    }
}

/// `e`'s references sorted by target, one per target (the first wins).
fn targets(e: &Entity) -> Vec<&Ref> {
    let mut refs: Vec<&Ref> = e.refs.iter().collect();
    refs.sort_by(|a, b| (&a.kind, &a.id).cmp(&(&b.kind, &b.id)));
    refs.dedup_by(|a, b| a.kind == b.kind && a.id == b.id);
    refs
}

/// `($first, ...), (...)`: placeholders for `rows` rows of `cols` values each.
fn values(rows: usize, cols: usize, first: usize) -> String {
    (0..rows)
        .map(|r| {
            let cells: Vec<String> = (0..cols)
                .map(|c| format!("${}", first + r * cols + c))
                .collect();
            format!("({})", cells.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl<'a> Writer<'a> {
    async fn apply(&mut self, tx: &mut Tx<'_>, op: &Op) -> Result<Option<Record>, StoreError> {
        match op {
            Op::Create(e) => self.create(tx, e).await.map(Some),
            Op::Replace {
                entity,
                if_version,
                secret,
            } => self
                .replace(tx, entity, *if_version, secret)
                .await
                .map(Some),
            Op::Delete {
                kind,
                id,
                if_version,
            } => {
                let cur = self.current(tx, kind, id, *if_version, false).await?;
                let action = self.action.unwrap_or("delete");
                self.delete(tx, kind, id, cur, action, 0).await?;
                Ok(None)
            }
        }
    }

    /// The entity as it stands, locked on PostgreSQL (whose revision row is not locked
    /// yet); refused unless at `if_version` when one is given.
    async fn current(
        &self,
        tx: &mut Tx<'_>,
        kind: &str,
        id: &str,
        if_version: Option<i64>,
        with_refs: bool,
    ) -> Result<Current, StoreError> {
        let (aggregate, lock) = match self.dialect {
            Dialect::Postgres => (
                "json_agg(json_build_array(r.ref_kind, r.ref_id, r.cascade))::text",
                " FOR UPDATE OF e",
            ),
            Dialect::Sqlite => (
                "json_group_array(json_array(r.ref_kind, r.ref_id, r.cascade))",
                "",
            ),
        };
        let refs = if with_refs {
            format!("(SELECT {aggregate} FROM refs r WHERE r.kind = e.kind AND r.id = e.id)")
        } else {
            "CAST(NULL AS TEXT)".to_owned()
        };
        let sql = format!(
            "SELECT e.version, e.created_at, e.body, {refs} AS refs \
             FROM entities e WHERE e.kind = $1 AND e.id = $2{lock}"
        );
        let Some(cur) = sqlx::query_as::<_, Current>(&sql)
            .bind(kind)
            .bind(id)
            .fetch_optional(&mut **tx)
            .await
            .map_err(classify)?
        else {
            return Err(StoreError::NotFound {
                kind: kind.into(),
                id: id.into(),
            });
        };
        if if_version.is_some_and(|v| v != cur.version) {
            return Err(StoreError::VersionMismatch {
                kind: kind.into(),
                id: id.into(),
                current: cur.version,
            });
        }
        Ok(cur)
    }

    /// The record `e` becomes by this write.
    fn written(&self, e: &Entity, created_at: i64) -> Record {
        Record {
            kind: e.kind.clone(),
            id: e.id.clone(),
            key: e.key.clone(),
            body: e.body.clone(),
            version: self.revision,
            created_at,
            updated_at: self.now,
        }
    }

    async fn create(&mut self, tx: &mut Tx<'_>, e: &Entity) -> Result<Record, StoreError> {
        let body = e.body.to_string();
        sqlx::query(
            "INSERT INTO entities (kind, id, natural_key, body, secret, version, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
        )
        .bind(&e.kind)
        .bind(&e.id)
        .bind(e.key.as_deref())
        .bind(&body)
        .bind(e.secret.as_deref())
        .bind(self.revision)
        .bind(self.now)
        .execute(&mut **tx)
        .await
        .map_err(|err| unique_violation(err, e))?;
        self.write_refs(tx, e).await?;
        let action = self.action.unwrap_or("create");
        self.log(&e.kind, &e.id, action, None, Some(body));
        Ok(self.written(e, self.now))
    }

    async fn replace(
        &mut self,
        tx: &mut Tx<'_>,
        e: &Entity,
        if_version: Option<i64>,
        secret: &SecretChange,
    ) -> Result<Record, StoreError> {
        let cur = self.current(tx, &e.kind, &e.id, if_version, true).await?;
        let body = e.body.to_string();
        let sql = format!(
            "UPDATE entities SET natural_key = $3, body = $4, version = $5, updated_at = $6{} \
             WHERE kind = $1 AND id = $2",
            match secret {
                SecretChange::Keep => "",
                SecretChange::Set(_) => ", secret = $7",
            }
        );
        let mut q = sqlx::query(&sql)
            .bind(&e.kind)
            .bind(&e.id)
            .bind(e.key.as_deref())
            .bind(&body)
            .bind(self.revision)
            .bind(self.now);
        if let SecretChange::Set(s) = secret {
            q = q.bind(s.as_deref());
        }
        q.execute(&mut **tx)
            .await
            .map_err(|err| unique_violation(err, e))?;
        // Most replaces keep the references: then two statements are saved.
        if !cur.same_refs(e)? {
            sqlx::query("DELETE FROM refs WHERE kind = $1 AND id = $2")
                .bind(&e.kind)
                .bind(&e.id)
                .execute(&mut **tx)
                .await
                .map_err(classify)?;
            self.write_refs(tx, e).await?;
        }
        let action = self.action.unwrap_or("replace");
        self.log(&e.kind, &e.id, action, Some(cur.body), Some(body));
        Ok(self.written(e, cur.created_at))
    }

    /// Deletes the entity (as it stands: `cur`), first deleting what refers to it
    /// with `cascade` (audited as `cascade-delete`); refuses when anything refers to
    /// it without.
    async fn delete(
        &mut self,
        tx: &mut Tx<'_>,
        kind: &str,
        id: &str,
        cur: Current,
        action: &'a str,
        depth: u32,
    ) -> Result<(), StoreError> {
        if depth > 8 {
            return Err(StoreError::Database("delete cascades too deep".into()));
        }
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT kind, id, cascade FROM refs WHERE ref_kind = $1 AND ref_id = $2 ORDER BY kind, id",
        )
        .bind(kind)
        .bind(id)
        .fetch_all(&mut **tx)
        .await
        .map_err(classify)?;
        let mut blocking = Vec::new();
        let mut cascading = Vec::new();
        for (kind, id, cascade) in rows {
            if cascade != 0 {
                cascading.push((kind, id));
            } else if blocking.len() < 20 {
                blocking.push((kind, id));
            }
        }
        if !blocking.is_empty() {
            return Err(StoreError::Referenced {
                kind: kind.into(),
                id: id.into(),
                by: blocking,
            });
        }
        for (dep_kind, dep_id) in cascading {
            match self.current(tx, &dep_kind, &dep_id, None, false).await {
                Ok(dep) => {
                    Box::pin(self.delete(tx, &dep_kind, &dep_id, dep, "cascade-delete", depth + 1))
                        .await?;
                }
                // Already gone: two cascades reached it.
                Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        sqlx::query("DELETE FROM entities WHERE kind = $1 AND id = $2")
            .bind(kind)
            .bind(id)
            .execute(&mut **tx)
            .await
            .map_err(classify)?;
        self.log(kind, id, action, Some(cur.body), None);
        Ok(())
    }

    /// Inserts the references, per 200 with one statement that takes only those whose
    /// target exists; if one was left out, reports the first missing. The foreign
    /// keys stay as the last line of defence.
    async fn write_refs(&self, tx: &mut Tx<'_>, e: &Entity) -> Result<(), StoreError> {
        for chunk in targets(e).chunks(200) {
            // VALUES columns are `column1`, ... in both dialects.
            let sql = format!(
                "INSERT INTO refs (kind, id, ref_kind, ref_id, cascade) \
                 SELECT $1, $2, t.kind, t.id, v.column3 FROM (VALUES {}) AS v \
                 JOIN entities t ON t.kind = v.column1 AND t.id = v.column2",
                values(chunk.len(), 3, 3)
            );
            let mut q = sqlx::query(&sql).bind(&e.kind).bind(&e.id);
            for r in chunk {
                q = q.bind(&r.kind).bind(&r.id).bind(i64::from(r.cascade));
            }
            let inserted = q.execute(&mut **tx).await.map_err(classify)?;
            if inserted.rows_affected() < chunk.len() as u64 {
                return Err(self.missing_ref(tx, chunk).await?);
            }
        }
        Ok(())
    }

    /// The first of `refs` (in sorted order) whose target does not exist.
    async fn missing_ref(&self, tx: &mut Tx<'_>, refs: &[&Ref]) -> Result<StoreError, StoreError> {
        let mut sql = String::from("SELECT kind, id FROM entities WHERE ");
        for i in 0..refs.len() {
            if i > 0 {
                sql.push_str(" OR ");
            }
            sql.push_str(&format!("(kind = ${} AND id = ${})", 2 * i + 1, 2 * i + 2));
        }
        let mut q = sqlx::query_as(&sql);
        for r in refs {
            q = q.bind(&r.kind).bind(&r.id);
        }
        let found: std::collections::HashSet<(String, String)> = q
            .fetch_all(&mut **tx)
            .await
            .map_err(classify)?
            .into_iter()
            .collect();
        Ok(refs
            .iter()
            .find(|r| !found.contains(&(r.kind.clone(), r.id.clone())))
            .map(|r| StoreError::MissingReference {
                kind: r.kind.clone(),
                id: r.id.clone(),
            })
            // Committed by another writer since the insert looked: try again.
            .unwrap_or_else(|| StoreError::Retry("a reference target appeared".into())))
    }

    fn log(
        &mut self,
        kind: &str,
        id: &str,
        action: &'a str,
        before: Option<String>,
        after: Option<String>,
    ) {
        self.pending.push(Pending {
            kind: kind.into(),
            id: id.into(),
            action,
            before,
            after,
        });
    }

    /// One change-log entry per entity written: its last change, in order of first write.
    fn changes(&self) -> Vec<(&str, &str, &'static str)> {
        let mut index: std::collections::HashMap<(&str, &str), usize> =
            std::collections::HashMap::with_capacity(self.pending.len());
        let mut changes: Vec<(&str, &str, &'static str)> = Vec::with_capacity(self.pending.len());
        for p in &self.pending {
            match index.entry((p.kind.as_str(), p.id.as_str())) {
                std::collections::hash_map::Entry::Occupied(i) => changes[*i.get()].2 = p.change(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(changes.len());
                    changes.push((&p.kind, &p.id, p.change()));
                }
            }
        }
        changes
    }

    /// Writes the change log and audit rows and, on PostgreSQL, takes the revision.
    async fn finish(&self, tx: &mut Tx<'_>) -> Result<i64, StoreError> {
        let changes = self.changes();
        match self.dialect {
            Dialect::Sqlite => {
                self.insert_log(tx, self.revision, &changes).await?;
                Ok(self.revision)
            }
            Dialect::Postgres => self.take_revision(tx, &changes).await,
        }
    }

    /// PostgreSQL: one statement bumps the revision, stamps the rows written (the
    /// first 1000) with it, announces it (delivered at commit; see `listen_revisions`)
    /// and, for writes of up to 100 events, logs them; larger writes finish after it.
    async fn take_revision(
        &self,
        tx: &mut Tx<'_>,
        changes: &[(&str, &str, &'static str)],
    ) -> Result<i64, StoreError> {
        let upserts: Vec<(&str, &str)> = changes
            .iter()
            .filter(|c| c.2 == "upsert")
            .map(|c| (c.0, c.1))
            .collect();
        let (stamp_now, stamp_later) = upserts.split_at(upserts.len().min(1000));
        // Every change comes from an event, so this bounds both.
        let log_now = self.pending.len() <= 100;
        let mut sql = String::from(
            "WITH r AS (UPDATE revision SET value = value + 1 WHERE id = 1 RETURNING value), \
             n AS (SELECT pg_notify('vigil_revision', CAST(value AS TEXT)) FROM r)",
        );
        let mut n = 1;
        if !stamp_now.is_empty() {
            sql.push_str(&format!(
                ", e AS (UPDATE entities SET version = (SELECT value FROM r) WHERE (kind, id) IN ({}) RETURNING 1)",
                values(stamp_now.len(), 2, n)
            ));
            n += stamp_now.len() * 2;
        }
        if log_now && !changes.is_empty() {
            sql.push_str(&format!(
                ", c AS (INSERT INTO changes (revision, kind, id, op) SELECT r.value, v.k, v.i, v.o FROM r, (VALUES {}) AS v(k, i, o) RETURNING 1)",
                values(changes.len(), 3, n)
            ));
            n += changes.len() * 3;
            sql.push_str(&format!(
                ", a AS (INSERT INTO audit (revision, at, actor, action, kind, entity_id, before, after) \
                 SELECT r.value, CAST(${n} AS BIGINT), v.ac, v.an, v.k, v.i, v.b, v.af FROM r, (VALUES {}) AS v(ac, an, k, i, b, af) RETURNING 1)",
                values(self.pending.len(), 6, n + 1)
            ));
        }
        sql.push_str(" SELECT r.value FROM r, n");
        let mut q = sqlx::query_scalar::<_, i64>(&sql);
        for (kind, id) in stamp_now {
            q = q.bind(*kind).bind(*id);
        }
        if log_now && !changes.is_empty() {
            for (kind, id, op) in changes {
                q = q.bind(*kind).bind(*id).bind(*op);
            }
            q = q.bind(self.now);
            for p in &self.pending {
                q = q
                    .bind(self.actor)
                    .bind(p.action)
                    .bind(p.kind.as_str())
                    .bind(p.id.as_str())
                    .bind(p.before.as_deref())
                    .bind(p.after.as_deref());
            }
        }
        let revision = q.fetch_one(&mut **tx).await.map_err(classify)?;
        for chunk in stamp_later.chunks(1000) {
            let sql = format!(
                "UPDATE entities SET version = $1 WHERE (kind, id) IN ({})",
                values(chunk.len(), 2, 2)
            );
            let mut q = sqlx::query(&sql).bind(revision);
            for (kind, id) in chunk {
                q = q.bind(*kind).bind(*id);
            }
            q.execute(&mut **tx).await.map_err(classify)?;
        }
        if !log_now {
            self.insert_log(tx, revision, changes).await?;
        }
        Ok(revision)
    }

    /// Writes the change log and audit rows under `revision`, 500 rows a statement.
    async fn insert_log(
        &self,
        tx: &mut Tx<'_>,
        revision: i64,
        changes: &[(&str, &str, &'static str)],
    ) -> Result<(), StoreError> {
        for chunk in changes.chunks(500) {
            let sql = format!(
                "INSERT INTO changes (revision, kind, id, op) VALUES {}",
                values(chunk.len(), 4, 1)
            );
            let mut q = sqlx::query(&sql);
            for (kind, id, op) in chunk {
                q = q.bind(revision).bind(*kind).bind(*id).bind(*op);
            }
            q.execute(&mut **tx).await.map_err(classify)?;
        }
        for chunk in self.pending.chunks(500) {
            let sql = format!(
                "INSERT INTO audit (revision, at, actor, action, kind, entity_id, before, after) VALUES {}",
                values(chunk.len(), 8, 1)
            );
            let mut q = sqlx::query(&sql);
            for p in chunk {
                q = q
                    .bind(revision)
                    .bind(self.now)
                    .bind(self.actor)
                    .bind(p.action)
                    .bind(p.kind.as_str())
                    .bind(p.id.as_str())
                    .bind(p.before.as_deref())
                    .bind(p.after.as_deref());
            }
            q.execute(&mut **tx).await.map_err(classify)?;
        }
        Ok(())
    }
}

fn unique_violation(err: sqlx::Error, e: &Entity) -> StoreError {
    if let sqlx::Error::Database(db) = &err {
        if db.kind() == sqlx::error::ErrorKind::UniqueViolation {
            let msg = db.message().to_owned();
            let constraint = db.constraint().unwrap_or_default().to_owned();
            if constraint.contains("natural_key") || msg.contains("natural_key") {
                return StoreError::AlreadyExists {
                    kind: e.kind.clone(),
                    key: e.key.clone().unwrap_or_default(),
                };
            }
            if constraint.contains("pkey") || msg.contains("entities.id") {
                return StoreError::AlreadyExists {
                    kind: e.kind.clone(),
                    key: e.id.clone(),
                };
            }
        }
    }
    classify(err)
}
