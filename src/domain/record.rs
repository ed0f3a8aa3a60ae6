//! The one stored record per workspace, and the changes Set and Clear make.
//!
//! The store holds text. A value that fails validation can only get there by
//! editing the database by hand; it is loaded as [`Stored::Invalid`], ignored
//! by the resolver and named in its trace, and kept as it is until a change
//! replaces it.

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

    /// The value as text: a valid one as `spell` writes it, an invalid one
    /// verbatim; `None` when absent.
    pub fn text<'a>(&'a self, spell: impl FnOnce(&'a T) -> &'a str) -> Option<&'a str> {
        match self {
            Stored::Absent => None,
            Stored::Valid(v) => Some(spell(v)),
            Stored::Invalid(raw) => Some(raw),
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

impl Stored<CredentialKeys> {
    /// Stored key names: none is absent; a list that is not a valid set is
    /// invalid, its names joined by commas (as the resolver's trace names
    /// it), a comma or backslash inside a name escaped with a backslash, so
    /// that [`Stored::names`] gives back exactly the names stored: a write
    /// that leaves the field alone writes the invalid list back as it was,
    /// never a different (perhaps valid) one.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Self {
        if names.is_empty() {
            return Stored::Absent;
        }
        match CredentialKeys::parse(names.iter().map(AsRef::as_ref)) {
            Ok(k) => Stored::Valid(k),
            Err(_) => Stored::Invalid(
                names
                    .iter()
                    .map(|n| n.as_ref().replace('\\', "\\\\").replace(',', "\\,"))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        }
    }

    /// The names: a valid set's, sorted; an invalid list's as stored (see
    /// [`Stored::from_names`]).
    pub fn names(&self) -> Vec<String> {
        match self {
            Stored::Absent => Vec::new(),
            Stored::Valid(k) => k.to_strings(),
            Stored::Invalid(raw) => {
                let mut names = vec![String::new()];
                let mut chars = raw.chars();
                while let Some(c) = chars.next() {
                    let name = names.last_mut().expect("at least one");
                    match c {
                        '\\' => name.extend(chars.next()),
                        ',' => names.push(String::new()),
                        c => name.push(c),
                    }
                }
                names
            }
        }
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

impl Record {
    /// A workspace with nothing stored yet: every field absent, revision 0
    /// (the first change makes revision 1).
    pub fn new(workspace_id: WorkspaceId) -> Self {
        Record {
            workspace_id,
            runtime: Stored::Absent,
            model: Stored::Absent,
            credential_keys: Stored::Absent,
            override_mode: Stored::Absent,
            revision: 0,
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
    /// The record after applying this change to `before`: the fields it
    /// names replaced, everything else (invalid values included) as it was.
    /// The revision is left to the store.
    pub fn apply(&self, before: &Record) -> Record {
        let mut r = before.clone();
        match self {
            Change::Set(p) => {
                if let Some(runtime) = &p.runtime {
                    r.runtime = Stored::from_option(runtime.clone());
                }
                if let Some(model) = &p.model {
                    r.model = Stored::from_option(model.clone());
                }
                if let Some(keys) = &p.credential_keys {
                    r.credential_keys = if keys.is_empty() {
                        Stored::Absent
                    } else {
                        Stored::Valid(keys.clone())
                    };
                }
                if let Some(m) = p.override_mode {
                    r.override_mode = Stored::Valid(m);
                }
            }
            Change::ClearOverride => r.override_mode = Stored::Absent,
        }
        r
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
        let runtime = Stored::from_text(Some("claude code"), Runtime::parse);
        let model = Stored::from_text(Some("opus"), Model::parse);
        let keys = Stored::from_names(&["NOT-A-KEY"]);
        let override_mode: Stored<Mode> = Stored::from_text(Some("BYOK"), |s| s.parse());
        assert_eq!(runtime, Stored::Invalid("claude code".into()));
        assert_eq!(model, Stored::Valid(Model::parse("opus").unwrap()));
        assert!(matches!(keys, Stored::Invalid(_)));
        assert_eq!(override_mode, Stored::Invalid("BYOK".into()));
        assert_eq!(override_mode.text(|m| m.as_str()), Some("BYOK"));
    }

    #[test]
    fn an_invalid_key_list_keeps_its_names() {
        let keys = Stored::from_names(&["OPENAI_API_KEY", "NOT-A-KEY"]);
        assert_eq!(keys, Stored::Invalid("OPENAI_API_KEY,NOT-A-KEY".into()));
        assert_eq!(keys.names(), vec!["OPENAI_API_KEY", "NOT-A-KEY"]);
        assert_eq!(Stored::from_names::<&str>(&[]), Stored::Absent);
        // A comma or backslash inside a name is escaped, so the names come
        // back exactly (never split into two valid keys).
        for names in [
            &["ANTHROPIC_API_KEY,OPENAI_API_KEY"][..],
            &["[\"OPENAI_API_KEY\"]"][..],
            &["A\\", "B,", ",C"][..],
            &["A,B", "", "C"][..],
        ] {
            let keys = Stored::from_names(names);
            assert!(matches!(keys, Stored::Invalid(_)), "{names:?}");
            assert_eq!(keys.names(), names, "{keys:?}");
        }
    }

    #[test]
    fn set_replaces_only_present_fields_and_empty_clears() {
        let before = Record {
            runtime: Stored::Valid(Runtime::parse("hermes").unwrap()),
            model: Stored::Valid(Model::parse("openai/gpt-4o").unwrap()),
            credential_keys: Stored::from_names(&["OPENAI_API_KEY"]),
            override_mode: Stored::Valid(Mode::Byok),
            revision: 3,
            ..Record::new(id())
        };
        let after = Change::Set(Patch {
            model: Some(None),
            ..Patch::default()
        })
        .apply(&before);
        assert_eq!(after.runtime, before.runtime);
        assert_eq!(after.model, Stored::Absent);
        assert_eq!(after.credential_keys.names(), vec!["OPENAI_API_KEY"]);
        assert_eq!(after.revision, 3, "the revision is the store's");
        let cleared = Change::ClearOverride.apply(&after);
        assert_eq!(cleared.override_mode, Stored::Absent);
    }

    #[test]
    fn a_set_keeps_an_invalid_value_it_does_not_name() {
        let before = Record {
            runtime: Stored::Invalid("claude code".into()),
            ..Record::new(id())
        };
        let after = Change::Set(Patch {
            override_mode: Some(Mode::Disabled),
            ..Patch::default()
        })
        .apply(&before);
        assert_eq!(after.runtime, Stored::Invalid("claude code".into()));
        assert_eq!(after.override_mode, Stored::Valid(Mode::Disabled));
    }
}
