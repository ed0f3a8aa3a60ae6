//! Logs and traces: `tracing` with text or JSON output, and OpenTelemetry
//! export over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set.
//!
//! The exporter takes the standard `OTEL_*` settings: endpoint, headers,
//! timeout and compression (`OTEL_EXPORTER_OTLP_*`), sampler
//! (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`), batching
//! (`OTEL_BSP_*`), resource (`OTEL_SERVICE_NAME`, default `billing-mode`;
//! `OTEL_RESOURCE_ATTRIBUTES`); `OTEL_SDK_DISABLED=true` or
//! `OTEL_TRACES_EXPORTER=none` turn export off. The caller's W3C trace
//! context is continued ([`rpc_span`]).
//!
//! Nothing in this crate records a credential value in a span or event: the
//! decision log names keys, never values.

use opentelemetry::trace::TracerProvider as _;
use tracing_subscriber::{
    filter::Targets,
    fmt::{format::FmtSpan, writer::BoxMakeWriter, MakeWriter},
    layer::SubscriberExt,
    util::SubscriberInitExt,
    EnvFilter, Layer, Registry,
};

pub mod lines;
pub mod rpc_span;
mod text;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The log filter, `EnvFilter` directives (e.g. `info` or
/// `billing_mode=debug,info`), and whether it was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogLevel {
    /// Given explicitly (`--log-level` or `BILLING_MODE_LOG`): used whatever
    /// `RUST_LOG` says; refused at start-up when it is not a valid filter.
    Explicit(String),
    /// Not given: `RUST_LOG` when it is set (and valid), else this default.
    Default(String),
}

impl LogLevel {
    /// The level when none is given and `RUST_LOG` is not set.
    pub const DEFAULT: &'static str = "info";

    /// From `--log-level`'s value: `Some` when the flag (or its variable)
    /// was given.
    pub fn from_flag(flag: Option<String>) -> LogLevel {
        match flag {
            Some(level) => LogLevel::Explicit(level),
            None => LogLevel::Default(Self::DEFAULT.to_owned()),
        }
    }

    /// The directives in force, given `RUST_LOG`'s value (if set): an
    /// explicit level (an error when it is not a valid filter), else
    /// `RUST_LOG` when it is a valid filter, else the default.
    fn directive<'a>(&'a self, rust_log: Option<&'a str>) -> anyhow::Result<&'a str> {
        match self {
            LogLevel::Explicit(level) => {
                check_filter(level)
                    .and_then(|()| EnvFilter::try_new(level).map_err(|e| e.to_string()))
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "invalid log filter {level:?} (--log-level or BILLING_MODE_LOG): {e}; \
                             {ACCEPTED_FORMS}"
                        )
                    })?;
                Ok(level)
            }
            LogLevel::Default(level) => Ok(rust_log.filter(|v| rust_log_valid(v)).unwrap_or(level)),
        }
    }
}

/// What a log filter may be, for the message refusing one.
const ACCEPTED_FORMS: &str = "give a level (error|warn|info|debug|trace|off) or target=level \
     directives, comma-separated (e.g. `warn` or `billing_mode=debug,info`)";

/// Whether `RUST_LOG`'s value is used: a valid filter, not blank. Any other
/// value is ignored (with a warning once logging is up).
fn rust_log_valid(v: &str) -> bool {
    !v.trim().is_empty() && check_filter(v).is_ok() && EnvFilter::try_new(v).is_ok()
}

/// Refuses a directive that is neither a level nor `target=level`: given a
/// bare word, `EnvFilter` takes it for a target, so a mistyped level
/// (`warning`) would silently turn every log line off, the decision log's
/// included. Empty directives (`info,`) are skipped, as `EnvFilter` does.
fn check_filter(filter: &str) -> Result<(), String> {
    let is_level =
        |s: &str| !s.is_empty() && s.parse::<tracing::level_filters::LevelFilter>().is_ok();
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let ok = is_level(directive)
            || directive
                .rsplit_once('=')
                .is_some_and(|(target, level)| !target.is_empty() && is_level(level));
        if !ok {
            return Err(format!(
                "`{directive}` is neither a level nor a target=level directive"
            ));
        }
    }
    Ok(())
}

/// Where log lines go, and in which format.
pub struct Sink {
    format: LogFormat,
    writer: BoxMakeWriter,
    ansi: bool,
    span_events: bool,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("format", &self.format)
            .field("ansi", &self.ansi)
            .field("span_events", &self.span_events)
            .finish_non_exhaustive()
    }
}

impl Sink {
    /// Standard error, the server's: text in colour when it is a terminal;
    /// many lines a write on a runtime built by [`runtime`] ([`lines`]).
    pub fn stderr(format: LogFormat) -> Sink {
        Sink {
            format,
            writer: BoxMakeWriter::new(lines::Stderr),
            ansi: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            span_events: false,
        }
    }

    /// Any writer (a file, or a buffer a test reads back), without colour.
    pub fn writer<W>(format: LogFormat, writer: W) -> Sink
    where
        W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
    {
        Sink {
            format,
            writer: BoxMakeWriter::new(writer),
            ansi: false,
            span_events: false,
        }
    }

    /// Also writes a line when each span opens, is entered, is exited and
    /// closes, with its fields (so a span's fields are written even when no
    /// event happens inside it).
    pub fn with_span_events(mut self) -> Sink {
        self.span_events = true;
        self
    }

    fn into_layer(self) -> Box<dyn Layer<Registry> + Send + Sync> {
        let span_events = if self.span_events {
            FmtSpan::FULL
        } else {
            FmtSpan::NONE
        };
        match self.format {
            LogFormat::Text => tracing_subscriber::fmt::layer()
                .with_ansi(self.ansi)
                .with_span_events(span_events)
                .event_format(text::TextFormat::default())
                .fmt_fields(text::TextFields)
                .with_writer(self.writer)
                .boxed(),
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(true)
                .with_span_list(true)
                .with_span_events(span_events)
                .with_writer(self.writer)
                .boxed(),
        }
    }
}

/// Keeps the OpenTelemetry pipeline alive; flushes it on drop.
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl std::fmt::Debug for TelemetryGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryGuard")
            .field("exporting", &self.provider.is_some())
            .finish()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
        lines::flush_all();
    }
}

/// The server's async runtime (and the CLI's): one worker thread per core;
/// each worker writes its log lines out when it runs out of work
/// ([`lines`]).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(lines::worker_parks)
        .build()
}

/// Installs the global subscriber: log lines, filtered by `level` (see
/// [`LogLevel`]), to each of `sinks` (the server's: [`Sink::stderr`]); and
/// traces, exported when the `OTEL_*` variables ask for it.
pub fn init(level: &LogLevel, sinks: Vec<Sink>) -> anyhow::Result<TelemetryGuard> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = EnvFilter::try_new(level.directive(rust_log.as_deref())?)?;
    // Said once logging is up: a RUST_LOG that is not used.
    let ignored_rust_log = match level {
        LogLevel::Default(_) => rust_log.filter(|v| !v.trim().is_empty() && !rust_log_valid(v)),
        LogLevel::Explicit(_) => None,
    };
    let logs: Vec<Box<dyn Layer<Registry> + Send + Sync>> =
        sinks.into_iter().map(Sink::into_layer).collect();
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let provider = if export_enabled(|k| std::env::var(k).ok()) {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()?;
        let mut resource = opentelemetry_sdk::Resource::builder().with_attribute(
            opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        );
        if !service_name_configured(|k| std::env::var(k).ok()) {
            resource = resource.with_service_name("billing-mode");
        }
        Some(
            opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource.build())
                .build(),
        )
    } else {
        None
    };
    // Traces get this service's spans and events at INFO and above whatever
    // the log filter, and only warnings from dependencies.
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("billing-mode"))
            .with_filter(
                Targets::new()
                    .with_target("billing_mode", tracing::Level::INFO)
                    .with_default(tracing::Level::WARN),
            )
    });
    match otel {
        Some(otel) => tracing_subscriber::registry()
            .with(logs.with_filter(filter))
            .with(otel)
            .try_init()?,
        // Without export, the log filter is the only one: applied to the
        // whole subscriber, a span or event it rejects is never created,
        // and one it accepts is not checked again against a per-layer
        // filter each time it is entered, exited or closed (entering and
        // exiting spans were 8 % of a Resolve's instructions, and this
        // takes about half of that; docs/performance.md, change 13). The
        // same lines are written either way.
        None => tracing_subscriber::registry()
            .with(logs)
            .with(filter)
            .try_init()?,
    }
    if let Some(value) = ignored_rust_log {
        tracing::warn!(
            rust_log = value,
            "RUST_LOG ignored: not a valid log filter; {ACCEPTED_FORMS}"
        );
    }
    Ok(TelemetryGuard { provider })
}

/// Whether to export traces, from the standard variables (`var` reads one).
fn export_enabled(var: impl Fn(&str) -> Option<String>) -> bool {
    let set = |k: &str| var(k).is_some_and(|v| !v.trim().is_empty());
    let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Whether the operator named the service (`OTEL_SERVICE_NAME`, or
/// `service.name` in `OTEL_RESOURCE_ATTRIBUTES`), which then wins.
fn service_name_configured(var: impl Fn(&str) -> Option<String>) -> bool {
    var("OTEL_SERVICE_NAME").is_some_and(|v| !v.trim().is_empty())
        || var("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|v| {
            v.split(',').any(|kv| {
                kv.split_once('=')
                    .is_some_and(|(k, _)| k.trim() == "service.name")
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn traces_are_exported_when_an_otlp_endpoint_is_set_and_not_disabled() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317");
        assert!(!export_enabled(vars(&[])));
        assert!(export_enabled(vars(&[endpoint])));
        assert!(export_enabled(vars(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://collector:4317"
        )])));
        assert!(!export_enabled(vars(&[
            endpoint,
            ("OTEL_SDK_DISABLED", "true")
        ])));
        assert!(!export_enabled(vars(&[
            endpoint,
            ("OTEL_TRACES_EXPORTER", "none")
        ])));
        assert!(export_enabled(vars(&[
            endpoint,
            ("OTEL_TRACES_EXPORTER", "otlp")
        ])));
    }

    #[test]
    fn an_explicit_log_level_beats_rust_log_which_beats_the_default() {
        let explicit = LogLevel::from_flag(Some("warn".to_owned()));
        assert_eq!(explicit.directive(None).unwrap(), "warn");
        assert_eq!(explicit.directive(Some("debug")).unwrap(), "warn");
        let default = LogLevel::from_flag(None);
        assert_eq!(default, LogLevel::Default("info".to_owned()));
        assert_eq!(default.directive(None).unwrap(), "info");
        assert_eq!(default.directive(Some("debug")).unwrap(), "debug");
        assert_eq!(
            default.directive(Some("billing_mode=trace,warn")).unwrap(),
            "billing_mode=trace,warn"
        );
        // An empty or invalid RUST_LOG is ignored, as before; a bare word
        // that is not a level (a target, to EnvFilter) is invalid.
        for ignored in [" ", "billing_mode=loud", "warning", "info,billing_mode"] {
            assert_eq!(
                default.directive(Some(ignored)).unwrap(),
                "info",
                "{ignored}"
            );
        }
    }

    #[test]
    fn an_explicit_filter_is_levels_or_target_level_directives() {
        for good in [
            "warn",
            "WARN",
            "off",
            "info,",
            "billing_mode=debug,info",
            "billing_mode::decision=info,warn",
            "h2=off,billing_mode[handler.resolve]=trace",
        ] {
            let level = LogLevel::from_flag(Some(good.to_owned()));
            assert_eq!(level.directive(Some("debug")).unwrap(), good);
        }
        for (bad, named) in [
            ("warning", "`warning`"),
            ("info,billing_mode", "`billing_mode`"),
            ("billing_mode=loud", "`billing_mode=loud`"),
            ("=debug", "`=debug`"),
        ] {
            let level = LogLevel::from_flag(Some(bad.to_owned()));
            let e = level.directive(None).unwrap_err().to_string();
            for part in [
                named,
                "--log-level or BILLING_MODE_LOG",
                "error|warn|info|debug|trace|off",
                "target=level",
            ] {
                assert!(e.contains(part), "{bad}: {part} not in {e}");
            }
        }
    }

    #[test]
    fn an_operator_given_service_name_wins() {
        assert!(!service_name_configured(vars(&[])));
        assert!(service_name_configured(vars(&[(
            "OTEL_SERVICE_NAME",
            "bm-eu1"
        )])));
        assert!(service_name_configured(vars(&[(
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=prod, service.name=bm-eu1"
        )])));
        assert!(!service_name_configured(vars(&[(
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=prod"
        )])));
    }
}
