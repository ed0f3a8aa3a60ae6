//! Errors raised by tonic itself, before or around a handler, carry an
//! `ErrorInfo` like every other error.
//!
//! Three come from tonic's own machinery rather than from [`ApiError`]: a
//! request over the message size limit (tonic's codec answers `OUT_OF_RANGE`),
//! a method or service the server does not have (`UNIMPLEMENTED`, from the
//! router or the service) and the per-request deadline. [`TransportErrorsLayer`] runs the deadline
//! itself (the server's `--request-timeout`, or the caller's `grpc-timeout`
//! when that is shorter, as tonic's own timeout did) and answers it as tonic
//! did (`CANCELLED`, "Timeout expired") with reason `DEADLINE_EXCEEDED`; and
//! it adds an `ErrorInfo` to a trailers-only error answer that has no details
//! (reason `MESSAGE_TOO_LARGE` for the size limit, `UNIMPLEMENTED`, with a
//! message saying what to check, for a missing method). Everything else
//! passes through untouched. The call-duration metric and the refusal count
//! ([`RpcMetricsLayer`]) sit outside this layer, so they record these
//! answers as the caller receives them.
//!
//! [`ApiError`]: super::error::ApiError
//! [`RpcMetricsLayer`]: crate::metrics::RpcMetricsLayer

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::error::{ErrorReason, ERROR_DOMAIN};

/// The header holding a status's encoded `google.rpc.Status` details.
const DETAILS_HEADER: &str = "grpc-status-details-bin";

/// Runs the per-request deadline and gives tonic's own errors an `ErrorInfo`.
#[derive(Debug, Clone)]
pub struct TransportErrorsLayer {
    request_timeout: Duration,
}

impl TransportErrorsLayer {
    /// `request_timeout` is the server's deadline for one call (the caller's
    /// `grpc-timeout` shortens it).
    pub fn new(request_timeout: Duration) -> Self {
        TransportErrorsLayer { request_timeout }
    }
}

impl<S> tower::Layer<S> for TransportErrorsLayer {
    type Service = TransportErrors<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TransportErrors {
            inner,
            request_timeout: self.request_timeout,
        }
    }
}

/// The service [`TransportErrorsLayer`] makes.
#[derive(Debug, Clone)]
pub struct TransportErrors<S> {
    inner: S,
    request_timeout: Duration,
}

impl<S, B, ResBody> tower::Service<http::Request<B>> for TransportErrors<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let deadline = deadline(req.headers(), self.request_timeout);
        let fut = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout(deadline, fut).await {
                Ok(Ok(mut resp)) => {
                    add_error_info(resp.headers_mut());
                    Ok(resp.map(tonic::body::Body::new))
                }
                Ok(Err(e)) => Err(e),
                Err(_) => Ok(timeout_status().into_http()),
            }
        })
    }
}

/// The call's deadline: the server's, or the caller's when shorter. The
/// caller's is cut by a millisecond so that this answer, not tonic's own
/// enforcement of the same header (outside this layer, without details),
/// is the one sent.
fn deadline(headers: &http::HeaderMap, server: Duration) -> Duration {
    match headers
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
    {
        Some(caller) if caller < server => caller.saturating_sub(Duration::from_millis(1)),
        _ => server,
    }
}

/// `grpc-timeout`: at most 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The deadline's answer: tonic's (code and message), with its reason.
fn timeout_status() -> Status {
    with_reason(
        Code::Cancelled,
        "Timeout expired",
        ErrorReason::DeadlineExceeded,
    )
}

fn with_reason(code: Code, message: &str, reason: ErrorReason) -> Status {
    let details = ErrorDetails::with_error_info(reason.as_str(), ERROR_DOMAIN, []);
    Status::with_error_details(code, message, details)
}

/// The reason of a status tonic raised itself, by its code and message.
fn reason_of(status: &Status) -> Option<ErrorReason> {
    match status.code() {
        Code::OutOfRange | Code::ResourceExhausted
            if status.message().contains("message length too large") =>
        {
            Some(ErrorReason::MessageTooLarge)
        }
        // The router's answer for an unknown service, and a service's for an
        // unknown method (every method this server has is implemented).
        Code::Unimplemented => Some(ErrorReason::Unimplemented),
        _ => None,
    }
}

/// What an answer without a message says (tonic's UNIMPLEMENTED has none).
const UNIMPLEMENTED_MESSAGE: &str =
    "this server has no such method: check the method's name, or the server's version \
     (a client newer than the server calls methods it does not have yet)";

/// Adds an `ErrorInfo` to a trailers-only error answer that has none.
fn add_error_info(headers: &mut http::HeaderMap) {
    if headers.contains_key(DETAILS_HEADER) {
        return;
    }
    let Some(status) = Status::from_header_map(headers) else {
        return;
    };
    let Some(reason) = reason_of(&status) else {
        return;
    };
    let message = match status.message() {
        "" if reason == ErrorReason::Unimplemented => UNIMPLEMENTED_MESSAGE,
        message => message,
    };
    let with_info = with_reason(status.code(), message, reason);
    // Rewrites grpc-status and grpc-message with the same values.
    let _ = with_info.add_header(headers);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
        for bad in ["", "S", "5", "5x", "-5S", "123456789S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_shorter_deadline_wins() {
        let server = Duration::from_secs(10);
        let mut h = http::HeaderMap::new();
        assert_eq!(deadline(&h, server), server);
        h.insert("grpc-timeout", "100m".parse().unwrap());
        assert_eq!(deadline(&h, server), Duration::from_millis(99));
        h.insert("grpc-timeout", "1H".parse().unwrap());
        assert_eq!(deadline(&h, server), server);
    }

    #[test]
    fn a_size_error_without_details_gets_its_error_info() {
        let mut headers = http::HeaderMap::new();
        Status::out_of_range(
            "Error, decoded message length too large: found 5 bytes, the limit is: 4 bytes",
        )
        .add_header(&mut headers)
        .unwrap();
        add_error_info(&mut headers);
        let status = Status::from_header_map(&headers).unwrap();
        assert_eq!(status.code(), Code::OutOfRange);
        assert!(status
            .message()
            .starts_with("Error, decoded message length"));
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "MESSAGE_TOO_LARGE");
        assert_eq!(info.domain, ERROR_DOMAIN);
    }

    #[test]
    fn an_answer_with_details_or_another_error_is_untouched() {
        let mut headers = http::HeaderMap::new();
        let status: Status =
            super::super::error::ApiError::new(ErrorReason::InvalidField, "x").into();
        status.add_header(&mut headers).unwrap();
        let before = headers.clone();
        add_error_info(&mut headers);
        assert_eq!(headers, before);
        let mut headers = http::HeaderMap::new();
        Status::not_found("").add_header(&mut headers).unwrap();
        let before = headers.clone();
        add_error_info(&mut headers);
        assert_eq!(headers, before);
    }

    #[test]
    fn unimplemented_gets_its_reason_and_a_message_saying_what_to_check() {
        let mut headers = http::HeaderMap::new();
        Status::unimplemented("").add_header(&mut headers).unwrap();
        add_error_info(&mut headers);
        let status = Status::from_header_map(&headers).expect("a status");
        assert_eq!(status.code(), Code::Unimplemented);
        assert_eq!(status.message(), UNIMPLEMENTED_MESSAGE);
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "UNIMPLEMENTED");
        assert_eq!(info.domain, ERROR_DOMAIN);
    }

    #[test]
    fn the_deadline_answer_is_tonics_with_its_reason() {
        let status = timeout_status();
        assert_eq!(status.code(), Code::Cancelled);
        assert_eq!(status.message(), "Timeout expired");
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "DEADLINE_EXCEEDED");
    }
}
