//! CheckSpend: the metering proxy's question, answered from this replica's
//! in-memory spend snapshot (no store round trip), or not at all.

use super::error::{ApiError, ErrorReason};
use crate::wire::convert;
use crate::{
    auth::Principal,
    proto,
    snapshot::{SpendError, SpendSnapshot},
    store::StoreError,
};

/// `allowed` only while the current decision is platform_managed; an error
/// whenever the snapshot cannot vouch for its answer.
pub fn check_spend(
    snapshot: &SpendSnapshot,
    who: &Principal,
    req: &proto::CheckSpendRequest,
) -> Result<proto::CheckSpendResponse, ApiError> {
    let id = convert::workspace_id(&req.workspace_id)?;
    match snapshot.check(&id) {
        Ok(answer) => {
            tracing::debug!(
                target: "billing_mode::decision",
                rpc = "CheckSpend",
                actor = %who.name,
                workspace = %id,
                mode = answer.mode.as_str(),
                revision = answer.revision,
                allowed = answer.allowed(),
                "spend"
            );
            Ok(proto::CheckSpendResponse {
                allowed: answer.allowed(),
                mode: convert::mode_to_wire(answer.mode).into(),
                revision: answer.revision,
                as_of: Some(answer.as_of.into()),
            })
        }
        Err(SpendError::NotFound) => Err(StoreError::NotFound.into()),
        Err(SpendError::Stale) => Err(ApiError::new(
            ErrorReason::StoreUnavailable,
            format!(
                "this replica cannot confirm its spend snapshot is current (within {:?}); \
                 refuse the platform-billed call, retry or ask another replica",
                snapshot.max_staleness()
            ),
        )),
        Err(SpendError::Undecidable) => Err(ApiError::new(
            ErrorReason::StoreUnavailable,
            "this workspace's stored state cannot be represented in the spend snapshot; \
             refuse the platform-billed call",
        )),
    }
}
