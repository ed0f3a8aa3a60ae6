//! The store's operation metric:
//! `billing_mode_store_operation_duration_seconds{operation, outcome}`.
//!
//! Every operation of the SQL store (`sql.rs`) runs in [`timed`], inside its
//! span, so a new operation is measured like the others.

use std::{future::Future, time::Instant};

use super::StoreError;

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
