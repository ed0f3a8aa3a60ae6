//! One test suite for the [`Store`] trait, run against every backend (in the
//! style of iox_catalog's interface tests).
//!
//! Each test is an `async fn(&mut Harness)`; [`store_tests!`] instantiates it
//! once per backend:
//!
//! - SQLite, always: a fresh database file in its own temporary directory.
//! - Postgres, when `DATABASE_URL` is a `postgres://` URL: a fresh schema per
//!   test (`search_path` set to it), dropped afterwards. Without it the
//!   Postgres variants print a loud `SKIPPED` line and pass, except under CI
//!   (`CI` set), where they fail.
//!
//! The harness can also run raw SQL, to check what the schema itself refuses
//! and to plant garbled data as a hand edit would.

use std::{collections::BTreeSet, future::Future, io::Write as _, str::FromStr, sync::Arc};

use chrono::{DateTime, Duration, Utc};
use sqlx::{
    postgres::{PgConnectOptions, PgPool, PgPoolOptions},
    sqlite::SqliteConnectOptions,
    Row,
};
use tempfile::TempDir;

use super::{
    dialect::Dialect, postgres::PgDialect, AuditEntry, Create, CreateOutcome, PoolSize,
    PostgresStore, SqliteStore, Store, StoreError, Write,
};
use crate::domain::{
    resolve, Change, CredentialKeys, Mode, Model, Patch, Record, Registry, Runtime, Source, Stored,
    WorkspaceId,
};

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

enum Backend {
    Sqlite {
        store: Arc<SqliteStore>,
        opts: SqliteConnectOptions,
        /// Keeps the database file alive for the test.
        _dir: TempDir,
    },
    Postgres {
        store: Arc<PostgresStore>,
        opts: PgConnectOptions,
    },
}

/// One backend, connected to a database of its own.
pub(super) struct Harness {
    backend: Backend,
    /// A URL for [`super::connect`] that reaches the same database.
    url: String,
}

impl Harness {
    async fn sqlite() -> Harness {
        let dir = TempDir::new().expect("temporary directory");
        let path = dir.path().join("billing.db");
        let opts = SqliteConnectOptions::new().filename(&path);
        let store = SqliteStore::connect(opts.clone(), PoolSize::default())
            .await
            .expect("connect to a fresh SQLite file");
        Harness {
            backend: Backend::Sqlite {
                store: Arc::new(store),
                opts,
                _dir: dir,
            },
            url: format!("sqlite://{}", path.display()),
        }
    }

    /// A harness on a fresh schema, and the handle that drops the schema;
    /// `None` (after saying so, loudly) when Postgres is not configured.
    async fn postgres(test: &str) -> Option<(Harness, PgSchema)> {
        let url = match std::env::var("DATABASE_URL") {
            Ok(u) if u.starts_with("postgres:") || u.starts_with("postgresql:") => u,
            Ok(_) => return skip_postgres(test, "DATABASE_URL is not a postgres:// URL"),
            Err(_) => return skip_postgres(test, "DATABASE_URL not set"),
        };
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .expect("connect to DATABASE_URL");
        let schema = format!("t_{:016x}", rand::random::<u64>());
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&admin)
            .await
            .expect("create the test schema");
        let guard = PgSchema { admin, schema };
        let opts = PgConnectOptions::from_str(&url)
            .expect("DATABASE_URL parses")
            .options([("search_path", guard.schema.as_str())]);
        let store = PostgresStore::connect(opts.clone(), PoolSize::default())
            .await
            .expect("connect to Postgres in the test schema");
        let sep = if url.contains('?') { '&' } else { '?' };
        let harness = Harness {
            backend: Backend::Postgres {
                store: Arc::new(store),
                opts,
            },
            url: format!("{url}{sep}options[search_path]={}", guard.schema),
        };
        Some((harness, guard))
    }

    fn store(&self) -> Arc<dyn Store> {
        match &self.backend {
            Backend::Sqlite { store, .. } => store.clone(),
            Backend::Postgres { store, .. } => store.clone(),
        }
    }

    fn backend_name(&self) -> &'static str {
        match &self.backend {
            Backend::Sqlite { .. } => "sqlite",
            Backend::Postgres { .. } => "postgres",
        }
    }

    /// Runs one raw statement; the number of rows it affected.
    async fn execute(&self, sql: &str) -> Result<u64, sqlx::Error> {
        match &self.backend {
            Backend::Sqlite { store, .. } => sqlx::query(sql)
                .execute(store.pool())
                .await
                .map(|r| r.rows_affected()),
            Backend::Postgres { store, .. } => sqlx::query(sql)
                .execute(store.pool())
                .await
                .map(|r| r.rows_affected()),
        }
    }

    /// The one integer a raw query returns.
    async fn query_i64(&self, sql: &str) -> i64 {
        self.query_one(sql).await
    }

    /// The one value a raw query returns.
    async fn query_one<T>(&self, sql: &str) -> T
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Sqlite>
            + sqlx::Type<sqlx::Sqlite>
            + for<'r> sqlx::Decode<'r, sqlx::Postgres>
            + sqlx::Type<sqlx::Postgres>,
    {
        let value = match &self.backend {
            Backend::Sqlite { store, .. } => sqlx::query(sql)
                .fetch_one(store.pool())
                .await
                .and_then(|row| row.try_get::<T, _>(0)),
            Backend::Postgres { store, .. } => sqlx::query(sql)
                .fetch_one(store.pool())
                .await
                .and_then(|row| row.try_get::<T, _>(0)),
        };
        value.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Stores `raw` as the workspace's override, bypassing the schema's check
    /// as a hand edit on a laxer schema would.
    async fn garble_override(&self, id: WorkspaceId, raw: &str) {
        let update = format!(
            "UPDATE billing_records SET override_mode = '{raw}' WHERE workspace_id = '{id}'"
        );
        let affected = match &self.backend {
            Backend::Sqlite { store, .. } => {
                let mut conn = store.pool().acquire().await.expect("a connection");
                sqlx::query("PRAGMA ignore_check_constraints = ON")
                    .execute(&mut *conn)
                    .await
                    .expect("disable CHECK constraints");
                let affected = sqlx::query(&update)
                    .execute(&mut *conn)
                    .await
                    .expect("garble the override");
                sqlx::query("PRAGMA ignore_check_constraints = OFF")
                    .execute(&mut *conn)
                    .await
                    .expect("re-enable CHECK constraints");
                affected.rows_affected()
            }
            Backend::Postgres { store, .. } => {
                sqlx::query(
                    "ALTER TABLE billing_records DROP CONSTRAINT billing_records_override_mode_check",
                )
                .execute(store.pool())
                .await
                .expect("drop the override CHECK constraint");
                sqlx::query(&update)
                    .execute(store.pool())
                    .await
                    .expect("garble the override")
                    .rows_affected()
            }
        };
        assert_eq!(affected, 1, "the garbling UPDATE must hit the record");
    }

    /// Closes the store and connects a new one to the same database.
    async fn reconnect(&mut self) {
        match &mut self.backend {
            Backend::Sqlite { store, opts, .. } => {
                store.pool().close().await;
                *store = Arc::new(
                    SqliteStore::connect(opts.clone(), PoolSize::default())
                        .await
                        .expect("reconnect to SQLite"),
                );
            }
            Backend::Postgres { store, opts } => {
                store.pool().close().await;
                *store = Arc::new(
                    PostgresStore::connect(opts.clone(), PoolSize::default())
                        .await
                        .expect("reconnect to Postgres"),
                );
            }
        }
    }

    async fn close(self) {
        match &self.backend {
            Backend::Sqlite { store, .. } => store.pool().close().await,
            Backend::Postgres { store, .. } => store.pool().close().await,
        }
    }
}

/// A per-test Postgres schema, dropped by [`PgSchema::drop_schema`].
struct PgSchema {
    admin: PgPool,
    schema: String,
}

impl PgSchema {
    async fn drop_schema(self) {
        let dropped = async {
            sqlx::query("SET lock_timeout = '10s'")
                .execute(&self.admin)
                .await?;
            sqlx::query(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema))
                .execute(&self.admin)
                .await
        }
        .await;
        if let Err(e) = dropped {
            loud(&format!(
                "WARNING: could not drop test schema {}: {e}",
                self.schema
            ));
        }
        self.admin.close().await;
    }
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Writes straight to stderr, past the test harness's output capture.
fn loud(message: &str) {
    let _ = writeln!(std::io::stderr(), "{message}");
}

fn skip_postgres<T>(test: &str, why: &str) -> Option<T> {
    if in_ci() {
        panic!("Postgres store tests must run in CI, but {why}: set DATABASE_URL=postgres://...");
    }
    loud(&format!(
        "SKIPPED: Postgres store test {test}: {why} (set DATABASE_URL=postgres://... to run it)"
    ));
    None
}

/// Runs one test body on its own task so a panic still lets the Postgres
/// schema be dropped, then re-raises the panic.
async fn run(body: impl Future<Output = ()> + Send + 'static, schema: Option<PgSchema>) {
    let result = tokio::spawn(body).await;
    if let Some(schema) = schema {
        schema.drop_schema().await;
    }
    if let Err(e) = result {
        match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("test task failed: {e}"),
        }
    }
}

macro_rules! store_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let h = super::Harness::sqlite().await;
                    super::run(
                        async move {
                            let mut h = h;
                            super::$name(&mut h).await;
                            h.close().await;
                        },
                        None,
                    )
                    .await;
                }
            )*
        }

        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let Some((h, schema)) = super::Harness::postgres(stringify!($name)).await else {
                        return;
                    };
                    super::run(
                        async move {
                            let mut h = h;
                            super::$name(&mut h).await;
                            h.close().await;
                        },
                        Some(schema),
                    )
                    .await;
                }
            )*
        }
    };
}

store_tests!(
    set_on_a_missing_workspace_creates_revision_1_with_an_audit_row,
    set_replaces_only_the_present_fields,
    clear_override_removes_the_override_and_bumps_the_revision,
    clear_on_a_missing_workspace_is_not_found,
    compare_and_set_refuses_a_wrong_expected_revision,
    a_write_that_changes_nothing_keeps_the_revision_and_writes_no_audit_row,
    audit_rows_carry_revision_actor_reason_fields_and_time,
    history_is_newest_first_and_pages_by_revision,
    concurrent_sets_on_one_workspace_lose_no_update,
    concurrent_creates_of_one_workspace_do_not_fail,
    concurrent_loads_each_get_their_own_record,
    the_database_refuses_an_invalid_override_mode,
    a_garbled_override_loads_as_invalid_and_resolve_ignores_it,
    garbled_runtime_and_credential_keys_load_as_invalid,
    a_garbled_key_list_is_written_back_as_it_was_by_a_write_that_leaves_it_alone,
    state_survives_reconnecting,
    migrations_are_idempotent,
    a_dry_run_answers_as_the_write_would_and_writes_nothing,
    applied_reports_keep_the_latest_per_instance_with_the_current_record,
    the_database_refuses_an_applied_report_it_cannot_interpret,
    list_after_pages_every_record_once_in_workspace_id_order,
    a_batch_creates_the_missing_in_one_commit_and_leaves_the_existing_untouched,
    batches_and_single_creates_of_the_same_workspaces_at_once_never_overwrite_each_other,
    the_snapshot_visits_every_record_once_as_of_its_position,
    database_errors_keep_their_class,
    an_audit_entry_that_is_not_the_fields_json_is_corrupt,
    pruning_drops_the_changes_before_the_cutoff_and_never_moves_back,
);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn runtime(s: &str) -> Runtime {
    Runtime::parse(s).unwrap()
}

fn model(s: &str) -> Model {
    Model::parse(s).unwrap()
}

fn keys(k: &[&str]) -> CredentialKeys {
    CredentialKeys::parse(k.iter().copied()).unwrap()
}

fn set(patch: Patch) -> Change {
    Change::Set(patch)
}

fn set_override(m: Mode) -> Change {
    set(Patch {
        override_mode: Some(m),
        ..Patch::default()
    })
}

fn set_model(m: &str) -> Change {
    set(Patch {
        model: Some(Some(model(m))),
        ..Patch::default()
    })
}

async fn write_as(
    store: &dyn Store,
    id: WorkspaceId,
    change: &Change,
    expected_revision: Option<u64>,
    actor: &str,
    reason: &str,
) -> Result<Record, StoreError> {
    store
        .write(Write {
            workspace_id: id,
            change,
            expected_revision,
            actor,
            reason,
        })
        .await
}

async fn write(
    store: &dyn Store,
    id: WorkspaceId,
    change: &Change,
    expected_revision: Option<u64>,
) -> Result<Record, StoreError> {
    write_as(store, id, change, expected_revision, "tester", "test").await
}

async fn load(store: &dyn Store, id: WorkspaceId) -> Record {
    store
        .load(&id)
        .await
        .expect("load")
        .expect("the record exists")
}

async fn history(store: &dyn Store, id: WorkspaceId) -> Vec<AuditEntry> {
    store.history(&id, None, 1000).await.expect("history")
}

fn revisions(entries: &[AuditEntry]) -> Vec<u64> {
    entries.iter().map(|e| e.revision).collect()
}

fn assert_mismatch(result: Result<Record, StoreError>, expected: u64, actual: Option<u64>) {
    match result {
        Err(StoreError::RevisionMismatch {
            expected: e,
            actual: a,
        }) => assert_eq!((e, a), (expected, actual), "mismatch details"),
        other => panic!("expected RevisionMismatch {{ {expected}, {actual:?} }}, got {other:?}"),
    }
}

fn assert_check_violation(err: &sqlx::Error, constraint: &str) {
    let sqlx::Error::Database(db) = err else {
        panic!("expected a database error, got {err:?}");
    };
    assert!(
        db.is_check_violation(),
        "expected a CHECK violation, got {db:?}"
    );
    assert!(
        db.constraint() == Some(constraint) || db.message().contains(constraint),
        "expected constraint {constraint} to be named, got {db:?}"
    );
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

async fn set_on_a_missing_workspace_creates_revision_1_with_an_audit_row(h: &mut Harness) {
    let store = h.store();
    assert_eq!(store.backend(), h.backend_name());
    let id = WorkspaceId::new_random();
    assert_eq!(store.load(&id).await.unwrap(), None);
    assert!(history(&*store, id).await.is_empty());

    let change = set(Patch {
        runtime: Some(Some(runtime("claude-code"))),
        model: Some(Some(model("opus"))),
        credential_keys: Some(keys(&["CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_API_KEY"])),
        override_mode: None,
    });
    let created = write_as(&*store, id, &change, None, "alice", "register")
        .await
        .unwrap();
    let expected = Record {
        workspace_id: id,
        runtime: Stored::Valid(runtime("claude-code")),
        model: Stored::Valid(model("opus")),
        credential_keys: Stored::Valid(keys(&["ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN"])),
        override_mode: Stored::Absent,
        revision: 1,
    };
    assert_eq!(created, expected);
    assert_eq!(load(&*store, id).await, expected);

    let audit = history(&*store, id).await;
    assert_eq!(audit.len(), 1, "{audit:?}");
    let row = &audit[0];
    assert_eq!(row.workspace_id, id);
    assert_eq!(row.revision, 1);
    assert_eq!(row.before, None, "a create has no before");
    assert_eq!(row.after, expected);
    assert_eq!(row.actor, "alice");
    assert_eq!(row.reason, "register");

    // A create with only an override leaves the other fields absent.
    let other = WorkspaceId::new_random();
    let created = write(&*store, other, &set_override(Mode::Disabled), None)
        .await
        .unwrap();
    let expected_other = Record {
        workspace_id: other,
        runtime: Stored::Absent,
        model: Stored::Absent,
        credential_keys: Stored::Absent,
        override_mode: Stored::Valid(Mode::Disabled),
        revision: 1,
    };
    assert_eq!(created, expected_other);
    assert_eq!(load(&*store, other).await, expected_other);
    // Workspaces are independent.
    assert_eq!(load(&*store, id).await, expected);
    assert_eq!(history(&*store, id).await.len(), 1);
    assert_eq!(history(&*store, other).await.len(), 1);
}

async fn set_replaces_only_the_present_fields(h: &mut Harness) {
    let store = h.store();
    let id = WorkspaceId::new_random();
    let mut expected = write(
        &*store,
        id,
        &set(Patch {
            runtime: Some(Some(runtime("hermes"))),
            model: Some(Some(model("openai/gpt-4o"))),
            credential_keys: Some(keys(&["OPENAI_API_KEY", "ANTHROPIC_API_KEY"])),
            override_mode: Some(Mode::Byok),
        }),
        None,
    )
    .await
    .unwrap();
    assert_eq!(expected.revision, 1);

    // Only the model changes.
    let after = write(&*store, id, &set_model("anthropic:claude-sonnet-4-6"), None)
        .await
        .unwrap();
    expected.model = Stored::Valid(model("anthropic:claude-sonnet-4-6"));
    expected.revision = 2;
    assert_eq!(after, expected);
    assert_eq!(load(&*store, id).await, expected);

    // An empty runtime (`Some(None)`) clears it; nothing else moves.
    let after = write(
        &*store,
        id,
        &set(Patch {
            runtime: Some(None),
            ..Patch::default()
        }),
        None,
    )
    .await
    .unwrap();
    expected.runtime = Stored::Absent;
    expected.revision = 3;
    assert_eq!(after, expected);
    assert_eq!(load(&*store, id).await, expected);

    // An empty model clears it.
    let after = write(
        &*store,
        id,
        &set(Patch {
            model: Some(None),
            ..Patch::default()
        }),
        None,
    )
    .await
    .unwrap();
    expected.model = Stored::Absent;
    expected.revision = 4;
    assert_eq!(after, expected);
    assert_eq!(load(&*store, id).await, expected);

    // Credential keys are replaced whole, not merged.
    let after = write(
        &*store,
        id,
        &set(Patch {
            credential_keys: Some(keys(&["GEMINI_API_KEY"])),
            ..Patch::default()
        }),
        None,
    )
    .await
    .unwrap();
    expected.credential_keys = Stored::Valid(keys(&["GEMINI_API_KEY"]));
    expected.revision = 5;
    assert_eq!(after, expected);
    assert_eq!(load(&*store, id).await, expected);

    // An empty set of keys clears them.
    let after = write(
        &*store,
        id,
        &set(Patch {
            credential_keys: Some(CredentialKeys::default()),
            ..Patch::default()
        }),
        None,
    )
    .await
    .unwrap();
    expected.credential_keys = Stored::Absent;
    expected.revision = 6;
    assert_eq!(after, expected);
    assert_eq!(load(&*store, id).await, expected);

    // Several fields at once; the override is replaced.
    let after = write(
        &*store,
        id,
        &set(Patch {
            runtime: Some(Some(runtime("langgraph"))),
            override_mode: Some(Mode::PlatformManaged),
            ..Patch::default()
        }),
        None,
    )
    .await
    .unwrap();
    expected.runtime = Stored::Valid(runtime("langgraph"));
    expected.override_mode = Stored::Valid(Mode::PlatformManaged);
    expected.revision = 7;
    assert_eq!(after, expected);
    assert_eq!(load(&*store, id).await, expected);
    assert_eq!(
        revisions(&history(&*store, id).await),
        vec![7, 6, 5, 4, 3, 2, 1]
    );
}

async fn clear_override_removes_the_override_and_bumps_the_revision(h: &mut Harness) {
    let store = h.store();
    let id = WorkspaceId::new_random();
    let created = write(
        &*store,
        id,
        &set(Patch {
            runtime: Some(Some(runtime("claude-code"))),
            model: Some(Some(model("opus"))),
            override_mode: Some(Mode::Byok),
            ..Patch::default()
        }),
        None,
    )
    .await
    .unwrap();

    let cleared = write_as(
        &*store,
        id,
        &Change::ClearOverride,
        None,
        "ops",
        "back to derived",
    )
    .await
    .unwrap();
    let expected = Record {
        override_mode: Stored::Absent,
        revision: 2,
        ..created.clone()
    };
    assert_eq!(cleared, expected);
    assert_eq!(load(&*store, id).await, expected);

    let audit = history(&*store, id).await;
    assert_eq!(revisions(&audit), vec![2, 1]);
    assert_eq!(audit[0].before, Some(created.clone()));
    assert_eq!(
        audit[0].before.as_ref().unwrap().override_mode,
        Stored::Valid(Mode::Byok)
    );
    assert_eq!(audit[0].after, expected);
    assert_eq!(audit[0].after.override_mode, Stored::Absent);
    assert_eq!(audit[0].actor, "ops");
    assert_eq!(audit[0].reason, "back to derived");

    // Clear honours compare-and-set too.
    write(&*store, id, &set_override(Mode::Disabled), None)
        .await
        .unwrap();
    assert_mismatch(
        write(&*store, id, &Change::ClearOverride, Some(2)).await,
        2,
        Some(3),
    );
    assert_eq!(
        load(&*store, id).await.override_mode,
        Stored::Valid(Mode::Disabled)
    );
    let cleared = write(&*store, id, &Change::ClearOverride, Some(3))
        .await
        .unwrap();
    assert_eq!(cleared.revision, 4);
    assert_eq!(cleared.override_mode, Stored::Absent);
    assert_eq!(load(&*store, id).await, cleared);
}

async fn clear_on_a_missing_workspace_is_not_found(h: &mut Harness) {
    let store = h.store();
    let id = WorkspaceId::new_random();
    for expected_revision in [None, Some(0), Some(1), Some(7)] {
        match write(&*store, id, &Change::ClearOverride, expected_revision).await {
            Err(StoreError::NotFound) => {}
            other => panic!("Clear with {expected_revision:?} on a missing record: {other:?}"),
        }
    }
    assert_eq!(
        store.load(&id).await.unwrap(),
        None,
        "Clear created a record"
    );
    assert!(history(&*store, id).await.is_empty());

    // The same Clear succeeds once the record exists.
    write(&*store, id, &set_override(Mode::Byok), None)
        .await
        .unwrap();
    let cleared = write(&*store, id, &Change::ClearOverride, None)
        .await
        .unwrap();
    assert_eq!(cleared.revision, 2);
}

async fn compare_and_set_refuses_a_wrong_expected_revision(h: &mut Harness) {
    let store = h.store();

    // Missing record: a non-zero expected revision is refused and creates nothing.
    let id = WorkspaceId::new_random();
    assert_mismatch(
        write(&*store, id, &set_model("opus"), Some(3)).await,
        3,
        None,
    );
    assert_mismatch(
        write(&*store, id, &set_model("opus"), Some(1)).await,
        1,
        None,
    );
    assert_eq!(store.load(&id).await.unwrap(), None);
    assert!(history(&*store, id).await.is_empty());

    // Expected 0 on a missing record creates it.
    let created = write(&*store, id, &set_model("opus"), Some(0))
        .await
        .unwrap();
    assert_eq!(created.revision, 1);

    // Expected 0 on an existing record is refused.
    assert_mismatch(
        write(&*store, id, &set_model("sonnet"), Some(0)).await,
        0,
        Some(1),
    );

    // The right revision succeeds.
    let r2 = write(&*store, id, &set_model("sonnet"), Some(1))
        .await
        .unwrap();
    assert_eq!(r2.revision, 2);
    assert_eq!(r2.model, Stored::Valid(model("sonnet")));

    // A stale revision is refused and changes nothing, not even with a
    // change that would be a no-op.
    assert_mismatch(
        write(&*store, id, &set_model("haiku"), Some(1)).await,
        1,
        Some(2),
    );
    assert_mismatch(
        write(&*store, id, &set_model("sonnet"), Some(1)).await,
        1,
        Some(2),
    );
    // A revision from the future is refused too.
    assert_mismatch(
        write(&*store, id, &set_model("haiku"), Some(9)).await,
        9,
        Some(2),
    );
    assert_eq!(load(&*store, id).await, r2);
    assert_eq!(revisions(&history(&*store, id).await), vec![2, 1]);

    let r3 = write(&*store, id, &set_model("haiku"), Some(2))
        .await
        .unwrap();
    assert_eq!(r3.revision, 3);
    assert_eq!(load(&*store, id).await, r3);
    assert_eq!(revisions(&history(&*store, id).await), vec![3, 2, 1]);
}

async fn a_write_that_changes_nothing_keeps_the_revision_and_writes_no_audit_row(h: &mut Harness) {
    let store = h.store();
    let id = WorkspaceId::new_random();
    let full = set(Patch {
        runtime: Some(Some(runtime("claude-code"))),
        model: Some(Some(model("opus"))),
        credential_keys: Some(keys(&["ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN"])),
        override_mode: Some(Mode::Byok),
    });
    let created = write(&*store, id, &full, None).await.unwrap();
    assert_eq!(created.revision, 1);

    let no_ops = [
        // The very same Set, retried.
        full.clone(),
        // A subset of the same values.
        set_model("opus"),
        set_override(Mode::Byok),
        // The same keys in another order, with a duplicate.
        set(Patch {
            credential_keys: Some(keys(&[
                "CLAUDE_CODE_OAUTH_TOKEN",
                "ANTHROPIC_API_KEY",
                "CLAUDE_CODE_OAUTH_TOKEN",
            ])),
            ..Patch::default()
        }),
    ];
    for change in &no_ops {
        let same = write(&*store, id, change, None).await.unwrap();
        assert_eq!(same, created, "{change:?} changed the record");
        // With the current revision as compare-and-set, too.
        let same = write(&*store, id, change, Some(1)).await.unwrap();
        assert_eq!(same, created, "{change:?} changed the record");
    }
    assert_eq!(load(&*store, id).await, created);
    assert_eq!(revisions(&history(&*store, id).await), vec![1]);

    // Clearing absent fields and an absent override changes nothing either.
    let cleared = write(&*store, id, &Change::ClearOverride, None)
        .await
        .unwrap();
    assert_eq!(cleared.revision, 2);
    let bare = write(
        &*store,
        id,
        &set(Patch {
            runtime: Some(None),
            model: Some(None),
            credential_keys: Some(CredentialKeys::default()),
            ..Patch::default()
        }),
        None,
    )
    .await
    .unwrap();
    assert_eq!(bare.revision, 3);
    for change in [
        Change::ClearOverride,
        set(Patch {
            runtime: Some(None),
            model: Some(None),
            credential_keys: Some(CredentialKeys::default()),
            ..Patch::default()
        }),
    ] {
        let same = write(&*store, id, &change, None).await.unwrap();
        assert_eq!(same, bare, "{change:?} changed the record");
    }
    assert_eq!(load(&*store, id).await, bare);
    assert_eq!(revisions(&history(&*store, id).await), vec![3, 2, 1]);
}

async fn audit_rows_carry_revision_actor_reason_fields_and_time(h: &mut Harness) {
    let store = h.store();
    let id = WorkspaceId::new_random();
    let t0 = Utc::now();
    let changes = [
        (
            set(Patch {
                runtime: Some(Some(runtime("langgraph"))),
                model: Some(Some(model("openai:gpt-4o"))),
                credential_keys: Some(keys(&["OPENAI_API_KEY"])),
                ..Patch::default()
            }),
            "alice@example.com",
            "onboarding",
        ),
        (
            set_override(Mode::Byok),
            "bob",
            "customer brings their own key — ticket #42 ✓\nsecond line",
        ),
        (Change::ClearOverride, "carol", "revert"),
    ];
    let mut records: Vec<Record> = Vec::new();
    for (change, actor, reason) in &changes {
        records.push(
            write_as(&*store, id, change, None, actor, reason)
                .await
                .unwrap(),
        );
    }
    let t1 = Utc::now();

    let mut audit = history(&*store, id).await;
    audit.reverse(); // oldest first, to line up with `changes`
    assert_eq!(audit.len(), 3, "{audit:?}");
    let slack = Duration::seconds(1);
    let mut previous: Option<DateTime<Utc>> = None;
    for (i, row) in audit.iter().enumerate() {
        let (_, actor, reason) = &changes[i];
        assert_eq!(row.workspace_id, id);
        assert_eq!(row.revision, i as u64 + 1);
        assert_eq!(row.revision, records[i].revision);
        assert_eq!(row.actor, *actor);
        assert_eq!(row.reason, *reason);
        assert_eq!(row.after, records[i]);
        assert_eq!(row.before, i.checked_sub(1).map(|p| records[p].clone()));
        assert!(
            row.at >= t0 - slack && row.at <= t1 + slack,
            "audit time {} is outside [{t0}, {t1}]",
            row.at
        );
        if let Some(p) = previous {
            assert!(row.at >= p, "audit times go backwards: {p} then {}", row.at);
        }
        previous = Some(row.at);
    }
    // The fields are recorded as stored text, in the audit log's JSON form.
    let as_text = if h.backend_name() == "postgres" {
        "::text"
    } else {
        ""
    };
    let after: String = h
        .query_one(&format!(
            "SELECT after{as_text} FROM billing_audit WHERE workspace_id = '{id}' AND revision = {}",
            audit[1].revision
        ))
        .await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&after).expect("the audit JSON parses"),
        serde_json::json!({
            "runtime": "langgraph",
            "model": "openai:gpt-4o",
            "credential_keys": ["OPENAI_API_KEY"],
            "override_mode": "byok",
        })
    );
}

async fn history_is_newest_first_and_pages_by_revision(h: &mut Harness) {
    let store = h.store();
    let id = WorkspaceId::new_random();
    let other = WorkspaceId::new_random();
    for i in 1..=7 {
        write(&*store, id, &set_model(&format!("model-{i}")), None)
            .await
            .unwrap();
        // Interleave another workspace's changes: they must not show up.
        write(&*store, other, &set_model(&format!("other-{i}")), None)
            .await
            .unwrap();
    }
    let all = history(&*store, id).await;
    assert_eq!(revisions(&all), vec![7, 6, 5, 4, 3, 2, 1]);
    assert!(all.iter().all(|e| e.workspace_id == id));
    for e in &all {
        assert_eq!(
            e.after.model.text(Model::as_str),
            Some(format!("model-{}", e.revision).as_str())
        );
    }

    let page = |before: Option<u64>, limit: u32| {
        let store = store.clone();
        async move {
            revisions(
                &store
                    .history(&id, before, limit)
                    .await
                    .expect("history page"),
            )
        }
    };
    assert_eq!(page(None, 3).await, vec![7, 6, 5]);
    assert_eq!(page(Some(5), 3).await, vec![4, 3, 2]);
    assert_eq!(page(Some(2), 3).await, vec![1]);
    assert_eq!(page(Some(1), 3).await, Vec::<u64>::new());
    assert_eq!(page(Some(100), 2).await, vec![7, 6]);
    assert_eq!(page(None, 0).await, Vec::<u64>::new());
    assert_eq!(page(None, 1).await, vec![7]);

    // Paging to the end yields every row exactly once.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let rows = store.history(&id, cursor, 2).await.unwrap();
        let Some(last) = rows.last() else { break };
        cursor = Some(last.revision);
        seen.extend(rows.iter().map(|e| e.revision));
    }
    assert_eq!(seen, vec![7, 6, 5, 4, 3, 2, 1]);

    assert!(history(&*store, WorkspaceId::new_random()).await.is_empty());
}

async fn concurrent_sets_on_one_workspace_lose_no_update(h: &mut Harness) {
    const N: u64 = 50;
    let store = h.store();
    let id = WorkspaceId::new_random();
    let tasks: Vec<_> = (1..=N)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let change = set_model(&format!("model-{i}"));
                let reason = format!("writer {i}");
                let record = write_as(&*store, id, &change, None, "racer", &reason).await;
                (i, record)
            })
        })
        .collect();
    let mut by_revision = std::collections::BTreeMap::new();
    for task in tasks {
        let (i, record) = task.await.expect("writer task");
        let record = record.unwrap_or_else(|e| panic!("writer {i} failed: {e:?}"));
        assert_eq!(record.model, Stored::Valid(model(&format!("model-{i}"))));
        assert!(
            by_revision.insert(record.revision, i).is_none(),
            "two writers got revision {}",
            record.revision
        );
    }
    assert_eq!(
        by_revision.keys().copied().collect::<Vec<_>>(),
        (1..=N).collect::<Vec<_>>(),
        "each write must get its own revision"
    );

    let last = load(&*store, id).await;
    assert_eq!(last.revision, N);
    assert_eq!(
        last.model,
        Stored::Valid(model(&format!("model-{}", by_revision[&N])))
    );

    let audit = history(&*store, id).await;
    assert_eq!(revisions(&audit), (1..=N).rev().collect::<Vec<_>>());
    let mut oldest_first = audit.clone();
    oldest_first.reverse();
    for (k, row) in oldest_first.iter().enumerate() {
        let writer = by_revision[&row.revision];
        assert_eq!(row.reason, format!("writer {writer}"));
        assert_eq!(
            row.after.model.text(Model::as_str),
            Some(format!("model-{writer}").as_str())
        );
        // Each change was made on top of the one before it.
        let expected_before = k.checked_sub(1).map(|p| oldest_first[p].after.clone());
        assert_eq!(row.before, expected_before, "revision {}", row.revision);
    }
    let models: BTreeSet<_> = audit
        .iter()
        .map(|e| e.after.model.text(Model::as_str).map(str::to_owned))
        .collect();
    assert_eq!(models.len(), N as usize);
}

/// Many loads at once, of many workspaces, some asked for twice and some
/// with no record: each gets its own workspace's record (on Postgres most of
/// them read together with others, `store::pg_batch`; checked below).
async fn concurrent_loads_each_get_their_own_record(h: &mut Harness) {
    const STORED: u64 = 40;
    let store = h.store();
    let mut expected = Vec::new();
    for i in 0..STORED {
        let id = WorkspaceId::new_random();
        // Revisions differ too (1 to 3), so that no two records are alike.
        for k in 0..=(i % 3) {
            write(&*store, id, &set_model(&format!("model-{i}-{k}")), None)
                .await
                .expect("write");
        }
        expected.push((id, Some((format!("model-{i}-{}", i % 3), i % 3 + 1))));
    }
    for _ in 0..10 {
        expected.push((WorkspaceId::new_random(), None));
    }
    // Every workspace 12 times over, interleaved.
    let loads: Vec<_> = (0..12)
        .flat_map(|_| expected.iter().cloned())
        .map(|(id, want)| {
            let store = store.clone();
            tokio::spawn(async move {
                let got = store.load(&id).await.expect("load");
                (id, want, got)
            })
        })
        .collect();
    // A load left waiting for ever would hang the suite: fail instead.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    for load in loads {
        let (id, want, got) = tokio::time::timeout_at(deadline, load)
            .await
            .expect("every load answered within a minute")
            .expect("load task");
        match (want, got) {
            (None, None) => {}
            (Some((m, revision)), Some(record)) => {
                assert_eq!(record.workspace_id, id, "another workspace's record");
                assert_eq!(record.model, Stored::Valid(model(&m)), "{id}");
                assert_eq!(record.revision, revision, "{id}");
            }
            (want, got) => panic!("{id}: expected {want:?}, loaded {got:?}"),
        }
    }
    if let Backend::Postgres { store, .. } = &h.backend {
        assert!(
            store.dialect().loads_answered_together() > 0,
            "600 loads at once and none read together with another: the test \
             did not exercise what it is for"
        );
    }
}

async fn concurrent_creates_of_one_workspace_do_not_fail(h: &mut Harness) {
    const N: usize = 20;
    let store = h.store();

    // The same Set from many callers at once: one creates, the rest are no-ops.
    let id = WorkspaceId::new_random();
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let change = set(Patch {
                    runtime: Some(Some(runtime("hermes"))),
                    model: Some(Some(model("openai/gpt-4o"))),
                    ..Patch::default()
                });
                write(&*store, id, &change, None).await
            })
        })
        .collect();
    for task in tasks {
        let record = task
            .await
            .expect("task")
            .expect("a concurrent create failed");
        assert_eq!(record.revision, 1);
        assert_eq!(record.runtime, Stored::Valid(runtime("hermes")));
    }
    assert_eq!(load(&*store, id).await.revision, 1);
    let audit = history(&*store, id).await;
    assert_eq!(revisions(&audit), vec![1]);
    assert_eq!(audit[0].before, None);

    // Different Sets at once on a new workspace: all apply, in some order.
    let id = WorkspaceId::new_random();
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(
                async move { write(&*store, id, &set_model(&format!("m{i}")), None).await },
            )
        })
        .collect();
    for task in tasks {
        task.await
            .expect("task")
            .expect("a concurrent create failed");
    }
    assert_eq!(load(&*store, id).await.revision, N as u64);
    assert_eq!(history(&*store, id).await.len(), N);

    // Create-only (expected revision 0) at once: exactly one wins.
    let id = WorkspaceId::new_random();
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let actor = format!("creator-{i}");
                let change = set_model(&format!("m{i}"));
                (
                    i,
                    write_as(&*store, id, &change, Some(0), &actor, "create").await,
                )
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.expect("task") {
            (i, Ok(record)) => {
                assert_eq!(record.revision, 1);
                winners.push(i);
            }
            (_, result @ Err(_)) => assert_mismatch(result, 0, Some(1)),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let audit = history(&*store, id).await;
    assert_eq!(revisions(&audit), vec![1]);
    assert_eq!(audit[0].actor, format!("creator-{}", winners[0]));
    assert_eq!(
        load(&*store, id).await.model,
        Stored::Valid(model(&format!("m{}", winners[0])))
    );
}

async fn the_database_refuses_an_invalid_override_mode(h: &mut Harness) {
    let store = h.store();
    let id = WorkspaceId::new_random();
    write(&*store, id, &set_override(Mode::Byok), None)
        .await
        .unwrap();

    // The statement itself works with a valid mode...
    let affected = h
        .execute(&format!(
            "UPDATE billing_records SET override_mode = 'disabled' WHERE workspace_id = '{id}'"
        ))
        .await
        .expect("a valid raw UPDATE");
    assert_eq!(affected, 1);
    let valid = load(&*store, id).await;
    assert_eq!(valid.override_mode, Stored::Valid(Mode::Disabled));

    // ...and is refused with an invalid one.
    for bogus in ["bogus", "BYOK", ""] {
        let err = h
            .execute(&format!(
                "UPDATE billing_records SET override_mode = '{bogus}' WHERE workspace_id = '{id}'"
            ))
            .await
            .expect_err("the schema must refuse an invalid override_mode");
        assert_check_violation(&err, "billing_records_override_mode_check");
    }
    assert_eq!(load(&*store, id).await, valid);

    // A new row with an invalid override is refused too.
    let new = WorkspaceId::new_random();
    let err = h
        .execute(&format!(
            "INSERT INTO billing_records (workspace_id, override_mode, revision, updated_at) \
             VALUES ('{new}', 'bogus', 1, CURRENT_TIMESTAMP)"
        ))
        .await
        .expect_err("the schema must refuse an invalid override_mode");
    assert_check_violation(&err, "billing_records_override_mode_check");
    assert_eq!(store.load(&new).await.unwrap(), None);
}

async fn a_garbled_override_loads_as_invalid_and_resolve_ignores_it(h: &mut Harness) {
    let registry = Registry::builtin().expect("the built-in registry");
    let store = h.store();
    let id = WorkspaceId::new_random();
    let created = write(&*store, id, &set_override(Mode::Byok), None)
        .await
        .unwrap();
    let before = resolve(&created, &registry);
    assert_eq!((before.mode, before.source), (Mode::Byok, Source::Override));

    h.garble_override(id, "BYOK").await;

    let garbled = load(&*store, id).await;
    assert_eq!(garbled.override_mode, Stored::Invalid("BYOK".into()));
    assert_eq!(garbled.revision, 1);
    assert_eq!(garbled.runtime, Stored::Absent);

    let resolution = resolve(&garbled, &registry);
    assert_eq!(
        resolution.override_mode, None,
        "a garbled override is absent"
    );
    assert_eq!(resolution.source, Source::Default);
    assert_eq!(resolution.mode, Mode::PlatformManaged);
    assert!(
        resolution
            .trace
            .iter()
            .any(|line| line.starts_with("override:") && line.contains("BYOK")),
        "the trace must name the garbled override: {:?}",
        resolution.trace
    );

    // A Set that does not touch the override still works, and keeps the
    // garbled text as it is (only an explicit change replaces it).
    let unrelated = write(
        &*store,
        id,
        &set(Patch {
            runtime: Some(Some(runtime("claude-code"))),
            ..Patch::default()
        }),
        Some(1),
    )
    .await
    .expect("a Set of another field is not blocked by a garbled override");
    assert_eq!(unrelated.override_mode, Stored::Invalid("BYOK".into()));
    assert_eq!(unrelated.revision, 2);

    // Clear repairs it, and the audit row records the garbled text.
    let repaired = write(&*store, id, &Change::ClearOverride, Some(2))
        .await
        .unwrap();
    assert_eq!(repaired.override_mode, Stored::Absent);
    assert_eq!(repaired.revision, 3);
    let audit = history(&*store, id).await;
    assert_eq!(
        audit[0]
            .before
            .as_ref()
            .unwrap()
            .override_mode
            .text(|m| m.as_str()),
        Some("BYOK")
    );
    assert_eq!(audit[0].after.override_mode, Stored::Absent);
}

async fn garbled_runtime_and_credential_keys_load_as_invalid(h: &mut Harness) {
    let registry = Registry::builtin().expect("the built-in registry");
    let store = h.store();
    let id = WorkspaceId::new_random();
    write(
        &*store,
        id,
        &set(Patch {
            runtime: Some(Some(runtime("claude-code"))),
            model: Some(Some(model("opus"))),
            credential_keys: Some(keys(&["CLAUDE_CODE_OAUTH_TOKEN"])),
            ..Patch::default()
        }),
        None,
    )
    .await
    .unwrap();

    let affected = h
        .execute(&format!(
            "UPDATE billing_records SET runtime = 'claude code', \
             credential_keys = '[\"NOT-A-KEY\"]' WHERE workspace_id = '{id}'"
        ))
        .await
        .expect("the schema allows any runtime text and any JSON array of keys");
    assert_eq!(affected, 1);

    let garbled = load(&*store, id).await;
    assert_eq!(garbled.runtime, Stored::Invalid("claude code".into()));
    assert_eq!(garbled.credential_keys, Stored::Invalid("NOT-A-KEY".into()));
    assert_eq!(garbled.model, Stored::Valid(model("opus")));
    assert_eq!(garbled.revision, 1);

    let resolution = resolve(&garbled, &registry);
    assert_eq!(resolution.runtime, None);
    assert!(resolution.credential_keys.is_empty());
    for name in ["claude code", "NOT-A-KEY"] {
        assert!(
            resolution.trace.iter().any(|line| line.contains(name)),
            "the trace must name {name:?}: {:?}",
            resolution.trace
        );
    }

    // A Set repairs the runtime; the audit row keeps the garbled text.
    let repaired = write(
        &*store,
        id,
        &set(Patch {
            runtime: Some(Some(runtime("claude-code"))),
            ..Patch::default()
        }),
        None,
    )
    .await
    .unwrap();
    assert_eq!(repaired.runtime, Stored::Valid(runtime("claude-code")));
    assert_eq!(repaired.revision, 2);
    let audit = history(&*store, id).await;
    assert_eq!(
        audit[0]
            .before
            .as_ref()
            .unwrap()
            .runtime
            .text(Runtime::as_str),
        Some("claude code")
    );
}

/// A hand-edited key list that is invalid only as a whole (one entry
/// holding two valid names and a comma) stays that list through a write of
/// another field: it must not come back as the two valid keys, which would
/// let an ignored value start deciding the mode, unrecorded.
async fn a_garbled_key_list_is_written_back_as_it_was_by_a_write_that_leaves_it_alone(
    h: &mut Harness,
) {
    let registry = Registry::builtin().unwrap();
    let store = h.store();
    let id = WorkspaceId::new_random();
    write(
        &*store,
        id,
        &set(Patch {
            runtime: Some(Some(runtime("langgraph"))),
            model: Some(Some(model("anthropic:claude-sonnet-4-6"))),
            ..Patch::default()
        }),
        None,
    )
    .await
    .unwrap();
    h.execute(&format!(
        "UPDATE billing_records SET credential_keys = \
         '[\"ANTHROPIC_API_KEY,OPENAI_API_KEY\"]' WHERE workspace_id = '{id}'"
    ))
    .await
    .unwrap();
    let garbled = load(&*store, id).await;
    assert!(
        matches!(garbled.credential_keys, Stored::Invalid(_)),
        "{garbled:?}"
    );
    let after = write(
        &*store,
        id,
        &set(Patch {
            runtime: Some(Some(runtime("deepagents"))),
            ..Patch::default()
        }),
        Some(1),
    )
    .await
    .unwrap();
    let reloaded = load(&*store, id).await;
    assert_eq!(reloaded, after, "what the write answered is what it stored");
    assert_eq!(reloaded.credential_keys, garbled.credential_keys);
    assert_eq!(
        resolve(&reloaded, &registry).mode,
        resolve(&garbled, &registry).mode
    );
    let audit = history(&*store, id).await;
    assert_eq!(
        audit[0].before.as_ref().unwrap().credential_keys,
        garbled.credential_keys
    );
    assert_eq!(audit[0].after.credential_keys, garbled.credential_keys);
}

async fn state_survives_reconnecting(h: &mut Harness) {
    let store = h.store();
    let id = WorkspaceId::new_random();
    write(
        &*store,
        id,
        &set(Patch {
            runtime: Some(Some(runtime("hermes"))),
            model: Some(Some(model("openai/gpt-4o"))),
            credential_keys: Some(keys(&["OPENAI_API_KEY"])),
            override_mode: Some(Mode::Byok),
        }),
        None,
    )
    .await
    .unwrap();
    write(&*store, id, &Change::ClearOverride, None)
        .await
        .unwrap();
    let record = load(&*store, id).await;
    let audit = history(&*store, id).await;
    assert_eq!(record.revision, 2);
    drop(store);

    h.reconnect().await;

    let store = h.store();
    assert_eq!(load(&*store, id).await, record);
    assert_eq!(history(&*store, id).await, audit);
    // Revisions carry on from where they were.
    let next = write(&*store, id, &set_model("gpt-5"), Some(2))
        .await
        .unwrap();
    assert_eq!(next.revision, 3);
    assert_eq!(revisions(&history(&*store, id).await), vec![3, 2, 1]);
}

async fn migrations_are_idempotent(h: &mut Harness) {
    let expected = match h.backend_name() {
        "sqlite" => SQLITE_MIGRATIONS.iter().count(),
        _ => POSTGRES_MIGRATIONS.iter().count(),
    } as i64;
    let count = "SELECT COUNT(*) FROM _sqlx_migrations";
    let succeeded = "SELECT COUNT(*) FROM _sqlx_migrations WHERE success";
    assert_eq!(h.query_i64(count).await, expected);
    assert_eq!(h.query_i64(succeeded).await, expected);

    let store = h.store();
    let id = WorkspaceId::new_random();
    let created = write(&*store, id, &set_override(Mode::Disabled), None)
        .await
        .unwrap();

    // A second store on the same database, through the public entry point,
    // while the first is still open.
    let again = super::connect(&h.url)
        .await
        .expect("connecting a second time must not fail");
    assert_eq!(again.backend(), h.backend_name());
    assert_eq!(h.query_i64(count).await, expected, "migrations re-applied");
    assert_eq!(h.query_i64(succeeded).await, expected);
    assert_eq!(load(&*again, id).await, created, "the data must survive");
    // Both see each other's writes.
    let r2 = write(&*again, id, &Change::ClearOverride, None)
        .await
        .unwrap();
    assert_eq!(load(&*store, id).await, r2);
    drop(again);

    // And a third time, after closing.
    drop(store);
    h.reconnect().await;
    assert_eq!(h.query_i64(count).await, expected);
    assert_eq!(load(&*h.store(), id).await, r2);
}

async fn a_dry_run_answers_as_the_write_would_and_writes_nothing(h: &mut Harness) {
    let store = h.store();
    let id = WorkspaceId::new_random();
    let dry = |change: &Change, expected_revision: Option<u64>| {
        let store = store.clone();
        let change = change.clone();
        async move {
            store
                .dry_run(Write {
                    workspace_id: id,
                    change: &change,
                    expected_revision,
                    actor: "tester",
                    reason: "test",
                })
                .await
        }
    };
    let audit_rows = "SELECT COUNT(*) FROM billing_audit";

    // On a missing workspace: a Clear is NotFound, a Set would create revision 1.
    assert!(matches!(
        dry(&Change::ClearOverride, None).await,
        Err(StoreError::NotFound)
    ));
    assert_mismatch(dry(&set_override(Mode::Byok), Some(4)).await, 4, None);
    let would = dry(&set_override(Mode::Byok), Some(0)).await.unwrap();
    assert_eq!(would.revision, 1);
    assert_eq!(
        would.override_mode,
        crate::domain::Stored::Valid(Mode::Byok)
    );
    assert_eq!(
        store.load(&id).await.unwrap(),
        None,
        "a dry run created the record"
    );
    assert_eq!(h.query_i64(audit_rows).await, 0);

    // On an existing one: the next revision, the fields after, nothing stored.
    let created = write(&*store, id, &set_model("opus"), None).await.unwrap();
    let would = dry(&set_override(Mode::Disabled), Some(1)).await.unwrap();
    let real_after = set_override(Mode::Disabled).apply(&created);
    assert_eq!(
        would,
        Record {
            revision: 2,
            ..real_after
        }
    );
    assert_mismatch(
        dry(&set_override(Mode::Disabled), Some(2)).await,
        2,
        Some(1),
    );
    // A no-op answers the record as it is.
    assert_eq!(dry(&set_model("opus"), None).await.unwrap(), created);
    assert_eq!(dry(&Change::ClearOverride, None).await.unwrap(), created);
    assert_eq!(load(&*store, id).await, created);
    assert_eq!(revisions(&history(&*store, id).await), vec![1]);
    assert_eq!(h.query_i64(audit_rows).await, 1);

    // And the dry run's answer is exactly what the real write then returns.
    let real = write(&*store, id, &set_override(Mode::Disabled), Some(1))
        .await
        .unwrap();
    assert_eq!(real, would);
}

async fn applied_reports_keep_the_latest_per_instance_with_the_current_record(h: &mut Harness) {
    use super::AppliedReport;
    use crate::domain::Instance;
    let store = h.store();
    assert!(store.applied_reports().await.unwrap().is_empty());
    let a = WorkspaceId::new_random();
    let b = WorkspaceId::new_random();
    write(&*store, a, &set_override(Mode::Byok), None)
        .await
        .unwrap();
    write(&*store, b, &set_model("opus"), None).await.unwrap();
    let at = |s: i64| DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap();
    let report = |ws, instance: &str, revision, mode, s| AppliedReport {
        workspace_id: ws,
        instance: Instance::parse(instance).unwrap(),
        revision,
        mode,
        reported_at: at(s),
    };
    store
        .record_applied(&report(a, "pod-1", 1, Mode::Byok, 1))
        .await
        .unwrap();
    store
        .record_applied(&report(a, "pod-2", 1, Mode::Byok, 2))
        .await
        .unwrap();
    store
        .record_applied(&report(b, "pod-1", 1, Mode::PlatformManaged, 3))
        .await
        .unwrap();
    // A later report for the same (workspace, instance) replaces the earlier one.
    let a2 = write(&*store, a, &Change::ClearOverride, None)
        .await
        .unwrap();
    store
        .record_applied(&report(a, "pod-1", 2, Mode::PlatformManaged, 4))
        .await
        .unwrap();
    // A report received earlier whose write comes last (a slower request)
    // does not replace the later one: the latest received is kept.
    store
        .record_applied(&report(a, "pod-1", 1, Mode::Byok, 3))
        .await
        .unwrap();

    let mut got = store.applied_reports().await.unwrap();
    got.sort_by(|x, y| {
        (x.0.workspace_id, x.0.instance.as_str()).cmp(&(y.0.workspace_id, y.0.instance.as_str()))
    });
    let mut want = vec![
        (report(a, "pod-1", 2, Mode::PlatformManaged, 4), a2.clone()),
        (report(a, "pod-2", 1, Mode::Byok, 2), a2.clone()),
        (
            report(b, "pod-1", 1, Mode::PlatformManaged, 3),
            load(&*store, b).await,
        ),
    ];
    want.sort_by(|x, y| {
        (x.0.workspace_id, x.0.instance.as_str()).cmp(&(y.0.workspace_id, y.0.instance.as_str()))
    });
    assert_eq!(got, want);
}

async fn the_database_refuses_an_applied_report_it_cannot_interpret(h: &mut Harness) {
    use super::AppliedReport;
    use crate::domain::Instance;
    let store = h.store();
    let id = WorkspaceId::new_random();
    // No record: the report has nothing to refer to.
    let orphan = store
        .record_applied(&AppliedReport {
            workspace_id: id,
            instance: Instance::parse("pod-1").unwrap(),
            revision: 1,
            mode: Mode::Byok,
            reported_at: Utc::now(),
        })
        .await;
    // The foreign key refuses it: a constraint violation is a bug (the
    // service checks the record first), not an outage to retry.
    assert!(
        matches!(orphan, Err(StoreError::Internal { .. })),
        "{orphan:?}"
    );
    write(&*store, id, &set_override(Mode::Byok), None)
        .await
        .unwrap();
    for sql in [
        format!(
            "INSERT INTO billing_applied (workspace_id, instance, revision, mode, reported_at) \
                 VALUES ('{id}', 'pod-1', 1, 'BYOK', '2026-01-01T00:00:00Z')"
        ),
        format!(
            "INSERT INTO billing_applied (workspace_id, instance, revision, mode, reported_at) \
                 VALUES ('{id}', 'pod-1', 0, 'byok', '2026-01-01T00:00:00Z')"
        ),
        format!(
            "INSERT INTO billing_applied (workspace_id, instance, revision, mode, reported_at) \
                 VALUES ('{id}', '', 1, 'byok', '2026-01-01T00:00:00Z')"
        ),
    ] {
        let err = h.execute(&sql).await.expect_err(&sql);
        let sqlx::Error::Database(db) = &err else {
            panic!("expected a database error for {sql}, got {err:?}");
        };
        assert!(db.is_check_violation(), "{sql}: {db:?}");
    }
}

async fn list_after_pages_every_record_once_in_workspace_id_order(h: &mut Harness) {
    let store = h.store();
    // Ids at both ends of the range and ones differing only in a letter
    // digit: the order must be the UUID's (byte) order on both backends.
    let mut ids: Vec<WorkspaceId> = [
        "00000000-0000-0000-0000-000000000000",
        "ffffffff-ffff-ffff-ffff-ffffffffffff",
        "0000000a-0000-4000-8000-000000000000",
        "00000009-0000-4000-8000-000000000000",
        "A0000000-0000-4000-8000-000000000000",
    ]
    .iter()
    .map(|s| WorkspaceId::parse(s).unwrap())
    .collect();
    ids.extend((0..20).map(|_| WorkspaceId::new_random()));
    for (i, id) in ids.iter().enumerate() {
        write(&*store, *id, &set_model(&format!("model-{i}")), None)
            .await
            .expect("create");
    }
    let mut listed = Vec::new();
    let mut after = None;
    loop {
        let page = store.list_after(after, 7).await.expect("list_after");
        assert!(page.len() <= 7, "a page holds at most the limit");
        let Some(last) = page.last() else { break };
        after = Some(last.workspace_id);
        listed.extend(page);
    }
    let listed_ids: Vec<WorkspaceId> = listed.iter().map(|r| r.workspace_id).collect();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(listed_ids, expected, "every record once, in id order");
    for r in &listed {
        assert_eq!(r, &load(&*store, r.workspace_id).await, "listed as loaded");
    }
    assert!(store
        .list_after(Some(*expected.last().unwrap()), 7)
        .await
        .unwrap()
        .is_empty());
}

async fn a_batch_creates_the_missing_in_one_commit_and_leaves_the_existing_untouched(
    h: &mut Harness,
) {
    let store = h.store();
    let existing = WorkspaceId::new_random();
    write(&*store, existing, &set_model("haiku"), None)
        .await
        .unwrap();
    let before = store.log_state().await.unwrap();
    let (a, b) = (WorkspaceId::new_random(), WorkspaceId::new_random());
    let make_a = set(Patch {
        runtime: Some(Some(runtime("claude-code"))),
        model: Some(Some(model("opus"))),
        credential_keys: Some(keys(&["CLAUDE_CODE_OAUTH_TOKEN"])),
        ..Patch::default()
    });
    let (make_e, make_b) = (set_model("opus"), set_override(Mode::Byok));
    let a_again = set_model("sonnet");
    let creates = [
        Create {
            workspace_id: a,
            change: &make_a,
        },
        Create {
            workspace_id: existing,
            change: &make_e,
        },
        Create {
            workspace_id: b,
            change: &make_b,
        },
        // The same workspace again: the first item created it.
        Create {
            workspace_id: a,
            change: &a_again,
        },
    ];
    let out = store
        .create_batch(&creates, "importer", "adopt: day one")
        .await
        .expect("create_batch");
    let a_record = Record {
        revision: 1,
        ..make_a.apply(&Record::new(a))
    };
    let b_record = Record {
        revision: 1,
        ..make_b.apply(&Record::new(b))
    };
    let e_record = load(&*store, existing).await;
    assert_eq!(e_record.model, Stored::Valid(model("haiku")), "untouched");
    assert_eq!(e_record.revision, 1);
    assert_eq!(
        out,
        vec![
            CreateOutcome::Created(a_record.clone()),
            CreateOutcome::Existing(e_record.clone()),
            CreateOutcome::Created(b_record.clone()),
            CreateOutcome::Existing(a_record.clone()),
        ],
        "{}",
        h.backend_name()
    );
    assert_eq!(load(&*store, a).await, a_record);
    assert_eq!(load(&*store, b).await, b_record);
    // One audit row per created workspace, with the actor and reason.
    for (id, record) in [(a, &a_record), (b, &b_record)] {
        let audit = history(&*store, id).await;
        assert_eq!(audit.len(), 1);
        assert_eq!(
            (
                audit[0].revision,
                audit[0].actor.as_str(),
                audit[0].reason.as_str()
            ),
            (1, "importer", "adopt: day one")
        );
        assert_eq!(audit[0].before, None);
        assert_eq!(audit[0].after, *record);
    }
    assert_eq!(history(&*store, existing).await.len(), 1);
    // One change-log position per created workspace, in batch order.
    let (changes, state) = store
        .changes_after(before.last_position, 100)
        .await
        .unwrap();
    assert_eq!(state.last_position, before.last_position + 2);
    let logged: Vec<(u64, Record)> = changes
        .into_iter()
        .map(|c| (c.position, c.record))
        .collect();
    assert_eq!(
        logged,
        vec![
            (before.last_position + 1, a_record.clone()),
            (before.last_position + 2, b_record.clone())
        ]
    );
    let mut records = Vec::new();
    let position = store.snapshot(&mut |r| records.push(r)).await.unwrap();
    assert_eq!(position, before.last_position + 2);
    assert_eq!(records.len(), 3);

    // Nothing to create: nothing written, nothing logged.
    let again = store
        .create_batch(&creates[..2], "importer", "again")
        .await
        .unwrap();
    assert!(again
        .iter()
        .all(|o| matches!(o, CreateOutcome::Existing(_))));
    assert!(store
        .create_batch(&[], "importer", "none")
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.log_state().await.unwrap(), state);

    // A change that cannot create fails the whole batch before any write.
    let c = WorkspaceId::new_random();
    let make_c = set_model("opus");
    let bad = [
        Create {
            workspace_id: c,
            change: &make_c,
        },
        Create {
            workspace_id: WorkspaceId::new_random(),
            change: &Change::ClearOverride,
        },
    ];
    assert!(matches!(
        store.create_batch(&bad, "importer", "bad").await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(store.load(&c).await.unwrap(), None);
    assert_eq!(store.log_state().await.unwrap(), state);
}

async fn batches_and_single_creates_of_the_same_workspaces_at_once_never_overwrite_each_other(
    h: &mut Harness,
) {
    const N: usize = 200;
    let store = h.store();
    let ids: Arc<Vec<WorkspaceId>> = Arc::new((0..N).map(|_| WorkspaceId::new_random()).collect());
    // Two batches of every workspace (one in reverse order) and a create-only
    // Set of each, all at once; each names itself in the model it writes.
    let batch = |name: &'static str, reverse: bool| {
        let (store, ids) = (store.clone(), ids.clone());
        tokio::spawn(async move {
            let change = set_model(name);
            let mut order: Vec<WorkspaceId> = ids.to_vec();
            if reverse {
                order.reverse();
            }
            let creates: Vec<Create<'_>> = order
                .iter()
                .map(|id| Create {
                    workspace_id: *id,
                    change: &change,
                })
                .collect();
            let out = store
                .create_batch(&creates, name, "race")
                .await
                .expect("a batch failed");
            order.into_iter().zip(out).collect::<Vec<_>>()
        })
    };
    let first = batch("batch-1", false);
    let second = batch("batch-2", true);
    let singles: Vec<_> = ids
        .iter()
        .rev()
        .map(|id| {
            let (store, id) = (store.clone(), *id);
            tokio::spawn(async move {
                let r =
                    write_as(&*store, id, &set_model("single"), Some(0), "single", "race").await;
                (id, r)
            })
        })
        .collect();
    let mut creator: std::collections::HashMap<WorkspaceId, Vec<&str>> = Default::default();
    let mut answered: Vec<(WorkspaceId, Record)> = Vec::new();
    for (name, task) in [("batch-1", first), ("batch-2", second)] {
        for (id, outcome) in task.await.expect("task") {
            match outcome {
                CreateOutcome::Created(r) => {
                    creator.entry(id).or_default().push(name);
                    answered.push((id, r));
                }
                CreateOutcome::Existing(r) => answered.push((id, r)),
            }
        }
    }
    for task in singles {
        match task.await.expect("task") {
            (id, Ok(r)) => {
                creator.entry(id).or_default().push("single");
                answered.push((id, r));
            }
            (_, result) => assert_mismatch(result, 0, Some(1)),
        }
    }
    assert_eq!(creator.len(), N);
    for id in ids.iter() {
        let who = &creator[id];
        assert_eq!(who.len(), 1, "exactly one creator: {who:?}");
        let record = load(&*store, *id).await;
        assert_eq!(record.revision, 1, "never overwritten");
        assert_eq!(record.model, Stored::Valid(model(who[0])));
        let audit = history(&*store, *id).await;
        assert_eq!(audit.len(), 1);
        assert_eq!(audit[0].actor, who[0]);
    }
    for (id, r) in &answered {
        assert_eq!(r, &load(&*store, *id).await, "every answer is the record");
    }
    // Each creation logged exactly once, at dense positions.
    let (changes, state) = store.changes_after(0, 10 * N as u32).await.unwrap();
    assert_eq!(state.last_position, N as u64);
    let positions: Vec<u64> = changes.iter().map(|c| c.position).collect();
    assert_eq!(positions, (1..=N as u64).collect::<Vec<_>>());
    let logged: BTreeSet<WorkspaceId> = changes.iter().map(|c| c.record.workspace_id).collect();
    assert_eq!(logged.len(), N);
}

async fn the_snapshot_visits_every_record_once_as_of_its_position(h: &mut Harness) {
    let store = h.store();
    let position = store
        .snapshot(&mut |r| panic!("an empty store has no record to visit: {r:?}"))
        .await
        .expect("snapshot of an empty store");
    assert_eq!(position, 0, "no change was ever made");

    // Records created, some changed again.
    let ids: Vec<WorkspaceId> = (0..30).map(|_| WorkspaceId::new_random()).collect();
    for (i, id) in ids.iter().enumerate() {
        write(&*store, *id, &set_model(&format!("model-{i}")), None)
            .await
            .expect("create");
        if i % 3 == 0 {
            write(&*store, *id, &set_override(Mode::Byok), None)
                .await
                .expect("update");
        }
    }

    // Once the first record has been handed over, other connections commit
    // changes to ten of the records and create another: the snapshot, still
    // being read, must show none of them.
    let newcomer = WorkspaceId::new_random();
    let runtime = tokio::runtime::Handle::current();
    let writer = store.clone();
    let changed = ids[..10].to_vec();
    let mut wrote_meanwhile = false;
    let mut visited: Vec<Record> = Vec::new();
    let position = store
        .snapshot(&mut |record| {
            if !wrote_meanwhile {
                wrote_meanwhile = true;
                tokio::task::block_in_place(|| {
                    runtime.block_on(async {
                        for id in &changed {
                            write(&*writer, *id, &set_override(Mode::Disabled), None)
                                .await
                                .expect("a change while the snapshot is read");
                        }
                        write(&*writer, newcomer, &set_model("late"), None)
                            .await
                            .expect("a creation while the snapshot is read");
                    })
                });
            }
            visited.push(record);
        })
        .await
        .expect("snapshot");
    assert!(wrote_meanwhile);

    // The state at `position`, from the change log: the latest record of
    // each workspace among the changes at or below it.
    let (log, state) = store.changes_after(0, 1000).await.expect("the log");
    assert_eq!(
        state.last_position,
        position + 11,
        "the eleven changes made meanwhile come after the snapshot's position"
    );
    let mut at_position = std::collections::BTreeMap::new();
    for change in log.iter().filter(|c| c.position <= position) {
        at_position.insert(change.record.workspace_id, change.record.clone());
    }
    let expected: Vec<Record> = at_position.into_values().collect();
    assert_eq!(expected.len(), ids.len());
    assert_eq!(
        visited, expected,
        "every record once, in workspace-id order, as of the snapshot's position"
    );
    assert!(visited.iter().all(|r| r.workspace_id != newcomer));

    // A snapshot taken now shows every change, at the log's end.
    let mut now: Vec<Record> = Vec::new();
    let position = store
        .snapshot(&mut |r| now.push(r))
        .await
        .expect("second snapshot");
    assert_eq!(position, state.last_position);
    let mut expected_ids = ids.clone();
    expected_ids.push(newcomer);
    expected_ids.sort();
    assert_eq!(
        now.iter().map(|r| r.workspace_id).collect::<Vec<_>>(),
        expected_ids
    );
    for r in &now {
        assert_eq!(r, &load(&*store, r.workspace_id).await, "visited as loaded");
    }
    for id in &changed {
        assert_eq!(
            load(&*store, *id).await.override_mode,
            Stored::Valid(Mode::Disabled)
        );
    }
}

async fn pruning_drops_the_changes_before_the_cutoff_and_never_moves_back(h: &mut Harness) {
    let store = h.store();
    let id = WorkspaceId::new_random();
    for m in ["opus", "haiku", "sonnet"] {
        write(&*store, id, &set_model(m), None).await.unwrap();
    }
    let start = store.log_state().await.unwrap();
    assert_eq!((start.last_position, start.pruned_through), (3, 0));

    // Nothing committed before the cutoff: nothing goes.
    let long_ago = Utc::now() - Duration::days(1);
    assert_eq!(store.prune_changes(long_ago).await.unwrap(), 0);
    let (kept, _) = store.changes_after(0, 10).await.unwrap();
    assert_eq!(kept.len(), 3);

    // Everything committed before it goes, oldest first.
    let later = Utc::now() + Duration::seconds(1);
    assert_eq!(store.prune_changes(later).await.unwrap(), 3);
    let (kept, state) = store.changes_after(0, 10).await.unwrap();
    assert!(kept.is_empty(), "{kept:?}");
    assert_eq!((state.last_position, state.pruned_through), (3, 3));

    // An earlier cutoff never moves it back; new changes keep their places.
    write(&*store, id, &set_model("opus"), None).await.unwrap();
    assert_eq!(store.prune_changes(long_ago).await.unwrap(), 3);
    let (kept, state) = store.changes_after(0, 10).await.unwrap();
    assert_eq!(kept.iter().map(|c| c.position).collect::<Vec<_>>(), vec![4]);
    assert_eq!((state.last_position, state.pruned_through), (4, 3));
}

async fn database_errors_keep_their_class(h: &mut Harness) {
    let store = h.store();
    let id = WorkspaceId::new_random();
    write(&*store, id, &set_override(Mode::Byok), None)
        .await
        .unwrap();
    // A constraint violation: a bug, not an outage.
    let err = h
        .execute(&format!(
            "UPDATE billing_records SET override_mode = 'bogus' WHERE workspace_id = '{id}'"
        ))
        .await
        .expect_err("the CHECK refuses it");
    let class = super::classify(err);
    assert!(matches!(class, StoreError::Internal { .. }), "{class:?}");
    // A statement the database cannot parse: a bug.
    let err = h.execute("SELEC 1").await.expect_err("a syntax error");
    let class = super::classify(err);
    assert!(matches!(class, StoreError::Internal { .. }), "{class:?}");
    // A table that is not there (dropped, being restored): retry later.
    let err = h
        .execute("SELECT 1 FROM billing_no_such_table")
        .await
        .expect_err("no such table");
    let class = super::classify(err);
    assert!(matches!(class, StoreError::Unavailable(_)), "{class:?}");
    // The cause stays the source, for the logs.
    let chain = crate::service::error::ErrorChain(&class).to_string();
    assert!(chain.contains("billing_no_such_table"), "{chain}");
}

async fn an_audit_entry_that_is_not_the_fields_json_is_corrupt(h: &mut Harness) {
    let store = h.store();
    let id = WorkspaceId::new_random();
    write(&*store, id, &set_override(Mode::Byok), None)
        .await
        .unwrap();
    // Valid JSON (Postgres checks that) but not the fields' shape.
    h.execute(&format!(
        "UPDATE billing_audit SET after = '{{\"runtime\": 5}}' WHERE workspace_id = '{id}'"
    ))
    .await
    .expect("a raw UPDATE");
    let err = store
        .history(&id, None, 10)
        .await
        .expect_err("the entry cannot be read");
    let StoreError::Corrupt { what, source } = &err else {
        panic!("expected Corrupt, got {err:?}");
    };
    assert_eq!(what, "audit fields");
    assert!(source.is_some(), "the JSON error is kept as the source");
    // The record itself still loads.
    assert_eq!(load(&*store, id).await.revision, 1);
}

// ---------------------------------------------------------------------------
// Postgres only: loads that wait go together (`store::pg_batch`)
// ---------------------------------------------------------------------------

/// `PoolSize::reads_in_flight` decides how many loads read at once; unset,
/// one per 16 read connections (rounded up); never more than there are.
#[tokio::test]
async fn reads_in_flight_is_the_setting_or_one_per_16_connections() {
    let test = "reads_in_flight_is_the_setting_or_one_per_16_connections";
    let Some((h, schema)) = Harness::postgres(test).await else {
        return;
    };
    let Backend::Postgres { opts, .. } = &h.backend else {
        unreachable!("a Postgres harness");
    };
    let opts = opts.clone();
    run(
        async move {
            let size = |max_connections, reads_in_flight| PoolSize {
                max_connections,
                reads_in_flight,
            };
            for (size, want) in [
                (PoolSize::default(), 1),
                (size(Some(8), None), 1),
                (size(Some(17), None), 2),
                (size(Some(64), None), 4),
                (size(Some(1), None), 1),
                (size(None, Some(1)), 1),
                (size(Some(8), Some(3)), 3),
                (size(Some(2), Some(5)), 2),
            ] {
                let store = PostgresStore::open(opts.clone(), size)
                    .await
                    .expect("open the store");
                assert_eq!(store.dialect().reads_in_flight(), want, "{size:?}");
                store.pool().close().await;
            }
            h.close().await;
        },
        Some(schema),
    )
    .await;
}

/// A load that holds the one turn and is cancelled hands the turn on: the
/// loads waiting behind it are read (together) and each gets its own row,
/// a workspace asked for twice included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_load_hands_its_turn_to_the_loads_waiting() {
    use super::{pg_batch::Batcher, pg_reads::ReadPool};

    let test = "a_cancelled_load_hands_its_turn_to_the_loads_waiting";
    let Some((h, schema)) = Harness::postgres(test).await else {
        return;
    };
    run(
        async move {
            let store = h.store();
            let ids: Vec<WorkspaceId> = (0..3).map(|_| WorkspaceId::new_random()).collect();
            for (i, id) in ids.iter().enumerate() {
                write(&*store, *id, &set_model(&format!("model-{i}")), None)
                    .await
                    .expect("write");
            }
            let Backend::Postgres { opts, .. } = &h.backend else {
                unreachable!("a Postgres harness")
            };
            let one = "SELECT model FROM billing_records WHERE workspace_id = $1::uuid";
            let many = PgDialect::load_many("model").expect("Postgres reads together");
            let reads = Arc::new(
                ReadPool::new(opts.clone(), 1, std::time::Duration::from_secs(5)).expect("pool"),
            );
            let batcher = Arc::new(Batcher::new(1));

            // The pool's one connection is taken, so the first load takes the
            // one turn and then waits for a connection.
            let held = reads.hold().await;
            let mut first = Box::pin(batcher.load(&reads, one, &many, ids[0].to_string()));
            tokio::select! {
                biased;
                _ = &mut first => panic!("the first load finished without a connection"),
                _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
            }
            let waiting: Vec<_> = [1, 2, 1]
                .into_iter()
                .map(|i| {
                    let (reads, batcher, many) = (reads.clone(), batcher.clone(), many.clone());
                    let id = ids[i];
                    tokio::spawn(async move {
                        let row = batcher.load(&reads, one, &many, id.to_string()).await;
                        (i, row)
                    })
                })
                .collect();
            // All three queue for the turn the first load holds (however
            // long the machine takes to run their tasks).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while batcher.waiting() < 3 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the loads did not queue for the turn: {} waiting",
                    batcher.waiting()
                );
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            drop(first);
            drop(held);
            for w in waiting {
                let (i, row) = tokio::time::timeout(std::time::Duration::from_secs(10), w)
                    .await
                    .expect("the waiting loads were answered (the turn was handed on)")
                    .expect("load task");
                let row = row.expect("load").expect("a stored workspace");
                assert_eq!(row.get::<String, _>("model"), format!("model-{i}"));
            }
            assert_eq!(
                batcher
                    .answered_together
                    .load(std::sync::atomic::Ordering::Relaxed),
                2,
                "the three waiting loads were read by one statement"
            );
        },
        Some(schema),
    )
    .await;
}

/// A TCP proxy to Postgres at `target` that, once armed, cuts the
/// connection at the next `COMMIT`: with [`FORWARD_THEN_CUT`] after
/// forwarding it, instead of relaying its answer (a commit the database
/// made whose answer the store never gets); with [`CUT_BEFORE`] without
/// forwarding it (the database rolls back). Disarms itself when it has cut.
async fn commit_cutting_proxy(
    target: (String, u16),
    armed: Arc<std::sync::atomic::AtomicU8>,
) -> u16 {
    use std::sync::atomic::Ordering::SeqCst;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (target, armed) = (target.clone(), armed.clone());
            tokio::spawn(async move {
                let Ok(server) =
                    tokio::net::TcpStream::connect((target.0.as_str(), target.1)).await
                else {
                    return;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let cutting = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let up = {
                    let cutting = cutting.clone();
                    async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match client_read.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            let commit = buf[..n].windows(7).any(|w| w == b"COMMIT\0");
                            let how = if commit { armed.swap(0, SeqCst) } else { 0 };
                            if how != 0 {
                                cutting.store(true, SeqCst);
                                if how == FORWARD_THEN_CUT {
                                    let _ = server_write.write_all(&buf[..n]).await;
                                }
                                // Time for the database to commit; then cut.
                                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                                return;
                            }
                            if server_write.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                };
                let down = async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match server_read.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if cutting.load(SeqCst) {
                            // The answer to the cut commit is never relayed.
                            std::future::pending::<()>().await;
                        }
                        if client_write.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                };
                tokio::select! {
                    () = up => {}
                    () = down => {}
                }
            });
        }
    });
    port
}

const FORWARD_THEN_CUT: u8 = 1;
const CUT_BEFORE: u8 = 2;

/// The connection is lost while `COMMIT` is answered: the database made the
/// write, so the write is answered as made, not as UNAVAILABLE ("no
/// decision was made, retry"), after which the caller's retry would meet
/// its own write as a revision mismatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_commit_answer_is_lost_is_answered_as_made_when_it_was() {
    let test = "a_write_whose_commit_answer_is_lost_is_answered_as_made_when_it_was";
    let Some((h, schema)) = Harness::postgres(test).await else {
        return;
    };
    run(
        async move {
            let Backend::Postgres { opts, .. } = &h.backend else {
                unreachable!("a Postgres harness")
            };
            use std::sync::atomic::Ordering::SeqCst;
            let armed = Arc::new(std::sync::atomic::AtomicU8::new(0));
            let port =
                commit_cutting_proxy((opts.get_host().to_owned(), opts.get_port()), armed.clone())
                    .await;
            let store = PostgresStore::connect(
                opts.clone().host("127.0.0.1").port(port),
                PoolSize::default(),
            )
            .await
            .expect("connect through the proxy");
            let id = WorkspaceId::new_random();
            write(&store, id, &set_model("opus"), None)
                .await
                .expect("first write");
            armed.store(FORWARD_THEN_CUT, SeqCst);
            let after = write(&store, id, &set_model("sonnet"), Some(1))
                .await
                .expect("the commit was made: answered as made");
            assert_eq!(armed.load(SeqCst), 0, "the proxy cut the commit's answer");
            assert_eq!(after.revision, 2);
            assert_eq!(load(&store, id).await, after);
            assert_eq!(revisions(&history(&store, id).await), vec![2, 1]);
            // A commit that never reached the database is not made, and not
            // answered as made: the store is unavailable, nothing changed.
            armed.store(CUT_BEFORE, SeqCst);
            let lost = store
                .write(Write {
                    workspace_id: id,
                    change: &set_model("haiku"),
                    expected_revision: Some(2),
                    actor: "test",
                    reason: "test",
                })
                .await;
            assert_eq!(armed.load(SeqCst), 0, "the proxy cut the commit");
            assert!(matches!(lost, Err(StoreError::Unavailable(_))), "{lost:?}");
            assert_eq!(load(&store, id).await, after);
            assert_eq!(revisions(&history(&store, id).await), vec![2, 1]);
            h.close().await;
        },
        Some(schema),
    )
    .await;
}
