//! Applied state and drift: `ReportApplied` and `ListDrift`.
//!
//! The provisioner reports, per instance, the revision and mode of the env it
//! started the instance with. The report is checked against what the authority
//! decided at that revision: the audit log holds the record's fields at every
//! revision, and the same [`resolve`] decides them. A report of an env the
//! authority never built (a revision the record never had, or another mode) is
//! refused. ListDrift lists every reported instance whose applied mode differs
//! from the current decision, oldest `since` first.
//!
//! ListDrift decides every reported instance on each call (the decision needs
//! the registry, so it cannot be made in SQL); walking the audit log is needed
//! only for the drifted ones, and stops at the first revision whose decision
//! matches the applied mode.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::error::{ApiError, ErrorReason};
use crate::wire::convert;
use crate::{
    auth::Principal,
    domain::{resolve, Instance, Mode, Record, Registry, Resolution, WorkspaceId},
    proto,
    store::{AppliedReport, Store, StoreError},
};

/// Audit rows read per round trip while looking for `since`.
const HISTORY_CHUNK: u32 = 200;

/// A validated ReportApplied request.
#[derive(Debug, Clone)]
pub struct ReportInput {
    pub workspace_id: WorkspaceId,
    pub revision: u64,
    pub mode: Mode,
    pub instance: Instance,
}

/// Validates a ReportApplied request before any I/O.
pub fn report_request(req: &proto::ReportAppliedRequest) -> Result<ReportInput, ApiError> {
    let workspace_id = convert::workspace_id(&req.workspace_id)?;
    let mode = convert::applied_mode(req.mode)?;
    let instance = Instance::parse(&req.instance).map_err(|e| ApiError::field("instance", &e))?;
    Ok(ReportInput {
        workspace_id,
        revision: req.revision,
        mode,
        instance,
    })
}

/// The mode the authority decided at `revision` of the workspace whose
/// current record is `record`; `None` when the record never had it.
async fn decided_at(
    store: &dyn Store,
    registry: &Registry,
    record: &Record,
    revision: u64,
) -> Result<Option<Mode>, ApiError> {
    if revision == 0 || revision > record.revision {
        return Ok(None);
    }
    if revision == record.revision {
        return Ok(Some(resolve(record, registry).mode));
    }
    let id = record.workspace_id;
    let entry = store.history(&id, Some(revision + 1), 1).await?;
    match entry.into_iter().next() {
        Some(e) if e.revision == revision => Ok(Some(resolve(&e.after, registry).mode)),
        // Every revision up to the current one has its audit row; a gap is
        // data the service cannot interpret: no answer rather than a guess.
        _ => Err(StoreError::corrupt(format!("no audit row for revision {revision}")).into()),
    }
}

/// ReportApplied: checks the report against the decision at its revision and
/// keeps it. Returns whether the revision is the current one, and the current
/// decision.
pub async fn report_applied(
    store: &dyn Store,
    registry: &Registry,
    who: &Principal,
    input: ReportInput,
) -> Result<proto::ReportAppliedResponse, ApiError> {
    // When the report was received, not when its write lands: a report
    // checked against an older revision (one more read) may be written after
    // a later report of the same instance, which must still be the one kept.
    let received_at = Utc::now();
    let record = store
        .load(&input.workspace_id)
        .await?
        .ok_or(StoreError::NotFound)?;
    match decided_at(store, registry, &record, input.revision).await? {
        None => {
            return Err(ApiError::new(
                ErrorReason::InvalidField,
                format!(
                    "revision: the record never had revision {} (its current revision is {}); \
                     report the resolution.revision of the BuildEnv result the instance was started with",
                    input.revision, record.revision
                ),
            ))
        }
        Some(decided) if decided != input.mode => {
            return Err(ApiError::new(
                ErrorReason::InvalidField,
                format!(
                    "mode: the authority decided {} at revision {}, not {}; this env was not built \
                     by the authority: re-provision the instance through BuildEnv",
                    decided.as_str(),
                    input.revision,
                    input.mode.as_str()
                ),
            ))
        }
        Some(_) => {}
    }
    store
        .record_applied(&AppliedReport {
            workspace_id: input.workspace_id,
            instance: input.instance.clone(),
            revision: input.revision,
            mode: input.mode,
            reported_at: received_at,
        })
        .await?;
    let resolution = resolve(&record, registry);
    let current = input.revision == record.revision;
    tracing::info!(
        target: "billing_mode::decision",
        rpc = "ReportApplied",
        actor = %who.name,
        workspace = %input.workspace_id,
        instance = %input.instance,
        applied_revision = input.revision,
        applied_mode = input.mode.as_str(),
        revision = resolution.revision,
        mode = resolution.mode.as_str(),
        current,
        "applied"
    );
    Ok(proto::ReportAppliedResponse {
        current,
        resolution: Some(convert::resolution_to_wire(resolution)),
    })
}

/// One drifted instance.
#[derive(Debug, Clone)]
struct Drift {
    report: AppliedReport,
    current: Resolution,
    since: DateTime<Utc>,
}

/// Where a page starts: after this (since, workspace, instance).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Position {
    since: DateTime<Utc>,
    workspace_id: WorkspaceId,
    instance: String,
}

impl Position {
    fn of(d: &Drift) -> Position {
        Position {
            since: d.since,
            workspace_id: d.report.workspace_id,
            instance: d.report.instance.as_str().to_owned(),
        }
    }

    /// Opaque to callers: hex of `SECONDS/NANOS/WORKSPACE/INSTANCE`, a dot,
    /// and a check value, so a token the service did not hand out (mangled,
    /// truncated, made up) is refused rather than read as another position.
    fn token(&self) -> String {
        let text = format!(
            "{}/{}/{}/{}",
            self.since.timestamp(),
            self.since.timestamp_subsec_nanos(),
            self.workspace_id,
            self.instance
        );
        format!("{}.{}", hex::encode(&text), check_value(&text))
    }

    fn parse(token: &str) -> Result<Position, ApiError> {
        let bad = || {
            ApiError::new(
                ErrorReason::InvalidField,
                "page_token: pass the next_page_token of a previous ListDrift response",
            )
        };
        let (body, check) = token.split_once('.').ok_or_else(bad)?;
        let text = String::from_utf8(hex::decode(body).map_err(|_| bad())?).map_err(|_| bad())?;
        if check != check_value(&text) {
            return Err(bad());
        }
        let mut parts = text.splitn(4, '/');
        let (Some(secs), Some(nanos), Some(ws), Some(instance)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let since = DateTime::from_timestamp(
            secs.parse().map_err(|_| bad())?,
            nanos.parse().map_err(|_| bad())?,
        )
        .ok_or_else(bad)?;
        let workspace_id = WorkspaceId::parse(ws).map_err(|_| bad())?;
        let instance = Instance::parse(instance).map_err(|_| bad())?;
        Ok(Position {
            since,
            workspace_id,
            instance: instance.as_str().to_owned(),
        })
    }
}

fn check_value(text: &str) -> String {
    super::page_check("ListDrift", text)
}

/// The commit time of the earliest revision from which the decision has
/// differed from `applied` without interruption, given the decisions newest
/// first; `None` when the newest decision is `applied` (no drift).
fn since_of(
    applied: Mode,
    newest_first: impl IntoIterator<Item = (Mode, DateTime<Utc>)>,
) -> (Option<DateTime<Utc>>, bool) {
    let mut since = None;
    for (mode, at) in newest_first {
        if mode == applied {
            return (since, true);
        }
        since = Some(at);
    }
    (since, false)
}

/// `since` for an instance of `record`'s workspace that applied `applied`,
/// from the audit log, up to the record's revision. The record's own
/// revision is decided as the record reads (`current`), as Resolve decides
/// it: a row edited by hand after its audit entry was written (a value the
/// service ignores) decides differently from that entry, and it is the
/// record that is in force; older revisions are decided from the log.
async fn drift_since(
    store: &dyn Store,
    registry: &Registry,
    record: &Record,
    current: Mode,
    applied: Mode,
) -> Result<Option<DateTime<Utc>>, ApiError> {
    let id = record.workspace_id;
    let mut before = record.revision + 1;
    let mut since = None;
    loop {
        let entries = store.history(&id, Some(before), HISTORY_CHUNK).await?;
        let Some(last) = entries.last() else {
            return Ok(since);
        };
        let next_before = last.revision;
        let decisions = entries.into_iter().map(|e| {
            let mode = if e.revision == record.revision {
                current
            } else {
                resolve(&e.after, registry).mode
            };
            (mode, e.at)
        });
        let (s, stopped) = since_of(applied, decisions);
        if s.is_some() {
            since = s;
        }
        if stopped || next_before <= 1 {
            return Ok(since);
        }
        before = next_before;
    }
}

/// ListDrift: one page of drifted instances, oldest `since` first.
pub async fn list_drift(
    store: &dyn Store,
    registry: &Registry,
    who: &Principal,
    req: &proto::ListDriftRequest,
) -> Result<proto::ListDriftResponse, ApiError> {
    let size = convert::page_size(req.page_size) as usize;
    let after = if req.page_token.is_empty() {
        None
    } else {
        Some(Position::parse(&req.page_token)?)
    };
    let reports = store.applied_reports().await?;
    // One decision per workspace, and one audit walk per (workspace, mode).
    let mut decisions: HashMap<WorkspaceId, Resolution> = HashMap::new();
    let mut sinces: HashMap<(WorkspaceId, Mode), Option<DateTime<Utc>>> = HashMap::new();
    let mut drift = Vec::new();
    for (report, record) in reports {
        let current = decisions
            .entry(report.workspace_id)
            .or_insert_with(|| resolve(&record, registry))
            .clone();
        if current.mode == report.mode {
            continue;
        }
        let key = (report.workspace_id, report.mode);
        let since = match sinces.get(&key) {
            Some(s) => *s,
            None => {
                let s = drift_since(store, registry, &record, current.mode, report.mode).await?;
                sinces.insert(key, s);
                s
            }
        };
        let Some(since) = since else {
            // The current decision differs, so the audit log must show when it
            // started to; without a row there is nothing safe to say.
            return Err(StoreError::corrupt(format!(
                "workspace {}: drifted, but the audit log has no entry for its revision {}",
                report.workspace_id, record.revision
            ))
            .into());
        };
        drift.push(Drift {
            report,
            current,
            since,
        });
    }
    drift.sort_by_cached_key(Position::of);
    let start = after.map_or(0, |a| drift.partition_point(|d| Position::of(d) <= a));
    let page: Vec<Drift> = drift.into_iter().skip(start).take(size + 1).collect();
    let next_page_token = if page.len() > size {
        Position::of(&page[size - 1]).token()
    } else {
        String::new()
    };
    let page = &page[..page.len().min(size)];
    tracing::info!(
        target: "billing_mode::decision",
        rpc = "ListDrift",
        actor = %who.name,
        entries = page.len(),
        "drift"
    );
    Ok(proto::ListDriftResponse {
        drift: page.iter().map(drift_to_wire).collect(),
        next_page_token,
    })
}

fn drift_to_wire(d: &Drift) -> proto::Drift {
    proto::Drift {
        workspace_id: d.report.workspace_id.to_string(),
        instance: d.report.instance.as_str().to_owned(),
        applied_mode: convert::mode_to_wire(d.report.mode).into(),
        applied_revision: d.report.revision,
        current: Some(convert::resolution_to_wire(d.current.clone())),
        since: Some(d.since.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(s, 0).unwrap()
    }

    #[test]
    fn since_is_the_start_of_the_uninterrupted_difference() {
        use Mode::*;
        // Newest first: r4 byok, r3 byok, r2 platform_managed, r1 byok.
        let d = [
            (Byok, t(4)),
            (Byok, t(3)),
            (PlatformManaged, t(2)),
            (Byok, t(1)),
        ];
        assert_eq!(since_of(PlatformManaged, d), (Some(t(3)), true));
        assert_eq!(since_of(Byok, d), (None, true));
        assert_eq!(since_of(Disabled, d), (Some(t(1)), false));
    }

    #[test]
    fn page_tokens_round_trip_and_foreign_ones_are_refused() {
        let p = Position {
            since: DateTime::from_timestamp(1_700_000_000, 123_456_789).unwrap(),
            workspace_id: WorkspaceId::new_random(),
            instance: "pod/a-1".into(),
        };
        assert_eq!(Position::parse(&p.token()).unwrap(), p);
        let forged = |text: &str| format!("{}.{}", hex::encode(text), check_value(text));
        let mut tampered = p.token().into_bytes();
        tampered[1] ^= 1;
        let tampered = String::from_utf8(tampered).unwrap();
        for bad in [
            "x",
            "12",
            &hex::encode("1/2/3"),
            &forged("1/2/3"),
            &forged("1/0/not-a-uuid/i"),
            &tampered,
        ] {
            let e = Position::parse(bad).unwrap_err();
            assert_eq!(e.reason, ErrorReason::InvalidField, "{bad}");
        }
    }
}
