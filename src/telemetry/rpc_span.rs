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
    time::{Duration, Instant},
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
#[derive(Debug, Clone, Copy)]
pub struct RpcSpanLayer {
    request_timeout: Duration,
}

impl RpcSpanLayer {
    /// `request_timeout` is the server's deadline: a call dropped without a
    /// status after it is recorded as DEADLINE_EXCEEDED, one dropped earlier
    /// as CANCELLED (the caller went away). The span sits inside the
    /// deadline layer, so it tells the two apart; the call metrics sit
    /// outside it and count what the caller received (a call past the
    /// deadline is answered CANCELLED, reason `DEADLINE_EXCEEDED`).
    pub fn new(request_timeout: Duration) -> Self {
        RpcSpanLayer { request_timeout }
    }
}

impl<S> Layer<S> for RpcSpanLayer {
    type Service = RpcSpan<S>;

    fn layer(&self, inner: S) -> RpcSpan<S> {
        RpcSpan {
            inner,
            request_timeout: self.request_timeout,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RpcSpan<S> {
    inner: S,
    request_timeout: Duration,
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
        let mut call = Call {
            span,
            start: Instant::now(),
            request_timeout: self.request_timeout,
            done: false,
        };
        Box::pin(async move {
            let response = response.instrument(call.span.clone()).await?;
            // A call that fails before any message has its status in the
            // headers (a "trailers-only" response); otherwise it comes in
            // the trailers, at the end of the body.
            call.finish_with(response.headers());
            Ok(response.map(|body| SpanBody { body, call }))
        })
    }
}

/// One call's span, until its status is recorded; at the latest when the
/// call is dropped.
struct Call {
    span: Span,
    start: Instant,
    request_timeout: Duration,
    done: bool,
}

impl Call {
    fn finish_with(&mut self, headers: &http::HeaderMap) {
        if let Some(code) = grpc_status(headers) {
            self.finish(code);
        }
    }

    fn finish(&mut self, code: i64) {
        if !self.done {
            self.done = true;
            record_status(&self.span, code);
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // Dropped before a status was sent: the server's deadline or the
        // caller's cancellation ended the call.
        let code = if self.start.elapsed() >= self.request_timeout {
            tonic::Code::DeadlineExceeded
        } else {
            tonic::Code::Cancelled
        };
        self.finish(code as i64);
    }
}

/// A response body that keeps the call's span open until it ends, and
/// records the status its trailers carry.
pub struct SpanBody<B> {
    body: B,
    call: Call,
}

impl<B> std::fmt::Debug for SpanBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpanBody").finish_non_exhaustive()
    }
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
        let span = this.call.span.clone();
        let _entered = span.enter();
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        if let Some(Ok(frame)) = &frame {
            if let Some(trailers) = frame.trailers_ref() {
                this.call.finish_with(trailers);
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

/// `grpc-status` from headers or trailers, if present.
fn grpc_status(headers: &http::HeaderMap) -> Option<i64> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Records the call's status code.
fn record_status(span: &Span, code: i64) {
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
        KeyValue::new(SOURCE, crate::wire::convert::source_name(r.source)),
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

#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        sync::{Arc, Mutex},
    };

    use http_body_util::{BodyExt, StreamBody};
    use opentelemetry::{trace::TracerProvider as _, Value};
    use opentelemetry_sdk::{
        error::OTelSdkResult,
        trace::{SdkTracerProvider, SpanData, SpanExporter},
    };
    use tower::{service_fn, ServiceExt};
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Keeps the spans it is given (the SDK's in-memory exporter needs its
    /// `testing` feature, which would rebuild the SDK for every test build).
    #[derive(Debug, Clone, Default)]
    struct Collect(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Collect {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.lock().unwrap().extend(batch);
            Ok(())
        }
    }

    type Frames = tokio_stream::Iter<std::vec::IntoIter<Result<Frame<bytes::Bytes>, Infallible>>>;

    fn body(trailer_status: Option<&str>) -> StreamBody<Frames> {
        let mut frames = vec![Ok(Frame::data(bytes::Bytes::from_static(b"message")))];
        if let Some(code) = trailer_status {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", code.parse().unwrap());
            frames.push(Ok(Frame::trailers(trailers)));
        }
        StreamBody::new(tokio_stream::iter(frames))
    }

    /// Runs `call` with spans exported to a collector; returns the
    /// `rpc.grpc.status_code` of the one span it produced.
    async fn status_code_of<F: Future<Output = ()>>(call: F) -> Option<i64> {
        let collected = Collect::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(collected.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        {
            let _default = tracing::subscriber::set_default(subscriber);
            call.await;
        }
        let spans = collected.0.lock().unwrap().clone();
        let [span] = &spans[..] else {
            panic!("one span expected: {spans:#?}");
        };
        assert_eq!(span.name, "molecule.billing.v1.BillingMode/Resolve");
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == "rpc.grpc.status_code")
            .map(|kv| match kv.value {
                Value::I64(code) => code,
                ref other => panic!("status code {other:?}"),
            })
    }

    fn request() -> http::Request<()> {
        http::Request::builder()
            .uri("/molecule.billing.v1.BillingMode/Resolve")
            .body(())
            .unwrap()
    }

    const TIMEOUT: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn the_status_of_a_unary_success_comes_from_the_trailers() {
        let code = status_code_of(async {
            let svc =
                RpcSpanLayer::new(TIMEOUT).layer(service_fn(|_req: http::Request<()>| async {
                    Ok::<_, Infallible>(http::Response::new(body(Some("0"))))
                }));
            let response = svc.oneshot(request()).await.unwrap();
            response.into_body().collect().await.unwrap();
        })
        .await;
        assert_eq!(code, Some(0));
    }

    #[tokio::test]
    async fn the_status_of_a_trailers_only_error_comes_from_the_headers() {
        let code = status_code_of(async {
            let svc =
                RpcSpanLayer::new(TIMEOUT).layer(service_fn(|_req: http::Request<()>| async {
                    let mut response = http::Response::new(body(None));
                    response
                        .headers_mut()
                        .insert("grpc-status", "5".parse().unwrap());
                    Ok::<_, Infallible>(response)
                }));
            let response = svc.oneshot(request()).await.unwrap();
            response.into_body().collect().await.unwrap();
        })
        .await;
        assert_eq!(code, Some(5));
    }

    #[tokio::test]
    async fn a_stream_the_caller_drops_is_cancelled() {
        let code = status_code_of(async {
            let svc =
                RpcSpanLayer::new(TIMEOUT).layer(service_fn(|_req: http::Request<()>| async {
                    Ok::<_, Infallible>(http::Response::new(body(Some("0"))))
                }));
            let response = svc.oneshot(request()).await.unwrap();
            // The first message, then the caller goes away.
            let mut body = response.into_body();
            body.frame().await.unwrap().unwrap();
            drop(body);
        })
        .await;
        assert_eq!(code, Some(tonic::Code::Cancelled as i64));
    }

    #[tokio::test]
    async fn a_call_dropped_after_the_deadline_exceeded_it() {
        let code = status_code_of(async {
            let svc =
                RpcSpanLayer::new(Duration::ZERO).layer(service_fn(|_req: http::Request<()>| {
                    std::future::pending::<Result<http::Response<StreamBody<Frames>>, Infallible>>()
                }));
            // The server's timeout drops the call before any answer.
            let call = svc.oneshot(request());
            let _ = tokio::time::timeout(Duration::from_millis(1), call).await;
        })
        .await;
        assert_eq!(code, Some(tonic::Code::DeadlineExceeded as i64));
    }
}
