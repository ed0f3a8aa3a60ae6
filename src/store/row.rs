//! The stored-text form of a record: its columns and the audit log's JSON.
//!
//! The one place stored text is printed and parsed. Loading parses it again
//! on purpose: a value a hand edit made invalid is kept as
//! [`Stored::Invalid`] (and written back as it was), not refused.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{ColumnIndex, Decode, Type};

use super::{AppliedReport, AuditEntry, LogState, LoggedChange, StoreError};
use crate::domain::{Instance, Mode, Model, Record, Runtime, Stored, WorkspaceId};

/// A record's fields as stored text: the row's columns, and the audit log's
/// JSON before and after each change (this struct's serde form, unchanged
/// since the first migration). They hold no secrets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Fields {
    pub(crate) runtime: Option<String>,
    pub(crate) model: Option<String>,
    /// Sorted names. Stored as a JSON array of strings.
    pub(crate) credential_keys: Vec<String>,
    pub(crate) override_mode: Option<String>,
}

impl Fields {
    /// The text of `record`'s fields, invalid values verbatim.
    pub(crate) fn of(record: &Record) -> Self {
        Fields {
            runtime: record.runtime.text(Runtime::as_str).map(str::to_owned),
            model: record.model.text(Model::as_str).map(str::to_owned),
            credential_keys: record.credential_keys.names(),
            override_mode: record.override_mode.text(|m| m.as_str()).map(str::to_owned),
        }
    }

    /// Interprets stored text, keeping invalid values as [`Stored::Invalid`].
    pub(crate) fn into_record(self, workspace_id: WorkspaceId, revision: u64) -> Record {
        Record {
            workspace_id,
            runtime: Stored::from_text(self.runtime.as_deref(), Runtime::parse),
            model: Stored::from_text(self.model.as_deref(), Model::parse),
            credential_keys: Stored::from_names(&self.credential_keys),
            override_mode: Stored::from_text(self.override_mode.as_deref(), |s| s.parse()),
            revision,
        }
    }

    /// The credential keys column: a JSON array.
    pub(crate) fn credential_keys_json(&self) -> String {
        serde_json::to_string(&self.credential_keys).expect("a list of strings serializes")
    }

    /// The audit log's JSON.
    pub(crate) fn to_json(&self) -> String {
        serde_json::to_string(self).expect("fields serialize")
    }

    fn from_json(text: &str) -> Result<Self, StoreError> {
        serde_json::from_str(text).map_err(|e| StoreError::corrupt_because("audit fields", e))
    }
}

/// Stored credential keys text: a JSON array. Unparsable text (a hand edit)
/// becomes one invalid entry so it is reported, not silently dropped.
fn credential_keys_from_json(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_else(|_| vec![text.to_owned()])
}

/// The columns a row is read through, for any backend's row type. (The
/// bounds are stated once here: Rust does not carry them along with a
/// generic row type.)
pub(crate) trait Columns {
    fn text(&self, column: &str) -> Result<String, sqlx::Error>;
    fn maybe_text(&self, column: &str) -> Result<Option<String>, sqlx::Error>;
    fn int(&self, column: &str) -> Result<i64, sqlx::Error>;
    fn time(&self, column: &str) -> Result<DateTime<Utc>, sqlx::Error>;
}

impl<R> Columns for R
where
    R: sqlx::Row,
    for<'r> &'r str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> DateTime<Utc>: Decode<'r, R::Database> + Type<R::Database>,
{
    fn text(&self, column: &str) -> Result<String, sqlx::Error> {
        self.try_get(column)
    }

    fn maybe_text(&self, column: &str) -> Result<Option<String>, sqlx::Error> {
        self.try_get(column)
    }

    fn int(&self, column: &str) -> Result<i64, sqlx::Error> {
        self.try_get(column)
    }

    fn time(&self, column: &str) -> Result<DateTime<Utc>, sqlx::Error> {
        self.try_get(column)
    }
}

/// A revision as stored (BIGINT) → domain.
pub(crate) fn revision_from_db(r: i64) -> Result<u64, StoreError> {
    u64::try_from(r)
        .ok()
        .filter(|r| *r >= 1)
        .ok_or_else(|| StoreError::corrupt(format!("revision {r} is not positive")))
}

pub(crate) fn revision_to_db(r: u64) -> Result<i64, StoreError> {
    i64::try_from(r).map_err(|_| StoreError::internal(format!("revision {r} is too large")))
}

pub(crate) fn position_from_db(p: i64) -> Result<u64, StoreError> {
    u64::try_from(p)
        .map_err(|_| StoreError::corrupt(format!("change log position {p} is negative")))
}

pub(crate) fn position_to_db(p: u64) -> i64 {
    // Positions come from the database; one beyond i64 cannot be asked for
    // by a caller that got it from here, so saturating only refuses junk.
    i64::try_from(p).unwrap_or(i64::MAX)
}

/// The row's `workspace_id` column; `unreadable` says what is corrupt if it
/// is not a UUID.
fn workspace_id(row: &impl Columns, unreadable: &'static str) -> Result<WorkspaceId, StoreError> {
    let id = row.text("workspace_id")?;
    WorkspaceId::parse(&id).map_err(|_| StoreError::corrupt(unreadable))
}

/// The record columns every statement selects (`runtime, model,
/// credential_keys, override_mode, revision`, the keys as JSON text).
pub(crate) fn record_from_row(
    row: &impl Columns,
    workspace_id: WorkspaceId,
) -> Result<Record, StoreError> {
    let fields = Fields {
        runtime: row.maybe_text("runtime")?,
        model: row.maybe_text("model")?,
        credential_keys: credential_keys_from_json(&row.text("credential_keys")?),
        override_mode: row.maybe_text("override_mode")?,
    };
    Ok(fields.into_record(workspace_id, revision_from_db(row.int("revision")?)?))
}

/// A listed record: its id column (text) and the record columns.
pub(crate) fn listed_from_row(row: &impl Columns) -> Result<Record, StoreError> {
    record_from_row(
        row,
        workspace_id(row, "a stored workspace id is not a UUID")?,
    )
}

/// One audit row (`revision, actor, reason, before, after, at`, the JSON
/// columns as text). Its before is the record at the revision below.
pub(crate) fn audit_from_row(
    row: &impl Columns,
    workspace_id: WorkspaceId,
) -> Result<AuditEntry, StoreError> {
    let revision = revision_from_db(row.int("revision")?)?;
    let before = row.maybe_text("before")?;
    let before = before
        .as_deref()
        .map(Fields::from_json)
        .transpose()?
        .map(|f| f.into_record(workspace_id, revision - 1));
    Ok(AuditEntry {
        workspace_id,
        revision,
        actor: row.text("actor")?,
        reason: row.text("reason")?,
        at: row.time("at")?,
        before,
        after: Fields::from_json(&row.text("after")?)?.into_record(workspace_id, revision),
    })
}

/// One change-log row (`position, workspace_id, revision, committed_at,
/// after`, the workspace id and fields as text).
pub(crate) fn change_from_row(row: &impl Columns) -> Result<LoggedChange, StoreError> {
    let workspace_id = workspace_id(row, "change log: workspace id is not a UUID")?;
    let revision = revision_from_db(row.int("revision")?)?;
    Ok(LoggedChange {
        position: position_from_db(row.int("position")?)?,
        committed_at: row.time("committed_at")?,
        record: Fields::from_json(&row.text("after")?)?.into_record(workspace_id, revision),
    })
}

/// The log's state row (`store_id, last_position, pruned_through`).
pub(crate) fn log_state_from_row(row: &impl Columns) -> Result<LogState, StoreError> {
    Ok(LogState {
        store_id: row.text("store_id")?,
        last_position: position_from_db(row.int("last_position")?)?,
        pruned_through: position_from_db(row.int("pruned_through")?)?,
    })
}

/// A report row joined with its record's columns.
pub(crate) fn applied_from_row(row: &impl Columns) -> Result<(AppliedReport, Record), StoreError> {
    let workspace_id = workspace_id(row, "applied report: workspace id")?;
    let instance = Instance::parse(&row.text("instance")?)
        .map_err(|_| StoreError::corrupt("applied report: instance"))?;
    let mode = row
        .text("mode")?
        .parse::<Mode>()
        .map_err(|_| StoreError::corrupt("applied report: mode"))?;
    let report = AppliedReport {
        workspace_id,
        instance,
        revision: revision_from_db(row.int("applied_revision")?)?,
        mode,
        reported_at: row.time("reported_at")?,
    };
    Ok((report, record_from_row(row, workspace_id)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> WorkspaceId {
        WorkspaceId::parse("6b66de8d-9337-4fb4-be8d-6d49dca0d809").unwrap()
    }

    #[test]
    fn invalid_stored_text_is_kept_as_invalid_and_written_back_verbatim() {
        let stored = Fields {
            runtime: Some("claude code".into()),
            model: Some("opus".into()),
            credential_keys: vec!["OPENAI_API_KEY".into(), "NOT-A-KEY".into()],
            override_mode: Some("BYOK".into()),
        };
        let rec = stored.clone().into_record(id(), 3);
        assert_eq!(rec.runtime, Stored::Invalid("claude code".into()));
        assert_eq!(rec.model, Stored::Valid(Model::parse("opus").unwrap()));
        assert!(matches!(rec.credential_keys, Stored::Invalid(_)));
        assert_eq!(rec.override_mode, Stored::Invalid("BYOK".into()));
        assert_eq!(Fields::of(&rec), stored);
    }

    #[test]
    fn the_audit_json_keeps_its_form() {
        let fields = Fields {
            runtime: Some("langgraph".into()),
            model: None,
            credential_keys: vec!["OPENAI_API_KEY".into()],
            override_mode: Some("byok".into()),
        };
        let json = r#"{"runtime":"langgraph","model":null,"credential_keys":["OPENAI_API_KEY"],"override_mode":"byok"}"#;
        assert_eq!(fields.to_json(), json);
        assert_eq!(Fields::from_json(json).unwrap(), fields);
        assert_eq!(fields.credential_keys_json(), r#"["OPENAI_API_KEY"]"#);
    }

    #[test]
    fn unparsable_credential_keys_become_one_invalid_entry() {
        assert_eq!(credential_keys_from_json("[\"A\"]"), vec!["A"]);
        assert_eq!(credential_keys_from_json("A, B"), vec!["A, B"]);
    }
}
