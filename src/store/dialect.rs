//! What differs between the SQL backends, and nothing else: the casts in
//! their SQL text (none in plain SQL), how a write takes its lock, how the
//! snapshot begins, the embedded migrations and pool size, how many rows one
//! statement writes and how `load` reaches the database ([`Queries`]), and
//! how the change feed is woken.
//!
//! [`super::sql::SqlStore`] is the one implementation of the store, generic
//! over a [`Dialect`] and its [`Queries`]; `postgres.rs` and `sqlite.rs` each
//! implement them, stating only what plain SQL would not do: a default
//! (the casts, the snapshot's `BEGIN`, [`Queries`] through
//! [`PlainSql`](super::sql::PlainSql)) is what plain SQL does.

use std::future::Future;

use chrono::{DateTime, Utc};
use sqlx::{Database, Pool};

use super::row::Fields;
use super::{ChangeListener, PoolSize, StoreError};
use crate::domain::Record;

/// A backend's connection (what a transaction dereferences to).
pub(crate) type Conn<D> = <<D as Dialect>::Db as Database>::Connection;

/// What a backend connects with (its connection's options).
pub(crate) type Options<D> = <Conn<D> as sqlx::Connection>::Options;

/// One audit row to insert: the workspace (text), the revision the change
/// made and the fields' text before (`None`: created) and after it.
#[derive(Debug)]
pub(crate) struct AuditRow<'a> {
    pub(crate) id: &'a str,
    pub(crate) revision: u64,
    pub(crate) before: Option<&'a Fields>,
    pub(crate) after: &'a Fields,
}

/// What one SQL backend does its own way.
pub(crate) trait Dialect: Send + Sync + Sized + 'static {
    /// The sqlx database.
    type Db: Database;

    /// The backend's name, for logs ([`super::Store::backend`]).
    const BACKEND: &'static str;
    /// The span attribute `db.system.name` (OpenTelemetry's name for it).
    const SYSTEM: &'static str;
    /// Appended to a parameter compared with or stored as a workspace id
    /// (plain SQL: nothing, the id is text).
    const UUID: &'static str = "";
    /// Appended to a text parameter stored in a JSON column (plain SQL:
    /// nothing, JSON is text).
    const JSON: &'static str = "";
    /// Appended to a workspace-id or JSON column read as text (plain SQL:
    /// nothing, they are text).
    const TEXT: &'static str = "";
    /// How a write keeps other writers out between its read and its commit.
    const WRITE_LOCK: WriteLock;
    /// Starts the snapshot's read-only transaction, one view of the data
    /// from its first read (`None`, the default: the pool's plain `BEGIN`).
    const BEGIN_SNAPSHOT: Option<&'static str> = None;
    /// One boolean: whether sqlx's migrations table exists.
    const MIGRATIONS_TABLE_EXISTS: &'static str;
    /// The embedded migrations.
    const MIGRATOR: &'static sqlx::migrate::Migrator;
    /// The pool's size unless configured (`--db-max-connections`).
    const DEFAULT_MAX_CONNECTIONS: u32;

    /// The statement that reads several workspaces at once, for a backend
    /// whose `load`s may go together: `columns` (the record's, as `load`
    /// selects them) after each row's 1-based position in the array of ids
    /// bound as `$1` (`None`, the default: each `load` reads alone).
    fn load_many(_columns: &str) -> Option<String> {
        None
    }

    /// Connects: the pool, sized by `size` (its `None`s: this dialect's
    /// defaults), and the dialect's own state.
    fn open(
        options: Options<Self>,
        size: PoolSize,
    ) -> impl Future<Output = Result<(Pool<Self::Db>, Self), StoreError>> + Send;

    /// Called after a transaction that logged a change has committed.
    fn committed(&self) {}

    /// A listener woken by committed changes.
    fn listen<'a>(
        &'a self,
        pool: &'a Pool<Self::Db>,
    ) -> impl Future<Output = Result<Box<dyn ChangeListener>, StoreError>> + Send + 'a;

    /// Connections the backend holds outside the pool: (open, idle).
    fn other_connections(&self) -> (u32, usize) {
        (0, 0)
    }
}

/// The statements a backend may run its own way: `load`'s read, and the
/// records, audit rows and change-log entries a write or a batch inserts
/// and reads back. A backend that runs them as plain SQL, one row per
/// statement, on the store's pool, says so with
/// [`PlainSql`](super::sql::PlainSql) and implements nothing here.
pub(crate) trait Queries: Dialect {
    /// Runs `load`'s one statement (`sql`, the workspace id bound as `$1`),
    /// or, with others waiting, `many` ([`Dialect::load_many`]).
    fn load<'a>(
        &'a self,
        pool: &'a Pool<Self::Db>,
        sql: &'a str,
        many: Option<&'a str>,
        id: String,
    ) -> impl Future<Output = Result<Option<<Self::Db as Database>::Row>, sqlx::Error>> + Send + 'a;

    /// Inserts new records (workspace and fields as text) at revision 1 in the
    /// order given; a workspace that has a record, or one another
    /// transaction is inserting, is skipped. Returns the workspaces inserted.
    fn insert_records(
        &self,
        conn: &mut Conn<Self>,
        records: &[(&str, &Fields)],
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// The records of `ids` (workspaces as text) that exist, in any order:
    /// `listed` (the record columns, id included, `FROM billing_records`)
    /// with the dialect's condition on the ids.
    fn select_records(
        &self,
        conn: &mut Conn<Self>,
        listed: &str,
        ids: &[&str],
    ) -> impl Future<Output = Result<Vec<Record>, StoreError>> + Send;

    /// The audit rows of the changes a transaction makes, every row with the
    /// same actor, reason and time, and their change-log entries at the next
    /// positions, in order. The last statements of every writing transaction
    /// (see `postgres.rs` for why).
    fn log_changes(
        &self,
        conn: &mut Conn<Self>,
        rows: &[AuditRow<'_>],
        actor: &str,
        reason: &str,
        at: DateTime<Utc>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// How a write keeps other writers out between reading a record and
/// committing its change: the write's read and its transaction's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteLock {
    /// Lock the rows read (`SELECT … FOR UPDATE`) in a plain transaction.
    /// Another create of the same record can still race the insert, and the
    /// loser retries as an update.
    Rows,
    /// Take the database's write lock when the transaction starts (`BEGIN
    /// IMMEDIATE`): writers queue; nothing can race.
    Database,
}

impl WriteLock {
    /// The statement that starts a writing transaction (`None`: `BEGIN`).
    pub(crate) fn begin(self) -> Option<&'static str> {
        match self {
            WriteLock::Rows => None,
            WriteLock::Database => Some("BEGIN IMMEDIATE"),
        }
    }

    /// Appended to the read of the row a write is about to change.
    pub(crate) fn read_suffix(self) -> &'static str {
        match self {
            WriteLock::Rows => " FOR UPDATE",
            WriteLock::Database => "",
        }
    }
}
