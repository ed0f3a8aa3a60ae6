//! Applied reports: per (workspace, instance), the latest report of the
//! revision and mode an instance was started with (`billing_applied`).
//!
//! The statements are the SQL store's (`sql.rs`); a row is read in `row.rs`.

use crate::domain::{Instance, Mode, WorkspaceId};
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
