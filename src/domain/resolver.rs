//! The one decision function: who pays for a workspace's LLM usage.
//!
//! [`resolve`] is pure over (record, registry). Resolve and BuildEnv both call
//! it on the same loaded record, so the read API and the provisioner cannot
//! disagree. Default-closed: the only ways to `byok` or `disabled` are a
//! validated override or a provider the registry recognizes as non-platform.

use super::{
    record::{Record, Stored},
    registry::{Provider, Registry},
    types::{CredentialKeys, Mode, Model, Runtime, WorkspaceId},
};

/// The rung of the chain that decided the mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Override,
    DerivedProvider,
    Default,
}

/// The provider the registry derived for a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerivedProvider {
    pub id: String,
    pub is_platform: bool,
    pub family: Option<String>,
    /// Any one of these authenticates the provider.
    pub credentials: Vec<String>,
}

impl DerivedProvider {
    fn from_provider(p: &Provider) -> Self {
        DerivedProvider {
            id: p.id.clone(),
            is_platform: p.platform,
            family: p.family.clone(),
            credentials: p.credentials.iter().map(|k| k.to_string()).collect(),
        }
    }
}

/// The decision for one workspace, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    pub workspace_id: WorkspaceId,
    pub mode: Mode,
    pub source: Source,
    pub provider: Option<DerivedProvider>,
    pub runtime: Option<Runtime>,
    pub model: Option<Model>,
    /// The valid stored override, if any.
    pub override_mode: Option<Mode>,
    pub revision: u64,
    /// The rungs evaluated, in order, in words (the decision itself is
    /// `mode` and `source`).
    pub trace: Vec<String>,
    /// For `platform_managed`: the keys the platform must refuse to store as
    /// the workspace's own secrets. Empty otherwise.
    pub forbidden_secret_keys: Vec<String>,
    /// The valid recorded credential names, sorted.
    pub credential_keys: Vec<String>,
}

/// Decides the mode for `record` with `registry`.
pub fn resolve(record: &Record, registry: &Registry) -> Resolution {
    let mut trace = Vec::new();

    let override_mode = match &record.override_mode {
        Stored::Absent => {
            trace.push("override: none".to_owned());
            None
        }
        Stored::Valid(m) => {
            trace.push(format!("override: {m}"));
            Some(*m)
        }
        Stored::Invalid(raw) => {
            trace.push(format!(
                "override: stored value {} is not a valid mode; ignored",
                quoted(raw)
            ));
            None
        }
    };

    let runtime = valid_or_note(&record.runtime, "runtime", &mut trace);
    let model = valid_or_note(&record.model, "model", &mut trace);
    let empty = CredentialKeys::default();
    let owned =
        valid_or_note(&record.credential_keys, "credential_keys", &mut trace).unwrap_or(&empty);

    let provider = derive_provider(runtime, model, owned, registry, &mut trace);

    let (mode, source) = match (override_mode, &provider) {
        (Some(m), _) => (m, Source::Override),
        (None, Some(p)) if p.is_platform => (Mode::PlatformManaged, Source::DerivedProvider),
        (None, Some(_)) => (Mode::Byok, Source::DerivedProvider),
        (None, None) => (Mode::PlatformManaged, Source::Default),
    };
    // The closing `decision:` line names the source as the API does, so the
    // wire writes it (`wire::convert::resolution_to_wire`).

    let forbidden_secret_keys = if mode == Mode::PlatformManaged {
        registry.forbidden_secret_keys().to_vec()
    } else {
        Vec::new()
    };

    Resolution {
        workspace_id: record.workspace_id,
        mode,
        source,
        provider,
        runtime: runtime.cloned(),
        model: model.cloned(),
        override_mode,
        revision: record.revision,
        trace,
        forbidden_secret_keys,
        credential_keys: owned.to_strings(),
    }
}

fn valid_or_note<'a, T>(
    field: &'a Stored<T>,
    name: &str,
    trace: &mut Vec<String>,
) -> Option<&'a T> {
    match field {
        Stored::Invalid(raw) => {
            trace.push(format!(
                "{name}: stored value {} is invalid; ignored",
                quoted(raw)
            ));
            None
        }
        other => other.valid(),
    }
}

/// Rung 2: the provider for (runtime, model, owned credentials), if any rule matches.
fn derive_provider(
    runtime: Option<&Runtime>,
    model: Option<&Model>,
    owned: &CredentialKeys,
    registry: &Registry,
    trace: &mut Vec<String>,
) -> Option<DerivedProvider> {
    let (Some(runtime), Some(model)) = (runtime, model) else {
        trace.push(match (runtime, model) {
            (None, None) => "derive: no runtime and no model recorded".to_owned(),
            (None, Some(_)) => "derive: no runtime recorded".to_owned(),
            _ => "derive: no model recorded".to_owned(),
        });
        return None;
    };
    let Some(rule) = registry.match_rule(runtime.as_str(), model.as_str()) else {
        trace.push(format!(
            "derive: no rule for runtime {runtime} matches model {model}"
        ));
        return None;
    };
    trace.push(format!(
        "derive: rule {} (runtime {runtime}, pattern {}) matches model {model}; candidates {}",
        rule.number,
        quoted(&rule.pattern),
        rule.candidate_ids().collect::<Vec<_>>().join(", ")
    ));
    let candidates = rule.candidates.as_slice();

    let chosen: &Provider = if candidates.len() == 1 {
        &candidates[0]
    } else if let Some((p, key)) = candidates.iter().find_map(|p| {
        p.credentials
            .iter()
            .find(|k| owned.contains(k))
            .map(|k| (p, k))
    }) {
        trace.push(format!(
            "derive: workspace owns {key}, a credential of {}",
            p.id
        ));
        p
    } else if let Some(p) = candidates.iter().find(|p| p.platform) {
        trace.push(format!(
            "derive: workspace owns no candidate's credential; platform candidate {}",
            p.id
        ));
        p
    } else {
        trace.push(format!(
            "derive: workspace owns no candidate's credential; first candidate {}",
            candidates[0].id
        ));
        &candidates[0]
    };
    trace.push(format!(
        "derive: provider {} is {}",
        chosen.id,
        if chosen.platform {
            "the platform's -> platform_managed"
        } else {
            "not the platform's -> byok"
        }
    ));
    Some(DerivedProvider::from_provider(chosen))
}

/// Quotes a stored value for a trace line, escaping control characters and
/// shortening very long values.
fn quoted(raw: &str) -> String {
    const MAX: usize = 80;
    let mut end = raw.len().min(MAX);
    while !raw.is_char_boundary(end) {
        end -= 1;
    }
    if end < raw.len() {
        format!("{:?}…", &raw[..end])
    } else {
        format!("{raw:?}")
    }
}
