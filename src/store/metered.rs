//! A [`Store`] that times every operation of the store it wraps into
//! `billing_mode_store_operation_duration_seconds{operation, outcome}`.
//!
//! The server wraps its store in this at start-up. A new store operation is
//! forwarded here through [`timed`], so it is measured like the others.

use std::{future::Future, sync::Arc, time::Instant};

use async_trait::async_trait;

use chrono::{DateTime, Utc};

use super::{
    AppliedReport, AuditEntry, ChangeListener, Create, CreateOutcome, LogState, LoggedChange,
    PoolStatus, Store, StoreError, Visit, Write,
};
use crate::domain::{Record, WorkspaceId};

pub struct MeteredStore {
    inner: Arc<dyn Store>,
}

impl std::fmt::Debug for MeteredStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredStore")
            .field("inner", &self.inner.backend())
            .finish()
    }
}

impl MeteredStore {
    pub fn wrap(inner: Arc<dyn Store>) -> Arc<dyn Store> {
        Arc::new(MeteredStore { inner })
    }
}

/// The outcome label of a store result: a closed set.
pub fn outcome<T>(r: &Result<T, StoreError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(StoreError::NotFound) => "not_found",
        Err(StoreError::RevisionMismatch { .. }) => "revision_mismatch",
        Err(StoreError::Corrupt { .. }) => "corrupt",
        Err(StoreError::Internal { .. }) => "internal",
        Err(StoreError::Unavailable(_)) => "unavailable",
    }
}

/// Runs `op`, recording its duration under `operation` and its outcome.
pub async fn timed<T>(
    operation: &'static str,
    op: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let start = Instant::now();
    let r = op.await;
    crate::metrics::global()
        .store_operation_duration
        .with_label_values(&[operation, outcome(&r)])
        .observe(start.elapsed().as_secs_f64());
    r
}

#[async_trait]
impl Store for MeteredStore {
    async fn load(&self, workspace_id: &WorkspaceId) -> Result<Option<Record>, StoreError> {
        timed("load", self.inner.load(workspace_id)).await
    }

    async fn write(&self, write: Write<'_>) -> Result<Record, StoreError> {
        timed("write", self.inner.write(write)).await
    }

    async fn create_batch(
        &self,
        creates: &[Create<'_>],
        actor: &str,
        reason: &str,
    ) -> Result<Vec<CreateOutcome>, StoreError> {
        timed(
            "create_batch",
            self.inner.create_batch(creates, actor, reason),
        )
        .await
    }

    async fn dry_run(&self, write: Write<'_>) -> Result<Record, StoreError> {
        timed("dry_run", self.inner.dry_run(write)).await
    }

    async fn history(
        &self,
        workspace_id: &WorkspaceId,
        before_revision: Option<u64>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        timed(
            "history",
            self.inner.history(workspace_id, before_revision, limit),
        )
        .await
    }

    async fn record_applied(&self, report: &AppliedReport) -> Result<(), StoreError> {
        timed("record_applied", self.inner.record_applied(report)).await
    }

    async fn applied_reports(&self) -> Result<Vec<(AppliedReport, Record)>, StoreError> {
        timed("applied_reports", self.inner.applied_reports()).await
    }

    async fn list_after(
        &self,
        after: Option<WorkspaceId>,
        limit: u32,
    ) -> Result<Vec<Record>, StoreError> {
        timed("list_after", self.inner.list_after(after, limit)).await
    }

    async fn log_state(&self) -> Result<LogState, StoreError> {
        timed("log_state", self.inner.log_state()).await
    }

    async fn changes_after(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<(Vec<LoggedChange>, LogState), StoreError> {
        timed("changes_after", self.inner.changes_after(after, limit)).await
    }

    async fn snapshot(&self, visit: Visit<'_>) -> Result<u64, StoreError> {
        timed("snapshot", self.inner.snapshot(visit)).await
    }

    async fn prune_changes(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        timed("prune_changes", self.inner.prune_changes(before)).await
    }

    async fn listen(&self) -> Result<Box<dyn ChangeListener>, StoreError> {
        timed("listen", self.inner.listen()).await
    }

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        timed("ping", self.inner.ping()).await
    }

    async fn pending_migrations(&self) -> Result<usize, StoreError> {
        timed("pending_migrations", self.inner.pending_migrations()).await
    }

    fn pool_status(&self) -> PoolStatus {
        self.inner.pool_status()
    }
}
