//! Who may call what: bearer tokens, their names and roles.
//!
//! Tokens are configured as SHA-256 hashes (never the tokens themselves) and
//! compared in constant time. Each token has a name, recorded as the actor in
//! audit rows and the decision log. With no tokens configured every caller is
//! the anonymous admin: start-up allows that only on loopback.

use std::{collections::BTreeSet, fmt, str::FromStr};

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{metadata::MetadataMap, Request, Status};

use crate::service::error::{ApiError, ErrorReason};

/// The actor name used when no tokens are configured.
pub const ANONYMOUS: &str = "anonymous";
/// Prefix of generated tokens, so a leaked one is recognisable.
pub const TOKEN_PREFIX: &str = "bmt_";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Resolve, History.
    Reader,
    /// Resolve, BuildEnv.
    Provisioner,
    /// Set of runtime, model, credential_keys.
    Writer,
    /// Everything, including override_mode and Clear.
    Admin,
    /// CheckSpend only (the platform's metering proxy).
    Meter,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Provisioner => "provisioner",
            Role::Writer => "writer",
            Role::Admin => "admin",
            Role::Meter => "meter",
        }
    }

    fn allows(self, action: Action) -> bool {
        match self {
            Role::Admin => true,
            Role::Reader => matches!(
                action,
                Action::Resolve
                    | Action::History
                    | Action::Watch
                    | Action::ListDrift
                    | Action::ListWorkspaces
            ),
            Role::Provisioner => matches!(
                action,
                Action::Resolve | Action::BuildEnv | Action::Watch | Action::ReportApplied
            ),
            Role::Writer => matches!(action, Action::SetFields),
            Role::Meter => matches!(action, Action::CheckSpend),
        }
    }
}

/// A role name that is not one of the roles.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?} (known: reader, provisioner, writer, admin, meter)")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "reader" => Ok(Role::Reader),
            "provisioner" => Ok(Role::Provisioner),
            "writer" => Ok(Role::Writer),
            "admin" => Ok(Role::Admin),
            "meter" => Ok(Role::Meter),
            other => Err(UnknownRole(other.to_owned())),
        }
    }
}

/// What a request asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Resolve,
    History,
    BuildEnv,
    /// Set without override_mode; BatchCreateWorkspaces with no item that
    /// sets it.
    SetFields,
    /// Set with override_mode; BatchCreateWorkspaces with an item that sets it.
    SetOverride,
    Clear,
    /// The change stream: whoever may Resolve.
    Watch,
    CheckSpend,
    ReportApplied,
    ListDrift,
    ListWorkspaces,
}

impl Action {
    fn describe(self) -> &'static str {
        match self {
            Action::Resolve => "Resolve (reader, provisioner or admin)",
            Action::History => "History (reader or admin)",
            Action::BuildEnv => "BuildEnv (provisioner or admin)",
            Action::SetFields => "Set or BatchCreateWorkspaces (writer or admin)",
            Action::SetOverride => "Set or BatchCreateWorkspaces with override_mode (admin)",
            Action::Clear => "Clear (admin)",
            Action::Watch => "Watch (reader, provisioner or admin)",
            Action::CheckSpend => "CheckSpend (meter or admin)",
            Action::ReportApplied => "ReportApplied (provisioner or admin)",
            Action::ListDrift => "ListDrift (reader or admin)",
            Action::ListWorkspaces => "ListWorkspaces (reader or admin)",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub roles: BTreeSet<Role>,
}

impl Principal {
    pub fn anonymous() -> Self {
        Principal {
            name: ANONYMOUS.to_owned(),
            roles: [Role::Admin].into(),
        }
    }

    /// Whether one of the caller's roles allows `action`.
    pub fn may(&self, action: Action) -> bool {
        self.roles.iter().any(|r| r.allows(action))
    }

    pub fn require(&self, action: Action) -> Result<(), ApiError> {
        if self.may(action) {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorReason::PermissionDenied,
                format!("token {:?} may not call {}", self.name, action.describe()),
            ))
        }
    }
}

/// One configured token: name, SHA-256 of the token, roles.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenEntry {
    pub name: String,
    hash: [u8; 32],
    pub roles: BTreeSet<Role>,
}

impl TokenEntry {
    /// Whether `other` is configured for the same token (the same hash).
    pub fn same_token(&self, other: &TokenEntry) -> bool {
        self.hash == other.hash
    }
}

impl fmt::Debug for TokenEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenEntry")
            .field("name", &self.name)
            .field("roles", &self.roles)
            .finish_non_exhaustive()
    }
}

impl TokenEntry {
    /// The configuration line for this entry: `NAME sha256:HEX ROLE[,ROLE…]`.
    pub fn line(&self) -> String {
        let roles: Vec<&str> = self.roles.iter().map(|r| r.as_str()).collect();
        format!(
            "{} sha256:{} {}",
            self.name,
            hex::encode(self.hash),
            roles.join(",")
        )
    }
}

/// A token configuration that could not be read: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tokens {source_name} line {line}: {problem}")]
pub struct TokenConfigError {
    pub source_name: String,
    pub line: usize,
    pub problem: TokenLineError,
}

/// What is wrong with one line of a token configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenLineError {
    #[error("expected `NAME sha256:HEX ROLE[,ROLE...]`")]
    Shape,
    #[error(transparent)]
    Name(#[from] TokenNameError),
    #[error("the hash must start with sha256:")]
    HashPrefix,
    #[error("the hash must be 64 hex digits after sha256:")]
    HashDigits,
    #[error(transparent)]
    Role(#[from] UnknownRole),
    #[error("duplicate token name {0:?}")]
    DuplicateName(String),
    #[error("the same token hash appears twice")]
    DuplicateHash,
}

/// A token name outside `[A-Za-z0-9-_.@]{1,128}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("name {0:?} must be 1-128 characters of letters, digits, - _ . @")]
pub struct TokenNameError(pub String);

/// Why [`generate_token`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GenerateTokenError {
    #[error(transparent)]
    Name(#[from] TokenNameError),
    #[error("a token needs at least one role")]
    NoRole,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
}

/// Parses token lines: `NAME sha256:HEX ROLE[,ROLE…]`; `#` comments and blank
/// lines are ignored.
pub fn parse_token_lines(
    text: &str,
    source_name: &str,
) -> Result<Vec<TokenEntry>, TokenConfigError> {
    let mut out: Vec<TokenEntry> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let err = |problem: TokenLineError| TokenConfigError {
            source_name: source_name.to_owned(),
            line: i + 1,
            problem,
        };
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [name, hash, roles] = parts[..] else {
            return Err(err(TokenLineError::Shape));
        };
        if !valid_name(name) {
            return Err(err(TokenNameError(name.to_owned()).into()));
        }
        let hex_part = hash
            .strip_prefix("sha256:")
            .ok_or_else(|| err(TokenLineError::HashPrefix))?;
        let bytes = hex::decode(hex_part)
            .ok()
            .filter(|b| b.len() == 32)
            .ok_or_else(|| err(TokenLineError::HashDigits))?;
        let roles = roles
            .split(',')
            .map(Role::from_str)
            .collect::<Result<BTreeSet<_>, _>>()
            .map_err(|e| err(e.into()))?;
        if out.iter().any(|e| e.name == name) {
            return Err(err(TokenLineError::DuplicateName(name.to_owned())));
        }
        let mut h = [0u8; 32];
        h.copy_from_slice(&bytes);
        if out.iter().any(|e| e.hash == h) {
            return Err(err(TokenLineError::DuplicateHash));
        }
        out.push(TokenEntry {
            name: name.to_owned(),
            hash: h,
            roles,
        });
    }
    Ok(out)
}

/// A new random token and its configuration entry.
pub fn generate_token(
    name: &str,
    roles: BTreeSet<Role>,
) -> Result<(String, TokenEntry), GenerateTokenError> {
    if !valid_name(name) {
        return Err(TokenNameError(name.to_owned()).into());
    }
    if roles.is_empty() {
        return Err(GenerateTokenError::NoRole);
    }
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let token = format!("{TOKEN_PREFIX}{}", hex::encode(bytes));
    let entry = TokenEntry {
        name: name.to_owned(),
        hash: Sha256::digest(token.as_bytes()).into(),
        roles,
    };
    Ok((token, entry))
}

/// Checks bearer tokens against the configured hashes.
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    tokens: Vec<TokenEntry>,
}

impl Authenticator {
    pub fn new(tokens: Vec<TokenEntry>) -> Self {
        Authenticator { tokens }
    }

    /// No tokens configured: every caller is the anonymous admin.
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    /// The caller named by the request's `authorization: Bearer …` metadata.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Principal, ApiError> {
        if self.is_open() {
            return Ok(Principal::anonymous());
        }
        let unauthenticated = |m: &str| ApiError::new(ErrorReason::Unauthenticated, m);
        let header = metadata
            .get("authorization")
            .ok_or_else(|| unauthenticated("missing `authorization: Bearer <token>` metadata"))?
            .to_str()
            .map_err(|_| unauthenticated("the authorization metadata is not readable text"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                unauthenticated("the authorization metadata must be `Bearer <token>`")
            })?;
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Compare against every entry, without stopping early.
        let mut found: Option<&TokenEntry> = None;
        for entry in &self.tokens {
            if bool::from(entry.hash.ct_eq(&presented)) {
                found = Some(entry);
            }
        }
        found
            .map(|e| Principal {
                name: e.name.clone(),
                roles: e.roles.clone(),
            })
            .ok_or_else(|| unauthenticated("unknown token"))
    }

    /// A tonic interceptor that authenticates and stores the [`Principal`] in
    /// the request's extensions.
    #[allow(clippy::result_large_err)]
    pub fn intercept(&self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let principal = self.authenticate(req.metadata())?;
        req.extensions_mut().insert(principal);
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    fn md(auth: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(a) = auth {
            m.insert("authorization", MetadataValue::try_from(a).unwrap());
        }
        m
    }

    #[test]
    fn a_generated_token_authenticates_as_its_name() {
        let (token, entry) = generate_token("provisioner-1", [Role::Provisioner].into()).unwrap();
        let parsed = parse_token_lines(&entry.line(), "test").unwrap();
        let auth = Authenticator::new(parsed);
        let p = auth
            .authenticate(&md(Some(&format!("Bearer {token}"))))
            .unwrap();
        assert_eq!(p.name, "provisioner-1");
        assert!(p.require(Action::BuildEnv).is_ok());
        assert_eq!(
            p.require(Action::Clear).unwrap_err().reason,
            ErrorReason::PermissionDenied
        );
        for bad in [
            None,
            Some("Bearer nope"),
            Some("Basic abc"),
            Some("Bearer "),
        ] {
            assert_eq!(
                auth.authenticate(&md(bad)).unwrap_err().reason,
                ErrorReason::Unauthenticated,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn roles_allow_exactly_their_actions() {
        use Action::*;
        let all = [
            Resolve,
            History,
            BuildEnv,
            SetFields,
            SetOverride,
            Clear,
            Watch,
            CheckSpend,
            ReportApplied,
            ListDrift,
            ListWorkspaces,
        ];
        let table = [
            (
                Role::Reader,
                vec![Resolve, History, Watch, ListDrift, ListWorkspaces],
            ),
            (
                Role::Provisioner,
                vec![Resolve, BuildEnv, Watch, ReportApplied],
            ),
            (Role::Writer, vec![SetFields]),
            (Role::Meter, vec![CheckSpend]),
            (Role::Admin, all.to_vec()),
        ];
        for (role, allowed) in table {
            for action in all {
                assert_eq!(
                    role.allows(action),
                    allowed.contains(&action),
                    "{role:?} {action:?}"
                );
            }
        }
    }

    #[test]
    fn generate_token_refuses_a_bad_name_and_no_role() {
        assert!(matches!(
            generate_token("a b", [Role::Admin].into()),
            Err(GenerateTokenError::Name(TokenNameError(n))) if n == "a b"
        ));
        assert_eq!(
            generate_token("ops", BTreeSet::new()).unwrap_err(),
            GenerateTokenError::NoRole
        );
        assert_eq!("root".parse::<Role>(), Err(UnknownRole("root".to_owned())));
    }

    #[test]
    fn bad_token_lines_name_the_line() {
        let e = parse_token_lines("# c\n\nops sha256:abc admin\n", "tokens.txt").unwrap_err();
        assert_eq!(e.line, 3);
        assert_eq!(e.problem, TokenLineError::HashDigits);
        assert!(e.to_string().contains("tokens.txt line 3"));
        let h = "0".repeat(64);
        let problem = |text: &str| parse_token_lines(text, "t").unwrap_err().problem;
        assert!(matches!(
            problem(&format!("a sha256:{h} root")),
            TokenLineError::Role(UnknownRole(r)) if r == "root"
        ));
        assert!(matches!(
            problem(&format!("a sha256:{h} admin\na sha256:{} reader", "1".repeat(64))),
            TokenLineError::DuplicateName(n) if n == "a"
        ));
        assert_eq!(
            problem(&format!("a sha256:{h} admin\nb sha256:{h} reader")),
            TokenLineError::DuplicateHash
        );
        assert_eq!(problem("a b"), TokenLineError::Shape);
        assert_eq!(
            problem(&format!("a md5:{h} admin")),
            TokenLineError::HashPrefix
        );
        assert!(matches!(
            problem(&format!("a/b sha256:{h} admin")),
            TokenLineError::Name(TokenNameError(n)) if n == "a/b"
        ));
        assert_eq!(
            parse_token_lines(&format!("a sha256:{h} admin,reader"), "t")
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn debug_output_never_shows_the_hash() {
        let (_, entry) = generate_token("x", [Role::Admin].into()).unwrap();
        assert!(!format!("{entry:?}").contains(&hex::encode(entry.hash)));
    }
}
