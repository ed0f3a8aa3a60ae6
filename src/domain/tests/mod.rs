//! The domain test suite: the resolver's decision table, the env builder's
//! rules for every mode and origin, the seeds' cases, and property tests for
//! the invariants the contract promises whatever the inputs.
//!
//! Everything here runs against the built-in registry, as shipped, unless a
//! test says otherwise.

mod env;
mod props;
mod resolver;
mod seeds;

use std::sync::OnceLock;

use super::{
    build_env, env::EnvEntry, resolve, BuiltEnv, CandidateEnv, EnvError, EnvInput, Mode, Model,
    Origin, Record, Registry, Resolution, Runtime, Stored, WorkspaceId,
};

/// Short names for origins, so env tables read like the contract.
pub(super) const W: Origin = Origin::Workspace;
pub(super) const G: Origin = Origin::Global;
pub(super) const P: Origin = Origin::Platform;
pub(super) const A: Origin = Origin::Authority;

/// The metering proxy's base URLs and the usage token, as PLATFORM entries carry them.
pub(super) const ANTHROPIC_PROXY: &str = "https://llm-proxy.molecule.test/anthropic";
pub(super) const OPENAI_PROXY: &str = "https://llm-proxy.molecule.test/openai";
pub(super) const USAGE_TOKEN: &str = "usage-token-of-this-workspace";

/// The revision every test record is loaded at.
pub(super) const REVISION: u64 = 7;

/// The built-in registry, loaded once.
pub(super) fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Registry::builtin().expect("the built-in registry loads"))
}

pub(super) fn workspace_id() -> WorkspaceId {
    WorkspaceId::parse("6b66de8d-9337-4fb4-be8d-6d49dca0d809").expect("a valid id")
}

/// A record as the store would load it from this stored text; invalid text
/// becomes `Stored::Invalid`, exactly as a hand-edited row would.
pub(super) fn record(
    runtime: Option<&str>,
    model: Option<&str>,
    owned: &[&str],
    override_mode: Option<&str>,
) -> Record {
    StoredText {
        runtime: runtime.map(str::to_owned),
        model: model.map(str::to_owned),
        credential_keys: owned.iter().map(|k| (*k).to_owned()).collect(),
        override_mode: override_mode.map(str::to_owned),
    }
    .into_record(workspace_id(), REVISION)
}

/// A record's fields as the store holds them (text), for tests that plant
/// what a hand edit could.
#[derive(Debug, Clone, Default)]
pub(super) struct StoredText {
    pub(super) runtime: Option<String>,
    pub(super) model: Option<String>,
    pub(super) credential_keys: Vec<String>,
    pub(super) override_mode: Option<String>,
}

impl StoredText {
    /// The record the store loads from this text: invalid text becomes
    /// `Stored::Invalid`.
    pub(super) fn into_record(self, workspace_id: WorkspaceId, revision: u64) -> Record {
        Record {
            workspace_id,
            runtime: Stored::from_text(self.runtime.as_deref(), Runtime::parse),
            model: Stored::from_text(self.model.as_deref(), Model::parse),
            credential_keys: Stored::from_names(&self.credential_keys),
            override_mode: Stored::from_text(self.override_mode.as_deref(), |s| s.parse::<Mode>()),
            revision,
        }
    }
}

/// Raw candidate entries from (origin, key, value) triples.
pub(super) fn inputs(entries: &[(Origin, &str, &str)]) -> Vec<EnvInput> {
    entries
        .iter()
        .map(|(origin, key, value)| EnvInput {
            key: (*key).to_owned(),
            value: (*value).to_owned(),
            origin: *origin,
        })
        .collect()
}

/// A validated candidate env from (origin, key, value) triples.
pub(super) fn candidate(entries: &[(Origin, &str, &str)]) -> CandidateEnv {
    CandidateEnv::parse(inputs(entries)).expect("a valid candidate env")
}

/// The PLATFORM entries a platform_managed Anthropic workspace needs.
pub(super) fn anthropic_proxy_inputs() -> Vec<(Origin, &'static str, &'static str)> {
    vec![
        (P, "MOLECULE_LLM_ANTHROPIC_BASE_URL", ANTHROPIC_PROXY),
        (P, "MOLECULE_LLM_USAGE_TOKEN", USAGE_TOKEN),
    ]
}

/// Resolves `record` and builds its env from `entries`, as BuildEnv does.
pub(super) fn build(
    record: &Record,
    entries: &[(Origin, &str, &str)],
) -> (Resolution, Result<BuiltEnv, EnvError>) {
    let resolution = resolve(record, registry());
    let built = build_env(&resolution, record, registry(), candidate(entries));
    (resolution, built)
}

/// `build`, for a case that must succeed.
pub(super) fn build_ok(record: &Record, entries: &[(Origin, &str, &str)]) -> BuiltEnv {
    match build(record, entries).1 {
        Ok(built) => built,
        Err(e) => panic!("expected an env, got {e:?}"),
    }
}

/// `build`, for a case that must fail.
pub(super) fn build_err(record: &Record, entries: &[(Origin, &str, &str)]) -> EnvError {
    match build(record, entries).1 {
        Ok(built) => panic!("expected an error, got {built:#?}"),
        Err(e) => e,
    }
}

/// The output entry for `key`, if any, as (value, origin).
pub(super) fn get<'a>(built: &'a BuiltEnv, key: &str) -> Option<(&'a str, Origin)> {
    built
        .env
        .iter()
        .find(|e| e.key == key)
        .map(|e| (e.value.as_str(), e.origin))
}

/// The whole output env as (key, value, origin) triples, in output order.
pub(super) fn triples(built: &BuiltEnv) -> Vec<(&str, &str, Origin)> {
    built
        .env
        .iter()
        .map(|EnvEntry { key, value, origin }| (key.as_str(), value.as_str(), *origin))
        .collect()
}

/// Owned strings from string literals, for comparing key lists.
pub(super) fn strings(keys: &[&str]) -> Vec<String> {
    keys.iter().map(|k| (*k).to_owned()).collect()
}
