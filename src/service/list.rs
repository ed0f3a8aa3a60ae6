//! ListWorkspaces: every workspace's decision, page by page, in workspace-id
//! order.
//!
//! Pages are keyed on the last workspace id *scanned* (keyset paging on the
//! primary key), so a listing sees every workspace that existed throughout
//! exactly once, whatever is written meanwhile. Mode and source are
//! properties of the decision, not stored columns: each scanned record is
//! decided with the one [`resolve`] and the filters apply to that decision.
//! A filter that matches few workspaces must not make one page read the
//! whole table, so a page stops after [`MAX_SCANNED_PER_PAGE`] records and
//! may then hold fewer entries than asked for (even none) with a
//! `next_page_token` to continue from.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};

use crate::{
    domain::{resolve, Mode, Registry, Source, WorkspaceId},
    proto,
    store::Store,
};

use super::error::{ApiError, ErrorReason};
use crate::wire::convert;

/// The most records one page reads before answering.
pub(super) const MAX_SCANNED_PER_PAGE: u32 = 2000;
/// Records read from the store per round trip.
const BATCH: u32 = 500;
/// Versions the token format, so it can change without misreading old ones.
const TOKEN_PREFIX: &str = "ws1:";

/// What one request asks for, validated before any I/O.
struct Query {
    page_size: u32,
    after: Option<WorkspaceId>,
    mode: Option<Mode>,
    source: Option<Source>,
}

fn query(req: &proto::ListWorkspacesRequest) -> Result<Query, ApiError> {
    let mode = convert::mode_filter(req.mode)?;
    let source = convert::source_filter(req.source)?;
    Ok(Query {
        page_size: convert::page_size(req.page_size),
        after: decode_token(&req.page_token)?,
        mode,
        source,
    })
}

/// Base64 of `ws1:ID`, a dot, and a check value of that text, so that a
/// token the service did not hand out (mangled, or made up in the same
/// form) is refused rather than read as another position.
fn encode_token(last_scanned: WorkspaceId) -> String {
    let text = format!("{TOKEN_PREFIX}{last_scanned}");
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(&text),
        super::page_check("ListWorkspaces", &text)
    )
}

/// The last scanned id a token carries; anything the service did not hand
/// out is refused (the token text is not echoed).
fn decode_token(token: &str) -> Result<Option<WorkspaceId>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    let id = token
        .split_once('.')
        .and_then(|(body, check)| {
            let text = String::from_utf8(URL_SAFE_NO_PAD.decode(body).ok()?).ok()?;
            (check == super::page_check("ListWorkspaces", &text)).then_some(text)
        })
        .and_then(|text| {
            let id = WorkspaceId::parse(text.strip_prefix(TOKEN_PREFIX)?).ok()?;
            // Only the exact form the service writes.
            (text == format!("{TOKEN_PREFIX}{id}")).then_some(id)
        });
    id.map(Some).ok_or_else(|| {
        ApiError::new(
            ErrorReason::InvalidField,
            "page_token: pass the next_page_token of a previous ListWorkspaces response",
        )
    })
}

/// One page of decisions.
pub(super) async fn list_workspaces(
    store: &dyn Store,
    registry: &Registry,
    req: &proto::ListWorkspacesRequest,
) -> Result<proto::ListWorkspacesResponse, ApiError> {
    let q = query(req)?;
    let wanted = q.page_size as usize;
    let mut resolutions = Vec::with_capacity(wanted.min(64));
    let mut last_scanned = q.after;
    let mut scanned = 0u32;
    let mut exhausted = false;
    'scan: while resolutions.len() < wanted && scanned < MAX_SCANNED_PER_PAGE {
        let limit = BATCH.min(MAX_SCANNED_PER_PAGE - scanned);
        let batch = store.list_after(last_scanned, limit).await?;
        let complete = batch.len() < limit as usize;
        for record in &batch {
            scanned += 1;
            last_scanned = Some(record.workspace_id);
            let r = resolve(record, registry);
            if q.mode.is_none_or(|m| m == r.mode) && q.source.is_none_or(|s| s == r.source) {
                resolutions.push(convert::resolution_to_wire(r));
                if resolutions.len() == wanted {
                    // The rest of the batch is read again by the next page.
                    exhausted =
                        complete && record.workspace_id == batch[batch.len() - 1].workspace_id;
                    break 'scan;
                }
            }
        }
        if complete {
            exhausted = true;
            break;
        }
    }
    let next_page_token = match (exhausted, last_scanned) {
        (false, Some(last)) => encode_token(last),
        _ => String::new(),
    };
    Ok(proto::ListWorkspacesResponse {
        resolutions,
        next_page_token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_and_nothing_else_is_accepted() {
        let id = WorkspaceId::parse("6b66de8d-9337-4fb4-be8d-6d49dca0d809").unwrap();
        assert_eq!(decode_token(&encode_token(id)).unwrap(), Some(id));
        assert_eq!(decode_token("").unwrap(), None);
        let upper = URL_SAFE_NO_PAD.encode("ws1:6B66DE8D-9337-4FB4-BE8D-6D49DCA0D809");
        let other_version = URL_SAFE_NO_PAD.encode("ws2:6b66de8d-9337-4fb4-be8d-6d49dca0d809");
        for bad in [
            "6b66de8d-9337-4fb4-be8d-6d49dca0d809",
            "not base64!",
            "d3Mx",
            upper.as_str(),
            other_version.as_str(),
        ] {
            let e = decode_token(bad).unwrap_err();
            assert_eq!(e.reason, ErrorReason::InvalidField, "{bad}");
            assert!(!e.message.contains(bad), "the token is not echoed");
        }
    }
}
