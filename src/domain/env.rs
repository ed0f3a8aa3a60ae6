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

/// A validated candidate env: one map per origin.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CandidateEnv {
    workspace: BTreeMap<EnvKey, String>,
    global: BTreeMap<EnvKey, String>,
    platform: BTreeMap<EnvKey, String>,
}

impl CandidateEnv {
    /// Validates keys, origins, limits and duplicates. Runs before any I/O.
    pub fn parse(entries: impl IntoIterator<Item = EnvInput>) -> Result<Self, EnvError> {
        let entries = entries.into_iter();
        let mut env = CandidateEnv::default();
        for (index, e) in entries.enumerate() {
            if index >= MAX_ENV_ENTRIES {
                return Err(EnvError::TooManyEntries { count: index + 1 });
            }
            let key = EnvKey::from_string(e.key)
                .map_err(|source| EnvError::InvalidKey { index, source })?;
            let map = match e.origin {
                Origin::Workspace => &mut env.workspace,
                Origin::Global => &mut env.global,
                Origin::Platform => &mut env.platform,
                Origin::Authority => {
                    return Err(EnvError::InvalidOrigin {
                        index,
                        key: key.to_string(),
                    })
                }
            };
            if e.value.len() > MAX_ENV_VALUE_BYTES {
                return Err(EnvError::ValueTooLong {
                    key: key.to_string(),
                    len: e.value.len(),
                });
            }
            if map.contains_key(&key) {
                return Err(EnvError::DuplicateKey {
                    key: key.to_string(),
                    origin: e.origin,
                });
            }
            map.insert(key, e.value);
        }
        Ok(env)
    }

    fn origin_map(&self, origin: Origin) -> &BTreeMap<EnvKey, String> {
        match origin {
            Origin::Workspace => &self.workspace,
            Origin::Global => &self.global,
            Origin::Platform | Origin::Authority => &self.platform,
        }
    }

    /// A non-empty value of `key` under exactly `origin`.
    fn get(&self, origin: Origin, key: &str) -> Option<&str> {
        self.origin_map(origin)
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// One entry per key, the highest-precedence origin winning
    /// (workspace, then global, then platform), sorted by key: each origin's
    /// entries, highest precedence first, sorted stably (the three runs are
    /// each sorted already) and the later duplicates dropped. No map is
    /// built: `build_env` looks keys up by binary search.
    pub fn merged(&self) -> Vec<(&str, &str, Origin)> {
        let mut out: Vec<(&str, &str, Origin)> = Vec::with_capacity(self.len());
        for origin in [Origin::Workspace, Origin::Global, Origin::Platform] {
            out.extend(
                self.origin_map(origin)
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str(), origin)),
            );
        }
        out.sort_by(|a, b| a.0.cmp(b.0));
        out.dedup_by(|later, first| later.0 == first.0);
        out
    }

    pub fn len(&self) -> usize {
        self.workspace.len() + self.global.len() + self.platform.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
/// `record`), or fails closed with no env.
pub fn build_env(
    resolution: &Resolution,
    record: &Record,
    registry: &Registry,
    candidate: &CandidateEnv,
) -> Result<BuiltEnv, EnvError> {
    debug_assert_eq!(resolution.revision, record.revision);
    let merged = candidate.merged();
    let merged_get = |key: &str| {
        merged
            .binary_search_by(|e| e.0.cmp(key))
            .ok()
            .map(|i| (merged[i].1, merged[i].2))
    };
    let recorded_model = resolution.model.as_ref();
    let model_vars = registry.model_vars(resolution.runtime.as_ref());

    // The container must run the model the decision was made on.
    for var in &model_vars {
        if let Some((value, _)) = merged_get(var).filter(|(v, _)| !v.is_empty()) {
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
    let mut written: BTreeMap<&str, &str> = BTreeMap::new();
    match mode {
        Mode::Byok => check_byok_credential(resolution, registry, candidate)?,
        Mode::PlatformManaged => {
            route_through_proxy(resolution, registry, candidate, &mut written)?
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

    // The candidate's entries kept, in key order, and
    // those neither kept nor rewritten: removed.
    let mut kept: Vec<(&str, &str, Origin)> = Vec::with_capacity(merged.len());
    let mut removed_keys = Vec::new();
    for &(key, value, origin) in &merged {
        let keep = if !registry.is_llm_key(key) {
            true
        } else {
            match mode {
                // Only the customer's own credentials and endpoints; never a
                // proxy input, whatever its origin.
                Mode::Byok => origin == Origin::Workspace && !key.starts_with(PROXY_PREFIX),
                Mode::PlatformManaged | Mode::Disabled => false,
            }
        };
        if keep {
            kept.push((key, value, origin));
        } else if !written.contains_key(key) {
            removed_keys.push(key.to_owned());
        }
    }

    // Both sorted: merged into the env in key order, one copy of each entry.
    let added_keys: Vec<String> = written.keys().map(|k| (*k).to_owned()).collect();
    let entry = |key: &str, value: &str, origin| EnvEntry {
        key: key.to_owned(),
        value: value.to_owned(),
        origin,
    };
    let mut env = Vec::with_capacity(kept.len() + written.len());
    let mut authority = written.into_iter().peekable();
    for (key, value, origin) in kept {
        while let Some((k, v)) = authority.next_if(|(k, _)| *k < key) {
            env.push(entry(k, v, Origin::Authority));
        }
        if authority.peek().is_some_and(|(k, _)| *k == key) {
            continue;
        }
        env.push(entry(key, value, origin));
    }
    env.extend(authority.map(|(k, v)| entry(k, v, Origin::Authority)));
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
            let any = candidate
                .workspace
                .iter()
                .any(|(k, v)| !v.is_empty() && registry.is_vendor_credential(k.as_str()));
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
