//! The Postgres backend (production).
//!
//! Writes lock the row with `SELECT … FOR UPDATE`; a create races other
//! creates through `INSERT … ON CONFLICT DO NOTHING` and retries as an update
//! when it loses, so concurrent writers never lose an update.
//!
//! The change log's positions are assigned in commit order. A plain sequence
//! would hand them out in *start* order: A takes 10, B takes 11, B commits, a
//! reader "after 9" sees 11 and moves past 10, then A commits and 10 is never
//! read. Instead, the last statement of every writing transaction increments
//! the one counter row `billing_change_log.last_position` and inserts the
//! change at that position; the row lock it takes is held until COMMIT, so the
//! next writer gets its position only after this one has committed (and is
//! visible: Postgres releases a transaction's locks after marking it
//! committed). Positions are therefore dense and in commit order, and a
//! reader that sees position N sees every position below it: "after cursor"
//! can never skip one. Writers serialize only for the tail of their
//! transaction (one statement and the commit); writes here are rare and
//! correctness beats throughput. A counter row rather than `MAX(position)+1`
//! under an advisory lock, because pruning empties the log and a maximum
//! would then restart at 1. Readers take no lock, so a Watch consumer never
//! slows a writer. The same statement sends `NOTIFY billing_changes_<store
//! id>` (delivered at commit) to wake every replica's feed; the channel names
//! the store, so stores sharing a database (test schemas) only wake their own.
//!
//! Because commits serialize on that counter, many creates are cheaper in one
//! transaction than in many: [`Store::create_batch`] inserts every record,
//! every audit row and every change-log entry of a batch with one statement
//! each (`UNNEST` of arrays, the same statements a single write runs with
//! one element), takes the counter once, for all its positions, and commits
//! once.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{
    postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions},
    Postgres, Transaction,
};
use tokio_stream::StreamExt as _;

use super::pg_reads::ReadPool;
use super::{
    audit_from_row, change_from_row, fields_to_json, listed_from_row, log_state_from_row,
    plan_create, plan_write, position_to_db, record_from_row, revision_to_db, AuditEntry,
    ChangeListener, Create, CreateOutcome, LogState, LoggedChange, Plan, PoolStatus, Store,
    StoreError, Visit, Write,
};
use crate::domain::{Fields, Record, WorkspaceId};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The size of each of the two pools (`load`'s reads, and the rest) unless
/// configured (`--db-max-connections`).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 16;

pub struct PostgresStore {
    pool: PgPool,
    /// `load`'s connections (see `store::pg_reads`).
    reads: ReadPool,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects, with pools of up to `max_connections` each, and applies
    /// the embedded migrations.
    pub async fn connect(opts: PgConnectOptions, max_connections: u32) -> Result<Self, StoreError> {
        let store = Self::open(opts, max_connections).await?;
        MIGRATOR.run(&store.pool).await?;
        Ok(store)
    }

    /// Connects, with pools of up to `max_connections` each (`load`'s
    /// reads, and everything else), without applying migrations.
    pub async fn open(opts: PgConnectOptions, max_connections: u32) -> Result<Self, StoreError> {
        // One plain connection first: it fails at once with the real cause
        // (refused, unknown host, bad login), where the pool would keep
        // retrying until its acquire timeout and report only that.
        sqlx::Connection::close(
            <sqlx::PgConnection as sqlx::Connection>::connect_with(&opts).await?,
        )
        .await?;
        // Two pools of `max_connections` each: `load`'s reads and the rest.
        let max_connections = max_connections.max(1);
        let acquire_timeout = std::time::Duration::from_secs(5);
        let reads = ReadPool::new(opts.clone(), max_connections as usize, acquire_timeout)?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(acquire_timeout)
            .connect_with(opts)
            .await?;
        Ok(PostgresStore { pool, reads })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

const SELECT_RECORD: &str = "SELECT runtime, model, credential_keys::text AS credential_keys, \
     override_mode, revision FROM billing_records WHERE workspace_id = $1::uuid";

async fn try_write(
    tx: &mut Transaction<'_, Postgres>,
    w: &Write<'_>,
) -> Result<Option<Record>, StoreError> {
    let id = w.workspace_id.to_string();
    let row = sqlx::query(&format!("{SELECT_RECORD} FOR UPDATE"))
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
        Plan::Unchanged(record) => return Ok(Some(record)),
        Plan::Insert { after } => {
            let inserted = insert_records(tx, &[(&id, &after)], now).await?;
            if inserted.is_empty() {
                // Another writer created it first: retry against its row.
                return Ok(None);
            }
            (None, after, 1)
        }
        Plan::Update {
            before,
            after,
            revision,
        } => {
            sqlx::query(
                    "UPDATE billing_records SET runtime = $2, model = $3, credential_keys = $4::jsonb, \
                     override_mode = $5, revision = $6, updated_at = $7 WHERE workspace_id = $1::uuid",
                )
                .bind(&id)
                .bind(&after.runtime)
                .bind(&after.model)
                .bind(after.credential_keys_json())
                .bind(&after.override_mode)
                .bind(revision_to_db(revision)?)
                .bind(now)
                .execute(&mut **tx)
                .await?;
            (Some(before), after, revision)
        }
    };
    insert_audit(
        tx,
        &[AuditRow {
            id: &id,
            revision,
            before: before.as_ref(),
            after: &after,
        }],
        w.actor,
        w.reason,
        now,
    )
    .await?;
    // Last, so the counter row stays locked only until COMMIT (module docs).
    append_changes(tx, &[(&id, revision)]).await?;
    Ok(Some(after.into_record(w.workspace_id, revision)))
}

/// Inserts new records (workspace as text, fields) at revision 1, in the
/// order given, one statement; a workspace that has a record, or one another
/// transaction is inserting, is skipped (`ON CONFLICT DO NOTHING`, which
/// waits for that transaction). Returns the workspaces inserted.
async fn insert_records(
    tx: &mut Transaction<'_, Postgres>,
    records: &[(&str, &Fields)],
    now: DateTime<Utc>,
) -> Result<Vec<String>, StoreError> {
    let mut ids = Vec::with_capacity(records.len());
    let mut runtimes = Vec::with_capacity(records.len());
    let mut models = Vec::with_capacity(records.len());
    let mut keys = Vec::with_capacity(records.len());
    let mut overrides = Vec::with_capacity(records.len());
    for (id, f) in records {
        ids.push(*id);
        runtimes.push(f.runtime.as_deref());
        models.push(f.model.as_deref());
        keys.push(f.credential_keys_json());
        overrides.push(f.override_mode.as_deref());
    }
    Ok(sqlx::query_scalar(
        "INSERT INTO billing_records \
         (workspace_id, runtime, model, credential_keys, override_mode, revision, updated_at) \
         SELECT t.w, t.rt, t.m, t.k::jsonb, t.o, 1, $6 \
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[]) \
              WITH ORDINALITY AS t(w, rt, m, k, o, n) \
         ORDER BY t.n \
         ON CONFLICT (workspace_id) DO NOTHING RETURNING workspace_id::text",
    )
    .bind(&ids)
    .bind(&runtimes)
    .bind(&models)
    .bind(&keys)
    .bind(&overrides)
    .bind(now)
    .fetch_all(&mut **tx)
    .await?)
}

/// One audit row to insert: the workspace (text), the revision the change
/// made and the fields before (`None`: created) and after it.
struct AuditRow<'a> {
    id: &'a str,
    revision: u64,
    before: Option<&'a Fields>,
    after: &'a Fields,
}

/// The audit rows of the changes this transaction makes, one statement,
/// every row with the same actor, reason and time.
async fn insert_audit(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[AuditRow<'_>],
    actor: &str,
    reason: &str,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    let mut ids = Vec::with_capacity(rows.len());
    let mut revisions = Vec::with_capacity(rows.len());
    let mut befores = Vec::with_capacity(rows.len());
    let mut afters = Vec::with_capacity(rows.len());
    for r in rows {
        ids.push(r.id);
        revisions.push(revision_to_db(r.revision)?);
        befores.push(r.before.map(fields_to_json));
        afters.push(fields_to_json(r.after));
    }
    sqlx::query(
        "INSERT INTO billing_audit (workspace_id, revision, actor, reason, before, after, at) \
         SELECT t.w, t.r, $5, $6, t.b::jsonb, t.a::jsonb, $7 \
         FROM UNNEST($1::uuid[], $2::bigint[], $3::text[], $4::text[]) AS t(w, r, b, a)",
    )
    .bind(&ids)
    .bind(&revisions)
    .bind(&befores)
    .bind(&afters)
    .bind(actor)
    .bind(reason)
    .bind(at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Appends the changes (workspace as text, revision) to the change log at
/// the next positions, in order, and wakes the feeds with one NOTIFY. The
/// last statement of every writing transaction: it locks the counter row
/// until COMMIT (module docs).
async fn append_changes(
    tx: &mut Transaction<'_, Postgres>,
    changes: &[(&str, u64)],
) -> Result<(), StoreError> {
    let ids: Vec<&str> = changes.iter().map(|(id, _)| *id).collect();
    let revisions = changes
        .iter()
        .map(|(_, r)| revision_to_db(*r))
        .collect::<Result<Vec<i64>, _>>()?;
    sqlx::query(
        "WITH p AS (UPDATE billing_change_log \
                    SET last_position = last_position + cardinality($1::uuid[]) \
                    RETURNING last_position, store_id), \
              c AS (INSERT INTO billing_changes (position, workspace_id, revision, committed_at) \
                    SELECT p.last_position - cardinality($1::uuid[]) + t.n, t.w, t.r, clock_timestamp() \
                    FROM p, UNNEST($1::uuid[], $2::bigint[]) WITH ORDINALITY AS t(w, r, n)) \
         SELECT pg_notify('billing_changes_' || store_id, last_position::text) FROM p",
    )
    .bind(&ids)
    .bind(&revisions)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// [`Store::create_batch`] in `tx`: the records first, in workspace-id order
/// (two batches sharing workspaces then wait on each other in one order and
/// cannot deadlock), `ON CONFLICT DO NOTHING` so a workspace created by
/// another writer, committed or not, is left to it; then what exists of
/// the others, the audit rows, and the change log last.
async fn create_batch_in(
    tx: &mut Transaction<'_, Postgres>,
    creates: &[Create<'_>],
    actor: &str,
    reason: &str,
) -> Result<Vec<CreateOutcome>, StoreError> {
    let ids: Vec<String> = creates.iter().map(|c| c.workspace_id.to_string()).collect();
    let fields = creates
        .iter()
        .map(|c| plan_create(c.workspace_id, c.change))
        .collect::<Result<Vec<Fields>, _>>()?;
    let mut order: Vec<usize> = (0..creates.len()).collect();
    order.sort_by_key(|&i| creates[i].workspace_id);
    let now = Utc::now();
    let sorted: Vec<(&str, &Fields)> = order
        .iter()
        .map(|&i| (ids[i].as_str(), &fields[i]))
        .collect();
    let inserted = insert_records(tx, &sorted, now).await?;
    // An id given twice is created once, by its first item.
    let mut inserted: std::collections::HashSet<String> = inserted.into_iter().collect();
    let created: Vec<bool> = ids.iter().map(|id| inserted.remove(id)).collect();
    let others: Vec<&str> = ids
        .iter()
        .zip(&created)
        .filter(|(_, c)| !**c)
        .map(|(id, _)| id.as_str())
        .collect();
    let mut existing = std::collections::HashMap::new();
    if !others.is_empty() {
        let rows = sqlx::query(
            "SELECT workspace_id::text AS workspace_id, runtime, model, \
             credential_keys::text AS credential_keys, override_mode, revision \
             FROM billing_records WHERE workspace_id = ANY($1::uuid[])",
        )
        .bind(&others)
        .fetch_all(&mut **tx)
        .await?;
        for row in &rows {
            let record = listed_from_row(row)?;
            existing.insert(record.workspace_id, record);
        }
    }
    let mut audit = Vec::new();
    let mut changes = Vec::new();
    let mut out = Vec::with_capacity(creates.len());
    for (i, c) in creates.iter().enumerate() {
        if created[i] {
            audit.push(AuditRow {
                id: &ids[i],
                revision: 1,
                before: None,
                after: &fields[i],
            });
            changes.push((ids[i].as_str(), 1));
            out.push(CreateOutcome::Created(
                fields[i].clone().into_record(c.workspace_id, 1),
            ));
        } else {
            let record = existing.get(&c.workspace_id).cloned().ok_or_else(|| {
                StoreError::internal("a record that refused a create is not there")
            })?;
            out.push(CreateOutcome::Existing(record));
        }
    }
    if !changes.is_empty() {
        insert_audit(tx, &audit, actor, reason, now).await?;
        // Last, so the counter row stays locked only until COMMIT.
        append_changes(tx, &changes).await?;
    }
    Ok(out)
}

const SELECT_LOG_STATE: &str =
    "SELECT store_id, last_position, pruned_through FROM billing_change_log";

/// `LISTEN` on its own connection. sqlx's listener reconnects by itself on
/// the next `recv` after a lost connection; what was sent meanwhile is lost,
/// which the feed's polling covers.
struct PgChangeListener(PgListener);

#[async_trait]
impl ChangeListener for PgChangeListener {
    async fn wait(&mut self) -> Result<(), StoreError> {
        self.0.recv().await?;
        Ok(())
    }
}

#[async_trait]
impl Store for PostgresStore {
    #[tracing::instrument(name = "store.load", skip_all, fields(otel.kind = "client", db.system.name = "postgresql", db.operation.name = "load"))]
    async fn load(&self, workspace_id: &WorkspaceId) -> Result<Option<Record>, StoreError> {
        let id = workspace_id.to_string();
        let row = self
            .reads
            .fetch_optional(|| sqlx::query(SELECT_RECORD).bind(id.clone()))
            .await?;
        Ok(row
            .as_ref()
            .map(record_from_row)
            .transpose()?
            .map(|(f, rev)| f.into_record(*workspace_id, rev)))
    }

    #[tracing::instrument(name = "store.write", skip_all, fields(otel.kind = "client", db.system.name = "postgresql", db.operation.name = "write"))]
    async fn write(&self, w: Write<'_>) -> Result<Record, StoreError> {
        // A lost create race is retried once as an update; a second loss is
        // impossible (the row exists and is locked by FOR UPDATE from then on).
        for _ in 0..2 {
            let mut tx = self.pool.begin().await?;
            match try_write(&mut tx, &w).await? {
                Some(record) => {
                    tx.commit().await?;
                    return Ok(record);
                }
                None => tx.rollback().await?,
            }
        }
        Err(StoreError::internal(
            "record creation raced twice; refusing to guess",
        ))
    }

    #[tracing::instrument(name = "store.create_batch", skip_all, fields(otel.kind = "client", db.system.name = "postgresql", db.operation.name = "create_batch", items = creates.len()))]
    async fn create_batch(
        &self,
        creates: &[Create<'_>],
        actor: &str,
        reason: &str,
    ) -> Result<Vec<CreateOutcome>, StoreError> {
        if creates.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await?;
        let out = create_batch_in(&mut tx, creates, actor, reason).await?;
        tx.commit().await?;
        Ok(out)
    }

    #[tracing::instrument(name = "store.dry_run", skip_all, fields(otel.kind = "client", db.system.name = "postgresql", db.operation.name = "dry_run"))]
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

    #[tracing::instrument(name = "store.history", skip_all, fields(otel.kind = "client", db.system.name = "postgresql", db.operation.name = "history"))]
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
            "SELECT revision, actor, reason, before::text AS before, after::text AS after, at \
             FROM billing_audit WHERE workspace_id = $1::uuid AND revision < $2 \
             ORDER BY revision DESC LIMIT $3",
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

    #[tracing::instrument(name = "store.record_applied", skip_all, fields(otel.kind = "client", db.system.name = "postgresql", db.operation.name = "record_applied"))]
    async fn record_applied(&self, report: &super::AppliedReport) -> Result<(), StoreError> {
        super::applied::record_pg(&self.pool, report).await
    }

    #[tracing::instrument(name = "store.applied_reports", skip_all, fields(otel.kind = "client", db.system.name = "postgresql", db.operation.name = "applied_reports"))]
    async fn applied_reports(&self) -> Result<Vec<(super::AppliedReport, Record)>, StoreError> {
        super::applied::list_pg(&self.pool).await
    }

    #[tracing::instrument(level = "debug", name = "store.log_state", skip_all, fields(otel.kind = "client", db.system.name = "postgresql", db.operation.name = "log_state"))]
    async fn log_state(&self) -> Result<LogState, StoreError> {
        let row = sqlx::query(SELECT_LOG_STATE).fetch_one(&self.pool).await?;
        log_state_from_row(&row)
    }

    #[tracing::instrument(level = "debug", name = "store.changes_after", skip_all, fields(otel.kind = "client", db.system.name = "postgresql", db.operation.name = "changes_after", after = after, limit = limit))]
    async fn changes_after(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<(Vec<LoggedChange>, LogState), StoreError> {
        // One statement, one snapshot: with positions in commit order, the
        // rows it sees above `after` are contiguous.
        let rows = sqlx::query(
            "SELECT c.position, c.workspace_id::text AS workspace_id, c.revision, c.committed_at, \
             a.after::text AS after FROM billing_changes c \
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

    #[tracing::instrument(name = "store.snapshot", skip_all, fields(otel.kind = "client", db.system.name = "postgresql", db.operation.name = "snapshot"))]
    async fn snapshot(&self, visit: Visit<'_>) -> Result<u64, StoreError> {
        // One REPEATABLE READ transaction: the records and the last position
        // as of the same instant. The rows are streamed: each is decoded and
        // handed over as it arrives, never all held at once.
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let state = log_state_from_row(&sqlx::query(SELECT_LOG_STATE).fetch_one(&mut *tx).await?)?;
        {
            let mut rows = sqlx::query(
                "SELECT workspace_id::text AS workspace_id, runtime, model, \
                 credential_keys::text AS credential_keys, override_mode, revision \
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

    #[tracing::instrument(name = "store.prune_changes", skip_all, fields(otel.kind = "client", db.system.name = "postgresql", db.operation.name = "prune_changes"))]
    async fn prune_changes(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let (pruned_through,): (i64,) = sqlx::query_as(
            "UPDATE billing_change_log SET pruned_through = GREATEST(pruned_through, \
             (SELECT COALESCE(MAX(position), 0) FROM billing_changes WHERE committed_at < $1)) \
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
        super::position_from_db(pruned_through)
    }

    #[tracing::instrument(level = "debug", name = "store.listen", skip_all, fields(otel.kind = "client", db.system.name = "postgresql", db.operation.name = "listen"))]
    async fn listen(&self) -> Result<Box<dyn ChangeListener>, StoreError> {
        let state = self.log_state().await?;
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener
            .listen(&format!("billing_changes_{}", state.store_id))
            .await?;
        Ok(Box::new(PgChangeListener(listener)))
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }

    #[tracing::instrument(name = "store.list_after", skip_all, fields(otel.kind = "client", db.system.name = "postgresql", db.operation.name = "list_after", limit = limit))]
    async fn list_after(
        &self,
        after: Option<WorkspaceId>,
        limit: u32,
    ) -> Result<Vec<Record>, StoreError> {
        const COLUMNS: &str = "SELECT workspace_id::text AS workspace_id, runtime, model, \
             credential_keys::text AS credential_keys, override_mode, revision FROM billing_records";
        let query = match after {
            Some(_) => {
                format!("{COLUMNS} WHERE workspace_id > $2::uuid ORDER BY workspace_id LIMIT $1")
            }
            None => format!("{COLUMNS} ORDER BY workspace_id LIMIT $1"),
        };
        let mut query = sqlx::query(&query).bind(i64::from(limit));
        if let Some(after) = after {
            query = query.bind(after.to_string());
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(listed_from_row).collect()
    }

    #[tracing::instrument(level = "debug", name = "store.ping", skip_all, fields(otel.kind = "client", db.system.name = "postgresql", db.operation.name = "ping"))]
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    #[tracing::instrument(level = "debug", name = "store.pending_migrations", skip_all, fields(otel.kind = "client", db.system.name = "postgresql", db.operation.name = "pending_migrations"))]
    async fn pending_migrations(&self) -> Result<usize, StoreError> {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
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
        let (reads_open, reads_idle) = self.reads.status();
        PoolStatus::of(
            self.pool.size() + reads_open,
            self.pool.num_idle() + reads_idle,
        )
    }
}
