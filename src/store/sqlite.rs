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

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
        SqliteSynchronous,
    },
    Sqlite, SqliteConnection,
};

use super::dialect::{AuditRow, Dialect, WriteLock};
use super::row::{listed_from_row, revision_to_db, Fields};
use super::sql::SqlStore;
use super::{ChangeListener, StoreError};
use crate::domain::Record;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The pool's size unless configured (`--db-max-connections`).
pub(crate) const DEFAULT_MAX_CONNECTIONS: u32 = 4;

/// The SQLite store.
pub(crate) type SqliteStore = SqlStore<SqliteDialect>;

/// SQLite's ways: no casts (ids and JSON are text), the database's write
/// lock taken up front, one row per statement, the feed woken in process.
#[derive(Debug)]
pub(crate) struct SqliteDialect {
    /// Bumped after every committed change; listeners wait for it to move.
    committed: tokio::sync::watch::Sender<u64>,
}

impl Dialect for SqliteDialect {
    type Db = Sqlite;
    type Options = SqliteConnectOptions;

    const BACKEND: &'static str = "sqlite";
    const SYSTEM: &'static str = "sqlite";
    const UUID: &'static str = "";
    const JSON: &'static str = "";
    const TEXT: &'static str = "";
    const WRITE_LOCK: WriteLock = WriteLock::Database;
    // A read transaction in WAL mode sees one snapshot from its first read.
    const BEGIN_SNAPSHOT: Option<&'static str> = None;
    const MIGRATIONS_TABLE_EXISTS: &'static str =
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations')";

    fn migrator() -> &'static sqlx::migrate::Migrator {
        &MIGRATOR
    }

    /// Creates the file if missing; WAL, so reads go on while one writes.
    async fn open(
        opts: SqliteConnectOptions,
        max_connections: u32,
    ) -> Result<(SqlitePool, Self), StoreError> {
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

    async fn load<'a>(
        &'a self,
        pool: &'a SqlitePool,
        sql: &'a str,
        id: String,
    ) -> Result<Option<SqliteRow>, sqlx::Error> {
        sqlx::query(sql).bind(id).fetch_optional(pool).await
    }

    async fn insert_records(
        &self,
        conn: &mut SqliteConnection,
        records: &[(&str, &Fields)],
        now: DateTime<Utc>,
    ) -> Result<Vec<String>, StoreError> {
        let mut inserted = Vec::with_capacity(records.len());
        for (id, f) in records {
            let row: Option<String> = sqlx::query_scalar(
                "INSERT INTO billing_records \
                 (workspace_id, runtime, model, credential_keys, override_mode, revision, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, 1, $6) \
                 ON CONFLICT (workspace_id) DO NOTHING RETURNING workspace_id",
            )
            .bind(*id)
            .bind(f.runtime.as_deref())
            .bind(f.model.as_deref())
            .bind(f.credential_keys_json())
            .bind(f.override_mode.as_deref())
            .bind(now)
            .fetch_optional(&mut *conn)
            .await?;
            inserted.extend(row);
        }
        Ok(inserted)
    }

    async fn select_records(
        &self,
        conn: &mut SqliteConnection,
        listed: &str,
        ids: &[&str],
    ) -> Result<Vec<Record>, StoreError> {
        let sql = format!("{listed} WHERE workspace_id = $1");
        let mut records = Vec::with_capacity(ids.len());
        for id in ids {
            let row = sqlx::query(&sql)
                .bind(*id)
                .fetch_optional(&mut *conn)
                .await?;
            if let Some(row) = row {
                records.push(listed_from_row(&row)?);
            }
        }
        Ok(records)
    }

    /// One statement a row. The write lock serializes whole writing
    /// transactions, so the counter hands out positions in commit order.
    async fn log_changes(
        &self,
        conn: &mut SqliteConnection,
        rows: &[AuditRow<'_>],
        actor: &str,
        reason: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        for r in rows {
            sqlx::query(
                "INSERT INTO billing_audit (workspace_id, revision, actor, reason, before, after, at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(r.id)
            .bind(revision_to_db(r.revision)?)
            .bind(actor)
            .bind(reason)
            .bind(r.before.map(Fields::to_json))
            .bind(r.after.to_json())
            .bind(at)
            .execute(&mut *conn)
            .await?;
        }
        let count = i64::try_from(rows.len())
            .map_err(|_| StoreError::internal("too many changes in one transaction"))?;
        let (last,): (i64,) = sqlx::query_as(
            "UPDATE billing_change_log SET last_position = last_position + $1 \
             RETURNING last_position",
        )
        .bind(count)
        .fetch_one(&mut *conn)
        .await?;
        for (position, r) in (last - count + 1..).zip(rows) {
            sqlx::query(
                "INSERT INTO billing_changes (position, workspace_id, revision, committed_at) \
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(position)
            .bind(r.id)
            .bind(revision_to_db(r.revision)?)
            .bind(Utc::now())
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
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

struct SqliteChangeListener(tokio::sync::watch::Receiver<u64>);

#[async_trait]
impl ChangeListener for SqliteChangeListener {
    async fn wait(&mut self) -> Result<(), StoreError> {
        if self.0.changed().await.is_err() {
            // The store is gone: nothing will ever be committed through it.
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}
