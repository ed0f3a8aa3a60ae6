//! The SQLite backend (the embedded default).
//!
//! Writes take the database write lock up front (`BEGIN IMMEDIATE`), so a
//! read-modify-write can never be interleaved with another writer's; waiting
//! writers queue on the busy timeout. WAL mode lets reads proceed meanwhile.
//!
//! The change log's position is the next value of the one counter row,
//! taken inside that same transaction: as the write lock serializes whole
//! writing transactions, positions are dense and in commit order (see
//! `postgres.rs` for why start order would lose changes). The feed is woken
//! in process after each commit; another process writing the same file is
//! only seen by the feed's polling.
//!
//! Its statements are the store's plain SQL, one row per statement
//! ([`PlainSql`]): no casts, ids and JSON are text.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::{
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
    },
    Sqlite,
};

use super::dialect::{Dialect, WriteLock};
use super::sql::PlainSql;
use super::{ChangeListener, PoolSize, StoreError, Wake};

/// SQLite's ways: plain SQL (no casts: ids and JSON are text; one row per
/// statement; `load` on the pool), the database's write lock taken up front,
/// the snapshot a plain `BEGIN` (a read transaction in WAL mode sees one
/// snapshot from its first read), the feed woken in process.
#[derive(Debug)]
pub(crate) struct SqliteDialect {
    /// Bumped after every committed change; listeners wait for it to move.
    committed: tokio::sync::watch::Sender<u64>,
}

impl Dialect for SqliteDialect {
    type Db = Sqlite;

    const BACKEND: &'static str = "sqlite";
    const SYSTEM: &'static str = "sqlite";
    const WRITE_LOCK: WriteLock = WriteLock::Database;
    const MIGRATIONS_TABLE_EXISTS: &'static str =
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations')";
    const MIGRATOR: &'static sqlx::migrate::Migrator = &sqlx::migrate!("./migrations/sqlite");
    const DEFAULT_MAX_CONNECTIONS: u32 = 4;

    /// Creates the file if missing; WAL, so reads go on while one writes.
    async fn open(
        opts: SqliteConnectOptions,
        size: PoolSize,
    ) -> Result<(SqlitePool, Self), StoreError> {
        let max_connections = size
            .max_connections
            .unwrap_or(Self::DEFAULT_MAX_CONNECTIONS);
        let opts = opts
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            // No ping before each query (sqlx's default): a file connection
            // does not drop like a network one, and the ping is a round trip
            // to the connection's worker thread on every request.
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await?;
        let committed = tokio::sync::watch::Sender::new(0);
        Ok((pool, SqliteDialect { committed }))
    }

    fn committed(&self) {
        self.committed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Woken by this process's writes only (module docs).
    async fn listen<'a>(
        &'a self,
        _pool: &'a SqlitePool,
    ) -> Result<Box<dyn ChangeListener>, StoreError> {
        Ok(Box::new(SqliteChangeListener(self.committed.subscribe())))
    }
}

/// The write lock serializes whole writing transactions, so one statement a
/// row hands out change-log positions in commit order.
impl PlainSql for SqliteDialect {}

struct SqliteChangeListener(tokio::sync::watch::Receiver<u64>);

#[async_trait]
impl ChangeListener for SqliteChangeListener {
    async fn wait(&mut self) -> Result<Wake, StoreError> {
        if self.0.changed().await.is_err() {
            // The store is gone: nothing will ever be committed through it.
            std::future::pending::<()>().await;
        }
        Ok(Wake::Change)
    }
}
