//! The one SQL store: every operation of [`Store`], written once, generic
//! over a [`Dialect`] that holds what the backends do differently.
//!
//! A write reads the record's row (locked, or under the database's write
//! lock), decides with [`plan_write`], then inserts or updates the row, the
//! audit row and the change-log entry, in that order, in one transaction. A
//! create that loses a race with another create (the row appeared between
//! the read and the insert) is retried once as an update; where the write
//! lock is the database's, that race cannot happen.
//!
//! [`PlainSql`] runs a dialect's [`Queries`] as plain SQL, one row per
//! statement: what a backend without statements of its own (SQLite) runs.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Pool, Type};
use tokio_stream::StreamExt as _;

use super::dialect::{AuditRow, Conn, Dialect, Options, Queries};
use super::metered::timed;
use super::row::{
    applied_from_row, audit_from_row, change_from_row, listed_from_row, log_state_from_row,
    position_from_db, position_to_db, record_from_row, revision_to_db, Fields,
};
use super::{
    plan_create, plan_write, AppliedReport, AuditEntry, ChangeListener, Create, CreateOutcome,
    LogState, LoggedChange, Plan, PoolSize, PoolStatus, Store, StoreError, Visit, Write,
};
use crate::domain::{Record, WorkspaceId};

/// The store of one SQL backend.
pub(crate) struct SqlStore<D: Dialect> {
    pool: Pool<D::Db>,
    dialect: D,
    sql: Statements,
}

impl<D: Dialect> std::fmt::Debug for SqlStore<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlStore")
            .field("backend", &D::BACKEND)
            .finish_non_exhaustive()
    }
}

impl<D: Dialect> SqlStore<D> {
    /// A store on `pool`, its differences in `dialect`.
    fn new(pool: Pool<D::Db>, dialect: D) -> Self {
        SqlStore {
            pool,
            dialect,
            sql: Statements::new::<D>(),
        }
    }

    /// Connects, with pools of `size`, and applies the embedded migrations.
    pub(crate) async fn connect(options: Options<D>, size: PoolSize) -> Result<Self, StoreError>
    where
        Conn<D>: sqlx::migrate::Migrate,
    {
        let store = Self::open(options, size).await?;
        D::MIGRATOR.run(&store.pool).await?;
        Ok(store)
    }

    /// Connects, with pools of `size`, without applying migrations.
    pub(crate) async fn open(options: Options<D>, size: PoolSize) -> Result<Self, StoreError> {
        let (pool, dialect) = D::open(options, size).await?;
        Ok(SqlStore::new(pool, dialect))
    }

    /// The dialect, for the store suite.
    #[cfg(test)]
    pub(crate) fn dialect(&self) -> &D {
        &self.dialect
    }

    /// The pool, for the store suite's raw SQL.
    #[cfg(test)]
    pub(crate) fn pool(&self) -> &Pool<D::Db> {
        &self.pool
    }

    /// A transaction begun with `statement` (`None`: a plain `BEGIN`).
    async fn begin(
        &self,
        statement: Option<&'static str>,
    ) -> Result<sqlx::Transaction<'static, D::Db>, StoreError> {
        Ok(match statement {
            Some(begin) => self.pool.begin_with(begin).await?,
            None => self.pool.begin().await?,
        })
    }
}

/// The statements every backend runs, their casts filled in once, when the
/// store is made.
#[derive(Debug)]
struct Statements {
    select_record: String,
    load_many: Option<String>,
    select_record_locked: String,
    update_record: String,
    update_record_keeping_override: String,
    history: String,
    log_state: String,
    changes_after: String,
    listed: String,
    all_records: String,
    first_records: String,
    records_after: String,
    prune: String,
    upsert_applied: String,
    applied: String,
}

impl Statements {
    fn new<D: Dialect>() -> Self {
        let (uuid, json, text) = (D::UUID, D::JSON, D::TEXT);
        let columns = format!(
            "runtime, model, credential_keys{text} AS credential_keys, override_mode, revision"
        );
        let select_record =
            format!("SELECT {columns} FROM billing_records WHERE workspace_id = $1{uuid}");
        let listed =
            format!("SELECT workspace_id{text} AS workspace_id, {columns} FROM billing_records");
        // The override is set only when it changes: SQLite re-checks a CHECK
        // constraint only when its column is in the SET list, so leaving an
        // unchanged (possibly hand-garbled) override out keeps unrelated Sets
        // working, as they do on Postgres.
        let update = format!(
            "UPDATE billing_records SET runtime = $2, model = $3, credential_keys = $4{json}, \
             revision = $5, updated_at = $6"
        );
        Statements {
            select_record_locked: format!("{select_record}{}", D::WRITE_LOCK.read_suffix()),
            select_record,
            load_many: D::load_many(&columns),
            update_record: format!("{update}, override_mode = $7 WHERE workspace_id = $1{uuid}"),
            update_record_keeping_override: format!("{update} WHERE workspace_id = $1{uuid}"),
            history: format!(
                "SELECT revision, actor, reason, before{text} AS before, after{text} AS after, at \
                 FROM billing_audit WHERE workspace_id = $1{uuid} AND revision < $2 \
                 ORDER BY revision DESC LIMIT $3"
            ),
            log_state: "SELECT store_id, last_position, pruned_through FROM billing_change_log"
                .into(),
            changes_after: format!(
                "SELECT c.position, c.workspace_id{text} AS workspace_id, c.revision, \
                 c.committed_at, a.after{text} AS after FROM billing_changes c \
                 JOIN billing_audit a ON a.workspace_id = c.workspace_id AND a.revision = c.revision \
                 WHERE c.position > $1 ORDER BY c.position LIMIT $2"
            ),
            all_records: format!("{listed} ORDER BY workspace_id"),
            first_records: format!("{listed} ORDER BY workspace_id LIMIT $1"),
            // Ids are compared as UUIDs on Postgres and as text on SQLite,
            // where they are stored lower-case and hyphenated (a CHECK): that
            // text's order is the UUID byte order, so both list alike.
            records_after: format!(
                "{listed} WHERE workspace_id > $2{uuid} ORDER BY workspace_id LIMIT $1"
            ),
            // The newest position committed before the cutoff, if it is
            // above what was pruned already.
            prune: "UPDATE billing_change_log SET pruned_through = COALESCE((SELECT MAX(position) \
                    FROM billing_changes WHERE committed_at < $1 AND position > pruned_through), \
                    pruned_through) RETURNING pruned_through"
                .into(),
            upsert_applied: format!(
                "INSERT INTO billing_applied (workspace_id, instance, revision, mode, reported_at) \
                 VALUES ($1{uuid}, $2, $3, $4, $5) ON CONFLICT (workspace_id, instance) DO UPDATE \
                 SET revision = excluded.revision, mode = excluded.mode, \
                 reported_at = excluded.reported_at \
                 WHERE billing_applied.reported_at <= excluded.reported_at"
            ),
            applied: format!(
                "SELECT a.workspace_id{text} AS workspace_id, a.instance, \
                 a.revision AS applied_revision, a.mode, a.reported_at, r.runtime, r.model, \
                 r.credential_keys{text} AS credential_keys, r.override_mode, r.revision \
                 FROM billing_applied a JOIN billing_records r ON r.workspace_id = a.workspace_id \
                 ORDER BY a.workspace_id, a.instance"
            ),
            listed,
        }
    }
}

/// A dialect whose [`Queries`] are plain SQL, one row per statement (`$n`
/// parameters, no casts), and `load` on the store's pool.
pub(crate) trait PlainSql: Dialect {}

// What plain SQL asks of a backend's sqlx types, stated once for its four
// statements (see the bounds on `Store` below for why they are stated).
impl<D: PlainSql> Queries for D
where
    for<'c> &'c mut Conn<D>: Executor<'c, Database = D::Db>,
    for<'q> <D::Db as Database>::Arguments<'q>: IntoArguments<'q, D::Db>,
    for<'r> &'r str: ColumnIndex<<D::Db as Database>::Row>,
    usize: ColumnIndex<<D::Db as Database>::Row>,
    for<'q> &'q str: Encode<'q, D::Db> + Type<D::Db>,
    for<'q> Option<&'q str>: Encode<'q, D::Db>,
    for<'q> String: Encode<'q, D::Db> + Decode<'q, D::Db> + Type<D::Db>,
    for<'q> Option<String>: Encode<'q, D::Db>,
    for<'q> i64: Encode<'q, D::Db> + Decode<'q, D::Db> + Type<D::Db>,
    for<'q> DateTime<Utc>: Encode<'q, D::Db> + Decode<'q, D::Db> + Type<D::Db>,
{
    async fn load<'a>(
        &'a self,
        pool: &'a Pool<D::Db>,
        sql: &'a str,
        _many: Option<&'a str>,
        id: String,
    ) -> Result<Option<<D::Db as Database>::Row>, sqlx::Error> {
        sqlx::query(sql).bind(id).fetch_optional(pool).await
    }

    async fn insert_records(
        &self,
        conn: &mut Conn<D>,
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
        conn: &mut Conn<D>,
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

    /// One statement a row, and the counter row taken once for all the
    /// changes. The feed is woken by [`Dialect::committed`], not here.
    async fn log_changes(
        &self,
        conn: &mut Conn<D>,
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
}

// The bounds say what the one implementation asks of a backend's sqlx types:
// an executor for its connections, and the Rust types it binds and reads.
// Rust does not carry such bounds along with `D`, so they are stated on each
// `impl` that runs SQL: here, once, and on plain SQL's `Queries` above.
impl<D: Queries> SqlStore<D>
where
    Self: Store,
{
    /// A commit that failed because the connection was lost may have been
    /// made all the same (the database committed, its answer never came).
    /// Answering UNAVAILABLE ("no decision was made") would then be false,
    /// and the caller's retry would meet its own write; so the outcome is
    /// read on another connection: the write's audit row (its revision,
    /// actor, reason and fields) there means it was made. Anything else,
    /// or a read that fails too, is the commit's error.
    async fn settle_commit(
        &self,
        w: &Write<'_>,
        after: Record,
        failed: StoreError,
    ) -> Result<Record, StoreError> {
        if !matches!(failed, StoreError::Unavailable(_)) {
            return Err(failed);
        }
        let made = match self
            .history(&w.workspace_id, Some(after.revision + 1), 1)
            .await
        {
            Ok(entries) => entries.first().is_some_and(|e| {
                e.revision == after.revision
                    && e.actor == w.actor
                    && e.reason == w.reason
                    && e.after == after
            }),
            Err(_) => false,
        };
        if made {
            tracing::warn!(
                workspace_id = %w.workspace_id,
                revision = after.revision,
                error = %failed,
                "the commit's answer was lost, but the write was made"
            );
            self.dialect.committed();
            Ok(after)
        } else {
            Err(failed)
        }
    }
}

#[async_trait]
impl<D: Queries> Store for SqlStore<D>
where
    for<'c> &'c mut Conn<D>: Executor<'c, Database = D::Db>,
    for<'q> <D::Db as Database>::Arguments<'q>: IntoArguments<'q, D::Db>,
    for<'r> &'r str: ColumnIndex<<D::Db as Database>::Row>,
    usize: ColumnIndex<<D::Db as Database>::Row>,
    for<'q> String: Encode<'q, D::Db> + Decode<'q, D::Db> + Type<D::Db>,
    for<'q> Option<String>: Encode<'q, D::Db> + Decode<'q, D::Db> + Type<D::Db>,
    for<'q> i64: Encode<'q, D::Db> + Decode<'q, D::Db> + Type<D::Db>,
    for<'q> bool: Decode<'q, D::Db> + Type<D::Db>,
    for<'q> DateTime<Utc>: Encode<'q, D::Db> + Decode<'q, D::Db> + Type<D::Db>,
{
    #[tracing::instrument(name = "store.load", skip_all, fields(otel.kind = "client", db.system.name = D::SYSTEM, db.operation.name = "load"))]
    async fn load(&self, workspace_id: &WorkspaceId) -> Result<Option<Record>, StoreError> {
        timed("load", async {
            let row = self
                .dialect
                .load(
                    &self.pool,
                    &self.sql.select_record,
                    self.sql.load_many.as_deref(),
                    workspace_id.to_string(),
                )
                .await?;
            row.map(|row| record_from_row(&row, *workspace_id))
                .transpose()
        })
        .await
    }

    #[tracing::instrument(name = "store.write", skip_all, fields(otel.kind = "client", db.system.name = D::SYSTEM, db.operation.name = "write"))]
    async fn write(&self, w: Write<'_>) -> Result<Record, StoreError> {
        timed("write", async {
            let id = w.workspace_id.to_string();
            // A lost create race is retried once as an update; a second loss is
            // impossible (the row exists and is locked from then on).
            for _ in 0..2 {
                let mut tx = self.begin(D::WRITE_LOCK.begin()).await?;
                let row = sqlx::query(&self.sql.select_record_locked)
                    .bind(id.clone())
                    .fetch_optional(&mut *tx)
                    .await?;
                let current = row
                    .map(|row| record_from_row(&row, w.workspace_id))
                    .transpose()?;
                let now = Utc::now();
                let (before, after) =
                    match plan_write(current, w.workspace_id, w.change, w.expected_revision)? {
                        Plan::Unchanged(record) => {
                            tx.commit().await?;
                            return Ok(record);
                        }
                        Plan::Insert { after } => {
                            let text = Fields::of(&after);
                            let inserted = self
                                .dialect
                                .insert_records(&mut *tx, &[(&id, &text)], now)
                                .await?;
                            if inserted.is_empty() {
                                // Another writer created it first: retry
                                // against its row.
                                tx.rollback().await?;
                                continue;
                            }
                            (None, after)
                        }
                        Plan::Update { before, after } => {
                            let keep_override = before.override_mode == after.override_mode;
                            let text = Fields::of(&after);
                            let keys = text.credential_keys_json();
                            let mut update = sqlx::query(if keep_override {
                                &self.sql.update_record_keeping_override
                            } else {
                                &self.sql.update_record
                            })
                            .bind(id.clone())
                            .bind(text.runtime)
                            .bind(text.model)
                            .bind(keys)
                            .bind(revision_to_db(after.revision)?)
                            .bind(now);
                            if !keep_override {
                                update = update.bind(text.override_mode);
                            }
                            update.execute(&mut *tx).await?;
                            (Some(before), after)
                        }
                    };
                let before = before.as_ref().map(Fields::of);
                let audit = AuditRow {
                    id: &id,
                    revision: after.revision,
                    before: before.as_ref(),
                    after: &Fields::of(&after),
                };
                self.dialect
                    .log_changes(&mut *tx, &[audit], w.actor, w.reason, now)
                    .await?;
                if let Err(e) = tx.commit().await {
                    return self.settle_commit(&w, after, e.into()).await;
                }
                self.dialect.committed();
                return Ok(after);
            }
            Err(StoreError::internal(
                "record creation raced twice; refusing to guess",
            ))
        })
        .await
    }

    /// The records first, in workspace-id order (two batches sharing
    /// workspaces then wait on each other in one order and cannot deadlock),
    /// skipping a workspace created by another writer, committed or not;
    /// then what exists of the others, the audit rows, and the change log
    /// last.
    #[tracing::instrument(name = "store.create_batch", skip_all, fields(otel.kind = "client", db.system.name = D::SYSTEM, db.operation.name = "create_batch", items = creates.len()))]
    async fn create_batch(
        &self,
        creates: &[Create<'_>],
        actor: &str,
        reason: &str,
    ) -> Result<Vec<CreateOutcome>, StoreError> {
        timed("create_batch", async {
            if creates.is_empty() {
                return Ok(Vec::new());
            }
            // Every change is checked before anything is written.
            let records = creates
                .iter()
                .map(|c| plan_create(c.workspace_id, c.change))
                .collect::<Result<Vec<Record>, _>>()?;
            let fields: Vec<Fields> = records.iter().map(Fields::of).collect();
            let ids: Vec<String> = creates.iter().map(|c| c.workspace_id.to_string()).collect();
            let mut order: Vec<usize> = (0..creates.len()).collect();
            order.sort_by_key(|&i| creates[i].workspace_id);
            let sorted: Vec<(&str, &Fields)> = order
                .iter()
                .map(|&i| (ids[i].as_str(), &fields[i]))
                .collect();
            let now = Utc::now();
            let mut tx = self.begin(D::WRITE_LOCK.begin()).await?;
            let inserted = self.dialect.insert_records(&mut *tx, &sorted, now).await?;
            // An id given twice is created once, by its first item.
            let mut inserted: HashSet<String> = inserted.into_iter().collect();
            let created: Vec<bool> = ids.iter().map(|id| inserted.remove(id)).collect();
            let others: Vec<&str> = ids
                .iter()
                .zip(&created)
                .filter(|(_, c)| !**c)
                .map(|(id, _)| id.as_str())
                .collect();
            let mut existing = HashMap::new();
            if !others.is_empty() {
                for record in self
                    .dialect
                    .select_records(&mut *tx, &self.sql.listed, &others)
                    .await?
                {
                    existing.insert(record.workspace_id, record);
                }
            }
            let mut audit = Vec::new();
            let mut out = Vec::with_capacity(creates.len());
            for (i, (c, record)) in creates.iter().zip(records).enumerate() {
                if created[i] {
                    audit.push(AuditRow {
                        id: &ids[i],
                        revision: 1,
                        before: None,
                        after: &fields[i],
                    });
                    out.push(CreateOutcome::Created(record));
                } else {
                    let record = existing.get(&c.workspace_id).cloned().ok_or_else(|| {
                        StoreError::internal("a record that refused a create is not there")
                    })?;
                    out.push(CreateOutcome::Existing(record));
                }
            }
            if !audit.is_empty() {
                self.dialect
                    .log_changes(&mut *tx, &audit, actor, reason, now)
                    .await?;
            }
            tx.commit().await?;
            if !audit.is_empty() {
                self.dialect.committed();
            }
            Ok(out)
        })
        .await
    }

    #[tracing::instrument(name = "store.dry_run", skip_all, fields(otel.kind = "client", db.system.name = D::SYSTEM, db.operation.name = "dry_run"))]
    async fn dry_run(&self, w: Write<'_>) -> Result<Record, StoreError> {
        timed("dry_run", async {
            // The row exactly as the real write reads it, without its lock.
            let row = sqlx::query(&self.sql.select_record)
                .bind(w.workspace_id.to_string())
                .fetch_optional(&self.pool)
                .await?;
            let current = row
                .map(|row| record_from_row(&row, w.workspace_id))
                .transpose()?;
            Ok(plan_write(current, w.workspace_id, w.change, w.expected_revision)?.into_record())
        })
        .await
    }

    #[tracing::instrument(name = "store.history", skip_all, fields(otel.kind = "client", db.system.name = D::SYSTEM, db.operation.name = "history"))]
    async fn history(
        &self,
        workspace_id: &WorkspaceId,
        before_revision: Option<u64>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        timed("history", async {
            let before = before_revision
                .map(revision_to_db)
                .transpose()?
                .unwrap_or(i64::MAX);
            let rows = sqlx::query(&self.sql.history)
                .bind(workspace_id.to_string())
                .bind(before)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
            rows.iter()
                .map(|row| audit_from_row(row, *workspace_id))
                .collect()
        })
        .await
    }

    #[tracing::instrument(name = "store.record_applied", skip_all, fields(otel.kind = "client", db.system.name = D::SYSTEM, db.operation.name = "record_applied"))]
    async fn record_applied(&self, report: &AppliedReport) -> Result<(), StoreError> {
        timed("record_applied", async {
            sqlx::query(&self.sql.upsert_applied)
                .bind(report.workspace_id.to_string())
                .bind(report.instance.as_str().to_owned())
                .bind(revision_to_db(report.revision)?)
                .bind(report.mode.as_str().to_owned())
                .bind(report.reported_at)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
        .await
    }

    #[tracing::instrument(name = "store.applied_reports", skip_all, fields(otel.kind = "client", db.system.name = D::SYSTEM, db.operation.name = "applied_reports"))]
    async fn applied_reports(&self) -> Result<Vec<(AppliedReport, Record)>, StoreError> {
        timed("applied_reports", async {
            let rows = sqlx::query(&self.sql.applied).fetch_all(&self.pool).await?;
            rows.iter().map(applied_from_row).collect()
        })
        .await
    }

    #[tracing::instrument(level = "debug", name = "store.log_state", skip_all, fields(otel.kind = "client", db.system.name = D::SYSTEM, db.operation.name = "log_state"))]
    async fn log_state(&self) -> Result<LogState, StoreError> {
        timed("log_state", async {
            let row = sqlx::query(&self.sql.log_state)
                .fetch_one(&self.pool)
                .await?;
            log_state_from_row(&row)
        })
        .await
    }

    #[tracing::instrument(level = "debug", name = "store.changes_after", skip_all, fields(otel.kind = "client", db.system.name = D::SYSTEM, db.operation.name = "changes_after", after = after, limit = limit))]
    async fn changes_after(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<(Vec<LoggedChange>, LogState), StoreError> {
        timed("changes_after", async {
            // One statement, one snapshot: with positions in commit order, the
            // rows it sees above `after` are contiguous.
            let rows = sqlx::query(&self.sql.changes_after)
                .bind(position_to_db(after))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
            let changes = rows.iter().map(change_from_row).collect::<Result<_, _>>()?;
            // The state's own read, not `log_state`: one operation, measured once.
            let state = sqlx::query(&self.sql.log_state)
                .fetch_one(&self.pool)
                .await?;
            Ok((changes, log_state_from_row(&state)?))
        })
        .await
    }

    #[tracing::instrument(name = "store.snapshot", skip_all, fields(otel.kind = "client", db.system.name = D::SYSTEM, db.operation.name = "snapshot"))]
    async fn snapshot(&self, visit: Visit<'_>) -> Result<u64, StoreError> {
        timed("snapshot", async {
            // One transaction that sees one state of the data: the records and
            // the last position as of the same instant. The rows are streamed:
            // each is decoded and handed over as it arrives, never all held at
            // once.
            let mut tx = self.begin(D::BEGIN_SNAPSHOT).await?;
            let state =
                log_state_from_row(&sqlx::query(&self.sql.log_state).fetch_one(&mut *tx).await?)?;
            {
                let mut rows = sqlx::query(&self.sql.all_records).fetch(&mut *tx);
                while let Some(row) = rows.next().await {
                    let row = row?;
                    visit(listed_from_row(&row)?);
                }
            }
            tx.commit().await?;
            Ok(state.last_position)
        })
        .await
    }

    #[tracing::instrument(name = "store.prune_changes", skip_all, fields(otel.kind = "client", db.system.name = D::SYSTEM, db.operation.name = "prune_changes"))]
    async fn prune_changes(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        timed("prune_changes", async {
            let mut tx = self.begin(D::WRITE_LOCK.begin()).await?;
            let (pruned_through,): (i64,) = sqlx::query_as(&self.sql.prune)
                .bind(before)
                .fetch_one(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM billing_changes WHERE position <= $1")
                .bind(pruned_through)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            position_from_db(pruned_through)
        })
        .await
    }

    #[tracing::instrument(level = "debug", name = "store.listen", skip_all, fields(otel.kind = "client", db.system.name = D::SYSTEM, db.operation.name = "listen"))]
    async fn listen(&self) -> Result<Box<dyn ChangeListener>, StoreError> {
        timed("listen", async { self.dialect.listen(&self.pool).await }).await
    }

    fn backend(&self) -> &'static str {
        D::BACKEND
    }

    #[tracing::instrument(name = "store.list_after", skip_all, fields(otel.kind = "client", db.system.name = D::SYSTEM, db.operation.name = "list_after", limit = limit))]
    async fn list_after(
        &self,
        after: Option<WorkspaceId>,
        limit: u32,
    ) -> Result<Vec<Record>, StoreError> {
        timed("list_after", async {
            let rows = match after {
                Some(after) => {
                    sqlx::query(&self.sql.records_after)
                        .bind(i64::from(limit))
                        .bind(after.to_string())
                        .fetch_all(&self.pool)
                        .await?
                }
                None => {
                    sqlx::query(&self.sql.first_records)
                        .bind(i64::from(limit))
                        .fetch_all(&self.pool)
                        .await?
                }
            };
            rows.iter().map(listed_from_row).collect()
        })
        .await
    }

    #[tracing::instrument(level = "debug", name = "store.ping", skip_all, fields(otel.kind = "client", db.system.name = D::SYSTEM, db.operation.name = "ping"))]
    async fn ping(&self) -> Result<(), StoreError> {
        timed("ping", async {
            sqlx::query("SELECT 1").execute(&self.pool).await?;
            Ok(())
        })
        .await
    }

    #[tracing::instrument(level = "debug", name = "store.pending_migrations", skip_all, fields(otel.kind = "client", db.system.name = D::SYSTEM, db.operation.name = "pending_migrations"))]
    async fn pending_migrations(&self) -> Result<usize, StoreError> {
        timed("pending_migrations", async {
            let exists: bool = sqlx::query_scalar(D::MIGRATIONS_TABLE_EXISTS)
                .fetch_one(&self.pool)
                .await?;
            let applied: Vec<i64> = if exists {
                sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                    .fetch_all(&self.pool)
                    .await?
            } else {
                Vec::new()
            };
            Ok(super::pending_migrations(D::MIGRATOR, &applied))
        })
        .await
    }

    fn pool_status(&self) -> PoolStatus {
        let (open, idle) = self.dialect.other_connections();
        PoolStatus::of(self.pool.size() + open, self.pool.num_idle() + idle)
    }
}
