//! The provisioning environment: the candidate env in, the final env out.
//!
//! [`build_env`] never decides the mode: it takes the [`Resolution`] that
//! [`super::resolve`] produced and shapes the env to match it, or fails
//! closed. Nothing here puts a value into an error or a trace: failures name
//! keys only.

use std::collections::BTreeMap;

use super::{
    record::Record,
    registry::{Family, Registry, BILLING_MODE_VARS, PROXY_PREFIX},
    resolver::{Resolution, Source},
    types::{EnvKey, Mode, Origin, ValidationError},
};

/// Most entries in a candidate env.
pub const MAX_ENV_ENTRIES: usize = 1024;
/// Longest value, in bytes.
pub const MAX_ENV_VALUE_BYTES: usize = 64 * 1024;

/// Why an environment could not be built. Messages name keys, never values.
///
/// The `Display` text is in the domain's words; the API's message for each
/// variant, which spells origins and RPCs by their wire names, is written in
/// [`crate::wire`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("env[{index}]: {source}")]
    InvalidKey {
        index: usize,
        source: ValidationError,
    },
    /// An entry claims the authority's own origin, which no candidate may.
    #[error("env[{index}] ({key}): the origin must be workspace, global or platform")]
    InvalidOrigin { index: usize, key: String },
    #[error("env key {key} appears twice with origin {origin:?}")]
    DuplicateKey { key: String, origin: Origin },
    #[error("the candidate env has {count} entries; at most {MAX_ENV_ENTRIES} are allowed")]
    TooManyEntries { count: usize },
    #[error(
        "the value of env key {key} is {len} bytes; at most {MAX_ENV_VALUE_BYTES} are allowed"
    )]
    ValueTooLong { key: String, len: usize },
    /// The candidate's value is not repeated: env values never leave the request.
    #[error(
        "the candidate env's {found_in} names a model other than the recorded model ({recorded})"
    )]
    ModelMismatch { found_in: String, recorded: String },
    #[error(
        "the workspace resolves byok but the candidate env has no workspace-origin credential \
         of {provider} (one of: {wanted})"
    )]
    MissingByokCredential { provider: String, wanted: String },
    #[error(
        "the workspace resolves platform_managed but the candidate env lacks the platform-origin \
         proxy input(s): {missing}"
    )]
    MissingPlatformProxy { missing: String },
}

/// One raw candidate entry, as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvInput {
    pub key: String,
    pub value: String,
    pub origin: Origin,
}

/// A validated candidate env: every entry, sorted by key and, within a key,
/// by precedence (workspace, then global, then platform; [`Origin`]'s
/// order), no (key, origin) twice. Sorted once when parsed, so the merged
/// view ([`CandidateEnv::merged`]) is a scan and a lookup a binary search.
/// A sorted vector, not a map per origin: a BuildEnv request carries tens of
/// entries, and three B-tree maps of them cost a node allocation and a
/// search per insert, and a sort again to merge them (docs/performance.md).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CandidateEnv {
    entries: Vec<Candidate>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Candidate {
    key: EnvKey,
    value: String,
    origin: Origin,
}

impl CandidateEnv {
    /// Validates keys, origins, limits and duplicates. Runs before any I/O.
    /// The first failing entry, in the order given, decides the error (a key
    /// fails as a duplicate at its second occurrence).
    pub fn parse(entries: impl IntoIterator<Item = EnvInput>) -> Result<Self, EnvError> {
        let entries = entries.into_iter();
        // Each entry with its position, for the duplicate check below.
        let mut valid: Vec<(Candidate, usize)> =
            Vec::with_capacity(entries.size_hint().0.min(MAX_ENV_ENTRIES));
        for (index, e) in entries.enumerate() {
            match Self::check(index, e) {
                Ok(c) => valid.push((c, index)),
                // A duplicate among the entries before this one fails first.
                Err(failure) => return Err(Self::sort(&mut valid).unwrap_or(failure)),
            }
        }
        match Self::sort(&mut valid) {
            Some(duplicate) => Err(duplicate),
            None => Ok(CandidateEnv {
                entries: valid.into_iter().map(|(c, _)| c).collect(),
            }),
        }
    }

    /// One entry on its own: its position, key, origin and value length.
    fn check(index: usize, e: EnvInput) -> Result<Candidate, EnvError> {
        if index >= MAX_ENV_ENTRIES {
            return Err(EnvError::TooManyEntries { count: index + 1 });
        }
        let key =
            EnvKey::from_string(e.key).map_err(|source| EnvError::InvalidKey { index, source })?;
        if e.origin == Origin::Authority {
            return Err(EnvError::InvalidOrigin {
                index,
                key: key.to_string(),
            });
        }
        if e.value.len() > MAX_ENV_VALUE_BYTES {
            return Err(EnvError::ValueTooLong {
                key: key.to_string(),
                len: e.value.len(),
            });
        }
        Ok(Candidate {
            key,
            value: e.value,
            origin: e.origin,
        })
    }

    /// Sorts `valid` by key and precedence (stably: equal ones stay in the
    /// order given) and returns, if any (key, origin) is there twice, the
    /// one whose second occurrence came first in the order given.
    fn sort(valid: &mut [(Candidate, usize)]) -> Option<EnvError> {
        valid.sort_by(|(a, _), (b, _)| (&a.key, a.origin).cmp(&(&b.key, b.origin)));
        valid
            .windows(2)
            .filter(|w| w[0].0.key == w[1].0.key && w[0].0.origin == w[1].0.origin)
            .map(|w| &w[1])
            .min_by_key(|(_, index)| *index)
            .map(|(c, _)| EnvError::DuplicateKey {
                key: c.key.to_string(),
                origin: c.origin,
            })
    }

    /// The entries of `key`, highest precedence first.
    fn of_key(&self, key: &str) -> &[Candidate] {
        let start = self.entries.partition_point(|c| c.key.as_str() < key);
        let len = self.entries[start..]
            .iter()
            .take_while(|c| c.key.as_str() == key)
            .count();
        &self.entries[start..start + len]
    }

    /// A non-empty value of `key` under exactly `origin`.
    fn get(&self, origin: Origin, key: &str) -> Option<&str> {
        self.of_key(key)
            .iter()
            .find(|c| c.origin == origin)
            .map(|c| c.value.as_str())
            .filter(|v| !v.is_empty())
    }

    /// The winning entry of `key`: the one of highest precedence.
    fn winner(&self, key: &str) -> Option<(&str, Origin)> {
        self.of_key(key)
            .first()
            .map(|c| (c.value.as_str(), c.origin))
    }

    /// One entry per key, the highest-precedence origin winning
    /// (workspace, then global, then platform), sorted by key: the first of
    /// each key's run.
    pub fn merged(&self) -> Vec<(&str, &str, Origin)> {
        self.entries
            .chunk_by(|a, b| a.key == b.key)
            .map(|run| (run[0].key.as_str(), run[0].value.as_str(), run[0].origin))
            .collect()
    }

    /// [`CandidateEnv::merged`], by value.
    fn into_winners(self) -> impl Iterator<Item = Candidate> {
        let mut entries = self.entries;
        entries.dedup_by(|later, first| later.key == first.key);
        entries.into_iter()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// One entry of the final env.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvEntry {
    pub key: String,
    pub value: String,
    pub origin: Origin,
}

/// The final env and what changed, keys sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltEnv {
    pub env: Vec<EnvEntry>,
    pub removed_keys: Vec<String>,
    pub added_keys: Vec<String>,
}

/// Shapes the provisioning env for `resolution` (made by `resolve` on
/// `record`), or fails closed with no env. Takes the candidate by value: the
/// entries it keeps are moved into the env, not copied.
pub fn build_env(
    resolution: &Resolution,
    record: &Record,
    registry: &Registry,
    candidate: CandidateEnv,
) -> Result<BuiltEnv, EnvError> {
    debug_assert_eq!(resolution.revision, record.revision);
    let recorded_model = resolution.model.as_ref();
    let model_vars = registry.model_vars(resolution.runtime.as_ref());

    // The container must run the model the decision was made on.
    for var in &model_vars {
        if let Some((value, _)) = candidate.winner(var).filter(|(v, _)| !v.is_empty()) {
            if recorded_model.map(|m| m.as_str()) != Some(value) {
                return Err(EnvError::ModelMismatch {
                    found_in: (*var).to_owned(),
                    recorded: recorded_model
                        .map_or_else(|| "none".to_owned(), |m| format!("{:?}", m.as_str())),
                });
            }
        }
    }

    // What the authority writes, keys sorted (and winning over a candidate's
    // entry of the same key).
    let mode = resolution.mode;
    let authority: Vec<EnvEntry> = {
        let mut written: BTreeMap<&str, &str> = BTreeMap::new();
        match mode {
            Mode::Byok => check_byok_credential(resolution, registry, &candidate)?,
            Mode::PlatformManaged => {
                route_through_proxy(resolution, registry, &candidate, &mut written)?
            }
            Mode::Disabled => {}
        }
        for var in BILLING_MODE_VARS {
            written.insert(var, mode.as_str());
        }
        if let Some(model) = recorded_model {
            for var in &model_vars {
                written.insert(var, model.as_str());
            }
        }
        written
            .into_iter()
            .map(|(key, value)| EnvEntry {
                key: key.to_owned(),
                value: value.to_owned(),
                origin: Origin::Authority,
            })
            .collect()
    };
    let added_keys: Vec<String> = authority.iter().map(|e| e.key.clone()).collect();
    let written = |key: &str| added_keys.binary_search_by(|k| k.as_str().cmp(key)).is_ok();

    // The candidate's winning entries kept, merged in key order with the
    // authority's (which win a key both have); those neither kept nor
    // rewritten: removed.
    let mut env = Vec::with_capacity(candidate.len() + authority.len());
    let mut removed_keys = Vec::new();
    let mut authority = authority.into_iter().peekable();
    for Candidate { key, value, origin } in candidate.into_winners() {
        let keep = if !registry.is_llm_key(key.as_str()) {
            true
        } else {
            match mode {
                // Only the customer's own credentials and endpoints; never a
                // proxy input, whatever its origin.
                Mode::Byok => {
                    origin == Origin::Workspace && !key.as_str().starts_with(PROXY_PREFIX)
                }
                Mode::PlatformManaged | Mode::Disabled => false,
            }
        };
        if !keep {
            if !written(key.as_str()) {
                removed_keys.push(key.into_string());
            }
            continue;
        }
        while let Some(e) = authority.next_if(|e| e.key.as_str() < key.as_str()) {
            env.push(e);
        }
        if authority.peek().is_some_and(|e| e.key == key.as_str()) {
            continue;
        }
        env.push(EnvEntry {
            key: key.into_string(),
            value,
            origin,
        });
    }
    env.extend(authority);
    Ok(BuiltEnv {
        env,
        removed_keys,
        added_keys,
    })
}

/// `byok` needs the customer's own credential; never the platform's.
fn check_byok_credential(
    resolution: &Resolution,
    registry: &Registry,
    candidate: &CandidateEnv,
) -> Result<(), EnvError> {
    let owned = |k: &str| candidate.get(Origin::Workspace, k).is_some();
    match &resolution.provider {
        Some(p) if !p.is_platform => {
            if p.credentials.iter().any(|k| owned(k)) {
                Ok(())
            } else {
                Err(EnvError::MissingByokCredential {
                    provider: p.id.clone(),
                    wanted: p.credentials.join(", "),
                })
            }
        }
        // An override chose byok over a platform (or no) provider: any vendor
        // credential the workspace itself owns will do.
        _ => {
            debug_assert_eq!(resolution.source, Source::Override);
            let any = candidate.entries.iter().any(|c| {
                c.origin == Origin::Workspace
                    && !c.value.is_empty()
                    && registry.is_vendor_credential(c.key.as_str())
            });
            if any {
                Ok(())
            } else {
                Err(EnvError::MissingByokCredential {
                    provider: resolution
                        .provider
                        .as_ref()
                        .map_or_else(|| "any provider".to_owned(), |p| p.id.clone()),
                    wanted: "any vendor credential".to_owned(),
                })
            }
        }
    }
}

/// `platform_managed`: every family with a PLATFORM base URL is pointed at the
/// proxy with the usage token; the required family must be among them.
fn route_through_proxy<'a>(
    resolution: &Resolution,
    registry: &'a Registry,
    candidate: &'a CandidateEnv,
    written: &mut BTreeMap<&'a str, &'a str>,
) -> Result<(), EnvError> {
    let required: &Family = resolution
        .provider
        .as_ref()
        .and_then(|p| p.family.as_deref())
        .and_then(|f| registry.family(f))
        .unwrap_or_else(|| registry.default_family());
    let token_var = registry.usage_token_var();
    let token = candidate.get(Origin::Platform, token_var);
    let base = candidate.get(Origin::Platform, &required.proxy_base_url);
    let missing: Vec<&str> = [
        base.is_none().then_some(required.proxy_base_url.as_str()),
        token.is_none().then_some(token_var),
    ]
    .into_iter()
    .flatten()
    .collect();
    let Some(token) = token.filter(|_| missing.is_empty()) else {
        return Err(EnvError::MissingPlatformProxy {
            missing: missing.join(", "),
        });
    };
    written.insert(token_var, token);
    for family in registry.families() {
        let Some(url) = candidate.get(Origin::Platform, &family.proxy_base_url) else {
            continue;
        };
        written.insert(family.proxy_base_url.as_str(), url);
        for var in &family.endpoints {
            written.insert(var.as_str(), url);
        }
        for var in &family.credentials {
            written.insert(var.as_str(), token);
        }
    }
    Ok(())
}
