//! The gRPC face of the authority: `molecule.billing.v1.BillingMode`.
//!
//! Each handler does the same four things in the contract's error order:
//! authorize, parse the request at the edge (INVALID_ARGUMENT before any I/O),
//! load the one record, and decide with the core's single [`resolve`].

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::{
    auth::{Action, Principal},
    domain::{BuiltEnv, Record, Registry, Resolution, WorkspaceId},
    proto::{self, billing_mode_server::BillingMode},
    store::{Create, CreateOutcome, Store, Write},
};

pub mod codec;
pub mod drift;
pub mod error;
mod list;
pub mod spans;
pub mod spend;
pub mod transport_errors;
pub mod watch;

use crate::wire::convert;

/// Integrity check of a page token's text, for the listing `kind` (not a
/// secret: any replica, and anyone, can compute it; it only tells a
/// handed-out token from a mangled or made-up one, which the contract
/// refuses).
pub(crate) fn page_check(kind: &str, text: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("billing-mode {kind} page v1\n{text}"));
    hex::encode(&digest[..8])
}
use error::{ApiError, ErrorReason};
// The core's decision functions, each in its own child span.
use spans::{build_env, resolve};

/// The service: the store, the registry and the change feed's watcher.
#[derive(Clone)]
pub struct BillingModeService {
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    watcher: watch::Watcher,
    spend: crate::snapshot::SpendSnapshot,
    /// The authenticator in force, followed by streams (a Watch whose token
    /// a reload takes away ends); `None`: calls are checked only as they start.
    auth: Option<crate::reload::SharedAuth>,
}

impl std::fmt::Debug for BillingModeService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BillingModeService").finish_non_exhaustive()
    }
}

impl BillingModeService {
    pub fn new(store: Arc<dyn Store>, registry: Arc<Registry>, watcher: watch::Watcher) -> Self {
        BillingModeService {
            store,
            registry,
            watcher,
            // Never current until one is given: CheckSpend fails closed.
            spend: crate::snapshot::SpendSnapshot::new(std::time::Duration::ZERO),
            auth: None,
        }
    }

    /// Follows the authenticator in force: a Watch stream ends once its
    /// token no longer authenticates, or no longer may Watch.
    pub fn with_auth(self, auth: crate::reload::SharedAuth) -> Self {
        BillingModeService {
            auth: Some(auth),
            ..self
        }
    }

    /// Answers CheckSpend from `spend`.
    pub fn with_spend(self, spend: crate::snapshot::SpendSnapshot) -> Self {
        BillingModeService { spend, ..self }
    }

    /// The record, in one round trip; a workspace nobody registered is an error.
    async fn load(&self, id: &WorkspaceId) -> Result<Record, ApiError> {
        self.store
            .load(id)
            .await?
            .ok_or_else(|| ApiError::from(crate::store::StoreError::NotFound))
    }

    async fn write(
        &self,
        principal: &Principal,
        input: convert::SetInput,
    ) -> Result<Resolution, ApiError> {
        let write = Write {
            workspace_id: input.workspace_id,
            change: &input.change,
            expected_revision: input.expected_revision,
            actor: &principal.name,
            reason: input.reason.as_ref().map_or("", |r| r.as_str()),
        };
        let record = if input.dry_run {
            self.store.dry_run(write).await?
        } else {
            self.store.write(write).await?
        };
        Ok(resolve(&record, &self.registry))
    }
}

fn principal<T>(req: &Request<T>) -> Result<Principal, ApiError> {
    req.extensions().get::<Principal>().cloned().ok_or_else(|| {
        ApiError::new(
            ErrorReason::Unauthenticated,
            "the request was not authenticated",
        )
    })
}

/// The decision log: one INFO line per decision; names, never values.
fn log_decision(rpc: &'static str, actor: &str, r: &Resolution, built: Option<&BuiltEnv>) {
    // The call's server span carries the outcome too.
    crate::telemetry::rpc_span::record_decision(&tracing::Span::current(), r);
    log_decision_line(rpc, actor, r, built);
}

/// The decision's log line and metric, without marking the call's span (a
/// batch makes many decisions in one call).
fn log_decision_line(rpc: &'static str, actor: &str, r: &Resolution, built: Option<&BuiltEnv>) {
    crate::metrics::record_decision(
        rpc,
        r.mode.as_str(),
        crate::wire::convert::source_name(r.source),
    );
    let provider = r.provider.as_ref().map_or("", |p| p.id.as_str());
    match built {
        None => tracing::info!(
            target: "billing_mode::decision",
            rpc,
            actor,
            workspace = %r.workspace_id,
            mode = r.mode.as_str(),
            source = crate::wire::convert::source_name(r.source),
            provider,
            revision = r.revision,
            "decision"
        ),
        Some(b) => tracing::info!(
            target: "billing_mode::decision",
            rpc,
            actor,
            workspace = %r.workspace_id,
            mode = r.mode.as_str(),
            source = crate::wire::convert::source_name(r.source),
            provider,
            revision = r.revision,
            removed_keys = %b.removed_keys.join(","),
            added_keys = %b.added_keys.join(","),
            "decision"
        ),
    }
}

/// Logs a refused request (reason only) and turns it into a status.
fn refuse(rpc: &'static str, e: ApiError) -> Status {
    tracing::info!(
        target: "billing_mode::decision",
        rpc,
        reason = e.reason.as_str(),
        "refused"
    );
    e.into()
}

/// Names the (validated) workspace on the handler's span. Only a parsed id:
/// what a caller sent is never recorded as it came.
fn record_workspace(id: &WorkspaceId) {
    tracing::Span::current().record("workspace", tracing::field::display(id));
}

// Each handler runs in its own DEBUG span (`handler.<rpc>`), inside the
// call's server span; traces (INFO) show the server span and, under it, the
// store's spans (`store.<operation>`) and the decision's.
#[tonic::async_trait]
impl BillingMode for BillingModeService {
    #[tracing::instrument(level = "debug", name = "handler.resolve", skip_all, fields(workspace = tracing::field::Empty))]
    async fn resolve(
        &self,
        request: Request<proto::ResolveRequest>,
    ) -> Result<Response<proto::ResolveResponse>, Status> {
        let run = async {
            let who = principal(&request)?;
            who.require(Action::Resolve)?;
            let id = convert::workspace_id(&request.get_ref().workspace_id)?;
            record_workspace(&id);
            let record = self.load(&id).await?;
            let resolution = resolve(&record, &self.registry);
            log_decision("Resolve", &who.name, &resolution, None);
            Ok(proto::ResolveResponse {
                resolution: Some(convert::resolution_to_wire(resolution)),
            })
        };
        run.await
            .map(Response::new)
            .map_err(|e| refuse("Resolve", e))
    }

    #[tracing::instrument(level = "debug", name = "handler.set", skip_all, fields(workspace = tracing::field::Empty))]
    async fn set(
        &self,
        request: Request<proto::SetRequest>,
    ) -> Result<Response<proto::SetResponse>, Status> {
        let run = async {
            let who = principal(&request)?;
            // Authorize on what the request asks for before validating it.
            let action = if request.get_ref().override_mode.is_some() {
                Action::SetOverride
            } else {
                Action::SetFields
            };
            who.require(action)?;
            let input = convert::set_request(request.get_ref())?;
            record_workspace(&input.workspace_id);
            debug_assert_eq!(input.sets_override(), action == Action::SetOverride);
            let rpc = if input.dry_run {
                "Set (dry run)"
            } else {
                "Set"
            };
            let resolution = self.write(&who, input).await?;
            log_decision(rpc, &who.name, &resolution, None);
            Ok(proto::SetResponse {
                resolution: Some(convert::resolution_to_wire(resolution)),
            })
        };
        run.await.map(Response::new).map_err(|e| refuse("Set", e))
    }

    #[tracing::instrument(level = "debug", name = "handler.batch_create_workspaces", skip_all, fields(items = request.get_ref().workspaces.len()))]
    async fn batch_create_workspaces(
        &self,
        request: Request<proto::BatchCreateWorkspacesRequest>,
    ) -> Result<Response<proto::BatchCreateWorkspacesResponse>, Status> {
        let run = async {
            let who = principal(&request)?;
            // As Set: authorize on what the request asks for before
            // validating it.
            let action = if request
                .get_ref()
                .workspaces
                .iter()
                .any(|w| w.override_mode != i32::from(proto::Mode::Unspecified))
            {
                Action::SetOverride
            } else {
                Action::SetFields
            };
            who.require(action)?;
            let input = convert::batch_create_request(request.get_ref())?;
            let creates: Vec<Create<'_>> = input
                .items
                .iter()
                .map(|(workspace_id, change)| Create {
                    workspace_id: *workspace_id,
                    change,
                })
                .collect();
            let reason = input.reason.as_ref().map_or("", |r| r.as_str());
            let outcomes = self.store.create_batch(&creates, &who.name, reason).await?;
            // An existing workspace's decision only for a caller who may
            // read it: creating gives no read access.
            let may_read = who.may(Action::Resolve);
            let mut created = 0usize;
            // The decisions in one `resolve` span, not one span each.
            let results = tracing::info_span!("resolve", items = outcomes.len()).in_scope(|| {
                outcomes
                    .iter()
                    .map(|outcome| match outcome {
                        CreateOutcome::Created(record) => {
                            created += 1;
                            let r = crate::domain::resolve(record, &self.registry);
                            log_decision_line("BatchCreateWorkspaces", &who.name, &r, None);
                            proto::BatchCreateResult {
                                created: true,
                                resolution: Some(convert::resolution_to_wire(r)),
                            }
                        }
                        CreateOutcome::Existing(record) => proto::BatchCreateResult {
                            created: false,
                            resolution: may_read.then(|| {
                                convert::resolution_to_wire(crate::domain::resolve(
                                    record,
                                    &self.registry,
                                ))
                            }),
                        },
                    })
                    .collect::<Vec<_>>()
            });
            tracing::info!(
                target: "billing_mode::decision",
                rpc = "BatchCreateWorkspaces",
                actor = %who.name,
                created,
                existing = results.len() - created,
                "batch created"
            );
            Ok(proto::BatchCreateWorkspacesResponse { results })
        };
        run.await
            .map(Response::new)
            .map_err(|e| refuse("BatchCreateWorkspaces", e))
    }

    #[tracing::instrument(level = "debug", name = "handler.clear", skip_all, fields(workspace = tracing::field::Empty))]
    async fn clear(
        &self,
        request: Request<proto::ClearRequest>,
    ) -> Result<Response<proto::ClearResponse>, Status> {
        let run = async {
            let who = principal(&request)?;
            who.require(Action::Clear)?;
            let input = convert::clear_request(request.get_ref())?;
            record_workspace(&input.workspace_id);
            let rpc = if input.dry_run {
                "Clear (dry run)"
            } else {
                "Clear"
            };
            let resolution = self.write(&who, input).await?;
            log_decision(rpc, &who.name, &resolution, None);
            Ok(proto::ClearResponse {
                resolution: Some(convert::resolution_to_wire(resolution)),
            })
        };
        run.await.map(Response::new).map_err(|e| refuse("Clear", e))
    }

    #[tracing::instrument(level = "debug", name = "handler.build_env", skip_all, fields(workspace = tracing::field::Empty))]
    async fn build_env(
        &self,
        request: Request<proto::BuildEnvRequest>,
    ) -> Result<Response<proto::BuildEnvResponse>, Status> {
        let run = async {
            let who = principal(&request)?;
            who.require(Action::BuildEnv)?;
            let req = request.into_inner();
            let id = convert::workspace_id(&req.workspace_id)?;
            record_workspace(&id);
            let candidate = convert::candidate_env(req.env)?;
            let record = self.load(&id).await?;
            // The same decision Resolve makes, on the same record.
            let resolution = resolve(&record, &self.registry);
            let built = build_env(&resolution, &record, &self.registry, candidate)?;
            log_decision("BuildEnv", &who.name, &resolution, Some(&built));
            Ok(proto::BuildEnvResponse {
                resolution: Some(convert::resolution_to_wire(resolution)),
                env: convert::env_to_wire(built.env),
                removed_keys: built.removed_keys,
                added_keys: built.added_keys,
            })
        };
        run.await
            .map(Response::new)
            .map_err(|e| refuse("BuildEnv", e))
    }

    #[tracing::instrument(level = "debug", name = "handler.history", skip_all, fields(workspace = tracing::field::Empty))]
    async fn history(
        &self,
        request: Request<proto::HistoryRequest>,
    ) -> Result<Response<proto::HistoryResponse>, Status> {
        let run = async {
            let who = principal(&request)?;
            who.require(Action::History)?;
            let req = request.get_ref();
            let id = convert::workspace_id(&req.workspace_id)?;
            record_workspace(&id);
            let size = convert::page_size(req.page_size);
            let before = convert::page_token(&req.page_token)?;
            let mut entries = self.store.history(&id, before, size + 1).await?;
            if entries.is_empty() {
                // Every record has history: no entries may mean no such workspace.
                self.load(&id).await?;
            }
            let next_page_token = if entries.len() > size as usize {
                entries.truncate(size as usize);
                entries
                    .last()
                    .map(|e| e.revision.to_string())
                    .unwrap_or_default()
            } else {
                String::new()
            };
            tracing::info!(
                target: "billing_mode::decision",
                rpc = "History",
                actor = %who.name,
                workspace = %id,
                entries = entries.len(),
                "history"
            );
            Ok(proto::HistoryResponse {
                entries: entries.iter().map(convert::audit_to_wire).collect(),
                next_page_token,
            })
        };
        run.await
            .map(Response::new)
            .map_err(|e| refuse("History", e))
    }

    type WatchStream = watch::WatchStream;

    #[tracing::instrument(level = "debug", name = "handler.watch", skip_all)]
    async fn watch(
        &self,
        request: Request<proto::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let run = async {
            let who = principal(&request)?;
            who.require(Action::Watch)?;
            let allowed = self
                .auth
                .as_ref()
                .map(|auth| watch::StillAllowed::new(auth.changes(), request.metadata()));
            let stream = watch::start(
                &self.watcher,
                self.registry.clone(),
                request.get_ref(),
                allowed,
            )
            .await?;
            tracing::info!(target: "billing_mode::decision", rpc = "Watch", actor = %who.name, "stream started");
            Ok(stream)
        };
        run.await.map(Response::new).map_err(|e| refuse("Watch", e))
    }

    // Part two of the contract: the spend check, drift reports and the
    // workspace list.
    #[tracing::instrument(level = "debug", name = "handler.check_spend", skip_all)]
    async fn check_spend(
        &self,
        request: Request<proto::CheckSpendRequest>,
    ) -> Result<Response<proto::CheckSpendResponse>, Status> {
        let run = async {
            let who = principal(&request)?;
            who.require(Action::CheckSpend)?;
            spend::check_spend(&self.spend, &who, request.get_ref())
        };
        run.await
            .map(Response::new)
            .map_err(|e| refuse("CheckSpend", e))
    }

    #[tracing::instrument(level = "debug", name = "handler.report_applied", skip_all)]
    async fn report_applied(
        &self,
        request: Request<proto::ReportAppliedRequest>,
    ) -> Result<Response<proto::ReportAppliedResponse>, Status> {
        let run = async {
            let who = principal(&request)?;
            who.require(Action::ReportApplied)?;
            let input = drift::report_request(request.get_ref())?;
            drift::report_applied(&*self.store, &self.registry, &who, input).await
        };
        run.await
            .map(Response::new)
            .map_err(|e| refuse("ReportApplied", e))
    }

    #[tracing::instrument(level = "debug", name = "handler.list_drift", skip_all)]
    async fn list_drift(
        &self,
        request: Request<proto::ListDriftRequest>,
    ) -> Result<Response<proto::ListDriftResponse>, Status> {
        let run = async {
            let who = principal(&request)?;
            who.require(Action::ListDrift)?;
            drift::list_drift(&*self.store, &self.registry, &who, request.get_ref()).await
        };
        run.await
            .map(Response::new)
            .map_err(|e| refuse("ListDrift", e))
    }

    #[tracing::instrument(level = "debug", name = "handler.list_workspaces", skip_all)]
    async fn list_workspaces(
        &self,
        request: Request<proto::ListWorkspacesRequest>,
    ) -> Result<Response<proto::ListWorkspacesResponse>, Status> {
        let run = async {
            let who = principal(&request)?;
            who.require(Action::ListWorkspaces)?;
            let page =
                list::list_workspaces(&*self.store, &self.registry, request.get_ref()).await?;
            tracing::info!(target: "billing_mode::decision", rpc = "ListWorkspaces",
                actor = %who.name, entries = page.resolutions.len(), "listed");
            Ok(page)
        };
        run.await
            .map(Response::new)
            .map_err(|e| refuse("ListWorkspaces", e))
    }
}
