//! Applied reports: per (workspace, instance), the latest report of the
//! revision and mode an instance was started with (`billing_applied`).
//!
//! The statements are the SQL store's (`sql.rs`); a row is read here.

use super::{record_from_row, revision_from_db, StoreError};
use crate::domain::{Instance, Mode, Record, WorkspaceId};
use chrono::{DateTime, Utc};

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

/// A report row joined with its record's columns.
pub(crate) fn applied_from_row<'r, R>(row: &'r R) -> Result<(AppliedReport, Record), StoreError>
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
