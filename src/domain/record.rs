//! The one stored record per workspace, and the changes Set and Clear make.
//!
//! The store holds text. A value that fails validation can only get there by
//! editing the database by hand; it is loaded as [`Stored::Invalid`], ignored
//! by the resolver and named in its trace.

use serde::{Deserialize, Serialize};

use super::types::{CredentialKeys, Mode, Model, Runtime, ValidationError, WorkspaceId};

/// A stored field: absent, valid, or invalid (hand-edited) text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored<T> {
    Absent,
    Valid(T),
    Invalid(String),
}

impl<T> Stored<T> {
    /// Parses stored text; `None` and the empty string are absent.
    pub fn from_text(
        text: Option<&str>,
        parse: impl FnOnce(&str) -> Result<T, ValidationError>,
    ) -> Self {
        match text {
            None | Some("") => Stored::Absent,
            Some(s) => match parse(s) {
                Ok(v) => Stored::Valid(v),
                Err(_) => Stored::Invalid(s.to_owned()),
            },
        }
    }

    pub fn valid(&self) -> Option<&T> {
        match self {
            Stored::Valid(v) => Some(v),
            _ => None,
        }
    }

    pub fn from_option(v: Option<T>) -> Self {
        v.map_or(Stored::Absent, Stored::Valid)
    }
}

/// A workspace's record as loaded from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub workspace_id: WorkspaceId,
    pub runtime: Stored<Runtime>,
    pub model: Stored<Model>,
    pub credential_keys: Stored<CredentialKeys>,
    pub override_mode: Stored<Mode>,
    /// Starts at 1; +1 on every change.
    pub revision: u64,
}

/// The record's fields as stored text: what the database holds and what the
/// audit log records before and after each change. They hold no secrets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fields {
    pub runtime: Option<String>,
    pub model: Option<String>,
    /// Sorted names. Stored as a JSON array of strings.
    pub credential_keys: Vec<String>,
    pub override_mode: Option<String>,
}

impl Fields {
    /// Interprets stored text, keeping invalid values as [`Stored::Invalid`].
    pub fn into_record(self, workspace_id: WorkspaceId, revision: u64) -> Record {
        let credential_keys = if self.credential_keys.is_empty() {
            Stored::Absent
        } else {
            match CredentialKeys::parse(self.credential_keys.iter().map(String::as_str)) {
                Ok(k) => Stored::Valid(k),
                Err(_) => Stored::Invalid(self.credential_keys.join(",")),
            }
        };
        Record {
            workspace_id,
            runtime: Stored::from_text(self.runtime.as_deref(), Runtime::parse),
            model: Stored::from_text(self.model.as_deref(), Model::parse),
            credential_keys,
            override_mode: Stored::from_text(self.override_mode.as_deref(), |s| s.parse()),
            revision,
        }
    }

    /// Stored credential keys text: a JSON array. Unparsable text (a hand
    /// edit) becomes one invalid entry so it is reported, not silently dropped.
    pub fn credential_keys_from_json(text: &str) -> Vec<String> {
        serde_json::from_str(text).unwrap_or_else(|_| vec![text.to_owned()])
    }

    pub fn credential_keys_json(&self) -> String {
        serde_json::to_string(&self.credential_keys).expect("a list of strings serializes")
    }
}

impl Record {
    /// The stored text of this record, invalid values included verbatim.
    pub fn fields(&self) -> Fields {
        fn text<T>(s: &Stored<T>, f: impl Fn(&T) -> String) -> Option<String> {
            match s {
                Stored::Absent => None,
                Stored::Valid(v) => Some(f(v)),
                Stored::Invalid(raw) => Some(raw.clone()),
            }
        }
        Fields {
            runtime: text(&self.runtime, |r| r.as_str().to_owned()),
            model: text(&self.model, |m| m.as_str().to_owned()),
            credential_keys: match &self.credential_keys {
                Stored::Absent => vec![],
                Stored::Valid(k) => k.to_strings(),
                Stored::Invalid(raw) => vec![raw.clone()],
            },
            override_mode: text(&self.override_mode, |m| m.as_str().to_owned()),
        }
    }
}

/// The fields a Set replaces; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Patch {
    /// `Some(None)` clears the runtime.
    pub runtime: Option<Option<Runtime>>,
    /// `Some(None)` clears the model.
    pub model: Option<Option<Model>>,
    /// Replaces the whole set.
    pub credential_keys: Option<CredentialKeys>,
    pub override_mode: Option<Mode>,
}

impl Patch {
    pub fn is_empty(&self) -> bool {
        self == &Patch::default()
    }
}

/// A change to a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Create the record if missing; replace the fields present.
    Set(Patch),
    /// Remove the override; the record must exist.
    ClearOverride,
}

impl Change {
    /// The fields after applying this change to `before` (`None`: no record yet).
    pub fn apply(&self, before: Option<&Fields>) -> Fields {
        let mut f = before.cloned().unwrap_or_default();
        match self {
            Change::Set(p) => {
                if let Some(r) = &p.runtime {
                    f.runtime = r.as_ref().map(|r| r.as_str().to_owned());
                }
                if let Some(m) = &p.model {
                    f.model = m.as_ref().map(|m| m.as_str().to_owned());
                }
                if let Some(k) = &p.credential_keys {
                    f.credential_keys = k.to_strings();
                }
                if let Some(m) = p.override_mode {
                    f.override_mode = Some(m.as_str().to_owned());
                }
            }
            Change::ClearOverride => f.override_mode = None,
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> WorkspaceId {
        WorkspaceId::parse("6b66de8d-9337-4fb4-be8d-6d49dca0d809").unwrap()
    }

    #[test]
    fn invalid_stored_text_is_kept_as_invalid() {
        let rec = Fields {
            runtime: Some("claude code".into()),
            model: Some("opus".into()),
            credential_keys: vec!["NOT-A-KEY".into()],
            override_mode: Some("BYOK".into()),
        }
        .into_record(id(), 3);
        assert_eq!(rec.runtime, Stored::Invalid("claude code".into()));
        assert_eq!(rec.model, Stored::Valid(Model::parse("opus").unwrap()));
        assert!(matches!(rec.credential_keys, Stored::Invalid(_)));
        assert_eq!(rec.override_mode, Stored::Invalid("BYOK".into()));
        assert_eq!(rec.fields().override_mode.as_deref(), Some("BYOK"));
    }

    #[test]
    fn set_replaces_only_present_fields_and_empty_clears() {
        let before = Fields {
            runtime: Some("hermes".into()),
            model: Some("openai/gpt-4o".into()),
            credential_keys: vec!["OPENAI_API_KEY".into()],
            override_mode: Some("byok".into()),
        };
        let after = Change::Set(Patch {
            model: Some(None),
            ..Patch::default()
        })
        .apply(Some(&before));
        assert_eq!(after.runtime.as_deref(), Some("hermes"));
        assert_eq!(after.model, None);
        assert_eq!(after.credential_keys, vec!["OPENAI_API_KEY"]);
        let cleared = Change::ClearOverride.apply(Some(&after));
        assert_eq!(cleared.override_mode, None);
    }
}
