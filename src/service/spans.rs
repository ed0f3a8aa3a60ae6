//! The decision's child spans. The handlers call these in place of the
//! core's [`domain::resolve`] and [`domain::build_env`]: the same functions,
//! each run in its own span (`resolve`, `build_env`) under the call's server
//! span, which carries the outcome, mode, source and revision, and never a
//! value.

use tracing::info_span;

use crate::{
    domain::{self, BuiltEnv, CandidateEnv, EnvError, Record, Registry, Resolution},
    telemetry::rpc_span::record_decision,
};

/// [`domain::resolve`], in the `resolve` span.
pub fn resolve(record: &Record, registry: &Registry) -> Resolution {
    let span = info_span!("resolve");
    let resolution = span.in_scope(|| domain::resolve(record, registry));
    record_decision(&span, &resolution);
    resolution
}

/// [`domain::build_env`], in the `build_env` span.
pub fn build_env(
    resolution: &Resolution,
    record: &Record,
    registry: &Registry,
    candidate: CandidateEnv,
) -> Result<BuiltEnv, EnvError> {
    let span = info_span!("build_env");
    let built = span.in_scope(|| domain::build_env(resolution, record, registry, candidate));
    record_decision(&span, resolution);
    built
}
