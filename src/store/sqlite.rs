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
        SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
    },
    Sqlite, Transaction,
};
use tokio_stream::StreamExt as _;

use super::{
    audit_from_row, change_from_row, fields_to_json, listed_from_row, log_state_from_row,
    plan_create, plan_write, position_from_db, position_to_db, record_from_row, revision_to_db,
    AuditEntry, ChangeListener, Create, CreateOutcome, LogState, LoggedChange, Plan, PoolStatus,
    Store, StoreError, Visit, Write,
};
use crate::domain::{Fields, Record, WorkspaceId};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The pool's size unless configured (`--db-max-connections`).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 4;

pub struct SqliteStore {
    pool: SqlitePool,
    /// Bumped after every committed change; listeners wait for it to move.
    committed: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if missing), with a pool of up to `max_connections`,
    /// and applies the embedded migrations.
    pub async fn connect(
        opts: SqliteConnectOptions,
        max_connections: u32,
    ) -> Result<Self, StoreError> {
        let store = Self::open(opts, max_connections).await?;
        MIGRATOR.run(&store.pool).await?;
        Ok(store)
    }

    /// Opens (creating if missing), with a pool of up to `max_connections`,
    /// without applying migrations.
    pub async fn open(
        opts: SqliteConnectOptions,
        max_connections: u32,
    ) -> Result<Self, StoreError> {
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
        Ok(SqliteStore {
            pool,
            committed: tokio::sync::watch::Sender::new(0),
        })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

const SELECT_RECORD: &str = "SELECT runtime, model, credential_keys, override_mode, revision \
     FROM billing_records WHERE workspace_id = $1";

/// The record's fields and revision as stored, `None` when it has none.
async fn read_current(
    tx: &mut Transaction<'_, Sqlite>,
    id: &str,
) -> Result<Option<(Fields, u64)>, StoreError> {
    let row = sqlx::query(SELECT_RECORD)
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?;
    row.as_ref().map(record_from_row).transpose()
}

/// The record after the write, and whether it changed (was logged).
async fn write_in(
    tx: &mut Transaction<'_, Sqlite>,
    w: &Write<'_>,
) -> Result<(Record, bool), StoreError> {
    let current = read_current(tx, &w.workspace_id.to_string()).await?;
    write_planned(tx, w, current).await
}

/// [`write_in`] on the row read (`current`) in the same transaction.
async fn write_planned(
    tx: &mut Transaction<'_, Sqlite>,
    w: &Write<'_>,
    current: Option<(Fields, u64)>,
) -> Result<(Record, bool), StoreError> {
    let id = w.workspace_id.to_string();
    let now = Utc::now();
    let (before, after, revision) = match plan_write(
        current,
        w.workspace_id,
        w.change,
        w.expected_revision,
    )? {
        Plan::Unchanged(record) => return Ok((record, false)),
        Plan::Insert { after } => {
            sqlx::query(
                    "INSERT INTO billing_records \
                     (workspace_id, runtime, model, credential_keys, override_mode, revision, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, 1, $6)",
                )
                .bind(&id)
                .bind(&after.runtime)
                .bind(&after.model)
                .bind(after.credential_keys_json())
                .bind(&after.override_mode)
                .bind(now)
                .execute(&mut **tx)
                .await?;
            (None, after, 1)
        }
        Plan::Update {
            before,
            after,
            revision,
        } => {
            // SQLite re-checks a CHECK constraint only when its column is in
            // the SET list: leaving an unchanged (possibly hand-garbled)
            // override out keeps unrelated Sets working, as on Postgres.
            let override_changed = before.override_mode != after.override_mode;
            let sql = if override_changed {
                "UPDATE billing_records SET runtime = $2, model = $3, credential_keys = $4, \
                 revision = $5, updated_at = $6, override_mode = $7 WHERE workspace_id = $1"
            } else {
                "UPDATE billing_records SET runtime = $2, model = $3, credential_keys = $4, \
                 revision = $5, updated_at = $6 WHERE workspace_id = $1"
            };
            let mut query = sqlx::query(sql)
                .bind(&id)
                .bind(&after.runtime)
                .bind(&after.model)
                .bind(after.credential_keys_json())
                .bind(revision_to_db(revision)?)
                .bind(now);
            if override_changed {
                query = query.bind(&after.override_mode);
            }
            query.execute(&mut **tx).await?;
            (Some(before), after, revision)
        }
    };
    sqlx::query(
        "INSERT INTO billing_audit (workspace_id, revision, actor, reason, before, after, at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&id)
    .bind(revision_to_db(revision)?)
    .bind(w.actor)
    .bind(w.reason)
    .bind(before.as_ref().map(fields_to_json))
    .bind(fields_to_json(&after))
    .bind(now)
    .execute(&mut **tx)
    .await?;
    let (position,): (i64,) = sqlx::query_as(
        "UPDATE billing_change_log SET last_position = last_position + 1 RETURNING last_position",
    )
    .fetch_one(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO billing_changes (position, workspace_id, revision, committed_at) \
         VALUES ($1, $2, $3, $4)",
    )
    .bind(position)
    .bind(&id)
    .bind(revision_to_db(revision)?)
    .bind(Utc::now())
    .execute(&mut **tx)
    .await?;
    Ok((after.into_record(w.workspace_id, revision), true))
}

/// [`Store::create_batch`] in `tx`, which holds the write lock: each
/// workspace read, and created by the one write path when it has no record.
async fn create_batch_in(
    tx: &mut Transaction<'_, Sqlite>,
    creates: &[Create<'_>],
    actor: &str,
    reason: &str,
) -> Result<Vec<CreateOutcome>, StoreError> {
    // Every change is checked before anything is written.
    for c in creates {
        plan_create(c.workspace_id, c.change)?;
    }
    let mut out = Vec::with_capacity(creates.len());
    for c in creates {
        let current = read_current(tx, &c.workspace_id.to_string()).await?;
        out.push(match current {
            Some((fields, revision)) => {
                CreateOutcome::Existing(fields.into_record(c.workspace_id, revision))
            }
            None => {
                let w = Write {
                    workspace_id: c.workspace_id,
                    change: c.change,
                    expected_revision: Some(0),
                    actor,
                    reason,
                };
                CreateOutcome::Created(write_planned(tx, &w, None).await?.0)
            }
        });
    }
    Ok(out)
}

const SELECT_LOG_STATE: &str =
    "SELECT store_id, last_position, pruned_through FROM billing_change_log";

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

#[async_trait]
impl Store for SqliteStore {
    #[tracing::instrument(name = "store.load", skip_all, fields(otel.kind = "client", db.system.name = "sqlite", db.operation.name = "load"))]
    async fn load(&self, workspace_id: &WorkspaceId) -> Result<Option<Record>, StoreError> {
        let row = sqlx::query(SELECT_RECORD)
            .bind(workspace_id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row
            .as_ref()
            .map(record_from_row)
            .transpose()?
            .map(|(f, rev)| f.into_record(*workspace_id, rev)))
    }

    #[tracing::instrument(name = "store.write", skip_all, fields(otel.kind = "client", db.system.name = "sqlite", db.operation.name = "write"))]
    async fn write(&self, w: Write<'_>) -> Result<Record, StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let (record, changed) = write_in(&mut tx, &w).await?;
        tx.commit().await?;
        if changed {
            self.committed.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(record)
    }

    #[tracing::instrument(name = "store.create_batch", skip_all, fields(otel.kind = "client", db.system.name = "sqlite", db.operation.name = "create_batch", items = creates.len()))]
    async fn create_batch(
        &self,
        creates: &[Create<'_>],
        actor: &str,
        reason: &str,
    ) -> Result<Vec<CreateOutcome>, StoreError> {
        if creates.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let out = create_batch_in(&mut tx, creates, actor, reason).await?;
        tx.commit().await?;
        if out.iter().any(|o| matches!(o, CreateOutcome::Created(_))) {
            self.committed.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(out)
    }

    #[tracing::instrument(name = "store.dry_run", skip_all, fields(otel.kind = "client", db.system.name = "sqlite", db.operation.name = "dry_run"))]
    async fn dry_run(&self, w: Write<'_>) -> Result<Record, StoreError> {
        // The row exactly as the real write reads it, without its lock.
        let row = sqlx::query(SELECT_RECORD)
            .bind(w.workspace_id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        let current = row.as_ref().map(record_from_row).transpose()?;
        Ok(
            plan_write(current, w.workspace_id, w.change, w.expected_revision)?
                .into_record(w.workspace_id),
        )
    }

    #[tracing::instrument(name = "store.history", skip_all, fields(otel.kind = "client", db.system.name = "sqlite", db.operation.name = "history"))]
    async fn history(
        &self,
        workspace_id: &WorkspaceId,
        before_revision: Option<u64>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let before = before_revision
            .map(revision_to_db)
            .transpose()?
            .unwrap_or(i64::MAX);
        let rows = sqlx::query(
            "SELECT revision, actor, reason, before, after, at FROM billing_audit \
             WHERE workspace_id = $1 AND revision < $2 ORDER BY revision DESC LIMIT $3",
        )
        .bind(workspace_id.to_string())
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| audit_from_row(row, *workspace_id))
            .collect()
    }

    #[tracing::instrument(name = "store.record_applied", skip_all, fields(otel.kind = "client", db.system.name = "sqlite", db.operation.name = "record_applied"))]
    async fn record_applied(&self, report: &super::AppliedReport) -> Result<(), StoreError> {
        super::applied::record_sqlite(&self.pool, report).await
    }

    #[tracing::instrument(name = "store.applied_reports", skip_all, fields(otel.kind = "client", db.system.name = "sqlite", db.operation.name = "applied_reports"))]
    async fn applied_reports(&self) -> Result<Vec<(super::AppliedReport, Record)>, StoreError> {
        super::applied::list_sqlite(&self.pool).await
    }

    #[tracing::instrument(level = "debug", name = "store.log_state", skip_all, fields(otel.kind = "client", db.system.name = "sqlite", db.operation.name = "log_state"))]
    async fn log_state(&self) -> Result<LogState, StoreError> {
        let row = sqlx::query(SELECT_LOG_STATE).fetch_one(&self.pool).await?;
        log_state_from_row(&row)
    }

    #[tracing::instrument(level = "debug", name = "store.changes_after", skip_all, fields(otel.kind = "client", db.system.name = "sqlite", db.operation.name = "changes_after", after = after, limit = limit))]
    async fn changes_after(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<(Vec<LoggedChange>, LogState), StoreError> {
        let rows = sqlx::query(
            "SELECT c.position, c.workspace_id, c.revision, c.committed_at, a.after \
             FROM billing_changes c \
             JOIN billing_audit a ON a.workspace_id = c.workspace_id AND a.revision = c.revision \
             WHERE c.position > $1 ORDER BY c.position LIMIT $2",
        )
        .bind(position_to_db(after))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let changes = rows.iter().map(change_from_row).collect::<Result<_, _>>()?;
        Ok((changes, self.log_state().await?))
    }

    #[tracing::instrument(name = "store.snapshot", skip_all, fields(otel.kind = "client", db.system.name = "sqlite", db.operation.name = "snapshot"))]
    async fn snapshot(&self, visit: Visit<'_>) -> Result<u64, StoreError> {
        // A read transaction in WAL mode sees one snapshot from its first
        // read. The rows are streamed (the connection's worker hands them
        // over through a bounded channel): each is decoded and handed over as
        // it arrives, never all held at once.
        let mut tx = self.pool.begin().await?;
        let state = log_state_from_row(&sqlx::query(SELECT_LOG_STATE).fetch_one(&mut *tx).await?)?;
        {
            let mut rows = sqlx::query(
                "SELECT workspace_id, runtime, model, credential_keys, override_mode, revision \
                 FROM billing_records ORDER BY workspace_id",
            )
            .fetch(&mut *tx);
            while let Some(row) = rows.next().await {
                let row = row?;
                visit(listed_from_row(&row)?);
            }
        }
        tx.commit().await?;
        Ok(state.last_position)
    }

    #[tracing::instrument(name = "store.prune_changes", skip_all, fields(otel.kind = "client", db.system.name = "sqlite", db.operation.name = "prune_changes"))]
    async fn prune_changes(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let (pruned_through,): (i64,) = sqlx::query_as(
            "UPDATE billing_change_log SET pruned_through = max(pruned_through, \
             (SELECT coalesce(max(position), 0) FROM billing_changes WHERE committed_at < $1)) \
             RETURNING pruned_through",
        )
        .bind(before)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM billing_changes WHERE position <= $1")
            .bind(pruned_through)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        position_from_db(pruned_through)
    }

    #[tracing::instrument(level = "debug", name = "store.listen", skip_all, fields(otel.kind = "client", db.system.name = "sqlite", db.operation.name = "listen"))]
    async fn listen(&self) -> Result<Box<dyn ChangeListener>, StoreError> {
        Ok(Box::new(SqliteChangeListener(self.committed.subscribe())))
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }

    #[tracing::instrument(name = "store.list_after", skip_all, fields(otel.kind = "client", db.system.name = "sqlite", db.operation.name = "list_after", limit = limit))]
    async fn list_after(
        &self,
        after: Option<WorkspaceId>,
        limit: u32,
    ) -> Result<Vec<Record>, StoreError> {
        // Ids are stored in lower-case hyphenated form (a CHECK), whose text
        // order is the UUID byte order Postgres sorts by: both backends list
        // in the same order.
        const COLUMNS: &str = "SELECT workspace_id, runtime, model, credential_keys, \
             override_mode, revision FROM billing_records";
        let query = match after {
            Some(_) => format!("{COLUMNS} WHERE workspace_id > $2 ORDER BY workspace_id LIMIT $1"),
            None => format!("{COLUMNS} ORDER BY workspace_id LIMIT $1"),
        };
        let mut query = sqlx::query(&query).bind(i64::from(limit));
        if let Some(after) = after {
            query = query.bind(after.to_string());
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(listed_from_row).collect()
    }

    #[tracing::instrument(level = "debug", name = "store.ping", skip_all, fields(otel.kind = "client", db.system.name = "sqlite", db.operation.name = "ping"))]
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    #[tracing::instrument(level = "debug", name = "store.pending_migrations", skip_all, fields(otel.kind = "client", db.system.name = "sqlite", db.operation.name = "pending_migrations"))]
    async fn pending_migrations(&self) -> Result<usize, StoreError> {
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations')",
        )
        .fetch_one(&self.pool)
        .await?;
        let applied: Vec<i64> = if exists {
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.pool)
                .await?
        } else {
            Vec::new()
        };
        Ok(super::pending_migrations(&MIGRATOR, &applied))
    }

    fn pool_status(&self) -> PoolStatus {
        PoolStatus::of(self.pool.size(), self.pool.num_idle())
    }
}
