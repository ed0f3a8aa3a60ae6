//! Adoption: registering a platform's existing workspaces from JSON Lines.
//!
//! One object a line: `workspace_id`, and optionally `runtime`, `model`,
//! `credential_keys` (names), `override_mode` and `legacy_mode` (what the
//! platform's old resolver decided). [`parse`] validates every line before
//! anything is sent, with the same domain validators the server uses; an
//! error names the line and the field, never a value (a malformed line may
//! hold a pasted secret). [`run`] then registers them through the real
//! service, so every decision is the server's own:
//!
//! - create-only, many at a time: `BatchCreateWorkspaces` calls of up to
//!   [`Options::batch_size`] workspaces (and at most [`MAX_BATCH_BYTES`]),
//!   each one transaction and one commit on the server. A workspace that
//!   already exists is counted and left alone, so a second run changes
//!   nothing. The lines with an override go in batches of their own, after
//!   the others: an override needs the admin role, and a batch is refused
//!   as a whole, so a writer's token fails those lines (each reported) and
//!   writes the rest;
//! - with `update`, an existing workspace is then read (`Resolve`) and
//!   compare-and-set on the revision read (`Set`), one at a time, so a
//!   concurrent change is reported, never lost;
//! - with `dry_run`, each line is sent as a `Set` with `dry_run` (which
//!   commits nothing), and the report holds the decisions they would
//!   produce, counted by mode and source, and every workspace whose decision
//!   differs from its `legacy_mode`.
//!
//! Calls run `concurrency` at a time; setting the cancel flag stops taking new
//! batches (dry run: lines), lets the calls in flight finish, and reports what
//! was done.

use std::{
    collections::{BTreeMap, HashMap},
    io::{self, BufRead},
    ops::Range,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
};

use prost::Message as _;
use serde::Serialize;
use serde_json::{Map, Value};
use tonic::{codegen::http, transport::Channel, Code, Request, Status};
use tonic_types::StatusExt;

use crate::{
    client::Bearer,
    domain::{CredentialKeys, Mode, Model, Runtime, WorkspaceId},
    proto::{self, billing_mode_client::BillingModeClient},
};

/// The longest line read, in bytes; a longer one is an error (and is not
/// held in memory).
pub const MAX_LINE_BYTES: usize = 1 << 20;

const FIELDS: &str = "workspace_id, runtime, model, credential_keys, override_mode, legacy_mode";

/// One valid line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// 1-based line number in the file.
    pub line: usize,
    pub workspace_id: WorkspaceId,
    pub runtime: Option<Runtime>,
    pub model: Option<Model>,
    /// Empty when the line has none.
    pub credential_keys: CredentialKeys,
    pub override_mode: Option<Mode>,
    pub legacy_mode: Option<Mode>,
}

/// Why a line was refused: the line, the field (when one is to blame) and
/// the rule. Never the value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LineError {
    pub line: usize,
    pub field: Option<&'static str>,
    pub message: String,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.field {
            Some(field) => write!(f, "line {}: {field}: {}", self.line, self.message),
            None => write!(f, "line {}: {}", self.line, self.message),
        }
    }
}

/// A file, validated.
#[derive(Debug, Default)]
pub struct Parsed {
    pub entries: Vec<Entry>,
    pub errors: Vec<LineError>,
    /// Lines read (blank ones included).
    pub lines: usize,
}

/// Reads and validates every line of `input`. I/O errors end the read;
/// everything wrong with a line is a [`LineError`].
pub fn parse(mut input: impl BufRead) -> io::Result<Parsed> {
    let mut parsed = Parsed::default();
    let mut seen: HashMap<WorkspaceId, usize> = HashMap::new();
    let mut buf = Vec::new();
    while let Some(too_long) = next_line(&mut input, &mut buf)? {
        parsed.lines += 1;
        let line = parsed.lines;
        let err = |field, message: String| LineError {
            line,
            field,
            message,
        };
        if too_long {
            parsed.errors.push(err(
                None,
                format!("longer than {MAX_LINE_BYTES} bytes; not read"),
            ));
            continue;
        }
        let Ok(text) = std::str::from_utf8(&buf) else {
            parsed.errors.push(err(None, "not UTF-8 text".to_owned()));
            continue;
        };
        if text.trim().is_empty() {
            continue;
        }
        match entry(line, text) {
            Ok(e) => match seen.get(&e.workspace_id) {
                Some(first) => parsed.errors.push(err(
                    Some("workspace_id"),
                    format!("the same workspace as line {first}"),
                )),
                None => {
                    seen.insert(e.workspace_id, line);
                    parsed.entries.push(e);
                }
            },
            Err(e) => parsed.errors.push(e),
        }
    }
    Ok(parsed)
}

/// The next line into `buf` (without its `\n` or `\r\n`); `Some(true)` when
/// it was longer than [`MAX_LINE_BYTES`] (then `buf` is empty and the rest
/// of the line was skipped unread); `None` at the end of the input.
fn next_line(input: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<Option<bool>> {
    buf.clear();
    let mut too_long = false;
    let mut any = false;
    loop {
        let available = input.fill_buf()?;
        if available.is_empty() {
            break;
        }
        any = true;
        let (chunk, used, end) = match available.iter().position(|b| *b == b'\n') {
            Some(i) => (&available[..i], i + 1, true),
            None => (available, available.len(), false),
        };
        if !too_long {
            if buf.len() + chunk.len() > MAX_LINE_BYTES {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(chunk);
            }
        }
        input.consume(used);
        if end {
            break;
        }
    }
    if !any {
        return Ok(None);
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(Some(too_long))
}

fn entry(line: usize, text: &str) -> Result<Entry, LineError> {
    let err = |field, message: String| LineError {
        line,
        field,
        message,
    };
    // serde_json's messages are not shown: only the position, never the text.
    let value: Value = serde_json::from_str(text).map_err(|e| {
        err(
            None,
            format!(
                "not valid JSON (column {}); expected one object a line",
                e.column()
            ),
        )
    })?;
    let Value::Object(object) = value else {
        return Err(err(None, "expected a JSON object".to_owned()));
    };
    if object.keys().any(|k| !FIELDS.split(", ").any(|f| f == k)) {
        // The unknown name is not echoed: it may be a pasted value.
        return Err(err(
            None,
            format!("an unknown field; the fields are {FIELDS}"),
        ));
    }
    let workspace_id = match object.get("workspace_id") {
        Some(Value::String(s)) => {
            WorkspaceId::parse(s).map_err(|e| err(Some("workspace_id"), e.to_string()))?
        }
        Some(_) => return Err(err(Some("workspace_id"), "must be a string".to_owned())),
        None => return Err(err(Some("workspace_id"), "is required".to_owned())),
    };
    let runtime = name(&object, "runtime", Runtime::parse).map_err(|m| err(Some("runtime"), m))?;
    let model = name(&object, "model", Model::parse).map_err(|m| err(Some("model"), m))?;
    let credential_keys = match object.get("credential_keys") {
        None | Some(Value::Null) => CredentialKeys::default(),
        Some(Value::String(s)) if s.is_empty() => CredentialKeys::default(),
        Some(Value::Array(items)) => {
            let mut names = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::String(s) => names.push(s.as_str()),
                    _ => {
                        return Err(err(
                            Some("credential_keys"),
                            format!("credential_keys[{i}] must be a string"),
                        ))
                    }
                }
            }
            CredentialKeys::parse(names).map_err(|e| err(Some("credential_keys"), e.to_string()))?
        }
        Some(_) => {
            return Err(err(
                Some("credential_keys"),
                "must be an array of names".to_owned(),
            ))
        }
    };
    let override_mode =
        mode(&object, "override_mode").map_err(|m| err(Some("override_mode"), m))?;
    let legacy_mode = mode(&object, "legacy_mode").map_err(|m| err(Some("legacy_mode"), m))?;
    Ok(Entry {
        line,
        workspace_id,
        runtime,
        model,
        credential_keys,
        override_mode,
        legacy_mode,
    })
}

/// An optional name: absent, `null` and `""` are none.
fn name<T>(
    object: &Map<String, Value>,
    field: &str,
    parse: impl Fn(&str) -> Result<T, crate::domain::ValidationError>,
) -> Result<Option<T>, String> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => parse(s).map(Some).map_err(|e| e.to_string()),
        Some(_) => Err("must be a string".to_owned()),
    }
}

/// An optional mode: absent, `null` and `""` are none.
fn mode(object: &Map<String, Value>, field: &str) -> Result<Option<Mode>, String> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => s
            .parse()
            .map(Some)
            .map_err(|_| "must be one of platform_managed, byok, disabled".to_owned()),
        Some(_) => Err("must be a string".to_owned()),
    }
}

// ---------------------------------------------------------------------------
// Sending

/// The transport calls go over: a [`Channel`], or one wrapped in tower
/// middleware (any `Clone + Send + Sync` HTTP service).
pub type Transport = tower::util::BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    tonic::transport::Error,
>;

/// A connection to the service and the bearer header to send, if any.
#[derive(Clone)]
pub struct Connection {
    client: BillingModeClient<Transport>,
    bearer: Bearer,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("bearer", &self.bearer)
            .finish_non_exhaustive()
    }
}

impl Connection {
    pub fn new(channel: Channel, bearer: Option<Bearer>) -> Self {
        Self::with_transport(Transport::new(channel), bearer)
    }

    pub fn with_transport(transport: Transport, bearer: Option<Bearer>) -> Self {
        Connection {
            client: BillingModeClient::new(transport),
            bearer: bearer.unwrap_or_default(),
        }
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        self.bearer.apply(&mut request);
        request
    }
}

/// Workspaces per `BatchCreateWorkspaces` call by default: large enough that
/// a commit serves many creates, small enough that the progress moves and a
/// Ctrl-C waits little.
pub const DEFAULT_BATCH_SIZE: usize = 250;

/// The most bytes of workspaces one batch carries (the server takes requests
/// of up to 4 MiB); a batch of unusually large lines is cut shorter.
pub const MAX_BATCH_BYTES: usize = 1 << 20;

/// How to import.
#[derive(Debug, Clone)]
pub struct Options {
    /// Decide every line with the server's dry run; write nothing.
    pub dry_run: bool,
    /// Update existing workspaces (compare-and-set on the revision read).
    pub update: bool,
    /// Calls in flight at once (at least 1).
    pub concurrency: usize,
    /// Workspaces per `BatchCreateWorkspaces` call (1 to
    /// [`crate::store::MAX_BATCH_CREATE`]; [`DEFAULT_BATCH_SIZE`] is a good
    /// choice).
    pub batch_size: usize,
    /// Recorded in the audit rows of the workspaces written.
    pub reason: String,
}

/// What happened to one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Created (dry run: would be).
    Created,
    /// Already registered and left alone.
    Existing,
    /// Updated (dry run: would be).
    Updated,
    /// Already registered with exactly the line's values.
    Unchanged,
    /// Changed by someone else between the read and the write: not updated.
    Conflict,
    /// Refused by the service, or the call failed.
    Failed,
}

/// One line's result.
#[derive(Debug, Clone)]
pub struct Done {
    pub line: usize,
    pub workspace_id: WorkspaceId,
    pub outcome: Outcome,
    pub legacy_mode: Option<Mode>,
    /// The decision the line ends with (dry run: would end with), when known.
    pub resolution: Option<proto::Resolution>,
    /// For `Conflict` and `Failed`: the status.
    pub error: Option<CallError>,
}

/// A refused or failed call: code, ErrorInfo reason and the server's message
/// (which never holds a credential value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CallError {
    pub code: String,
    pub reason: String,
    pub message: String,
}

impl CallError {
    fn from_status(s: &Status) -> Self {
        CallError {
            code: format!("{:?}", s.code()),
            reason: s
                .get_details_error_info()
                .map(|i| i.reason)
                .unwrap_or_default(),
            message: s.message().to_owned(),
        }
    }
}

/// The decision a line ends with, differing from its `legacy_mode`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Disagreement {
    pub line: usize,
    pub workspace_id: String,
    pub legacy_mode: &'static str,
    pub mode: &'static str,
    pub source: &'static str,
    pub provider: String,
    /// The trace line that decided it.
    pub reason: String,
    pub trace: Vec<String>,
}

/// What a run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub dry_run: bool,
    /// Valid lines given to the run.
    pub total: usize,
    /// Lines whose calls completed.
    pub done: usize,
    /// Stopped early (cancelled, or a call that every other would fail too).
    pub interrupted: bool,
    /// Stopped early by a refusal every other call would meet too (a token
    /// that may not write, say), not by a signal: named in `failures`.
    pub stopped_by_refusal: bool,
    pub created: usize,
    pub existing: usize,
    pub updated: usize,
    pub unchanged: usize,
    pub conflicts: Vec<Failure>,
    pub failures: Vec<Failure>,
    /// Decisions known at the end, counted by (mode, source).
    pub decisions: BTreeMap<String, usize>,
    /// Lines whose decision differs from their `legacy_mode`, in line order.
    pub disagreements: Vec<Disagreement>,
}

/// A line that was not imported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    pub line: usize,
    pub workspace_id: String,
    #[serde(flatten)]
    pub error: CallError,
}

impl Report {
    /// Whether the run wrote (dry run: would write) anything.
    pub fn changed(&self) -> bool {
        self.created + self.updated > 0
    }

    fn add(&mut self, d: Done) {
        self.done += 1;
        match d.outcome {
            Outcome::Created => self.created += 1,
            Outcome::Existing => self.existing += 1,
            Outcome::Updated => self.updated += 1,
            Outcome::Unchanged => self.unchanged += 1,
            Outcome::Conflict | Outcome::Failed => {
                let f = Failure {
                    line: d.line,
                    workspace_id: d.workspace_id.to_string(),
                    error: d.error.clone().unwrap_or(CallError {
                        code: String::new(),
                        reason: String::new(),
                        message: String::new(),
                    }),
                };
                if d.outcome == Outcome::Conflict {
                    self.conflicts.push(f);
                } else {
                    self.failures.push(f);
                }
            }
        }
        let Some(r) = &d.resolution else { return };
        let mode = mode_name(r.mode);
        let source = source_name(r.source);
        *self
            .decisions
            .entry(format!("{mode} {source}"))
            .or_default() += 1;
        if let Some(legacy) = d.legacy_mode {
            if legacy.as_str() != mode {
                self.disagreements.push(Disagreement {
                    line: d.line,
                    workspace_id: r.workspace_id.clone(),
                    legacy_mode: legacy.as_str(),
                    mode,
                    source,
                    provider: r.provider.clone(),
                    reason: deciding_reason(r),
                    trace: r.trace.clone(),
                });
            }
        }
    }

    fn finish(&mut self) {
        self.disagreements.sort_by_key(|d| d.line);
        self.conflicts.sort_by_key(|f| f.line);
        self.failures.sort_by_key(|f| f.line);
    }
}

/// A mode's name; `unspecified` when it has none.
pub fn mode_name(v: i32) -> &'static str {
    crate::wire::names::mode_name(v).unwrap_or("unspecified")
}

/// A source's name; `UNSPECIFIED` when it has none.
pub fn source_name(v: i32) -> &'static str {
    crate::wire::names::source_name(v).unwrap_or("UNSPECIFIED")
}

/// The trace line that decided: the override, or the last derivation step.
fn deciding_reason(r: &proto::Resolution) -> String {
    let prefix = if r.source == i32::from(proto::Source::Override) {
        "override:"
    } else {
        "derive:"
    };
    r.trace
        .iter()
        .rev()
        .find(|t| t.starts_with(prefix))
        .or(r.trace.last())
        .cloned()
        .unwrap_or_default()
}

/// The Set a line stands for: its runtime, model and credential names
/// (absent ones cleared, which for a create is the same as absent) and its
/// override when it has one. An import never removes an override.
fn set_request(e: &Entry, opts: &Options, expected_revision: u64) -> proto::SetRequest {
    proto::SetRequest {
        workspace_id: e.workspace_id.to_string(),
        override_mode: e
            .override_mode
            .map(|m| i32::from(crate::wire::convert::mode_to_wire(m))),
        runtime: Some(
            e.runtime
                .as_ref()
                .map(|r| r.as_str().to_owned())
                .unwrap_or_default(),
        ),
        model: Some(
            e.model
                .as_ref()
                .map(|m| m.as_str().to_owned())
                .unwrap_or_default(),
        ),
        credential_keys: Some(proto::CredentialKeys {
            keys: e.credential_keys.to_strings(),
        }),
        expected_revision: Some(expected_revision),
        // A dry run is checked exactly as the write would be, and an override
        // needs a reason: one that says what it is, when none is given.
        reason: if opts.dry_run && opts.reason.trim().is_empty() {
            "import (dry run)".to_owned()
        } else {
            opts.reason.clone()
        },
        dry_run: opts.dry_run,
    }
}

fn is_revision_mismatch(s: &Status) -> bool {
    s.code() == Code::Aborted
}

/// Errors every other call would meet too: stop instead of repeating them.
fn is_fatal(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unauthenticated | Code::PermissionDenied | Code::Unimplemented
    )
}

/// A line's result.
fn done(
    e: &Entry,
    outcome: Outcome,
    resolution: Option<proto::Resolution>,
    error: Option<CallError>,
) -> Done {
    Done {
        line: e.line,
        workspace_id: e.workspace_id,
        outcome,
        legacy_mode: e.legacy_mode,
        resolution,
        error,
    }
}

/// A failed call's result for `e`, and whether the run should stop.
fn failed(e: &Entry, s: &Status) -> (Done, bool) {
    (
        done(e, Outcome::Failed, None, Some(CallError::from_status(s))),
        is_fatal(s),
    )
}

/// A refused write of `e` (a `Set`, or the `BatchCreateWorkspaces` holding
/// it): as [`failed`], except that `PERMISSION_DENIED` for a line with an
/// override is that line's alone. An override needs the admin role; a
/// writer's token may still write the lines without one, so the run goes
/// on and the line is reported as needing an admin.
fn refused_write(e: &Entry, s: &Status) -> (Done, bool) {
    if s.code() != Code::PermissionDenied || e.override_mode.is_none() {
        return failed(e, s);
    }
    let mut error = CallError::from_status(s);
    error.message = format!(
        "override_mode needs the admin role: import this line with an admin token ({})",
        s.message()
    );
    (done(e, Outcome::Failed, None, Some(error)), false)
}

/// One line, one create-only `Set` (dry run: what it would do): returns its
/// result and whether the run should stop.
async fn import_one(conn: &Connection, e: &Entry, opts: &Options) -> (Done, bool) {
    let mut client = conn.client.clone();
    // Create-only: never overwrites a registration made meanwhile.
    match client.set(conn.request(set_request(e, opts, 0))).await {
        Ok(r) => (
            done(e, Outcome::Created, r.into_inner().resolution, None),
            false,
        ),
        Err(s) if is_revision_mismatch(&s) => existing_one(conn, e, opts).await,
        Err(s) => refused_write(e, &s),
    }
}

/// A line whose workspace exists: read it (the decision it keeps, and the
/// revision to update), then, with `update`, compare-and-set on that revision.
async fn existing_one(conn: &Connection, e: &Entry, opts: &Options) -> (Done, bool) {
    let mut client = conn.client.clone();
    let current = match client
        .resolve(conn.request(proto::ResolveRequest {
            workspace_id: e.workspace_id.to_string(),
        }))
        .await
    {
        Ok(r) => r.into_inner().resolution,
        Err(s) => return failed(e, &s),
    };
    let Some(current) = current else {
        return failed(e, &Status::internal("the server returned no resolution"));
    };
    if !opts.update {
        return (done(e, Outcome::Existing, Some(current), None), false);
    }
    let revision = current.revision;
    match client
        .set(conn.request(set_request(e, opts, revision)))
        .await
    {
        Ok(r) => {
            let r = r.into_inner().resolution;
            let outcome = match &r {
                Some(r) if r.revision == revision => Outcome::Unchanged,
                _ => Outcome::Updated,
            };
            (done(e, outcome, r, None), false)
        }
        Err(s) if is_revision_mismatch(&s) => (
            done(e, Outcome::Conflict, None, Some(CallError::from_status(&s))),
            false,
        ),
        Err(s) => refused_write(e, &s),
    }
}

/// The workspace a line stands for in a `BatchCreateWorkspaces` call: its
/// runtime, model, credential names and override when it has one.
fn new_workspace(e: &Entry) -> proto::NewWorkspace {
    proto::NewWorkspace {
        workspace_id: e.workspace_id.to_string(),
        override_mode: e
            .override_mode
            .map_or(proto::Mode::Unspecified, crate::wire::convert::mode_to_wire)
            .into(),
        runtime: e
            .runtime
            .as_ref()
            .map(|r| r.as_str().to_owned())
            .unwrap_or_default(),
        model: e
            .model
            .as_ref()
            .map(|m| m.as_str().to_owned())
            .unwrap_or_default(),
        credential_keys: e.credential_keys.to_strings(),
    }
}

/// `entries` cut into batches of at most `batch_size` workspaces and
/// [`MAX_BATCH_BYTES`] (a batch holds at least one). Lines with an override
/// and lines without one are never in the same batch: an override needs the
/// admin role, and a batch is refused as a whole, so a writer's batch of
/// lines without one must not hold an override ([`run`] sends those lines
/// after the others, so there is one such cut).
fn batches(entries: &[Entry], batch_size: usize) -> Vec<Range<usize>> {
    let batch_size = batch_size.clamp(1, crate::store::MAX_BATCH_CREATE);
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, e) in entries.iter().enumerate() {
        let size = new_workspace(e).encoded_len() + 8;
        let other_kind = e.override_mode.is_some() != entries[start].override_mode.is_some();
        if i > start && (i - start == batch_size || bytes + size > MAX_BATCH_BYTES || other_kind) {
            out.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < entries.len() {
        out.push(start..entries.len());
    }
    out
}

/// One batch, one `BatchCreateWorkspaces` call; with `update`, each existing
/// workspace then as [`existing_one`]. Returns the results and whether the
/// run should stop. After a fatal error updating one existing workspace, the
/// batch's later existing ones are left out (not sent), but the workspaces
/// the call created are reported, since they were.
async fn import_batch(conn: &Connection, entries: &[Entry], opts: &Options) -> (Vec<Done>, bool) {
    let mut client = conn.client.clone();
    let request = proto::BatchCreateWorkspacesRequest {
        workspaces: entries.iter().map(new_workspace).collect(),
        reason: opts.reason.clone(),
    };
    let status = match client.batch_create_workspaces(conn.request(request)).await {
        Ok(r) if r.get_ref().results.len() == entries.len() => {
            let mut out = Vec::with_capacity(entries.len());
            let mut stopped = false;
            for (e, r) in entries.iter().zip(r.into_inner().results) {
                if r.created {
                    out.push(done(e, Outcome::Created, r.resolution, None));
                } else if stopped {
                    // Not sent: the run stops.
                } else if opts.update {
                    let (d, fatal) = existing_one(conn, e, opts).await;
                    out.push(d);
                    stopped = fatal;
                } else {
                    // Left alone; its decision is known when the caller may
                    // read it.
                    out.push(done(e, Outcome::Existing, r.resolution, None));
                }
            }
            return (out, stopped);
        }
        Ok(r) => Status::internal(format!(
            "the server answered {} results for {} workspaces",
            r.get_ref().results.len(),
            entries.len()
        )),
        Err(s) => s,
    };
    // The call failed as a whole: every line of the batch with its status
    // (a batch of overrides refused to a writer stops only those lines).
    let mut fatal = false;
    let out: Vec<Done> = entries
        .iter()
        .map(|e| {
            let (d, stop) = refused_write(e, &status);
            fatal |= stop;
            d
        })
        .collect();
    (out, fatal)
}

/// Imports `entries`, `opts.concurrency` calls at a time, in batches
/// (dry run: one line a call). The lines with an override go after the
/// others, in batches of their own: refused to a token without the admin
/// role, they fail alone, and the run goes on. `cancel` stops the run after
/// the calls in flight; `progress` is called with the number of lines done
/// after each call.
pub async fn run(
    conn: &Connection,
    mut entries: Vec<Entry>,
    opts: &Options,
    cancel: Arc<AtomicBool>,
    mut progress: impl FnMut(usize),
) -> Report {
    entries.sort_by_key(|e| e.override_mode.is_some());
    let total = entries.len();
    let units = Arc::new(if opts.dry_run {
        (0..total).map(|i| i..i + 1).collect()
    } else {
        batches(&entries, opts.batch_size)
    });
    let entries = Arc::new(entries);
    let next = Arc::new(AtomicUsize::new(0));
    let workers = opts.concurrency.clamp(1, 1024).min(units.len().max(1));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Vec<Done>, bool)>(workers * 4);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (conn, entries, units, next, cancel, tx, opts) = (
            conn.clone(),
            entries.clone(),
            units.clone(),
            next.clone(),
            cancel.clone(),
            tx.clone(),
            opts.clone(),
        );
        tasks.spawn(async move {
            while !cancel.load(Ordering::SeqCst) {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(unit) = units.get(i) else { break };
                let unit = &entries[unit.clone()];
                let result = if opts.dry_run {
                    let (d, fatal) = import_one(&conn, &unit[0], &opts).await;
                    (vec![d], fatal)
                } else {
                    import_batch(&conn, unit, &opts).await
                };
                if tx.send(result).await.is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut report = Report {
        dry_run: opts.dry_run,
        total,
        ..Report::default()
    };
    let mut stopped = false;
    // Whether the refusal stopped the run (rather than a cancellation, a
    // signal, that came first).
    let mut by_refusal = false;
    while let Some((done, fatal)) = rx.recv().await {
        if fatal && !stopped {
            stopped = true;
            by_refusal = !cancel.swap(true, Ordering::SeqCst);
        }
        for d in done {
            report.add(d);
        }
        progress(report.done);
    }
    while tasks.join_next().await.is_some() {}
    report.interrupted = report.done < total;
    report.stopped_by_refusal = by_refusal && report.interrupted;
    report.finish();
    report
}

// ---------------------------------------------------------------------------
// Output

/// The report as JSON, with the refused lines of the file.
pub fn report_json(report: &Report, invalid: &[LineError], lines: usize) -> Value {
    let mut v = serde_json::to_value(report).expect("the report serializes");
    let o = v.as_object_mut().expect("an object");
    o.insert("lines".into(), lines.into());
    o.insert(
        "invalid".into(),
        serde_json::to_value(invalid).expect("errors serialize"),
    );
    o.insert("changed".into(), report.changed().into());
    v
}

/// The report as text for a person.
pub fn report_text(report: &Report, invalid: &[LineError], lines: usize) -> String {
    let mut out = String::new();
    out += &format!(
        "{lines} lines: {} valid, {} invalid{}\n",
        report.total,
        invalid.len(),
        if invalid.is_empty() { "" } else { " (skipped)" }
    );
    for e in invalid {
        out += &format!("  skipped {e}\n");
    }
    if report.dry_run {
        out += "dry run: nothing was written\n";
    }
    if report.stopped_by_refusal {
        out += &format!(
            "STOPPED after {} of {} workspaces by a refusal every other line would meet too \
             (below); the rest were not sent\n",
            report.done, report.total
        );
    } else if report.interrupted {
        out += &format!(
            "INTERRUPTED after {} of {} workspaces; the rest were not sent\n",
            report.done, report.total
        );
    }
    let (created, updated) = if report.dry_run {
        ("would create:", "would update:")
    } else {
        ("created:", "updated:")
    };
    out += &format!("{created:<14}{}\n", report.created);
    out += &format!("{:<14}{} (left alone)\n", "existing:", report.existing);
    out += &format!("{updated:<14}{}\n", report.updated);
    out += &format!("{:<14}{}\n", "unchanged:", report.unchanged);
    out += &format!("{:<14}{}\n", "conflicts:", report.conflicts.len());
    out += &format!("{:<14}{}\n", "failed:", report.failures.len());
    if !report.changed() && !report.interrupted && report.failures.is_empty() {
        out += match (report.dry_run, invalid.is_empty()) {
            (true, true) => "nothing would change: every workspace is already registered\n",
            (false, true) => "nothing changed: every workspace is already registered\n",
            // The skipped lines' workspaces may well not be.
            (true, false) => {
                "nothing would change: every valid line's workspace is already registered; \
                 the skipped lines were not imported\n"
            }
            (false, false) => {
                "nothing changed: every valid line's workspace is already registered; \
                 the skipped lines were not imported\n"
            }
        };
    }
    for f in &report.conflicts {
        out += &format!(
            "  conflict line {} {}: changed concurrently, not updated ({})\n",
            f.line, f.workspace_id, f.error.message
        );
    }
    for f in &report.failures {
        out += &format!(
            "  failed line {} {}: {} {}: {}\n",
            f.line, f.workspace_id, f.error.code, f.error.reason, f.error.message
        );
    }
    out += "decisions by mode and source:\n";
    for (k, n) in &report.decisions {
        out += &format!("  {k:<40} {n}\n");
    }
    out += &format!("differs from legacy_mode: {}\n", report.disagreements.len());
    for d in &report.disagreements {
        out += &format!(
            "  line {} {}: legacy {} -> {} ({}): {}\n",
            d.line, d.workspace_id, d.legacy_mode, d.mode, d.source, d.reason
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Parsed {
        parse(io::Cursor::new(s.as_bytes())).unwrap()
    }

    #[test]
    fn a_valid_line_becomes_an_entry() {
        let p = parse_str(
            "{\"workspace_id\":\"6B66DE8D-9337-4fb4-be8d-6d49dca0d809\",\"runtime\":\"claude-code\",\
             \"model\":\"opus\",\"credential_keys\":[\"CLAUDE_CODE_OAUTH_TOKEN\"],\"legacy_mode\":\"platform_managed\"}\n\
             \n{\"workspace_id\":\"11111111-1111-4111-8111-111111111111\",\"model\":\"\",\"override_mode\":null}\r\n",
        );
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        assert_eq!(p.lines, 3);
        assert_eq!(p.entries.len(), 2);
        let e = &p.entries[0];
        assert_eq!(
            e.workspace_id.to_string(),
            "6b66de8d-9337-4fb4-be8d-6d49dca0d809"
        );
        assert_eq!(e.legacy_mode, Some(Mode::PlatformManaged));
        assert_eq!(p.entries[1].line, 3);
        assert_eq!(p.entries[1].model, None);
    }

    #[test]
    fn a_run_that_skipped_lines_never_says_every_workspace_is_registered() {
        let p = parse_str("{\"workspace_id\":\"not-a-uuid\"}\n");
        assert_eq!(p.errors.len(), 1);
        for dry_run in [false, true] {
            let report = Report {
                dry_run,
                ..Report::default()
            };
            let text = report_text(&report, &p.errors, 1);
            assert!(!text.contains("every workspace"), "{text}");
            assert!(
                text.contains("the skipped lines were not imported"),
                "{text}"
            );
            assert!(report_text(&report, &[], 1).contains("every workspace is already registered"));
        }
    }

    #[test]
    fn an_empty_string_is_absent_in_every_optional_field() {
        let p = parse_str(
            "{\"workspace_id\":\"6b66de8d-9337-4fb4-be8d-6d49dca0d809\",\"runtime\":\"\",\"model\":\"\",\
             \"credential_keys\":\"\",\"override_mode\":\"\",\"legacy_mode\":\"\"}\n",
        );
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let e = &p.entries[0];
        assert_eq!((e.runtime.as_ref(), e.model.as_ref()), (None, None));
        assert_eq!(e.credential_keys, CredentialKeys::default());
        assert_eq!((e.override_mode, e.legacy_mode), (None, None));
        // Anything else that is not a mode is still refused.
        let p = parse_str(
            "{\"workspace_id\":\"6b66de8d-9337-4fb4-be8d-6d49dca0d809\",\"override_mode\":\" \"}\n",
        );
        assert_eq!(p.errors.len(), 1, "{:?}", p.errors);
    }

    #[test]
    fn batches_hold_at_most_the_batch_size_and_the_byte_bound() {
        let line = |i: usize, keys: usize| {
            let keys: Vec<String> = (0..keys)
                .map(|k| format!("K{k}_{}", "X".repeat(250)))
                .collect();
            format!(
                "{}\n",
                serde_json::json!({"workspace_id": WorkspaceId::new_random().to_string(),
                    "model": format!("m{i}"), "credential_keys": keys})
            )
        };
        let small: String = (0..1001).map(|i| line(i, 0)).collect();
        let p = parse_str(&small);
        assert_eq!(
            batches(&p.entries, 250),
            vec![0..250, 250..500, 500..750, 750..1000, 1000..1001]
        );
        assert_eq!(
            batches(&p.entries, 5000).len(),
            2,
            "at most MAX_BATCH_CREATE"
        );
        assert_eq!(batches(&p.entries, 0)[0], 0..1);
        assert!(batches(&[], 250).is_empty());
        // Lines of 64 long names (16 KiB each): cut by bytes, not count.
        let large: String = (0..200).map(|i| line(i, 64)).collect();
        let p = parse_str(&large);
        let b = batches(&p.entries, 250);
        assert!(b.len() >= 4, "{b:?}");
        assert_eq!(b.iter().map(|r| r.len()).sum::<usize>(), 200);
        for r in &b {
            let bytes: usize = p.entries[r.clone()]
                .iter()
                .map(|e| new_workspace(e).encoded_len())
                .sum();
            assert!(bytes <= MAX_BATCH_BYTES, "{bytes}");
        }
    }

    #[test]
    fn lines_with_an_override_are_never_batched_with_the_others() {
        let text: String = (0..25)
            .map(|i| {
                let mut o =
                    serde_json::json!({"workspace_id": WorkspaceId::new_random().to_string()});
                if i % 3 == 0 {
                    o["override_mode"] = "byok".into();
                }
                format!("{o}\n")
            })
            .collect();
        let p = parse_str(&text);
        let b = batches(&p.entries, 4);
        assert_eq!(b.iter().map(|r| r.len()).sum::<usize>(), 25);
        for r in &b {
            let kinds: std::collections::BTreeSet<bool> = p.entries[r.clone()]
                .iter()
                .map(|e| e.override_mode.is_some())
                .collect();
            assert_eq!(kinds.len(), 1, "{r:?}");
            assert!(r.len() <= 4, "{r:?}");
        }
    }

    #[test]
    fn errors_name_the_line_and_field_and_never_the_value() {
        let secret = "sk-ant-api03-SECRETVALUE";
        let long = format!("{{\"workspace_id\":\"{}\"}}", "x".repeat(MAX_LINE_BYTES));
        let text = [
            format!("{{\"workspace_id\":\"{secret}\"}}"),
            format!("{{\"workspace_id\":\"6b66de8d-9337-4fb4-be8d-6d49dca0d809\",\"credential_keys\":[\"OK\",\"{secret}=x\"]}}"),
            format!("{{\"workspace_id\":\"6b66de8d-9337-4fb4-be8d-6d49dca0d800\",\"override_mode\":\"{secret}\"}}"),
            format!("{{\"workspace_id\": {secret}"),
            long,
            format!("{{\"{secret}\":1}}"),
            format!("{{\"workspace_id\":\"6b66de8d-9337-4fb4-be8d-6d49dca0d801\",\"model\":\"a {secret}\"}}"),
            "{\"workspace_id\":\"6b66de8d-9337-4fb4-be8d-6d49dca0d802\"}".to_owned(),
            "{\"workspace_id\":\"6B66DE8D-9337-4fb4-be8d-6d49dca0d802\"}".to_owned(),
            "[1]".to_owned(),
        ]
        .join("\n");
        let p = parse_str(&text);
        let got: Vec<(usize, Option<&str>)> = p.errors.iter().map(|e| (e.line, e.field)).collect();
        assert_eq!(
            got,
            vec![
                (1, Some("workspace_id")),
                (2, Some("credential_keys")),
                (3, Some("override_mode")),
                (4, None),
                (5, None),
                (6, None),
                (7, Some("model")),
                (9, Some("workspace_id")),
                (10, None),
            ]
        );
        assert_eq!(p.entries.len(), 1);
        for e in &p.errors {
            assert!(!e.to_string().contains("SECRETVALUE"), "{e}");
        }
        assert!(p.errors[1].message.contains("credential_keys[1]"));
        assert!(p.errors[7].message.contains("line 8"));
    }
}
