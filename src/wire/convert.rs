//! proto ⇄ domain, at the edge. Wire strings become domain types here and
//! nowhere else; every failure is an [`ApiError`] naming the field.

use crate::{
    domain::{
        env::{EnvEntry, EnvError, MAX_ENV_ENTRIES},
        resolver::Source,
        CandidateEnv, Change, CredentialKeys, EnvInput, Mode, Model, Origin, Patch, Reason, Record,
        Resolution, Runtime, WorkspaceId,
    },
    proto,
    store::AuditEntry,
};

use crate::service::error::{ApiError, ErrorReason};

pub fn workspace_id(s: &str) -> Result<WorkspaceId, ApiError> {
    WorkspaceId::parse(s).map_err(|e| ApiError::field("workspace_id", &e))
}

pub fn mode_to_wire(m: Mode) -> proto::Mode {
    match m {
        Mode::PlatformManaged => proto::Mode::PlatformManaged,
        Mode::Byok => proto::Mode::Byok,
        Mode::Disabled => proto::Mode::Disabled,
    }
}

/// A proto mode as the domain's; `None` for `MODE_UNSPECIFIED`.
pub fn mode_from_proto(m: proto::Mode) -> Option<Mode> {
    match m {
        proto::Mode::PlatformManaged => Some(Mode::PlatformManaged),
        proto::Mode::Byok => Some(Mode::Byok),
        proto::Mode::Disabled => Some(Mode::Disabled),
        proto::Mode::Unspecified => None,
    }
}

/// A proto source as the domain's; `None` for `SOURCE_UNSPECIFIED`.
pub(crate) fn source_from_proto(s: proto::Source) -> Option<Source> {
    match s {
        proto::Source::Override => Some(Source::Override),
        proto::Source::DerivedProvider => Some(Source::DerivedProvider),
        proto::Source::Default => Some(Source::Default),
        proto::Source::Unspecified => None,
    }
}

/// ListWorkspaces' mode filter: unspecified is any mode.
pub fn mode_filter(v: i32) -> Result<Option<Mode>, ApiError> {
    proto::Mode::try_from(v).map(mode_from_proto).map_err(|_| {
        ApiError::new(
            ErrorReason::InvalidMode,
            format!("mode: {v} is not a mode (0 any, 1 platform_managed, 2 byok, 3 disabled)"),
        )
    })
}

/// ListWorkspaces' source filter: unspecified is any source.
pub fn source_filter(v: i32) -> Result<Option<Source>, ApiError> {
    proto::Source::try_from(v)
        .map(source_from_proto)
        .map_err(|_| {
            ApiError::new(
                ErrorReason::InvalidField,
                format!(
                "source: {v} is not a source (0 any, 1 OVERRIDE, 2 DERIVED_PROVIDER, 3 DEFAULT)"
            ),
            )
        })
}

/// The mode a ReportApplied request says an instance runs.
pub fn applied_mode(v: i32) -> Result<Mode, ApiError> {
    proto::Mode::try_from(v)
        .ok()
        .and_then(mode_from_proto)
        .ok_or_else(|| {
            ApiError::new(
                ErrorReason::InvalidMode,
                "mode: report the resolution.mode of the BuildEnv result the instance was started with",
            )
        })
}

/// A requested mode: `MODE_UNSPECIFIED` and unknown numbers are refused.
pub fn mode_from_wire(v: i32) -> Result<Mode, ApiError> {
    match proto::Mode::try_from(v).map(mode_from_proto) {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(ApiError::new(
            ErrorReason::InvalidMode,
            "override_mode: MODE_UNSPECIFIED is not a mode; to remove an override use Clear",
        )),
        Err(_) => Err(ApiError::new(
            ErrorReason::InvalidMode,
            format!("override_mode: {v} is not a mode (1 platform_managed, 2 byok, 3 disabled)"),
        )),
    }
}

/// An origin number as the domain's origin; `None` for unspecified and
/// unknown numbers.
pub fn origin_from_wire(v: i32) -> Option<Origin> {
    match proto::Origin::try_from(v) {
        Ok(proto::Origin::Workspace) => Some(Origin::Workspace),
        Ok(proto::Origin::Global) => Some(Origin::Global),
        Ok(proto::Origin::Platform) => Some(Origin::Platform),
        Ok(proto::Origin::Authority) => Some(Origin::Authority),
        Ok(proto::Origin::Unspecified) | Err(_) => None,
    }
}

fn source_to_wire(s: Source) -> proto::Source {
    match s {
        Source::Override => proto::Source::Override,
        Source::DerivedProvider => proto::Source::DerivedProvider,
        Source::Default => proto::Source::Default,
    }
}

fn origin_to_wire(o: Origin) -> proto::Origin {
    match o {
        Origin::Workspace => proto::Origin::Workspace,
        Origin::Global => proto::Origin::Global,
        Origin::Platform => proto::Origin::Platform,
        Origin::Authority => proto::Origin::Authority,
    }
}

/// A source as traces, logs and metrics name it: the proto name without its
/// `SOURCE_` prefix (`DERIVED_PROVIDER`).
pub fn source_name(s: Source) -> &'static str {
    let name = source_to_wire(s).as_str_name();
    name.strip_prefix("SOURCE_").unwrap_or(name)
}

/// The trace's closing line: the decision, its source named as the API
/// names it.
fn decision_line(r: &Resolution) -> String {
    format!("decision: {} (source {})", r.mode, source_name(r.source))
}

/// The API's message for an env that could not be built: it names origins
/// (`ORIGIN_WORKSPACE`) and RPCs as a caller knows them.
pub fn env_error_message(e: &EnvError) -> String {
    match e {
        EnvError::InvalidOrigin { index, key } => {
            format!("env[{index}] ({key}): origin must be WORKSPACE, GLOBAL or PLATFORM")
        }
        EnvError::DuplicateKey { key, origin } => format!(
            "env key {key} appears twice with origin {}",
            origin_to_wire(*origin).as_str_name()
        ),
        EnvError::ModelMismatch { found_in, recorded } => format!(
            "the candidate env's {found_in} names a model other than the recorded model \
             ({recorded}); record the model with Set, or provision the recorded one"
        ),
        EnvError::MissingByokCredential { provider, wanted } => format!(
            "the workspace resolves byok but the candidate env has no WORKSPACE-origin \
             credential of {provider} (one of: {wanted}); the platform's credentials are never \
             used instead"
        ),
        EnvError::MissingPlatformProxy { missing } => format!(
            "the workspace resolves platform_managed but the candidate env lacks the \
             PLATFORM-origin proxy input(s): {missing}"
        ),
        EnvError::InvalidKey { .. }
        | EnvError::TooManyEntries { .. }
        | EnvError::ValueTooLong { .. } => e.to_string(),
    }
}

/// The decision as the API sends it; its trace is the resolver's rungs, then
/// the decision and the source that made it. By value: the strings move into
/// the message rather than being copied (a caller that keeps its resolution
/// clones it).
pub fn resolution_to_wire(r: Resolution) -> proto::Resolution {
    let decision = decision_line(&r);
    let mut trace = r.trace;
    trace.push(decision);
    proto::Resolution {
        workspace_id: r.workspace_id.to_string(),
        mode: mode_to_wire(r.mode).into(),
        source: source_to_wire(r.source).into(),
        provider_is_platform: r.provider.as_ref().is_some_and(|p| p.is_platform),
        provider: r.provider.map(|p| p.id).unwrap_or_default(),
        runtime: r.runtime.map(Runtime::into_string).unwrap_or_default(),
        model: r.model.map(Model::into_string).unwrap_or_default(),
        override_mode: r
            .override_mode
            .map_or(proto::Mode::Unspecified, mode_to_wire)
            .into(),
        revision: r.revision,
        trace,
        forbidden_secret_keys: r.forbidden_secret_keys,
        credential_keys: r.credential_keys,
    }
}

/// A validated Set request.
#[derive(Debug)]
pub struct SetInput {
    pub workspace_id: WorkspaceId,
    pub change: Change,
    pub expected_revision: Option<u64>,
    pub reason: Option<Reason>,
    /// Check and answer as the write would, writing nothing.
    pub dry_run: bool,
}

impl SetInput {
    pub fn sets_override(&self) -> bool {
        matches!(&self.change, Change::Set(p) if p.override_mode.is_some())
    }
}

fn optional_name<T>(
    field: &str,
    v: Option<&str>,
    parse: impl Fn(&str) -> Result<T, crate::domain::ValidationError>,
) -> Result<Option<Option<T>>, ApiError> {
    match v {
        None => Ok(None),
        Some("") => Ok(Some(None)),
        Some(s) => parse(s)
            .map(|t| Some(Some(t)))
            .map_err(|e| ApiError::field(field, &e)),
    }
}

fn reason(s: &str) -> Result<Option<Reason>, ApiError> {
    Reason::parse(s).map_err(|e| ApiError::field("reason", &e))
}

pub fn set_request(req: &proto::SetRequest) -> Result<SetInput, ApiError> {
    let workspace_id = workspace_id(&req.workspace_id)?;
    let override_mode = req.override_mode.map(mode_from_wire).transpose()?;
    let runtime = optional_name("runtime", req.runtime.as_deref(), Runtime::parse)?;
    let model = optional_name("model", req.model.as_deref(), Model::parse)?;
    let credential_keys = req
        .credential_keys
        .as_ref()
        .map(|k| {
            CredentialKeys::parse(k.keys.iter().map(String::as_str))
                .map_err(|e| ApiError::field("credential_keys", &e))
        })
        .transpose()?;
    let reason = reason(&req.reason)?;
    let patch = Patch {
        runtime,
        model,
        credential_keys,
        override_mode,
    };
    if patch.is_empty() {
        return Err(ApiError::new(
            ErrorReason::NothingToSet,
            "nothing to set: give override_mode, runtime, model or credential_keys",
        ));
    }
    if patch.override_mode.is_some() && reason.is_none() {
        return Err(ApiError::new(
            ErrorReason::ReasonRequired,
            "setting override_mode needs a non-empty reason",
        ));
    }
    Ok(SetInput {
        workspace_id,
        change: Change::Set(patch),
        expected_revision: req.expected_revision,
        reason,
        dry_run: req.dry_run,
    })
}

/// A validated BatchCreateWorkspaces request: each item's workspace and the
/// change that creates it, in request order, and the reason.
#[derive(Debug)]
pub struct BatchCreateInput {
    pub items: Vec<(WorkspaceId, Change)>,
    pub reason: Option<Reason>,
}

/// Each item is validated as the `SetRequest` it stands for (create-only),
/// and an error names the item: `workspaces[3].model …`.
pub fn batch_create_request(
    req: &proto::BatchCreateWorkspacesRequest,
) -> Result<BatchCreateInput, ApiError> {
    let max = crate::store::MAX_BATCH_CREATE;
    if req.workspaces.is_empty() {
        return Err(ApiError::new(
            ErrorReason::NothingToSet,
            "nothing to create: give at least one workspace in workspaces",
        ));
    }
    if req.workspaces.len() > max {
        return Err(ApiError::new(
            ErrorReason::LimitExceeded,
            format!(
                "workspaces has {} items; at most {max} are allowed in one call (send several)",
                req.workspaces.len()
            ),
        ));
    }
    let reason = reason(&req.reason)?;
    let mut items = Vec::with_capacity(req.workspaces.len());
    let mut first = std::collections::HashMap::with_capacity(req.workspaces.len());
    for (i, w) in req.workspaces.iter().enumerate() {
        let set = proto::SetRequest {
            workspace_id: w.workspace_id.clone(),
            override_mode: (w.override_mode != i32::from(proto::Mode::Unspecified))
                .then_some(w.override_mode),
            runtime: Some(w.runtime.clone()),
            model: Some(w.model.clone()),
            credential_keys: Some(proto::CredentialKeys {
                keys: w.credential_keys.clone(),
            }),
            expected_revision: Some(0),
            reason: req.reason.clone(),
            dry_run: false,
        };
        let input = set_request(&set).map_err(|e| match e.reason {
            ErrorReason::ReasonRequired => ApiError::new(
                e.reason,
                format!("workspaces[{i}].override_mode: setting it needs a non-empty reason"),
            ),
            _ => ApiError::new(e.reason, format!("workspaces[{i}].{}", e.message)),
        })?;
        if let Some(j) = first.insert(input.workspace_id, i) {
            return Err(ApiError::new(
                ErrorReason::InvalidField,
                format!("workspaces[{i}].workspace_id: the same workspace as workspaces[{j}]"),
            ));
        }
        items.push((input.workspace_id, input.change));
    }
    Ok(BatchCreateInput { items, reason })
}

pub fn clear_request(req: &proto::ClearRequest) -> Result<SetInput, ApiError> {
    let workspace_id = workspace_id(&req.workspace_id)?;
    let reason = reason(&req.reason)?;
    if reason.is_none() {
        return Err(ApiError::new(
            ErrorReason::ReasonRequired,
            "Clear needs a non-empty reason",
        ));
    }
    Ok(SetInput {
        workspace_id,
        change: Change::ClearOverride,
        expected_revision: req.expected_revision,
        reason,
        dry_run: req.dry_run,
    })
}

/// The candidate env, validated before any I/O.
/// Takes the request's entries: their keys and values move into the
/// candidate, uncopied.
pub fn candidate_env(env: Vec<proto::EnvVar>) -> Result<CandidateEnv, ApiError> {
    if env.len() > MAX_ENV_ENTRIES {
        return Err(ApiError::new(
            ErrorReason::LimitExceeded,
            format!(
                "env has {} entries; at most {MAX_ENV_ENTRIES} are allowed",
                env.len()
            ),
        ));
    }
    let inputs = env.into_iter().map(|e| EnvInput {
        key: e.key,
        value: e.value,
        // UNSPECIFIED, AUTHORITY and unknown numbers are all refused by the
        // domain as an invalid origin for a candidate entry.
        origin: origin_from_wire(e.origin).unwrap_or(Origin::Authority),
    });
    Ok(CandidateEnv::parse(inputs)?)
}

pub fn env_to_wire(env: Vec<EnvEntry>) -> Vec<proto::EnvVar> {
    env.into_iter()
        .map(|e| proto::EnvVar {
            key: e.key,
            value: e.value,
            origin: origin_to_wire(e.origin).into(),
        })
        .collect()
}

/// A record's fields as History shows them: as stored, an invalid
/// (hand-edited) value verbatim.
fn fields_to_wire(r: &Record) -> proto::RecordFields {
    proto::RecordFields {
        runtime: r
            .runtime
            .text(Runtime::as_str)
            .unwrap_or_default()
            .to_owned(),
        model: r.model.text(Model::as_str).unwrap_or_default().to_owned(),
        credential_keys: r.credential_keys.names(),
        override_mode: r
            .override_mode
            .text(|m| m.as_str())
            .unwrap_or_default()
            .to_owned(),
    }
}

pub fn audit_to_wire(a: &AuditEntry) -> proto::AuditEntry {
    proto::AuditEntry {
        revision: a.revision,
        actor: a.actor.clone(),
        reason: a.reason.clone(),
        time: Some(a.at.into()),
        before: a.before.as_ref().map(fields_to_wire),
        after: Some(fields_to_wire(&a.after)),
    }
}

/// History paging: 0 → 50, capped at 500.
pub fn page_size(n: u32) -> u32 {
    match n {
        0 => 50,
        n => n.min(500),
    }
}

/// A page token is the revision the next page starts below.
pub fn page_token(s: &str) -> Result<Option<u64>, ApiError> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse::<u64>()
        .ok()
        .filter(|r| *r >= 1)
        .map(Some)
        .ok_or_else(|| {
            ApiError::new(
                ErrorReason::InvalidField,
                "page_token: pass the next_page_token of a previous History response",
            )
        })
}
