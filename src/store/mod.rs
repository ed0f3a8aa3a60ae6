//! Durable state: one record per workspace, its audit log, and the change log
//! (every committed revision bump at a global, commit-ordered position) that
//! the change feed ([`crate::feed`]) reads.
//!
//! One trait, two backends on sqlx: Postgres in production, SQLite as the
//! embedded default. The logic of a write (create, replace, compare-and-set,
//! no-op detection) is decided once, in [`plan_write`]; the backends only run
//! SQL. Migrations are embedded in the binary and applied by [`connect`].

use std::{str::FromStr, sync::Arc};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::domain::{Change, Record, WorkspaceId};

pub mod applied;
mod dialect;
pub mod metered;
mod pg_batch;
mod pg_reads;
mod postgres;
mod row;
mod sql;
mod sqlite;

pub use applied::AppliedReport;

use postgres::PgDialect;
use sqlite::SqliteDialect;

/// How the store connects: its pools' size and, on Postgres, how many reads
/// run at once ([`open`]). The default is each backend's own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolSize {
    /// Connections of each pool at most (`--db-max-connections`); `None`:
    /// the backend's default (16 on Postgres, 4 on SQLite).
    pub max_connections: Option<u32>,
    /// Postgres: loads read at once, each its own statement; a load that
    /// arrives while that many run waits, and those waiting go to the
    /// database together in one statement (`--db-reads-in-flight`, see
    /// `store::pg_batch`). `None`: one per 16 of `max_connections` (1 of
    /// the default 16). SQLite,
    /// whose reads are in process, has no use for it.
    pub reads_in_flight: Option<u32>,
}

/// The Postgres store.
pub(crate) type PostgresStore = sql::SqlStore<PgDialect>;
/// The SQLite store.
pub(crate) type SqliteStore = sql::SqlStore<SqliteDialect>;

#[cfg(test)]
mod tests;

/// A cause carried by [`StoreError::Corrupt`]: whatever failed to read the
/// stored value (a decode error, a JSON error), kept for the logs.
pub type CorruptCause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why the store could not do what was asked.
///
/// Each variant is a class a caller acts on differently: retry
/// ([`Unavailable`](StoreError::Unavailable)), stop and call an operator
/// ([`Corrupt`](StoreError::Corrupt)), or report a bug
/// ([`Internal`](StoreError::Internal)). [`classify`] decides the class of a
/// `sqlx::Error`; every cause stays the error's source, for the logs.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or could not do the work now
    /// (connection, timeout, pool, resources, serialization or deadlock,
    /// a busy SQLite file, a missing table): retrying may succeed.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// A stored row or log entry could not be interpreted (e.g. a hand-edited
    /// revision, an audit entry that is not the fields' JSON): retrying reads
    /// the same bytes again.
    #[error("stored data is unreadable: {what}")]
    Corrupt {
        what: String,
        #[source]
        source: Option<CorruptCause>,
    },
    /// The database refused the operation in a way that means a bug (a
    /// constraint violation, a syntax error) or the store broke an invariant
    /// it keeps itself (a lost race that cannot happen).
    #[error("store failure: {what}")]
    Internal {
        what: String,
        #[source]
        source: Option<sqlx::Error>,
    },
    /// No record for the workspace.
    #[error("no record for the workspace")]
    NotFound,
    /// Compare-and-set failed: `actual` is the record's revision, `None` when
    /// there is no record.
    #[error("expected revision {expected}, record is at {actual:?}")]
    RevisionMismatch { expected: u64, actual: Option<u64> },
}

impl StoreError {
    /// Stored data that cannot be interpreted, with no further cause.
    pub fn corrupt(what: impl Into<String>) -> Self {
        StoreError::Corrupt {
            what: what.into(),
            source: None,
        }
    }

    /// Stored data that cannot be interpreted, and what failed to read it.
    pub fn corrupt_because(what: impl Into<String>, source: impl Into<CorruptCause>) -> Self {
        StoreError::Corrupt {
            what: what.into(),
            source: Some(source.into()),
        }
    }

    /// A broken invariant of the store itself, with no further cause.
    pub fn internal(what: impl Into<String>) -> Self {
        StoreError::Internal {
            what: what.into(),
            source: None,
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        classify(e)
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        StoreError::Unavailable(sqlx::Error::Migrate(Box::new(e)))
    }
}

/// The class of a database error: [`StoreError::Unavailable`],
/// [`StoreError::Corrupt`] or [`StoreError::Internal`].
pub fn classify(e: sqlx::Error) -> StoreError {
    use sqlx::Error as E;
    match e {
        // The database is not there, or not reachable now. A malformed URL
        // and a failed migration only happen at startup, which reports them
        // as it always did (and does not wait for them).
        E::Io(_)
        | E::Tls(_)
        | E::Protocol(_)
        | E::PoolTimedOut
        | E::PoolClosed
        | E::WorkerCrashed
        | E::Configuration(_)
        | E::Migrate(_) => StoreError::Unavailable(e),
        // A stored value that cannot be read as what the schema says it is.
        E::ColumnDecode { .. }
        | E::Decode(_)
        | E::ColumnNotFound(_)
        | E::ColumnIndexOutOfBounds { .. }
        | E::TypeNotFound { .. } => StoreError::corrupt_because("a stored value cannot be read", e),
        E::Database(ref db) => match database_class(db.as_ref()) {
            DbClass::Unavailable => StoreError::Unavailable(e),
            DbClass::Corrupt => StoreError::corrupt_because("the database reports damaged data", e),
            DbClass::Internal => StoreError::Internal {
                what: "the database refused the operation".into(),
                source: Some(e),
            },
        },
        // Everything else (a row a query requires is missing, an encode
        // failure, a savepoint misuse) is a mistake in this code.
        _ => StoreError::Internal {
            what: "the database call failed".into(),
            source: Some(e),
        },
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DbClass {
    Unavailable,
    Corrupt,
    Internal,
}

/// The class of an error the database itself reported.
fn database_class(db: &(dyn sqlx::error::DatabaseError + 'static)) -> DbClass {
    if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        return postgres_class(pg.code());
    }
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        let code = db.code().and_then(|c| c.parse::<i32>().ok());
        return sqlite_class(code, db.message());
    }
    DbClass::Internal
}

/// A Postgres SQLSTATE's class.
fn postgres_class(code: &str) -> DbClass {
    match code {
        // 08: connection exception; 53: insufficient resources (disk, memory,
        // too many connections); 57P0x: the server is shutting down or
        // restarting; 57014: a statement timeout; 55P03: a lock timeout;
        // 40001 / 40P01: a serialization failure or a deadlock (the
        // transaction may simply be run again); 58: an I/O error of the
        // server; 28 / 3D000: the login or the database is refused (an
        // operator restores it); 25006: a read-only transaction (the
        // database is a standby, or was made read-only: a failover in
        // progress); 25P03: the session was ended as idle in a transaction;
        // 55000: "the database is not currently accepting connections"
        // (none of our statements can meet this state otherwise).
        c if c.starts_with("08")
            || c.starts_with("53")
            || c.starts_with("57P0")
            || c.starts_with("58")
            || c.starts_with("28") =>
        {
            DbClass::Unavailable
        }
        "57014" | "55P03" | "40001" | "40P01" | "3D000" | "25006" | "25P03" | "55000" => {
            DbClass::Unavailable
        }
        // A table or schema that is not there: the store is being restored
        // or was dropped, not a statement of ours that is wrong.
        "42P01" | "3F000" => DbClass::Unavailable,
        // XX001 / XX002: the server found a damaged page or index.
        "XX001" | "XX002" => DbClass::Corrupt,
        // 23: a constraint violation; 42: a syntax error or an undefined
        // column or function (a bug, or a missing migration); 22: a value
        // the statement should never have sent; anything else: a bug.
        _ => DbClass::Internal,
    }
}

/// A SQLite (extended) result code's class; its primary code is the low byte.
fn sqlite_class(code: Option<i32>, message: &str) -> DbClass {
    match code.map(|c| c & 0xff) {
        // BUSY, LOCKED: another connection holds the file; READONLY, IOERR,
        // FULL, CANTOPEN, PROTOCOL: the file cannot be used now (an operator
        // restores it).
        Some(5 | 6 | 8 | 10 | 13 | 14 | 15) => DbClass::Unavailable,
        // CORRUPT, NOTADB: the file is damaged.
        Some(11 | 26) => DbClass::Corrupt,
        // A table that is not there (SQLITE_ERROR names it only in text).
        Some(1) if message.starts_with("no such table") => DbClass::Unavailable,
        // CONSTRAINT, a syntax error, anything else: a bug.
        _ => DbClass::Internal,
    }
}

/// One change to make, with who made it and why.
#[derive(Debug, Clone)]
pub struct Write<'a> {
    pub workspace_id: WorkspaceId,
    pub change: &'a Change,
    pub expected_revision: Option<u64>,
    pub actor: &'a str,
    pub reason: &'a str,
}

/// One record to create if it is missing ([`Store::create_batch`]): the
/// workspace and the change that makes its first revision.
#[derive(Debug, Clone, Copy)]
pub struct Create<'a> {
    pub workspace_id: WorkspaceId,
    pub change: &'a Change,
}

/// What [`Store::create_batch`] did for one workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateOutcome {
    /// Created at revision 1, with its audit row and change-log entry.
    Created(Record),
    /// Already registered: left untouched; the record as it is.
    Existing(Record),
}

/// The most workspaces one [`Store::create_batch`] (and one
/// `BatchCreateWorkspaces` call) may create: a bound on the transaction's
/// size and on how long it holds the change log's counter.
pub const MAX_BATCH_CREATE: usize = 1000;

/// One audit row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub workspace_id: WorkspaceId,
    pub revision: u64,
    pub actor: String,
    pub reason: String,
    pub at: DateTime<Utc>,
    /// The record before the change (at the revision below); `None` when
    /// the change created it.
    pub before: Option<Record>,
    /// The record the change made, at `revision`.
    pub after: Record,
}

/// One committed change, as the change log holds it: the record after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedChange {
    /// Global, dense, in commit order: 1, 2, 3, ...
    pub position: u64,
    /// When the change committed (the database's clock on Postgres).
    pub committed_at: DateTime<Utc>,
    /// The record after the change (its workspace id and revision included).
    pub record: Record,
}

/// The change log's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogState {
    /// Names this store (one database, or one Postgres schema): 32 hex digits.
    pub store_id: String,
    /// The last position handed out (0: none yet).
    pub last_position: u64,
    /// Changes at or below this position were pruned: a reader must be at
    /// least here to miss nothing.
    pub pruned_through: u64,
}

/// Receives the records of [`Store::snapshot`], one at a time.
pub type Visit<'a> = &'a mut (dyn FnMut(Record) + Send);

/// What woke a [`ChangeListener`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A change may have committed.
    Change,
    /// The answer to this listener's own [`ChangeListener::heartbeat`].
    Heartbeat,
}

/// A heartbeat on its way ([`ChangeListener::heartbeat`]).
pub type Heartbeat =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send>>;

/// Wakes the change feed when a change may have been committed.
#[async_trait]
pub trait ChangeListener: Send {
    /// Completes when a change may have committed since the last call, or
    /// with this listener's heartbeat. A hint only: it may wake spuriously,
    /// and after a lost connection a change may pass unannounced (the feed
    /// also polls).
    async fn wait(&mut self) -> Result<Wake, StoreError>;

    /// Asks the store, over another connection, to wake this listener with
    /// [`Wake::Heartbeat`]. A connection that stopped carrying anything
    /// without being closed (a NAT or a load balancer that forgot an idle
    /// connection, a partition) never ends `wait`, so only a heartbeat that
    /// does not come back shows it dead. `None` where a listener cannot go
    /// silent so (SQLite's, in process).
    fn heartbeat(&self) -> Option<Heartbeat> {
        None
    }
}

/// The storage interface. Every method is one transaction at most; `load`
/// is one round trip.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The record, or `None` when the workspace was never registered.
    async fn load(&self, workspace_id: &WorkspaceId) -> Result<Option<Record>, StoreError>;

    /// Applies a change atomically with its audit row; returns the record
    /// after it. A change that changes nothing returns the record unchanged
    /// and writes no audit row.
    async fn write(&self, write: Write<'_>) -> Result<Record, StoreError>;

    /// Creates, create-only, every workspace of `creates` that has no record,
    /// all in one transaction: one audit row (`actor`, `reason`) and one
    /// change-log position per created workspace, positions in `creates`
    /// order, one commit. A workspace that already has a record (created
    /// concurrently, or earlier in the same batch) is left untouched and
    /// answered as it is. Answers one outcome per item, in `creates` order.
    /// Every change must be one that can create a record (a `Set`):
    /// `ClearOverride` is `NotFound`, like [`Store::write`]'s, and nothing is
    /// written.
    async fn create_batch(
        &self,
        creates: &[Create<'_>],
        actor: &str,
        reason: &str,
    ) -> Result<Vec<CreateOutcome>, StoreError>;

    /// What [`Store::write`] would return for `write`, with every check it
    /// makes (`NotFound`, compare-and-set, no-op detection) on the stored row,
    /// writing nothing: no revision, no audit row, no change event. One read,
    /// no write lock; a concurrent write may of course change the answer.
    async fn dry_run(&self, write: Write<'_>) -> Result<Record, StoreError>;

    /// Audit rows, newest first, with revisions below `before_revision` if given.
    async fn history(
        &self,
        workspace_id: &WorkspaceId,
        before_revision: Option<u64>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError>;

    /// Keeps `report` as the latest report of its (workspace, instance),
    /// replacing one received earlier (by `reported_at`, whatever order the
    /// writes land in); one received later is kept instead. The workspace's
    /// record must exist.
    async fn record_applied(&self, report: &AppliedReport) -> Result<(), StoreError>;

    /// Every kept report, each with its workspace's current record, in
    /// (workspace, instance) order; one round trip.
    async fn applied_reports(&self) -> Result<Vec<(AppliedReport, Record)>, StoreError>;
    /// The change log's state.
    async fn log_state(&self) -> Result<LogState, StoreError>;

    /// Up to `limit` logged changes above position `after`, in position
    /// order, and the log's state read after them (so a change missing
    /// because it was pruned shows in `pruned_through`).
    async fn changes_after(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<(Vec<LoggedChange>, LogState), StoreError>;

    /// Every record and the log position they reflect, read consistently:
    /// one read (one transaction) at one position `P`, handing each record
    /// to `visit` as it arrives from the database, in workspace-id order, so
    /// memory does not grow with the number of records. Returns `P`: every
    /// change at or below it is reflected in the records visited, none above.
    ///
    /// On an error, the records already visited are part of no snapshot:
    /// discard them.
    async fn snapshot(&self, visit: Visit<'_>) -> Result<u64, StoreError>;

    /// Deletes logged changes committed before `before` (oldest first, so the
    /// log stays a contiguous range); returns the new `pruned_through`.
    async fn prune_changes(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;

    /// A listener woken by committed changes (on Postgres, by `NOTIFY` from
    /// any replica; on SQLite, by this process's writes).
    async fn listen(&self) -> Result<Box<dyn ChangeListener>, StoreError>;

    /// Which backend this is, for logs.
    fn backend(&self) -> &'static str;

    /// Up to `limit` records whose workspace id is greater than `after` (from
    /// the first when `None`), in workspace-id order: keyset paging, so a
    /// listing resumed after any id sees every record that existed throughout
    /// exactly once, whatever was written meanwhile.
    async fn list_after(
        &self,
        after: Option<WorkspaceId>,
        limit: u32,
    ) -> Result<Vec<Record>, StoreError>;

    /// One cheap round trip to the database (readiness).
    async fn ping(&self) -> Result<(), StoreError>;

    /// How many of the embedded migrations the database has not applied.
    async fn pending_migrations(&self) -> Result<usize, StoreError>;

    /// The connection pool's state (metrics).
    fn pool_status(&self) -> PoolStatus;
}

/// Connections of a store's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStatus {
    pub in_use: u32,
    pub idle: u32,
}

impl PoolStatus {
    fn of(size: u32, idle: usize) -> Self {
        let idle = u32::try_from(idle).unwrap_or(u32::MAX).min(size);
        PoolStatus {
            in_use: size - idle,
            idle,
        }
    }
}

/// Embedded migrations whose version is not among `applied`.
fn pending_migrations(migrator: &sqlx::migrate::Migrator, applied: &[i64]) -> usize {
    migrator
        .iter()
        .filter(|m| !m.migration_type.is_down_migration() && !applied.contains(&m.version))
        .count()
}

/// What a write does, decided from the current record before any SQL is
/// written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Nothing changes: return the record as it is.
    Unchanged(Record),
    /// Create the record, at revision 1.
    Insert { after: Record },
    /// Replace the record's fields; `after` is at the next revision.
    Update { before: Record, after: Record },
}

impl Plan {
    /// The record this plan leaves behind (what a write returns).
    pub fn into_record(self) -> Record {
        match self {
            Plan::Unchanged(record) | Plan::Insert { after: record } => record,
            Plan::Update { after, .. } => after,
        }
    }
}

/// Decides a write against the current record (`None`: there is none).
pub fn plan_write(
    current: Option<Record>,
    workspace_id: WorkspaceId,
    change: &Change,
    expected_revision: Option<u64>,
) -> Result<Plan, StoreError> {
    if current.is_none() && *change == Change::ClearOverride {
        // NOT_FOUND takes precedence over a revision mismatch.
        return Err(StoreError::NotFound);
    }
    let actual = current.as_ref().map(|r| r.revision);
    match (expected_revision, actual) {
        (None, _) | (Some(0), None) => {}
        (Some(e), Some(a)) if e == a => {}
        (Some(expected), actual) => return Err(StoreError::RevisionMismatch { expected, actual }),
    }
    match current {
        None => Ok(Plan::Insert {
            after: Record {
                revision: 1,
                ..change.apply(&Record::new(workspace_id))
            },
        }),
        Some(before) => {
            let after = change.apply(&before);
            if after == before {
                Ok(Plan::Unchanged(before))
            } else {
                Ok(Plan::Update {
                    after: Record {
                        revision: before.revision + 1,
                        ..after
                    },
                    before,
                })
            }
        }
    }
}

/// The record a create makes: [`plan_write`] on a missing record, create-only.
pub fn plan_create(workspace_id: WorkspaceId, change: &Change) -> Result<Record, StoreError> {
    match plan_write(None, workspace_id, change, Some(0))? {
        Plan::Insert { after } => Ok(after),
        Plan::Unchanged(_) | Plan::Update { .. } => Err(StoreError::internal(
            "a create on a missing record planned as an update",
        )),
    }
}

/// Connects to `database_url` (`postgres://…` or `sqlite:…`) with the
/// backend's default pool size and applies the embedded migrations.
pub async fn connect(database_url: &str) -> Result<Arc<dyn Store>, StoreError> {
    open(database_url, true, PoolSize::default()).await
}

/// Connects to `database_url`, applying the embedded migrations when
/// `migrate` is true (otherwise see [`Store::pending_migrations`]), with
/// pools of `size`.
pub async fn open(
    database_url: &str,
    migrate: bool,
    size: PoolSize,
) -> Result<Arc<dyn Store>, StoreError> {
    if database_url.starts_with("postgres:") || database_url.starts_with("postgresql:") {
        refuse_unknown_pg_parameters(database_url)?;
        let opts = sqlx::postgres::PgConnectOptions::from_str(database_url)?;
        Ok(Arc::new(if migrate {
            PostgresStore::connect(opts, size).await?
        } else {
            PostgresStore::open(opts, size).await?
        }))
    } else if database_url.starts_with("sqlite:") {
        let opts = sqlx::sqlite::SqliteConnectOptions::from_str(database_url)?;
        Ok(Arc::new(if migrate {
            SqliteStore::connect(opts, size).await?
        } else {
            SqliteStore::open(opts, size).await?
        }))
    } else {
        Err(StoreError::Unavailable(sqlx::Error::Configuration(
            "database URL must start with postgres://, postgresql:// or sqlite:".into(),
        )))
    }
}

/// The query parameters sqlx's Postgres driver reads from a URL. It logs any
/// other one at WARN, value and all, before ignoring it, so a misspelt or
/// unsupported secret parameter (`sslpassword=`) would reach the log; such a
/// URL is refused here instead, naming only the parameter.
const PG_URL_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// libpq's connection parameters that sqlx does not read: refused like any
/// other unknown parameter, but named in the refusal.
const LIBPQ_ONLY_PARAMETERS: &[&str] = &[
    "connect_timeout",
    "client_encoding",
    "fallback_application_name",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "replication",
    "gssencmode",
    "sslnegotiation",
    "sslcompression",
    "sslpassword",
    "sslcertmode",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "requirepeer",
    "require_auth",
    "channel_binding",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "service",
    "passfile",
    "target_session_attrs",
    "load_balance_hosts",
];

fn refuse_unknown_pg_parameters(database_url: &str) -> Result<(), StoreError> {
    let Some((_, query)) = database_url.split_once('?') else {
        return Ok(());
    };
    let query = query.split_once('#').map_or(query, |(q, _)| q);
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let key = param.split_once('=').map_or(param, |(key, _)| key);
        let known =
            PG_URL_PARAMETERS.contains(&key) || (key.starts_with("options[") && key.ends_with(']'));
        if !known {
            // Named only when it is one of libpq's parameters: anything else
            // may be a piece of a badly encoded password (after a `?` or an
            // `&` in it).
            let named = if LIBPQ_ONLY_PARAMETERS.contains(&key) {
                format!("`{key}`")
            } else {
                "(not shown: it may be part of a password; percent-encode `?`, `@` and `/` \
                 in a password)"
                    .to_owned()
            };
            return Err(StoreError::Unavailable(sqlx::Error::Configuration(
                format!(
                    "database URL: unknown parameter {named}; known: {}",
                    PG_URL_PARAMETERS.join(", ")
                )
                .into(),
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod classify_tests {
    use super::*;

    #[test]
    fn an_unknown_url_parameter_is_refused_naming_only_a_name() {
        let refused = |url: &str| match refuse_unknown_pg_parameters(url) {
            Err(e) => e.to_string(),
            Ok(()) => panic!("accepted: {url}"),
        };
        let e = refused("postgres://app@db/x?sslmode=require&sslpassword=s3cret");
        assert!(e.contains("`sslpassword`") && !e.contains("s3cret"), "{e}");
        // A `?` or `&` in a password that was not encoded: nothing of it shown.
        for url in [
            "postgres://app:s3?cret@db/x",
            "postgres://app:s3?x&cret@db/x",
            "postgres://app:s3?cr#et@db/x",
            "postgres://app@db/x?password=s3&cret",
        ] {
            let e = refused(url);
            assert!(!e.contains("cret") && e.contains("not shown"), "{e}");
        }
        for fine in [
            "postgres://app:pw@db/x",
            "postgres://app@db/x?sslmode=verify-full&sslrootcert=/ca.pem&application_name=bm",
            "postgres://app@db/x?options[statement_timeout]=5s",
            "postgres://app@db/x?",
        ] {
            refuse_unknown_pg_parameters(fine).unwrap_or_else(|e| panic!("{fine}: {e}"));
        }
    }

    #[test]
    fn connection_pool_and_timeout_failures_are_unavailable() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        for e in [
            io,
            sqlx::Error::Tls("handshake".into()),
            sqlx::Error::Protocol("unexpected eof".into()),
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            sqlx::Error::WorkerCrashed,
        ] {
            let class = classify(e);
            assert!(matches!(class, StoreError::Unavailable(_)), "{class:?}");
        }
    }

    #[test]
    fn values_that_cannot_be_decoded_are_corrupt() {
        for e in [
            sqlx::Error::ColumnDecode {
                index: "\"revision\"".into(),
                source: "not an integer".into(),
            },
            sqlx::Error::Decode("bad text".into()),
            sqlx::Error::ColumnNotFound("after".into()),
            sqlx::Error::TypeNotFound {
                type_name: "jsonb".into(),
            },
        ] {
            let class = classify(e);
            assert!(
                matches!(
                    &class,
                    StoreError::Corrupt {
                        source: Some(_),
                        ..
                    }
                ),
                "{class:?}"
            );
        }
    }

    #[test]
    fn a_row_a_query_requires_that_is_missing_is_internal() {
        let class = classify(sqlx::Error::RowNotFound);
        assert!(
            matches!(
                class,
                StoreError::Internal {
                    source: Some(_),
                    ..
                }
            ),
            "{class:?}"
        );
    }

    #[test]
    fn postgres_sqlstates_have_their_class() {
        for code in [
            "08006", "08001", "57P01", "57P02", "57P03", "53300", "53100", "40001", "40P01",
            "57014", "55P03", "58030", "28P01", "3D000", "42P01", "3F000", "25006", "25P03",
            "55000",
        ] {
            assert_eq!(postgres_class(code), DbClass::Unavailable, "{code}");
        }
        for code in ["XX001", "XX002"] {
            assert_eq!(postgres_class(code), DbClass::Corrupt, "{code}");
        }
        for code in [
            "23505", "23503", "23514", "23502", "42601", "42703", "42883", "22P02", "XX000",
        ] {
            assert_eq!(postgres_class(code), DbClass::Internal, "{code}");
        }
    }

    #[test]
    fn sqlite_result_codes_have_their_class() {
        // BUSY, BUSY_SNAPSHOT, LOCKED, LOCKED_SHAREDCACHE, READONLY, IOERR_READ,
        // FULL, CANTOPEN.
        for code in [5, 517, 6, 262, 8, 266, 13, 14] {
            assert_eq!(sqlite_class(Some(code), ""), DbClass::Unavailable, "{code}");
        }
        assert_eq!(
            sqlite_class(Some(1), "no such table: x"),
            DbClass::Unavailable
        );
        for code in [11, 26] {
            assert_eq!(sqlite_class(Some(code), ""), DbClass::Corrupt, "{code}");
        }
        // CONSTRAINT_CHECK, CONSTRAINT_UNIQUE, CONSTRAINT_FOREIGNKEY, a syntax error.
        for (code, message) in [
            (275, ""),
            (2067, ""),
            (787, ""),
            (1, "near \"SELEC\": syntax error"),
        ] {
            assert_eq!(
                sqlite_class(Some(code), message),
                DbClass::Internal,
                "{code}"
            );
        }
        assert_eq!(sqlite_class(None, ""), DbClass::Internal);
    }
}

#[cfg(test)]
mod plan_tests {
    use super::*;
    use crate::domain::{Mode, Patch};

    fn id() -> WorkspaceId {
        WorkspaceId::parse("6b66de8d-9337-4fb4-be8d-6d49dca0d809").unwrap()
    }

    fn set_override(m: Mode) -> Change {
        Change::Set(Patch {
            override_mode: Some(m),
            ..Patch::default()
        })
    }

    #[test]
    fn expected_revision_zero_means_create_only() {
        let c = set_override(Mode::Byok);
        assert!(matches!(
            plan_write(None, id(), &c, Some(0)),
            Ok(Plan::Insert { .. })
        ));
        assert!(matches!(
            plan_write(
                Some(Record {
                    revision: 1,
                    ..Record::new(id())
                }),
                id(),
                &c,
                Some(0)
            ),
            Err(StoreError::RevisionMismatch {
                expected: 0,
                actual: Some(1)
            })
        ));
        assert!(matches!(
            plan_write(None, id(), &c, Some(3)),
            Err(StoreError::RevisionMismatch {
                expected: 3,
                actual: None
            })
        ));
    }

    #[test]
    fn a_write_that_changes_nothing_is_unchanged() {
        let before = Record {
            revision: 4,
            ..set_override(Mode::Byok).apply(&Record::new(id()))
        };
        let plan = plan_write(Some(before), id(), &set_override(Mode::Byok), None).unwrap();
        assert!(matches!(plan, Plan::Unchanged(r) if r.revision == 4));
        let plan = plan_write(
            Some(Record {
                revision: 4,
                ..Record::new(id())
            }),
            id(),
            &Change::ClearOverride,
            None,
        )
        .unwrap();
        assert!(matches!(plan, Plan::Unchanged(_)));
    }

    #[test]
    fn clear_on_a_missing_record_is_not_found() {
        assert!(matches!(
            plan_write(None, id(), &Change::ClearOverride, None),
            Err(StoreError::NotFound)
        ));
    }
}
