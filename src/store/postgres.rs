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
//! transaction than in many: [`super::Store::create_batch`] inserts every record,
//! every audit row and every change-log entry of a batch with one statement
//! each (`UNNEST` of arrays, the same statements a single write runs with
//! one element), takes the counter once, for all its positions, and commits
//! once.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{
    postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow},
    PgConnection, Postgres,
};

use super::dialect::{AuditRow, Dialect, Queries, WriteLock};
use super::pg_batch::Batcher;
use super::pg_reads::ReadPool;
use super::row::{listed_from_row, revision_to_db, Fields};
use super::{ChangeListener, Heartbeat, PoolSize, StoreError, Wake};
use crate::domain::Record;

/// Postgres's ways: casts to `uuid` and `jsonb`, the row lock, many rows
/// per statement (`UNNEST` of arrays), `load` through its own connections.
#[derive(Debug)]
pub(crate) struct PgDialect {
    /// `load`'s connections (see `store::pg_reads`).
    reads: ReadPool,
    /// `load`s that wait, read together (see `store::pg_batch`).
    batches: Batcher,
}

impl Dialect for PgDialect {
    type Db = Postgres;

    const BACKEND: &'static str = "postgres";
    const SYSTEM: &'static str = "postgresql";
    const UUID: &'static str = "::uuid";
    const JSON: &'static str = "::jsonb";
    const TEXT: &'static str = "::text";
    const WRITE_LOCK: WriteLock = WriteLock::Rows;
    const BEGIN_SNAPSHOT: Option<&'static str> =
        Some("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY");
    const MIGRATIONS_TABLE_EXISTS: &'static str =
        "SELECT to_regclass('_sqlx_migrations') IS NOT NULL";
    const MIGRATOR: &'static sqlx::migrate::Migrator = &sqlx::migrate!("./migrations/postgres");
    /// The size of each of the two pools (`load`'s reads, and the rest).
    const DEFAULT_MAX_CONNECTIONS: u32 = 16;

    /// Row n answers the n-th id of the array (`store::pg_batch`).
    fn load_many(columns: &str) -> Option<String> {
        Some(format!(
            "SELECT t.n, {columns} FROM UNNEST($1::uuid[]) WITH ORDINALITY AS t(id, n) \
             JOIN billing_records ON workspace_id = t.id"
        ))
    }

    /// Two pools of `size.max_connections` each: `load`'s reads, and the
    /// rest (at least two); the change feed's `LISTEN` has a connection of
    /// its own besides.
    async fn open(opts: PgConnectOptions, size: PoolSize) -> Result<(PgPool, Self), StoreError> {
        // One plain connection first: it fails at once with the real cause
        // (refused, unknown host, bad login), where the pool would keep
        // retrying until its acquire timeout and report only that.
        sqlx::Connection::close(
            <sqlx::PgConnection as sqlx::Connection>::connect_with(&opts).await?,
        )
        .await?;
        let max_connections = size
            .max_connections
            .unwrap_or(Self::DEFAULT_MAX_CONNECTIONS)
            .max(1);
        let acquire_timeout = std::time::Duration::from_secs(5);
        let reads = ReadPool::new(opts.clone(), max_connections as usize, acquire_timeout)?;
        let pool = PgPoolOptions::new()
            // At least two: a write need not wait for the change feed's
            // read of the log.
            .max_connections(max_connections.max(2))
            .acquire_timeout(acquire_timeout)
            .connect_with(opts)
            .await?;
        // Unless configured, one statement reads at a time per 16 read
        // connections (1 of the default 16): under load every load that
        // waits goes in the next statement, so Postgres and the server are
        // woken once for many requests (docs/performance.md, change 9). The
        // rest of the connections serve the reads of a statement that
        // failed, which each run alone (store::pg_batch).
        let in_flight = size
            .reads_in_flight
            .unwrap_or(max_connections.div_ceil(16))
            .clamp(1, max_connections);
        if let Some(asked) = size.reads_in_flight.filter(|&n| n > in_flight) {
            // More statements at once than there are read connections
            // cannot run; say what runs instead of ignoring the setting.
            tracing::warn!(
                db_reads_in_flight = asked,
                db_max_connections = max_connections,
                "reads in flight capped at the read connections"
            );
        }
        let batches = Batcher::new(in_flight as usize);
        Ok((pool, PgDialect { reads, batches }))
    }

    /// `LISTEN` on its own connection, on the channel that names the store
    /// and on a heartbeat channel of this listener's own.
    async fn listen<'a>(&'a self, pool: &'a PgPool) -> Result<Box<dyn ChangeListener>, StoreError> {
        let store_id: String = sqlx::query_scalar("SELECT store_id FROM billing_change_log")
            .fetch_one(pool)
            .await?;
        // A pool of its own, of the one connection: a listener dropped
        // because its connection went silent (see `ChangeListener::heartbeat`)
        // sends `UNLISTEN` on it as it goes, which waits as long as the dead
        // connection does (until the kernel gives the connection up); it
        // must not hold one of the store's connections meanwhile.
        let own = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_lazy_with((*pool.connect_options()).clone());
        let mut listener = PgListener::connect_with(&own).await?;
        // A lost connection is reported, not made again inside a wait the
        // feed may cancel (see `PgChangeListener`).
        listener.eager_reconnect(false);
        let heartbeat = format!("billing_heartbeat_{}", uuid::Uuid::new_v4().simple());
        listener
            .listen_all([heartbeat.as_str(), &format!("billing_changes_{store_id}")])
            .await?;
        Ok(Box::new(PgChangeListener {
            listener,
            heartbeat,
            pool: pool.clone(),
        }))
    }

    fn other_connections(&self) -> (u32, usize) {
        self.reads.status()
    }
}

#[cfg(test)]
impl PgDialect {
    /// Loads answered by a statement another load sent.
    pub(crate) fn loads_answered_together(&self) -> usize {
        self.batches
            .answered_together
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Loads read at once (`PoolSize::reads_in_flight`, resolved).
    pub(crate) fn reads_in_flight(&self) -> usize {
        self.batches.in_flight()
    }
}

/// `load` through its own connections, and a batch's rows with one
/// statement each, however many (`UNNEST` of arrays: module docs).
impl Queries for PgDialect {
    async fn load<'a>(
        &'a self,
        _pool: &'a PgPool,
        sql: &'a str,
        many: Option<&'a str>,
        id: String,
    ) -> Result<Option<PgRow>, sqlx::Error> {
        match many {
            Some(many) => self.batches.load(&self.reads, sql, many, id).await,
            None => {
                self.reads
                    .fetch_optional(|| sqlx::query(sql).bind(&id))
                    .await
            }
        }
    }

    /// One statement; `ON CONFLICT DO NOTHING` waits for a transaction
    /// inserting the same workspace and then skips it.
    async fn insert_records(
        &self,
        conn: &mut PgConnection,
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
        .fetch_all(conn)
        .await?)
    }

    async fn select_records(
        &self,
        conn: &mut PgConnection,
        listed: &str,
        ids: &[&str],
    ) -> Result<Vec<Record>, StoreError> {
        let rows = sqlx::query(&format!("{listed} WHERE workspace_id = ANY($1::uuid[])"))
            .bind(ids)
            .fetch_all(conn)
            .await?;
        rows.iter().map(listed_from_row).collect()
    }

    /// Two statements however many rows: the audit rows, then the change
    /// log, which takes the counter row once for all the changes (its lock
    /// is held until COMMIT: module docs) and wakes the feeds with one NOTIFY.
    async fn log_changes(
        &self,
        conn: &mut PgConnection,
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
            befores.push(r.before.map(Fields::to_json));
            afters.push(r.after.to_json());
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
        .execute(&mut *conn)
        .await?;
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
        .execute(conn)
        .await?;
        Ok(())
    }
}

/// `try_recv`, not `recv`: when the listener's connection is lost, `recv`
/// reconnects and goes on waiting without a word, and whatever was notified
/// while it was away is gone, so a change committed then would reach this
/// replica only at the next poll. `try_recv` (without eager reconnection)
/// returns `None` instead, which is reported as an error: the feed drops
/// this listener, listens on a new connection, and only then reads the log,
/// so that read finds any change nobody told it of, and every later one
/// wakes it. (Reconnecting here instead would happen inside a wait the
/// feed cancels after its poll interval, and the reconnect that follows
/// would listen again only after the feed's read.) `tests/api/watch.rs`
/// (`a_change_committed_while_the_listening_connection_is_lost_…`) commits a
/// change while the listening connection is lost and the server cannot know
/// yet; with `recv` the change waits for the next poll.
struct PgChangeListener {
    listener: PgListener,
    /// This listener's own channel ([`ChangeListener::heartbeat`]).
    heartbeat: String,
    /// The store's pool, which sends the heartbeat.
    pool: PgPool,
}

#[async_trait]
impl ChangeListener for PgChangeListener {
    async fn wait(&mut self) -> Result<Wake, StoreError> {
        match self.listener.try_recv().await? {
            Some(n) if n.channel() == self.heartbeat => Ok(Wake::Heartbeat),
            Some(_) => Ok(Wake::Change),
            None => Err(StoreError::Unavailable(sqlx::Error::Io(
                std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "the connection of the change listener was lost",
                ),
            ))),
        }
    }

    fn heartbeat(&self) -> Option<Heartbeat> {
        let (pool, channel) = (self.pool.clone(), self.heartbeat.clone());
        Some(Box::pin(async move {
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(channel)
                .execute(&pool)
                .await?;
            Ok(())
        }))
    }
}
