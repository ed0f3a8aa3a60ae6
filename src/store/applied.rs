//! Applied reports: per (workspace, instance), the latest report of the
//! revision and mode an instance was started with (`billing_applied`).
//!
//! The SQL differs between the backends only in casts, so each statement is
//! written once per backend here and the rows are read by one generic reader.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, SqlitePool};

use super::{record_from_row, revision_from_db, revision_to_db, StoreError};
use crate::domain::{Instance, Mode, Record, WorkspaceId};

/// One instance's latest report of the env it runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedReport {
    pub workspace_id: WorkspaceId,
    pub instance: Instance,
    /// The record's revision the applied env was built at.
    pub revision: u64,
    /// The mode of that env.
    pub mode: Mode,
    pub reported_at: DateTime<Utc>,
}

const UPSERT_PG: &str =
    "INSERT INTO billing_applied (workspace_id, instance, revision, mode, reported_at) \
     VALUES ($1::uuid, $2, $3, $4, $5) ON CONFLICT (workspace_id, instance) DO UPDATE \
     SET revision = excluded.revision, mode = excluded.mode, reported_at = excluded.reported_at";

const UPSERT_SQLITE: &str =
    "INSERT INTO billing_applied (workspace_id, instance, revision, mode, reported_at) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (workspace_id, instance) DO UPDATE \
     SET revision = excluded.revision, mode = excluded.mode, reported_at = excluded.reported_at";

const SELECT_PG: &str = "SELECT a.workspace_id::text AS workspace_id, a.instance, \
     a.revision AS applied_revision, a.mode, a.reported_at, r.runtime, r.model, \
     r.credential_keys::text AS credential_keys, r.override_mode, r.revision \
     FROM billing_applied a JOIN billing_records r ON r.workspace_id = a.workspace_id \
     ORDER BY a.workspace_id, a.instance";

const SELECT_SQLITE: &str = "SELECT a.workspace_id AS workspace_id, a.instance, \
     a.revision AS applied_revision, a.mode, a.reported_at, r.runtime, r.model, \
     r.credential_keys, r.override_mode, r.revision \
     FROM billing_applied a JOIN billing_records r ON r.workspace_id = a.workspace_id \
     ORDER BY a.workspace_id, a.instance";

pub(crate) async fn record_pg(pool: &PgPool, r: &AppliedReport) -> Result<(), StoreError> {
    sqlx::query(UPSERT_PG)
        .bind(r.workspace_id.to_string())
        .bind(r.instance.as_str())
        .bind(revision_to_db(r.revision)?)
        .bind(r.mode.as_str())
        .bind(r.reported_at)
        .execute(pool)
        .await?;
    Ok(())
}

pub(crate) async fn record_sqlite(pool: &SqlitePool, r: &AppliedReport) -> Result<(), StoreError> {
    sqlx::query(UPSERT_SQLITE)
        .bind(r.workspace_id.to_string())
        .bind(r.instance.as_str())
        .bind(revision_to_db(r.revision)?)
        .bind(r.mode.as_str())
        .bind(r.reported_at)
        .execute(pool)
        .await?;
    Ok(())
}

pub(crate) async fn list_pg(pool: &PgPool) -> Result<Vec<(AppliedReport, Record)>, StoreError> {
    let rows = sqlx::query(SELECT_PG).fetch_all(pool).await?;
    rows.iter().map(applied_from_row).collect()
}

pub(crate) async fn list_sqlite(
    pool: &SqlitePool,
) -> Result<Vec<(AppliedReport, Record)>, StoreError> {
    let rows = sqlx::query(SELECT_SQLITE).fetch_all(pool).await?;
    rows.iter().map(applied_from_row).collect()
}

/// A report row joined with its record's columns.
fn applied_from_row<'r, R>(row: &'r R) -> Result<(AppliedReport, Record), StoreError>
where
    R: sqlx::Row,
    &'r str: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    DateTime<Utc>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let id: String = row.try_get("workspace_id")?;
    let workspace_id =
        WorkspaceId::parse(&id).map_err(|_| StoreError::corrupt("applied report: workspace id"))?;
    let instance: String = row.try_get("instance")?;
    let instance =
        Instance::parse(&instance).map_err(|_| StoreError::corrupt("applied report: instance"))?;
    let mode: String = row.try_get("mode")?;
    let mode = mode
        .parse::<Mode>()
        .map_err(|_| StoreError::corrupt("applied report: mode"))?;
    let report = AppliedReport {
        workspace_id,
        instance,
        revision: revision_from_db(row.try_get("applied_revision")?)?,
        mode,
        reported_at: row.try_get("reported_at")?,
    };
    let (fields, revision) = record_from_row(row)?;
    Ok((report, fields.into_record(workspace_id, revision)))
}
