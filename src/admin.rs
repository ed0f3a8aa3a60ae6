//! The admin listener: plaintext HTTP for probes and scrapes, separate from
//! the gRPC port so it works whatever TLS the gRPC port demands.
//!
//! - `GET /healthz`: 200 while the process serves HTTP at all (liveness).
//! - `GET /readyz`: probes the store now (bounded), then 200 when every
//!   readiness condition holds, 503 otherwise; the body lists them.
//! - `GET /metrics`: the Prometheus text format.
//!
//! Served with hyper directly (already compiled in for tonic): three fixed
//! routes need no web framework.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, task::JoinSet};

use crate::{
    health::{self, Condition, Readiness},
    metrics,
    store::Store,
};

/// What the admin handlers look at.
pub struct AdminState {
    pub readiness: Readiness,
    pub store: Arc<dyn Store>,
    pub store_reachable: Condition,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("readiness", &self.readiness)
            .field("store", &self.store.backend())
            .finish_non_exhaustive()
    }
}

/// Serves `listener` until the task is dropped or aborted.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    let mut connections = JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "admin listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
        let state = state.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

async fn handle(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "use GET\n".to_owned(),
        );
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, PLAIN, "ok\n".to_owned()),
        "/readyz" => {
            health::check_store(
                state.store.as_ref(),
                &state.store_reachable,
                health::STORE_PROBE_BOUND,
            )
            .await;
            let ready = state.readiness.is_ready();
            let mut body = String::from(if ready { "ready\n" } else { "not ready\n" });
            for (name, holds) in state.readiness.conditions() {
                body.push_str(if holds { "ok:     " } else { "failed: " });
                body.push_str(name);
                body.push('\n');
            }
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, PLAIN, body)
        }
        "/metrics" => {
            let m = metrics::global();
            let pool = state.store.pool_status();
            m.store_pool_connections
                .with_label_values(&["in_use"])
                .set(i64::from(pool.in_use));
            m.store_pool_connections
                .with_label_values(&["idle"])
                .set(i64::from(pool.idle));
            text(StatusCode::OK, metrics::CONTENT_TYPE, m.encode())
        }
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found: try /healthz, /readyz or /metrics\n".to_owned(),
        ),
    }
}
