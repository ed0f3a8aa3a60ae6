//! Traces, as a collector receives them: the real binary exports over
//! OTLP/gRPC (configured by `OTEL_EXPORTER_OTLP_ENDPOINT` alone) to a real
//! OTLP receiver run inside the test, built from the `opentelemetry-proto`
//! crate's service definitions.
//!
//! Checked: the server spans' names and RPC attributes (OpenTelemetry RPC
//! conventions), the decision's mode, source and revision on them, the child
//! spans for the store and the decision, the caller's `traceparent` and
//! `tracestate` continued, and that no credential value sent in a BuildEnv
//! reaches any exported span, attribute or event.
//!
//! The server runs as a process of its own, so its exporter and its global
//! subscriber are not this test binary's: unlike the canary test, this one
//! can share the binary with the others.

use std::collections::HashMap;

use crate::helpers::{backends, env, new_workspace, Backend, TestDb};
use crate::otlp::{every_string, start_receiver, Receiver};
use crate::server_process::ServerProcess;
use billing_mode::proto::{
    billing_mode_client::BillingModeClient, BuildEnvRequest, CredentialKeys, Origin,
    ResolveRequest, SetRequest,
};
use opentelemetry_proto::tonic::{
    common::v1::{any_value::Value, KeyValue},
    trace::v1::{span::SpanKind, Span},
};
use tonic::{Code, Request};

fn attrs(list: &[KeyValue]) -> HashMap<&str, &Value> {
    list.iter()
        .filter_map(|kv| Some((kv.key.as_str(), kv.value.as_ref()?.value.as_ref()?)))
        .collect()
}

fn string<'a>(v: Option<&&'a Value>) -> Option<&'a str> {
    match v {
        Some(Value::StringValue(s)) => Some(s),
        _ => None,
    }
}

fn int(v: Option<&&Value>) -> Option<i64> {
    match v {
        Some(Value::IntValue(i)) => Some(*i),
        _ => None,
    }
}

/// A W3C traceparent for a caller's span.
struct Caller {
    trace_id: [u8; 16],
    span_id: [u8; 8],
}

impl Caller {
    fn new() -> Caller {
        let id = uuid::Uuid::new_v4();
        let mut span_id = [0u8; 8];
        span_id.copy_from_slice(&uuid::Uuid::new_v4().as_bytes()[..8]);
        Caller {
            trace_id: *id.as_bytes(),
            span_id,
        }
    }

    fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-01",
            hex::encode(self.trace_id),
            hex::encode(self.span_id)
        )
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert("traceparent", self.traceparent().parse().unwrap());
        request
            .metadata_mut()
            .insert("tracestate", "control-plane=provision-7".parse().unwrap());
        request
    }
}

const CANARY_WORKSPACE_TOKEN: &str = "canary-wstoken-5f1c0e7a9b2d4c61";
const CANARY_PLATFORM_KEY: &str = "canary-platformkey-83ad20c4e6f1";
const CANARY_USAGE_TOKEN: &str = "canary-usagetoken-0b9e7d5a3c18";

backends!(
    exported_spans_follow_the_rpc_conventions_and_continue_the_callers_trace,
    flavor = "multi_thread"
);
async fn exported_spans_follow_the_rpc_conventions_and_continue_the_callers_trace(db: TestDb) {
    let receiver = Receiver::default();
    let endpoint = start_receiver(receiver.clone()).await;
    let server = ServerProcess::start(
        &db.url,
        &[],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())],
    );
    let mut client = BillingModeClient::connect(format!("http://{}", server.addr))
        .await
        .unwrap();

    let workspace = new_workspace();
    let (set_caller, env_caller, missing_caller) = (Caller::new(), Caller::new(), Caller::new());
    client
        .set(set_caller.request(SetRequest {
            workspace_id: workspace.clone(),
            runtime: Some("claude-code".into()),
            model: Some("opus".into()),
            credential_keys: Some(CredentialKeys {
                keys: vec!["CLAUDE_CODE_OAUTH_TOKEN".into()],
            }),
            reason: "register".into(),
            ..Default::default()
        }))
        .await
        .expect("Set");
    let built = client
        .build_env(env_caller.request(BuildEnvRequest {
            workspace_id: workspace.clone(),
            env: vec![
                env(
                    Origin::Workspace,
                    "CLAUDE_CODE_OAUTH_TOKEN",
                    CANARY_WORKSPACE_TOKEN,
                ),
                env(Origin::Global, "ANTHROPIC_API_KEY", CANARY_PLATFORM_KEY),
                env(
                    Origin::Platform,
                    "MOLECULE_LLM_USAGE_TOKEN",
                    CANARY_USAGE_TOKEN,
                ),
            ],
        }))
        .await
        .expect("BuildEnv")
        .into_inner();
    // The canary really went through the server (so its absence below means
    // something): the workspace's token is in the built env.
    assert!(built.env.iter().any(|e| e.value == CANARY_WORKSPACE_TOKEN));
    let missing = client
        .resolve(missing_caller.request(ResolveRequest {
            workspace_id: new_workspace(),
        }))
        .await
        .expect_err("an unregistered workspace");
    assert_eq!(missing.code(), Code::NotFound);
    // No traceparent: the trace starts here.
    client
        .resolve(ResolveRequest {
            workspace_id: workspace.clone(),
        })
        .await
        .expect("Resolve");
    drop(client);

    // SIGTERM: the server finishes, flushing its spans on the way out.
    // (Waited for off the runtime, which serves the receiver meanwhile.)
    let (status, server) = server.stop().await;
    assert!(status.success(), "exit {status:?}:\n{}", server.log());

    let received = receiver.received.lock().unwrap().clone();
    let log = server.log();
    assert!(!received.is_empty(), "nothing exported; server log:\n{log}");
    for request in &received {
        for s in every_string(request) {
            for canary in [
                CANARY_WORKSPACE_TOKEN,
                CANARY_PLATFORM_KEY,
                CANARY_USAGE_TOKEN,
            ] {
                assert!(
                    !s.contains(canary),
                    "a credential value was exported: {s:?}"
                );
            }
        }
        for rs in &request.resource_spans {
            let resource = attrs(&rs.resource.as_ref().unwrap().attributes);
            assert_eq!(string(resource.get("service.name")), Some("billing-mode"));
        }
    }
    let spans: Vec<&Span> = received
        .iter()
        .flat_map(|r| &r.resource_spans)
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| &ss.spans)
        .collect();
    let named =
        |name: &str| -> Vec<&Span> { spans.iter().copied().filter(|s| s.name == name).collect() };
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    let children = |parent: &Span| -> Vec<&Span> {
        spans
            .iter()
            .copied()
            .filter(|s| s.parent_span_id == parent.span_id && s.trace_id == parent.trace_id)
            .collect()
    };

    // BuildEnv: the server span continues the caller's trace.
    let [build] = named("molecule.billing.v1.BillingMode/BuildEnv")[..] else {
        panic!("one BuildEnv server span expected; spans: {names:?}");
    };
    assert_eq!(build.kind, SpanKind::Server as i32);
    assert_eq!(build.trace_id, env_caller.trace_id, "the caller's trace id");
    assert_eq!(
        build.parent_span_id, env_caller.span_id,
        "the caller's span is the parent"
    );
    assert_eq!(build.trace_state, "control-plane=provision-7");
    let a = attrs(&build.attributes);
    assert_eq!(string(a.get("rpc.system")), Some("grpc"));
    assert_eq!(
        string(a.get("rpc.service")),
        Some("molecule.billing.v1.BillingMode")
    );
    assert_eq!(string(a.get("rpc.method")), Some("BuildEnv"));
    assert_eq!(int(a.get("rpc.grpc.status_code")), Some(0));
    assert_eq!(string(a.get("billing.mode")), Some("byok"));
    assert_eq!(string(a.get("billing.source")), Some("DERIVED_PROVIDER"));
    assert_eq!(int(a.get("billing.revision")), Some(1));
    // Its children: the store load and the decision.
    let kids = children(build);
    let kid_names: Vec<&str> = kids.iter().map(|s| s.name.as_str()).collect();
    for expected in ["store.load", "resolve", "build_env"] {
        assert!(
            kid_names.contains(&expected),
            "BuildEnv's children {kid_names:?} lack {expected}"
        );
    }
    let load = kids.iter().find(|s| s.name == "store.load").unwrap();
    assert_eq!(load.kind, SpanKind::Client as i32);
    let la = attrs(&load.attributes);
    let system = match db.backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgresql",
    };
    assert_eq!(string(la.get("db.system.name")), Some(system));
    assert_eq!(string(la.get("db.operation.name")), Some("load"));
    let decide = kids.iter().find(|s| s.name == "resolve").unwrap();
    assert_eq!(
        string(attrs(&decide.attributes).get("billing.mode")),
        Some("byok")
    );

    // Set: its own caller's trace, a store write under it.
    let [set] = named("molecule.billing.v1.BillingMode/Set")[..] else {
        panic!("one Set server span expected; spans: {names:?}");
    };
    assert_eq!(set.trace_id, set_caller.trace_id);
    assert_eq!(set.parent_span_id, set_caller.span_id);
    assert_eq!(int(attrs(&set.attributes).get("billing.revision")), Some(1));
    assert!(
        children(set).iter().any(|s| s.name == "store.write"),
        "Set has no store.write child; spans: {names:?}"
    );

    // Resolve: one refused (NOT_FOUND, no decision), one a root span.
    let resolves = named("molecule.billing.v1.BillingMode/Resolve");
    assert_eq!(resolves.len(), 2, "spans: {names:?}");
    let refused = resolves
        .iter()
        .find(|s| s.trace_id == missing_caller.trace_id)
        .expect("the refused Resolve continues its caller's trace");
    let ra = attrs(&refused.attributes);
    assert_eq!(
        int(ra.get("rpc.grpc.status_code")),
        Some(Code::NotFound as i64)
    );
    assert_eq!(string(ra.get("rpc.method")), Some("Resolve"));
    assert!(!ra.contains_key("billing.mode"), "no decision, no mode");
    let root = resolves
        .iter()
        .find(|s| s.trace_id != missing_caller.trace_id)
        .unwrap();
    assert!(
        root.parent_span_id.is_empty(),
        "without a traceparent the span is a root"
    );
    assert_eq!(
        int(attrs(&root.attributes).get("rpc.grpc.status_code")),
        Some(0)
    );
}
