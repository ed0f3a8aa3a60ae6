//! The SQLite backend (the embedded default).
//!
//! Writes take the database write lock up front (`BEGIN IMMEDIATE`), so a
//! read-modify-write can never be interleaved with another writer's; waiting
//! writers queue on the busy timeout. WAL mode lets reads proceed meanwhile.

use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use sqlx::{
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
    },
    Sqlite, Transaction,
};

use super::{
    audit_from_row, fields_to_json, listed_from_row, plan_write, record_from_row, revision_to_db,
    AuditEntry, Plan, PoolStatus, Store, StoreError, Write,
};
use crate::domain::{Record, WorkspaceId};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if missing) and applies the embedded migrations.
    pub async fn connect(opts: SqliteConnectOptions) -> Result<Self, StoreError> {
        let store = Self::open(opts).await?;
        MIGRATOR.run(&store.pool).await?;
        Ok(store)
    }

    /// Opens (creating if missing) without applying migrations.
    pub async fn open(opts: SqliteConnectOptions) -> Result<Self, StoreError> {
        let opts = opts
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await?;
        Ok(SqliteStore { pool })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

const SELECT_RECORD: &str = "SELECT runtime, model, credential_keys, override_mode, revision \
     FROM billing_records WHERE workspace_id = $1";

async fn write_in(tx: &mut Transaction<'_, Sqlite>, w: &Write<'_>) -> Result<Record, StoreError> {
    let id = w.workspace_id.to_string();
    let row = sqlx::query(SELECT_RECORD)
        .bind(&id)
        .fetch_optional(&mut **tx)
        .await?;
    let current = row.as_ref().map(record_from_row).transpose()?;
    let now = Utc::now();
    let (before, after, revision) = match plan_write(
        current,
        w.workspace_id,
        w.change,
        w.expected_revision,
    )? {
        Plan::Unchanged(record) => return Ok(record),
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
    Ok(after.into_record(w.workspace_id, revision))
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
        let record = write_in(&mut tx, &w).await?;
        tx.commit().await?;
        Ok(record)
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

    fn backend(&self) -> &'static str {
        "sqlite"
    }

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

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

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
