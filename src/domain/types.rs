//! Domain newtypes, each with one fallible constructor.
//!
//! A value of one of these types has been validated; nothing past the edge
//! handles raw strings.

use std::{collections::BTreeSet, fmt, str::FromStr};

/// Longest runtime or model, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Longest env key, in bytes.
pub const MAX_ENV_KEY_BYTES: usize = 256;
/// Most credential names a record may hold.
pub const MAX_CREDENTIAL_KEYS: usize = 64;
/// Longest reason, in bytes.
pub const MAX_REASON_BYTES: usize = 1024;

/// Why a value was refused. The message names the field and the rule, never
/// the value of anything secret (only names and ids are ever validated here).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("workspace_id must be a hyphenated UUID such as 6b66de8d-9337-4fb4-be8d-6d49dca0d809")]
    WorkspaceId,
    #[error("mode must be one of platform_managed, byok, disabled")]
    Mode,
    #[error("{field} must be at most {max} bytes")]
    TooLong { field: &'static str, max: usize },
    #[error("{field} must not contain whitespace or control characters")]
    BadCharacters { field: &'static str },
    /// Text that may hold spaces, newlines and tabs (a reason), but no other
    /// control character.
    #[error("{field} must not contain control characters (newlines and tabs are allowed)")]
    ControlCharacters { field: &'static str },
    #[error("{field} must not be empty")]
    Empty { field: &'static str },
    /// The offending text is not repeated: a malformed key may hold a value
    /// (`KEY=secret`).
    #[error("an env key must match ^[A-Za-z_][A-Za-z0-9_]*$ and be at most 256 bytes")]
    EnvKey,
    #[error(
        "credential_keys[{index}] must match ^[A-Za-z_][A-Za-z0-9_]*$ and be at most 256 bytes"
    )]
    CredentialKey { index: usize },
    #[error("at most {MAX_CREDENTIAL_KEYS} credential keys are allowed, got {count}")]
    TooManyCredentialKeys { count: usize },
}

/// A workspace's id: a UUID, shown in lower-case hyphenated form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkspaceId(uuid::Uuid);

impl WorkspaceId {
    /// Accepts only the canonical hyphenated form (8-4-4-4-12 hex digits), any case.
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        let b = s.as_bytes();
        let hyphens_ok = b.len() == 36
            && b.iter().enumerate().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => *c == b'-',
                _ => c.is_ascii_hexdigit(),
            });
        if !hyphens_ok {
            return Err(ValidationError::WorkspaceId);
        }
        uuid::Uuid::parse_str(s)
            .map(WorkspaceId)
            .map_err(|_| ValidationError::WorkspaceId)
    }

    pub fn new_random() -> Self {
        WorkspaceId(uuid::Uuid::new_v4())
    }

    /// The UUID as a number (compact keys for in-memory tables).
    pub fn as_u128(&self) -> u128 {
        self.0.as_u128()
    }

    pub fn from_u128(v: u128) -> Self {
        WorkspaceId(uuid::Uuid::from_u128(v))
    }
}

impl fmt::Display for WorkspaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// Who pays for a workspace's LLM usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    PlatformManaged,
    Byok,
    Disabled,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::PlatformManaged, Mode::Byok, Mode::Disabled];

    /// The exact string form, as stored and as written to the container.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::PlatformManaged => "platform_managed",
            Mode::Byok => "byok",
            Mode::Disabled => "disabled",
        }
    }
}

impl FromStr for Mode {
    type Err = ValidationError;
    /// Exact, case-sensitive: anything else is not a mode.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "platform_managed" => Ok(Mode::PlatformManaged),
            "byok" => Ok(Mode::Byok),
            "disabled" => Ok(Mode::Disabled),
            _ => Err(ValidationError::Mode),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a candidate env entry came from; also the authority's own entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    /// The workspace's own secrets.
    Workspace,
    /// Org-wide secrets (may be the platform's own credentials).
    Global,
    /// Platform settings: proxy base URLs and the usage token.
    Platform,
    /// Written by the authority.
    Authority,
}

fn check_name(field: &'static str, s: &str) -> Result<(), ValidationError> {
    if s.is_empty() {
        return Err(ValidationError::Empty { field });
    }
    if s.len() > MAX_NAME_BYTES {
        return Err(ValidationError::TooLong {
            field,
            max: MAX_NAME_BYTES,
        });
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ValidationError::BadCharacters { field });
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Non-empty, at most 256 bytes, no whitespace or control characters.
            pub fn parse(s: &str) -> Result<Self, ValidationError> {
                check_name($field, s)?;
                Ok($name(s.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The text, without a copy.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// An agent runtime, e.g. `claude-code`, `hermes`, `langgraph`.
    Runtime,
    "runtime"
);
name_type!(
    /// The one model a workspace runs, e.g. `opus` or `anthropic:claude-sonnet-4-6`.
    Model,
    "model"
);
name_type!(
    /// The container or host an env was applied to, as the provisioner names it.
    Instance,
    "instance"
);

/// An environment variable name: `^[A-Za-z_][A-Za-z0-9_]*$`, at most 256 bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EnvKey(String);

impl EnvKey {
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        Self::check(s)?;
        Ok(EnvKey(s.to_owned()))
    }

    /// [`EnvKey::parse`] of a string the caller gives up: the key keeps it,
    /// no copy.
    pub fn from_string(s: String) -> Result<Self, ValidationError> {
        Self::check(&s)?;
        Ok(EnvKey(s))
    }

    fn check(s: &str) -> Result<(), ValidationError> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= MAX_ENV_KEY_BYTES
            && (b[0].is_ascii_alphabetic() || b[0] == b'_')
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_');
        if ok {
            Ok(())
        } else {
            Err(ValidationError::EnvKey)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for EnvKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for EnvKey {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for EnvKey {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for EnvKey {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for EnvKey {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// The names (never values) of the LLM credentials a workspace owns: at most
/// 64, duplicates merged, kept sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CredentialKeys(BTreeSet<EnvKey>);

impl CredentialKeys {
    pub fn parse<'a>(keys: impl IntoIterator<Item = &'a str>) -> Result<Self, ValidationError> {
        let mut set = BTreeSet::new();
        let mut count = 0usize;
        for (index, k) in keys.into_iter().enumerate() {
            count += 1;
            set.insert(EnvKey::parse(k).map_err(|_| ValidationError::CredentialKey { index })?);
        }
        if set.len() > MAX_CREDENTIAL_KEYS {
            return Err(ValidationError::TooManyCredentialKeys { count });
        }
        Ok(CredentialKeys(set))
    }

    pub fn contains(&self, key: &str) -> bool {
        self.0.contains(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = &EnvKey> {
        self.0.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sorted names.
    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(|k| k.0.clone()).collect()
    }
}

/// Why a change was made: trimmed, non-empty, at most 1024 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason(String);

impl Reason {
    /// `Ok(None)` for an empty or whitespace-only reason (no reason given).
    pub fn parse(s: &str) -> Result<Option<Self>, ValidationError> {
        let t = s.trim();
        if t.is_empty() {
            return Ok(None);
        }
        if t.len() > MAX_REASON_BYTES {
            return Err(ValidationError::TooLong {
                field: "reason",
                max: MAX_REASON_BYTES,
            });
        }
        if t.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
            return Err(ValidationError::ControlCharacters { field: "reason" });
        }
        Ok(Some(Reason(t.to_owned())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_id_accepts_only_the_hyphenated_form_and_lowercases() {
        let id = WorkspaceId::parse("6B66DE8D-9337-4FB4-BE8D-6D49DCA0D809").unwrap();
        assert_eq!(id.to_string(), "6b66de8d-9337-4fb4-be8d-6d49dca0d809");
        for bad in [
            "",
            "6b66de8d93374fb4be8d6d49dca0d809",
            "{6b66de8d-9337-4fb4-be8d-6d49dca0d809}",
            "urn:uuid:6b66de8d-9337-4fb4-be8d-6d49dca0d809",
            "6b66de8d-9337-4fb4-be8d-6d49dca0d80",
            "6b66de8d-9337-4fb4-be8d-6d49dca0d80g",
            "6b66de8d-9337-4fb4-be8d_6d49dca0d809",
        ] {
            assert_eq!(
                WorkspaceId::parse(bad),
                Err(ValidationError::WorkspaceId),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn mode_strings_are_exact() {
        for m in Mode::ALL {
            assert_eq!(m.as_str().parse::<Mode>(), Ok(m));
        }
        for bad in ["", "BYOK", "Byok", " byok", "platform-managed", "none"] {
            assert!(bad.parse::<Mode>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_reject_whitespace_control_and_length() {
        assert!(Runtime::parse("claude-code").is_ok());
        assert!(Model::parse("anthropic:claude-sonnet-4-6").is_ok());
        assert!(Model::parse(&"m".repeat(256)).is_ok());
        assert!(Model::parse(&"m".repeat(257)).is_err());
        assert!(Model::parse("op us").is_err());
        assert!(Model::parse("opus\n").is_err());
        assert!(Runtime::parse("").is_err());
    }

    #[test]
    fn env_keys_follow_the_shell_rule() {
        for ok in ["A", "_", "ANTHROPIC_API_KEY", "a1_b2", &"K".repeat(256)] {
            assert!(EnvKey::parse(ok).is_ok(), "{ok:?}");
        }
        for bad in ["", "1A", "A-B", "A B", "Ä", &"K".repeat(257), "A=B"] {
            assert!(EnvKey::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn credential_keys_merge_duplicates_sort_and_cap() {
        let k = CredentialKeys::parse(["B", "A", "B"]).unwrap();
        assert_eq!(k.to_strings(), vec!["A", "B"]);
        let many: Vec<String> = (0..65).map(|i| format!("K{i}")).collect();
        assert!(CredentialKeys::parse(many.iter().map(String::as_str)).is_err());
        let exactly: Vec<String> = (0..64).map(|i| format!("K{i}")).collect();
        assert!(CredentialKeys::parse(exactly.iter().map(String::as_str)).is_ok());
    }

    #[test]
    fn whitespace_only_reason_is_no_reason() {
        assert_eq!(Reason::parse("  \t ").unwrap(), None);
        assert_eq!(Reason::parse(" ok ").unwrap().unwrap().as_str(), "ok");
    }

    #[test]
    fn a_reason_may_have_spaces_newlines_and_tabs_but_no_other_control_character() {
        let ok = "ticket 42:\n\tthe customer brings a key";
        assert_eq!(Reason::parse(ok).unwrap().unwrap().as_str(), ok);
        let e = Reason::parse("bell \u{7} here").unwrap_err();
        assert_eq!(
            e.to_string(),
            "reason must not contain control characters (newlines and tabs are allowed)"
        );
    }
}
