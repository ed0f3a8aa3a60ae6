//! A real OTLP/gRPC trace receiver, built from the `opentelemetry-proto`
//! crate's service definitions, for the tests that check what a collector
//! receives (`tests/api/traces.rs`, `tests/canary.rs`).

use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::{any_value::Value, AnyValue, KeyValue},
};
use tonic::{transport::server::TcpIncoming, Request, Response, Status};

/// The receiver: keeps every export request it is sent.
#[derive(Clone, Default)]
pub(crate) struct Receiver {
    pub(crate) received: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.received.lock().unwrap().push(request.into_inner());
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Starts the receiver on a free port; returns its endpoint URL.
pub(crate) async fn start_receiver(receiver: Receiver) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    format!("http://{addr}")
}

/// Every string an exported span could carry a value in: names, attribute
/// values (span, event, link, resource), status message, trace state.
pub(crate) fn every_string(request: &ExportTraceServiceRequest) -> Vec<String> {
    fn any(v: &AnyValue, out: &mut Vec<String>) {
        match &v.value {
            Some(Value::StringValue(s)) => out.push(s.clone()),
            Some(Value::ArrayValue(a)) => a.values.iter().for_each(|v| any(v, out)),
            Some(Value::KvlistValue(l)) => l.values.iter().for_each(|kv| kvs(kv, out)),
            Some(Value::BytesValue(b)) => out.push(String::from_utf8_lossy(b).into_owned()),
            other => out.push(format!("{other:?}")),
        }
    }
    fn kvs(kv: &KeyValue, out: &mut Vec<String>) {
        out.push(kv.key.clone());
        if let Some(v) = &kv.value {
            any(v, out);
        }
    }
    let mut out = Vec::new();
    for rs in &request.resource_spans {
        if let Some(r) = &rs.resource {
            r.attributes.iter().for_each(|kv| kvs(kv, &mut out));
        }
        for ss in &rs.scope_spans {
            for span in &ss.spans {
                out.push(span.name.clone());
                out.push(span.trace_state.clone());
                span.attributes.iter().for_each(|kv| kvs(kv, &mut out));
                for e in &span.events {
                    out.push(e.name.clone());
                    e.attributes.iter().for_each(|kv| kvs(kv, &mut out));
                }
                for l in &span.links {
                    l.attributes.iter().for_each(|kv| kvs(kv, &mut out));
                }
                if let Some(s) = &span.status {
                    out.push(s.message.clone());
                }
            }
        }
    }
    out
}
