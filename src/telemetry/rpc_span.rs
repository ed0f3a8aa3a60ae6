//! The server span of every call, per the OpenTelemetry RPC conventions.
//!
//! One span per call, named `package.Service/Method` (e.g.
//! `molecule.billing.v1.BillingMode/Resolve`), of kind server, with
//! `rpc.system`, `rpc.service`, `rpc.method` and, when the call ends,
//! `rpc.grpc.status_code`. A W3C `traceparent` (and `tracestate`) in the
//! request metadata makes it a child of the caller's span, so the trace
//! continues the caller's. The span lasts until the response body ends: for a
//! stream, until the stream does. The handlers add the decision's mode, source
//! and revision ([`record_decision`]); never a value.
//!
//! Not `tonic-tracing-opentelemetry`'s layer: it reads the status from the
//! response headers only, so a successful unary call (whose status travels in
//! the trailers) gets no `rpc.grpc.status_code`, and its span ends when the
//! headers are sent rather than when the stream ends.

use std::{
    future::Future,
    pin::Pin,
    task::{ready, Context, Poll},
};

use http_body::{Body, Frame, SizeHint};
use opentelemetry::{propagation::Extractor, trace::Status, KeyValue};
use tower::{Layer, Service};
use tracing::{Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::domain::Resolution;

/// The decision's attributes on the server span and the decision span.
pub const MODE: &str = "billing.mode";
pub const SOURCE: &str = "billing.source";
pub const REVISION: &str = "billing.revision";

/// Wraps every call in its server span (see the module documentation).
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcSpanLayer;

impl<S> Layer<S> for RpcSpanLayer {
    type Service = RpcSpan<S>;

    fn layer(&self, inner: S) -> RpcSpan<S> {
        RpcSpan { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RpcSpan<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for RpcSpan<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = http::Response<SpanBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let span = server_span(&request);
        let response = span.in_scope(|| self.inner.call(request));
        Box::pin(async move {
            // Dropped here without a response (the per-request timeout, or
            // the client went away), the span ends without a status code.
            let response = response.instrument(span.clone()).await?;
            // A call that fails before any message has its status in the
            // headers (a "trailers-only" response); otherwise it comes in
            // the trailers, at the end of the body.
            record_status(&span, response.headers());
            Ok(response.map(|body| SpanBody { body, span }))
        })
    }
}

/// A response body that keeps the call's span open until it ends, and
/// records the status its trailers carry.
pub struct SpanBody<B> {
    body: B,
    span: Span,
}

impl<B> Body for SpanBody<B>
where
    B: Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = &mut *self;
        // A stream's items are produced while its body is polled: in the span.
        let _entered = this.span.enter();
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        if let Some(Ok(frame)) = &frame {
            if let Some(trailers) = frame.trailers_ref() {
                record_status(&this.span, trailers);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The span for one call, continuing the caller's trace if it sent one.
fn server_span<B>(request: &http::Request<B>) -> Span {
    let path = request.uri().path();
    let name = path.strip_prefix('/').unwrap_or(path);
    let (service, method) = name.split_once('/').unwrap_or((name, ""));
    let span = tracing::info_span!(
        target: "billing_mode::rpc",
        "rpc",
        otel.name = name,
        otel.kind = "server",
    );
    // The rpc.* attributes go to the exported span only: the log lines
    // inside the span stay short (they name the RPC themselves).
    span.set_attribute("rpc.system", "grpc");
    span.set_attribute("rpc.service", service.to_owned());
    span.set_attribute("rpc.method", method.to_owned());
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(request.headers()))
    });
    // Fails only for a span that is disabled (filtered out): nothing to do.
    let _ = span.set_parent(parent);
    span
}

/// Records `grpc-status` from headers or trailers, if present.
fn record_status(span: &Span, headers: &http::HeaderMap) {
    let Some(code) = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok())
    else {
        return;
    };
    span.set_attribute("rpc.grpc.status_code", code);
    // The conventions' server errors: UNKNOWN, DEADLINE_EXCEEDED,
    // UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS. Other codes are the
    // caller's problem and leave the span's status unset. The description
    // is the code, never the message.
    if matches!(code, 2 | 4 | 12 | 13 | 14 | 15) {
        span.set_status(Status::error(format!("grpc-status {code}")));
    }
}

/// Puts the decision's mode, source and revision on `span` (never a value).
pub fn record_decision(span: &Span, resolution: &Resolution) {
    for kv in decision_attributes(resolution) {
        span.set_attribute(kv.key, kv.value);
    }
}

fn decision_attributes(r: &Resolution) -> [KeyValue; 3] {
    [
        KeyValue::new(MODE, r.mode.as_str()),
        KeyValue::new(SOURCE, r.source.as_str()),
        KeyValue::new(REVISION, i64::try_from(r.revision).unwrap_or(i64::MAX)),
    ]
}

/// Reads propagation headers from the request metadata. (The
/// `opentelemetry-http` crate has the same eight lines.)
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}
