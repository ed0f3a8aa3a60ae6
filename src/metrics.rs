//! Metrics: the one Prometheus registry of the process, served in the text
//! format on the admin port's `/metrics`.
//!
//! Crate: `prometheus` (the Prometheus Rust client maintained under TiKV),
//! with default features off (no protobuf). It writes the classic text
//! format 0.0.4, which every Prometheus and `promtool check metrics` read.
//! The official `prometheus-client` crate writes OpenMetrics only, whose
//! counter and info families `promtool` (2.42, Debian bookworm) rejects.
//!
//! To add metrics, add a field to [`Metrics`], create and register it in
//! `Metrics::new`, and record through [`global`]. Names follow the
//! OpenTelemetry semantic conventions where one exists (translated to
//! Prometheus: dots to underscores, the unit as a suffix), otherwise
//! `billing_mode_*`. Labels take values from small closed sets only: never a
//! workspace id, a token name or any value from a request.

use std::{
    collections::HashSet,
    future::Future,
    pin::Pin,
    sync::LazyLock,
    task::{Context, Poll},
    time::Instant,
};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Buckets for call and store durations, in seconds: the OpenTelemetry
/// recommendation for `rpc.server.call.duration`, with finer steps below
/// 5 ms where this service's decisions live.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
    7.5, 10.0,
];

/// Every metric of the server.
pub struct Metrics {
    registry: Registry,
    /// `rpc.server.call.duration` (seconds), by `rpc.system`, `rpc.service`,
    /// `rpc.method` and `rpc.grpc.status_code`.
    pub rpc_server_call_duration: HistogramVec,
    /// Decisions answered, by RPC, mode and source.
    pub decisions: IntCounterVec,
    /// Calls that ended in an error, by RPC and the contract's error reason.
    pub refusals: IntCounterVec,
    /// Store operations (seconds), by operation and outcome.
    pub store_operation_duration: HistogramVec,
    /// Store connection pool, by state (`in_use`, `idle`).
    pub store_pool_connections: IntGaugeVec,
    /// Loads each Postgres read statement answered (`store::pg_batch`).
    pub store_loads_per_read: Histogram,
    /// Spend-snapshot entries the periodic recheck found differing from
    /// their record (changed outside the service: no change-log entry).
    pub spend_snapshot_repairs: prometheus::IntCounter,
    /// Always 1; the labels carry the version and the git commit.
    pub build_info: IntGaugeVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let rpc_server_call_duration = HistogramVec::new(
            HistogramOpts::new(
                "rpc_server_call_duration_seconds",
                "Duration of gRPC calls served (OpenTelemetry rpc.server.call.duration).",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &[
                "rpc_system",
                "rpc_service",
                "rpc_method",
                "rpc_grpc_status_code",
            ],
        )
        .expect("valid metric");
        let decisions = IntCounterVec::new(
            Opts::new(
                "billing_mode_decisions_total",
                "Decisions answered, by RPC, mode and source.",
            ),
            &["rpc", "mode", "source"],
        )
        .expect("valid metric");
        let refusals = IntCounterVec::new(
            Opts::new(
                "billing_mode_refusals_total",
                "Calls refused, by RPC and error reason.",
            ),
            &["rpc", "reason"],
        )
        .expect("valid metric");
        let store_operation_duration = HistogramVec::new(
            HistogramOpts::new(
                "billing_mode_store_operation_duration_seconds",
                "Duration of store operations, by operation and outcome.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["operation", "outcome"],
        )
        .expect("valid metric");
        let store_pool_connections = IntGaugeVec::new(
            Opts::new(
                "billing_mode_store_pool_connections",
                "Connections in the store's pool, by state (in_use, idle).",
            ),
            &["state"],
        )
        .expect("valid metric");
        let store_loads_per_read = Histogram::with_opts(
            HistogramOpts::new(
                "billing_mode_store_loads_per_read",
                "Loads (Resolve's and BuildEnv's reads) each Postgres read statement answered: \
                 1 when a load read alone, more when loads that waited were read together.",
            )
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
        )
        .expect("valid metric");
        let spend_snapshot_repairs = prometheus::IntCounter::new(
            "billing_mode_spend_snapshot_repairs_total",
            "Workspaces whose spend-snapshot entry the periodic recheck found differing from \
             the stored record, which was changed outside the service (no change-log entry); \
             CheckSpend answers from the record from then on. Anything above 0 needs looking at.",
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "billing_mode_build_info",
                "Always 1: the version and git commit of the running build.",
            ),
            &["version", "git_commit"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), GIT_COMMIT])
            .set(1);
        for m in [
            Box::new(rpc_server_call_duration.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(decisions.clone()),
            Box::new(refusals.clone()),
            Box::new(store_operation_duration.clone()),
            Box::new(store_pool_connections.clone()),
            Box::new(spend_snapshot_repairs.clone()),
            Box::new(store_loads_per_read.clone()),
            Box::new(build_info.clone()),
        ] {
            registry
                .register(m)
                .expect("each metric is registered once");
        }
        Metrics {
            registry,
            rpc_server_call_duration,
            decisions,
            refusals,
            store_operation_duration,
            store_pool_connections,
            store_loads_per_read,
            spend_snapshot_repairs,
            build_info,
        }
    }

    /// The registry, for metrics registered outside this module.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Everything, in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encoding to memory cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

/// The git commit the binary was built from (`unknown` without git).
pub const GIT_COMMIT: &str = env!("BILLING_MODE_GIT_COMMIT");

/// The content type of [`Metrics::encode`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn global() -> &'static Metrics {
    &METRICS
}

/// Counts one decision answered by `rpc`.
pub fn record_decision(rpc: &'static str, mode: &'static str, source: &'static str) {
    global()
        .decisions
        .with_label_values(&[rpc, mode, source])
        .inc();
}

/// Counts one refused call: its `ErrorInfo` reason when it is one of the
/// contract's reasons, `UNSPECIFIED` when the error carries none (every
/// answer of the service and of its gRPC layer does: a safety net).
fn record_refusal(method: &str, headers: &http::HeaderMap) {
    let status = tonic::Status::from_header_map(headers);
    let reason = status
        .as_ref()
        .and_then(tonic_types::StatusExt::get_details_error_info)
        .and_then(|info| {
            crate::service::error::ErrorReason::ALL
                .iter()
                .find(|r| r.as_str() == info.reason)
                .map(|r| r.as_str())
        })
        .unwrap_or("UNSPECIFIED");
    global().refusals.with_label_values(&[method, reason]).inc();
}

// ---------------------------------------------------------------------------
// Per-call duration, as a tower layer around the gRPC services.

/// The `service/method` pairs the server knows, from the descriptor sets it
/// serves. Any other path is labelled `_OTHER` (as the OpenTelemetry
/// conventions say), so a caller cannot create label values.
static KNOWN_METHODS: LazyLock<HashSet<String>> = LazyLock::new(|| {
    let mut known = HashSet::new();
    for fds in [
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ] {
        let set: prost_types::FileDescriptorSet =
            prost::Message::decode(fds).expect("embedded descriptor sets decode");
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let service_name = if package.is_empty() {
                    service.name().to_owned()
                } else {
                    format!("{package}.{}", service.name())
                };
                for method in service.method {
                    known.insert(format!("{service_name}/{}", method.name()));
                }
            }
        }
    }
    known
});

/// `(rpc.service, rpc.method)` for a request path `/pkg.Service/Method`.
fn rpc_labels(path: &str) -> (String, String) {
    let full = path.strip_prefix('/').unwrap_or(path);
    match full.split_once('/') {
        Some((service, method)) if KNOWN_METHODS.contains(full) => {
            (service.to_owned(), method.to_owned())
        }
        _ => ("_OTHER".to_owned(), "_OTHER".to_owned()),
    }
}

/// Records `rpc.server.call.duration` for every call it wraps, with the
/// call's final gRPC status (from the trailers, or the headers of a
/// trailers-only answer), and counts each refusal by its reason.
///
/// It is the outermost layer of the server's stack, so it sees every answer
/// as the caller receives it: the per-request deadline's (`CANCELLED`,
/// reason `DEADLINE_EXCEEDED`) and the `ErrorInfo` given to tonic's own
/// errors included ([`TransportErrorsLayer`]).
///
/// [`TransportErrorsLayer`]: crate::service::transport_errors::TransportErrorsLayer
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcMetricsLayer;

impl RpcMetricsLayer {
    pub fn new() -> Self {
        RpcMetricsLayer
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
}

/// One call being timed; recorded exactly once, at the latest when dropped.
struct CallTimer {
    service: String,
    method: String,
    start: Instant,
    done: bool,
}

impl CallTimer {
    /// Records the call with the status in `headers` (headers of a
    /// trailers-only answer, or trailers).
    fn finish_with(&mut self, headers: &http::HeaderMap) {
        if let Some(code) = grpc_status(headers) {
            if code != 0 && !self.done {
                record_refusal(&self.method, headers);
            }
            self.finish(code);
        }
    }

    fn finish(&mut self, code: i32) {
        if self.done {
            return;
        }
        self.done = true;
        let code = code.to_string();
        global()
            .rpc_server_call_duration
            .with_label_values(&["grpc", &self.service, &self.method, &code])
            .observe(self.start.elapsed().as_secs_f64());
    }
}

impl Drop for CallTimer {
    fn drop(&mut self) {
        // Dropped before a status was sent: the server's deadline answers
        // inside this layer, so the caller went away (a cancellation, a reset
        // stream, a closed connection) and received no status from it.
        self.finish(tonic::Code::Cancelled as i32);
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

impl<S, B, ResBody> tower::Service<http::Request<B>> for RpcMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (service, method) = rpc_labels(req.uri().path());
        let mut timer = CallTimer {
            service,
            method,
            start: Instant::now(),
            done: false,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            match fut.await {
                Ok(resp) => {
                    if grpc_status(resp.headers()).is_some() {
                        // Trailers-only answer (an error): the status is final.
                        timer.finish_with(resp.headers());
                        Ok(resp.map(|inner| MeteredBody { inner, timer: None }))
                    } else {
                        Ok(resp.map(|inner| MeteredBody {
                            inner,
                            timer: Some(timer),
                        }))
                    }
                }
                Err(e) => {
                    timer.finish(tonic::Code::Unknown as i32);
                    Err(e)
                }
            }
        })
    }
}

/// A response body that records the call when its trailers pass by.
pub struct MeteredBody<B> {
    inner: B,
    timer: Option<CallTimer>,
}

impl<B> std::fmt::Debug for MeteredBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredBody").finish_non_exhaustive()
    }
}

impl<B> http_body::Body for MeteredBody<B>
where
    B: http_body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(trailers) = frame.trailers_ref() {
                if let Some(t) = this.timer.as_mut() {
                    t.finish_with(trailers);
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_methods_get_their_own_labels() {
        assert_eq!(
            rpc_labels("/molecule.billing.v1.BillingMode/Resolve"),
            (
                "molecule.billing.v1.BillingMode".to_owned(),
                "Resolve".to_owned()
            )
        );
        assert_eq!(
            rpc_labels("/grpc.health.v1.Health/Check"),
            ("grpc.health.v1.Health".to_owned(), "Check".to_owned())
        );
        for unknown in [
            "/molecule.billing.v1.BillingMode/6b66de8d-9337-4fb4-be8d-6d49dca0d809",
            "/x/y",
            "/",
            "",
        ] {
            assert_eq!(
                rpc_labels(unknown),
                ("_OTHER".to_owned(), "_OTHER".to_owned())
            );
        }
    }

    #[test]
    fn the_registry_encodes_in_the_text_format() {
        let text = global().encode();
        assert!(text.contains("# TYPE billing_mode_build_info gauge"));
        assert!(text.contains(&format!("git_commit=\"{GIT_COMMIT}\"")));
    }
}
