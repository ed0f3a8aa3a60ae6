//! The text log format, written with as little machinery as the line needs.
//!
//! The text is tracing-subscriber's default format without colours
//! (`fmt::format::Full` with `DefaultFields`), to the byte: a unit test runs
//! both on the same events and compares. Ours because the default's cost was
//! measured (docs/performance.md, "Instructions per request"): it writes each
//! piece of a line through `write!` and a `dyn fmt::Write` (a field is a
//! format string of three pieces, the name and `=` each wrapped in a style),
//! and that machinery, not the text, was a sixth of what a Resolve cost the
//! server (its decision line and its spans' fields). Here the common pieces
//! (a string that needs no escaping, an integer, a boolean, the timestamp,
//! the level, the span list, the target) are plain `write_str` calls; every
//! other field (a message, an error, a `Debug` or `Display` value, a string
//! that needs escaping, a name with `r#` or `log.`) is written by
//! tracing-subscriber's own `DefaultVisitor`, and a line with colours, or an
//! event that came from the `log` crate, by its own `Format`. So a case this
//! module does not know is never written differently, only more slowly.

use std::{
    cell::RefCell,
    fmt::{self, Write as _},
};

use chrono::{Datelike, Timelike};
use tracing::{
    field::{Field, Visit},
    Event, Level, Subscriber,
};
use tracing_log::NormalizeEvent;
use tracing_subscriber::{
    field::{RecordFields, VisitOutput},
    fmt::{
        format::{DefaultFields, DefaultVisitor, Format, Full, Writer},
        time::{FormatTime, SystemTime},
        FmtContext, FormatEvent, FormatFields, FormattedFields,
    },
    registry::LookupSpan,
};

/// Formats events: the default full format's text (module docs).
#[derive(Debug, Default)]
pub(crate) struct TextFormat {
    /// Writes what this formatter does not: a line with colours, a `log`
    /// record.
    fallback: Format<Full, SystemTime>,
}

impl<S, N> FormatEvent<S, N> for TextFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if writer.has_ansi_escapes() || event.is_log() {
            return self.fallback.format_event(ctx, writer, event);
        }
        let meta = event.metadata();
        write_timestamp(&mut writer)?;
        writer.write_str(level_str(meta.level()))?;
        writer.write_char(' ')?;
        if let Some(scope) = ctx.event_scope() {
            let mut seen = false;
            for span in scope.from_root() {
                writer.write_str(span.metadata().name())?;
                seen = true;
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>() {
                    if !fields.is_empty() {
                        writer.write_char('{')?;
                        writer.write_str(fields)?;
                        writer.write_char('}')?;
                    }
                }
                writer.write_char(':')?;
            }
            if seen {
                writer.write_char(' ')?;
            }
        }
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        ctx.format_fields(writer.by_ref(), event)?;
        writer.write_char('\n')
    }
}

/// The level as the default format writes it without colours: five wide.
fn level_str(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => "TRACE",
        Level::DEBUG => "DEBUG",
        Level::INFO => " INFO",
        Level::WARN => " WARN",
        Level::ERROR => "ERROR",
    }
}

/// Now, as the default's `SystemTime` timer writes it
/// (`2026-11-28T17:19:04.123456Z`), and a space.
fn write_timestamp(writer: &mut Writer<'_>) -> fmt::Result {
    let now = chrono::DateTime::<chrono::Utc>::from(std::time::SystemTime::now());
    match rfc3339_micros(&now) {
        Some(text) => {
            // Only ASCII digits and separators were written.
            writer.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)?;
        }
        // A year outside 0..=9999: the default's own writing.
        None => SystemTime.format_time(writer)?,
    }
    writer.write_char(' ')
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ`, for a year from 0 to 9999.
fn rfc3339_micros(t: &chrono::DateTime<chrono::Utc>) -> Option<[u8; 27]> {
    let year = u32::try_from(t.year()).ok().filter(|y| *y <= 9999)?;
    let mut out = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut value: u32| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, t.month());
    put(8, 2, t.day());
    put(11, 2, t.hour());
    put(14, 2, t.minute());
    put(17, 2, t.second());
    // Below a second: a leap second's nanoseconds run past a billion.
    put(20, 6, (t.nanosecond() % 1_000_000_000) / 1_000);
    Some(out)
}

/// The largest field buffer a thread keeps between uses, in bytes.
const MAX_KEPT_SCRATCH: usize = 16 * 1024;

/// Formats fields (an event's, a span's): the text of `DefaultFields`.
#[derive(Debug, Default)]
pub(crate) struct TextFields;

impl<'w> FormatFields<'w> for TextFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        if writer.has_ansi_escapes() || !writer.sanitizes_ansi_escapes() {
            // Styled names and `=`, or messages left unescaped: the
            // default's writing.
            return DefaultFields::new().format_fields(writer, fields);
        }
        thread_local! {
            static SCRATCH: RefCell<String> = const { RefCell::new(String::new()) };
        }
        // The fields are written to a buffer kept for the thread and then
        // handed on in one piece: a span's fields go to a new, empty string,
        // which would otherwise grow (and copy itself) several times.
        SCRATCH.with(|scratch| {
            let mut own;
            let mut borrowed;
            let out = match scratch.try_borrow_mut() {
                Ok(s) => {
                    borrowed = s;
                    &mut *borrowed
                }
                // A field's `Debug` that logs: its own buffer.
                Err(_) => {
                    own = String::new();
                    &mut own
                }
            };
            out.clear();
            let mut visitor = TextVisitor {
                out,
                is_empty: true,
                result: Ok(()),
            };
            fields.record(&mut visitor);
            let written = visitor.result.and_then(|()| writer.write_str(visitor.out));
            // A rare large field does not keep its buffer for the thread's
            // life.
            if out.capacity() > MAX_KEPT_SCRATCH {
                *out = String::new();
            }
            written
        })
    }
}

/// Writes `name=value` pairs separated by spaces, as `DefaultVisitor` does;
/// hands it the fields it does not write the same way itself.
struct TextVisitor<'a> {
    out: &'a mut String,
    /// No field written yet (so no space before the next).
    is_empty: bool,
    result: fmt::Result,
}

impl TextVisitor<'_> {
    /// Whether this visitor writes `field` itself: not a name the default
    /// rewrites (`r#type`) or skips (`log.target`); the message is written
    /// by [`TextVisitor::record_debug`].
    fn plain_name(field: &Field) -> bool {
        let name = field.name();
        name != "message" && !name.starts_with("r#") && !name.starts_with("log.")
    }

    /// The space before every field but the first.
    fn pad(&mut self) {
        if self.is_empty {
            self.is_empty = false;
        } else {
            self.out.push(' ');
        }
    }

    /// `name=` and then `value`, already in its final form.
    fn write_pair(&mut self, field: &Field, value: &[&str]) {
        if self.result.is_err() {
            return;
        }
        self.pad();
        self.out.push_str(field.name());
        self.out.push('=');
        for part in value {
            self.out.push_str(part);
        }
    }

    /// The default's writing, for a field this visitor does not write.
    fn default_visitor(&mut self, field: &Field, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        if self.result.is_err() {
            return;
        }
        // `Writer::new` sanitizes messages, as the writer it stands for
        // (checked in `format_fields`).
        let mut default = DefaultVisitor::new(Writer::new(self.out), self.is_empty);
        record(&mut default);
        self.result = default.finish();
        // It wrote the field (and the space before it) unless the name is a
        // `log.` one, which it skips.
        if !field.name().starts_with("log.") {
            self.is_empty = false;
        }
    }
}

/// A string `Debug` writes as itself between quotes: printable ASCII
/// without `"` or `\`.
fn needs_no_escape(s: &str) -> bool {
    s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

/// Whether the default's message sanitizing rewrites `c` (its
/// `EscapingWriter`: ESC, BEL, BS, FF, DEL and the C1 controls).
fn sanitized(c: char) -> bool {
    matches!(
        c,
        '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}'
    )
}

/// The message, written as the default sanitizes it: control characters
/// that steer a terminal become escapes.
struct Sanitizing<'a>(&'a mut String);

impl fmt::Write for Sanitizing<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if !s.chars().any(sanitized) {
            self.0.push_str(s);
            return Ok(());
        }
        for c in s.chars() {
            match c {
                '\x1b' => self.0.push_str("\\x1b"),
                '\x07' => self.0.push_str("\\x07"),
                '\x08' => self.0.push_str("\\x08"),
                '\x0c' => self.0.push_str("\\x0c"),
                '\x7f' => self.0.push_str("\\x7f"),
                c if sanitized(c) => write!(self.0, "\\u{{{:x}}}", c as u32)?,
                c => self.0.push(c),
            }
        }
        Ok(())
    }
}

impl Visit for TextVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if Self::plain_name(field) && needs_no_escape(value) {
            self.write_pair(field, &["\"", value, "\""]);
        } else {
            self.default_visitor(field, |v| v.record_str(field, value));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if Self::plain_name(field) {
            self.write_pair(field, &[itoa::Buffer::new().format(value)]);
        } else {
            self.default_visitor(field, |v| v.record_u64(field, value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if Self::plain_name(field) {
            self.write_pair(field, &[itoa::Buffer::new().format(value)]);
        } else {
            self.default_visitor(field, |v| v.record_i64(field, value));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if Self::plain_name(field) {
            self.write_pair(field, &[if value { "true" } else { "false" }]);
        } else {
            self.default_visitor(field, |v| v.record_bool(field, value));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.default_visitor(field, |v| v.record_error(field, value));
    }

    /// A `Debug` or `Display` value (`?x`, `%x`), and the message.
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        if field.name() == "message" {
            self.pad();
            self.result = write!(Sanitizing(self.out), "{value:?}");
        } else if Self::plain_name(field) {
            self.write_pair(field, &[]);
            self.result = write!(self.out, "{value:?}");
        } else {
            self.default_visitor(field, |v| v.record_debug(field, value));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        sync::{Arc, Mutex},
    };

    use tracing_subscriber::{fmt::format::FmtSpan, layer::SubscriberExt};

    use super::*;

    /// A log sink a test reads back.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Capture {
        fn lines_without_time(&self) -> Vec<String> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines()
                .map(|l| {
                    l.split_once(' ')
                        .expect("a timestamp, then the line")
                        .1
                        .to_owned()
                })
                .collect()
        }
    }

    #[derive(Debug)]
    struct Cause;
    impl fmt::Display for Cause {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("the cause")
        }
    }
    impl std::error::Error for Cause {}

    #[derive(Debug)]
    struct Failure(Cause);
    impl fmt::Display for Failure {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("it failed")
        }
    }
    impl std::error::Error for Failure {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    /// Every kind of field and span this service writes, and the awkward
    /// ones: strings that need escaping, control characters in a message,
    /// `r#` names, errors with a source, fields recorded after the span
    /// opened, spans without fields, every level.
    fn emit_everything() {
        tracing::info!(target: "billing_mode::decision", rpc = "Resolve", actor = "cp", revision = 3u64, "decision");
        let rpc = tracing::info_span!(target: "billing_mode::rpc", "rpc", otel.name = "molecule.billing.v1.BillingMode/Resolve", otel.kind = "server");
        let _rpc = rpc.enter();
        let handler = tracing::info_span!("handler.resolve", workspace = tracing::field::Empty);
        let _handler = handler.enter();
        handler.record(
            "workspace",
            tracing::field::display("6f1c2b9e-0000-4000-8000-00000000abcd"),
        );
        let plain = tracing::info_span!("resolve");
        let _plain = plain.enter();
        tracing::info!(
            target: "billing_mode::decision",
            rpc = "Resolve",
            actor = "control-plane",
            workspace = %"6f1c2b9e-0000-4000-8000-00000000abcd",
            mode = "MODE_PLATFORM",
            source = "SOURCE_DERIVED",
            provider = "",
            revision = 7u64,
            removed_keys = %"ANTHROPIC_API_KEY,OPENAI_API_KEY",
            added_keys = %"",
            "decision"
        );
        tracing::warn!(
            quoted = "say \"hi\"",
            backslash = "a\\b",
            newline = "one\ntwo",
            tab = "a\tb",
            unicode = "naïve ✓",
            ansi = "\u{1b}[31mred",
            c1 = "\u{85}next",
            empty = "",
            negative = -12i64,
            big = u64::MAX,
            yes = true,
            no = false,
            ratio = 0.5f64,
            shown = %"display value",
            debugged = ?vec!["a", "b"],
            r#type = "keyword",
            "message with {} and \u{1b}[0m escape \u{9b}1m and \x07",
            "args"
        );
        let failure = Failure(Cause);
        tracing::error!(
            error = &failure as &(dyn std::error::Error + 'static),
            "failed"
        );
        let lone = Cause;
        tracing::error!(error = &lone as &(dyn std::error::Error + 'static));
        tracing::debug!(only_fields = 1u64);
        tracing::trace!(message = "explicit message field", after = "x");
        tracing::info!("");
    }

    #[test]
    fn writes_exactly_what_the_default_format_writes() {
        let ours = Capture::default();
        let theirs = Capture::default();
        let (o, t) = (ours.clone(), theirs.clone());
        let events = FmtSpan::NEW | FmtSpan::ENTER | FmtSpan::EXIT;
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_span_events(events.clone())
                    .with_writer(move || t.clone()),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_span_events(events)
                    .event_format(TextFormat::default())
                    .fmt_fields(TextFields)
                    .with_writer(move || o.clone()),
            );
        tracing::subscriber::with_default(subscriber, emit_everything);
        let (ours, theirs) = (ours.lines_without_time(), theirs.lines_without_time());
        assert!(theirs.len() > 10, "{theirs:#?}");
        assert_eq!(ours, theirs);
        // The interesting lines are there (so the comparison compared them).
        assert!(theirs.iter().any(|l| l.contains(
            "rpc{otel.name=\"molecule.billing.v1.BillingMode/Resolve\" otel.kind=\"server\"}:handler.resolve{workspace=6f1c2b9e-0000-4000-8000-00000000abcd}:resolve: billing_mode::decision: decision rpc=\"Resolve\""
        )), "{theirs:#?}");
        assert!(
            theirs
                .iter()
                .any(|l| l.contains("quoted=\"say \\\"hi\\\"\"")),
            "{theirs:#?}"
        );
    }

    #[test]
    fn the_timestamp_is_rfc3339_in_microseconds_like_the_default_timer() {
        use chrono::TimeZone;
        for (secs, nanos) in [
            (0, 0),
            (951_782_400, 999_999_999), // 2000-02-29, the last nanosecond of a second
            (1_795_881_544, 123_456_789),
            (4_107_542_399, 1_000),     // 2099-12-31T23:59:59
            (253_402_300_799, 999_000), // 9999-12-31T23:59:59
        ] {
            let t = chrono::Utc.timestamp_opt(secs, nanos).unwrap();
            let ours = rfc3339_micros(&t).unwrap();
            assert_eq!(
                std::str::from_utf8(&ours).unwrap(),
                t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            );
        }
        let beyond = chrono::Utc.timestamp_opt(253_402_300_800, 0).unwrap();
        assert_eq!(rfc3339_micros(&beyond), None);
        // The default timer's text has the same shape: same length, the
        // separators in the same places.
        let mut theirs = String::new();
        SystemTime
            .format_time(&mut Writer::new(&mut theirs))
            .unwrap();
        let mut ours = String::new();
        write_timestamp(&mut Writer::new(&mut ours)).unwrap();
        assert_eq!(ours.len(), theirs.len() + 1, "{ours:?} {theirs:?}");
        let shape = |s: &str| {
            s.bytes()
                .map(|b| if b.is_ascii_digit() { b'9' } else { b })
                .collect::<Vec<_>>()
        };
        assert_eq!(shape(ours.trim_end()), shape(&theirs));
    }
}
