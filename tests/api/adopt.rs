//! Adoption, black-box on both backends: `ListWorkspaces` through the real
//! gRPC server, the import (`billing_mode::import`, the library behind
//! `billing-mode import`) against the real server, and both commands through
//! the real binary.
//!
//! The expected decisions below are the test's own table, written from the
//! registry's documented rules (docs/registry.md), not a call to the
//! resolver the server uses.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::Cursor,
    process::{Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use crate::helpers::*;
use billing_mode::{
    auth::Role,
    import::{self, Connection, Options, Report, Transport},
    proto::{
        watch_response, BatchCreateWorkspacesRequest, ListWorkspacesRequest, Mode, NewWorkspace,
        Resolution, ResolveRequest, SetRequest, Source, WatchRequest,
    },
};
use serde_json::{json, Value};
use tonic::{codegen::http, Code};

const BIN: &str = env!("CARGO_BIN_EXE_billing-mode");

// ---------------------------------------------------------------------------
// The workspaces: every runtime and model convention of the built-in registry

/// One kind of workspace and the decision the registry's rules give it.
struct Case {
    runtime: Option<&'static str>,
    model: Option<&'static str>,
    keys: &'static [&'static str],
    override_mode: Option<&'static str>,
    mode: &'static str,
    source: &'static str,
}

const fn case(
    runtime: &'static str,
    model: &'static str,
    keys: &'static [&'static str],
    mode: &'static str,
) -> Case {
    Case {
        runtime: Some(runtime),
        model: Some(model),
        keys,
        override_mode: None,
        mode,
        source: "DERIVED_PROVIDER",
    }
}

const PM: &str = "platform_managed";
const BYOK: &str = "byok";
const DISABLED: &str = "disabled";

const LANGGRAPH_FAMILY: [&str; 5] = ["langgraph", "deepagents", "crewai", "autogen", "openclaw"];

fn cases() -> Vec<Case> {
    let mut c = vec![
        // claude-code: the CLI aliases are the customer's subscription.
        case("claude-code", "opus", &["CLAUDE_CODE_OAUTH_TOKEN"], BYOK),
        case("claude-code", "sonnet", &[], BYOK),
        case("claude-code", "haiku", &["ANTHROPIC_API_KEY"], BYOK),
        // Versioned ids: the customer's API key, else the platform's.
        case(
            "claude-code",
            "claude-sonnet-4-6",
            &["ANTHROPIC_API_KEY"],
            BYOK,
        ),
        case("claude-code", "claude-opus-4-7", &[], PM),
        case(
            "claude-code",
            "claude-haiku-4-5",
            &["ANTHROPIC_AUTH_TOKEN"],
            BYOK,
        ),
        // hermes vendor/model slugs.
        case("hermes", "anthropic/claude-sonnet-4-5", &[], PM),
        case(
            "hermes",
            "anthropic/claude-sonnet-4-5",
            &["ANTHROPIC_API_KEY"],
            BYOK,
        ),
        case("hermes", "openai/gpt-4o", &[], PM),
        case("hermes", "openai/gpt-4o", &["OPENROUTER_API_KEY"], BYOK),
        case("hermes", "openai/gpt-4o", &["OPENAI_API_KEY"], BYOK),
        case("hermes", "openrouter/auto", &[], BYOK),
        case(
            "hermes",
            "custom/my-model",
            &["HERMES_CUSTOM_API_KEY"],
            BYOK,
        ),
        case("hermes", "gemini/gemini-2.5-pro", &["GEMINI_API_KEY"], BYOK),
        case("hermes", "minimax/MiniMax-M2.7", &[], BYOK),
        case("hermes", "minimax-cn/MiniMax-M2.7", &[], BYOK),
        case("hermes", "kimi-coding/kimi-k2", &[], BYOK),
        case("hermes", "kimi-coding-cn/kimi-k2", &[], BYOK),
        case("hermes", "deepseek/deepseek-chat", &[], BYOK),
        case("hermes", "zai/glm-4.6", &[], BYOK),
        case("hermes", "alibaba/qwen3-max", &[], BYOK),
        case("hermes", "dashscope/qwen3-max", &[], BYOK),
        case("hermes", "qwen/qwen3-max", &[], BYOK),
        case("hermes", "xai/grok-4", &[], BYOK),
        case("hermes", "grok/grok-4", &[], BYOK),
        case("hermes", "nousresearch/hermes-4", &["NOUS_API_KEY"], BYOK),
        // gemini-cli and codex.
        case("gemini-cli", "gemini-2.5-pro", &["GEMINI_API_KEY"], BYOK),
        case("codex", "gpt-5", &[], PM),
        case("codex", "o4-mini", &["OPENAI_API_KEY"], BYOK),
        case("codex", "codex-MiniMax-M2.7", &[], BYOK),
        case("codex", "MiniMax-M2", &["MINIMAX_API_KEY"], BYOK),
    ];
    for rt in LANGGRAPH_FAMILY {
        c.extend([
            case(rt, "anthropic:claude-sonnet-4-6", &[], PM),
            case(
                rt,
                "anthropic:claude-sonnet-4-6",
                &["ANTHROPIC_API_KEY"],
                BYOK,
            ),
            case(rt, "openai:gpt-4.1-mini", &[], PM),
            case(rt, "openai:gpt-4.1-mini", &["OPENAI_API_KEY"], BYOK),
            case(
                rt,
                "openrouter:google/gemini-2.5-flash",
                &["OPENAI_API_KEY"],
                BYOK,
            ),
            case(rt, "groq:llama-3.3-70b", &[], BYOK),
            case(rt, "cerebras:llama-4", &[], BYOK),
            case(rt, "qianfan:ernie-4", &[], BYOK),
            case(rt, "google_genai:gemini-2.0-flash", &[], BYOK),
            // A bare name is Anthropic.
            case(rt, "claude-opus-4-7", &[], PM),
        ]);
    }
    // No rule, no model, no runtime: the closed default.
    for (runtime, model) in [
        (Some("langgraph"), Some("ollama:llama3")),
        (Some("hermes"), Some("unknown/model")),
        (Some("external"), Some("anything")),
        (Some("claude-code"), None),
        (None, Some("opus")),
        (None, None),
    ] {
        c.push(Case {
            runtime,
            model,
            keys: &[],
            override_mode: None,
            mode: PM,
            source: "DEFAULT",
        });
    }
    // Operator overrides win whatever is derived.
    for (model, m) in [("opus", PM), ("claude-opus-4-7", BYOK), ("gpt-5", DISABLED)] {
        c.push(Case {
            runtime: Some(if model == "gpt-5" {
                "codex"
            } else {
                "claude-code"
            }),
            model: Some(model),
            keys: &[],
            override_mode: Some(m),
            mode: m,
            source: "OVERRIDE",
        });
    }
    c
}

/// What the test expects for one generated line.
#[derive(Debug, Clone)]
struct Expected {
    line: usize,
    id: String,
    mode: &'static str,
    source: &'static str,
    legacy: Option<&'static str>,
}

/// `n` lines cycling through every case, with a legacy mode that usually
/// agrees and sometimes not (and sometimes is absent).
fn generate(n: usize) -> (String, Vec<Expected>) {
    let cases = cases();
    let modes = [PM, BYOK, DISABLED];
    let mut text = String::new();
    let mut expected = Vec::new();
    for i in 0..n {
        let c = &cases[i % cases.len()];
        let id = new_workspace();
        let legacy = match i % 13 {
            0 => None,
            5 => Some(modes[(modes.iter().position(|m| *m == c.mode).unwrap() + 1) % 3]),
            9 => Some(modes[i % 3]),
            _ => Some(c.mode),
        };
        let mut o = serde_json::Map::new();
        o.insert("workspace_id".into(), json!(id));
        if let Some(r) = c.runtime {
            o.insert("runtime".into(), json!(r));
        }
        if let Some(m) = c.model {
            o.insert("model".into(), json!(m));
        }
        if !c.keys.is_empty() || i % 2 == 0 {
            o.insert("credential_keys".into(), json!(c.keys));
        }
        if let Some(m) = c.override_mode {
            o.insert("override_mode".into(), json!(m));
        }
        if let Some(l) = legacy {
            o.insert("legacy_mode".into(), json!(l));
        }
        text += &Value::Object(o).to_string();
        text.push('\n');
        expected.push(Expected {
            line: i + 1,
            id,
            mode: c.mode,
            source: c.source,
            legacy,
        });
    }
    (text, expected)
}

fn expected_disagreements(expected: &[Expected]) -> BTreeSet<(usize, String, &'static str)> {
    expected
        .iter()
        .filter(|e| e.legacy.is_some_and(|l| l != e.mode))
        .map(|e| (e.line, e.id.clone(), e.mode))
        .collect()
}

fn expected_counts(expected: &[Expected]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for e in expected {
        *m.entry(format!("{} {}", e.mode, e.source)).or_default() += 1;
    }
    m
}

fn got_disagreements(r: &Report) -> BTreeSet<(usize, String, &'static str)> {
    r.disagreements
        .iter()
        .map(|d| (d.line, d.workspace_id.clone(), d.mode))
        .collect()
}

fn mode_str(m: i32) -> &'static str {
    import::mode_name(m)
}

// ---------------------------------------------------------------------------
// Helpers

fn options(dry_run: bool, update: bool, reason: &str) -> Options {
    Options {
        dry_run,
        update,
        concurrency: 8,
        batch_size: import::DEFAULT_BATCH_SIZE,
        reason: reason.to_owned(),
    }
}

async fn import_text(conn: &Connection, text: &str, opts: &Options) -> Report {
    let parsed = import::parse(Cursor::new(text.as_bytes())).expect("reading the file");
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    import::run(
        conn,
        parsed.entries,
        opts,
        Arc::new(AtomicBool::new(false)),
        |_| {},
    )
    .await
}

async fn list_all(c: &mut Client, page_size: u32, mode: Mode, source: Source) -> Vec<Resolution> {
    list_pages(c, page_size, mode, source)
        .await
        .into_iter()
        .flat_map(|(page, _)| page)
        .collect()
}

/// Every page: its entries and whether it had a next_page_token.
async fn list_pages(
    c: &mut Client,
    page_size: u32,
    mode: Mode,
    source: Source,
) -> Vec<(Vec<Resolution>, bool)> {
    let mut pages = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = c
            .list_workspaces(ListWorkspacesRequest {
                page_size,
                page_token: page_token.clone(),
                mode: mode.into(),
                source: source.into(),
            })
            .await
            .expect("ListWorkspaces succeeds")
            .into_inner();
        let more = !page.next_page_token.is_empty();
        pages.push((page.resolutions, more));
        if !more {
            return pages;
        }
        page_token = page.next_page_token;
    }
}

fn ids(rs: &[Resolution]) -> Vec<String> {
    rs.iter().map(|r| r.workspace_id.clone()).collect()
}

fn set_model(ws: &str, model: &str) -> SetRequest {
    SetRequest {
        workspace_id: ws.to_owned(),
        runtime: Some("claude-code".into()),
        model: Some(model.to_owned()),
        ..SetRequest::default()
    }
}

/// The binary with no settings picked up from the environment.
fn bin(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("BILLING_MODE_") || k.starts_with("OTEL_") || k == "DATABASE_URL" {
            cmd.env_remove(&key);
        }
    }
    cmd.args(args).stdin(Stdio::null());
    cmd
}

async fn run_bin(cmd: Command) -> Output {
    let mut cmd = cmd;
    tokio::task::spawn_blocking(move || cmd.output().expect("running billing-mode"))
        .await
        .unwrap()
}

fn describe(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// When a [`Hooked`] transport's hook runs: before the call is sent, or
/// after its answer came back and before the caller sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum When {
    Before,
    After,
}

type HookFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
type Hook = dyn Fn(When, &str, usize) -> Option<HookFuture> + Send + Sync;

/// A transport that counts the calls of each method and, around the `n`-th
/// call of a method (counting from 1), awaits what `hook(when, method, n)`
/// returns: e.g. a concurrent write landing between two calls of an import.
#[derive(Clone)]
struct Hooked {
    inner: tonic::transport::Channel,
    calls: Arc<Mutex<BTreeMap<String, usize>>>,
    hook: Arc<Hook>,
}

impl Hooked {
    fn new(
        inner: tonic::transport::Channel,
        hook: impl Fn(When, &str, usize) -> Option<HookFuture> + Send + Sync + 'static,
    ) -> Self {
        Hooked {
            inner,
            calls: Arc::default(),
            hook: Arc::new(hook),
        }
    }

    fn counting(inner: tonic::transport::Channel) -> Self {
        Self::new(inner, |_, _, _| None)
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Hooked {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let method = req.uri().path().rsplit('/').next().unwrap_or("").to_owned();
        let n = {
            let mut calls = self.calls.lock().unwrap();
            let n = calls.entry(method.clone()).or_default();
            *n += 1;
            *n
        };
        let before = (self.hook)(When::Before, &method, n);
        let after = (self.hook)(When::After, &method, n);
        // The clone that poll_ready made ready takes the call.
        let mut inner = self.inner.clone();
        std::mem::swap(&mut inner, &mut self.inner);
        Box::pin(async move {
            if let Some(f) = before {
                f.await;
            }
            let response = inner.call(req).await?;
            if let Some(f) = after {
                f.await;
            }
            Ok(response)
        })
    }
}

/// The calls counted so far, by method; resets the count.
fn take_calls(calls: &Mutex<BTreeMap<String, usize>>) -> BTreeMap<String, usize> {
    std::mem::take(&mut *calls.lock().unwrap())
}

// ---------------------------------------------------------------------------
// Import of 5,000 workspaces, at the library level on both backends

backends!(
    importing_5000_workspaces_dry_run_then_apply_then_again_changes_nothing_the_second_time,
    flavor = "multi_thread",
    worker_threads = 4
);
async fn importing_5000_workspaces_dry_run_then_apply_then_again_changes_nothing_the_second_time(
    db: TestDb,
) {
    let app = TestApp::spawn(&db).await;
    let counting = Hooked::counting(app.channel().await);
    let calls = counting.calls.clone();
    let conn = Connection::with_transport(Transport::new(counting), None);
    let mut c = app.client().await;
    let (text, expected) = generate(5000);
    let by_id: HashMap<&str, &Expected> = expected.iter().map(|e| (e.id.as_str(), e)).collect();
    let want_disagreements = expected_disagreements(&expected);
    assert!(
        want_disagreements.len() > 300,
        "the file has disagreements to find"
    );

    // Dry run: the server's decisions, nothing written.
    let dry = import_text(&conn, &text, &options(true, false, "")).await;
    assert!(dry.failures.is_empty(), "{:?}", &dry.failures[..1]);
    assert_eq!((dry.created, dry.existing, dry.done), (5000, 0, 5000));
    assert!(!dry.interrupted);
    assert_eq!(
        dry.decisions,
        expected_counts(&expected),
        "{:?}",
        db.backend
    );
    assert_eq!(got_disagreements(&dry), want_disagreements);
    for d in &dry.disagreements {
        assert_eq!(d.source, by_id[d.workspace_id.as_str()].source);
        assert!(!d.reason.is_empty() && !d.trace.is_empty());
    }
    assert!(
        raw_record_rows(&db).await.is_empty(),
        "a dry run writes no record"
    );
    assert!(
        raw_audit_rows(&db).await.is_empty(),
        "a dry run writes no audit row"
    );
    assert_eq!(take_calls(&calls), [("Set".to_owned(), 5000)].into());

    // Apply: every workspace created, with the reason in its audit row.
    let applied = import_text(&conn, &text, &options(false, false, "adopt: day one")).await;
    assert!(applied.failures.is_empty(), "{:?}", &applied.failures[..1]);
    assert_eq!((applied.created, applied.existing), (5000, 0));
    assert!(applied.changed());
    assert_eq!(applied.decisions, expected_counts(&expected));
    assert_eq!(got_disagreements(&applied), want_disagreements);
    let records = raw_record_rows(&db).await;
    let audit = raw_audit_rows(&db).await;
    assert_eq!((records.len(), audit.len()), (5000, 5000));
    assert!(audit
        .iter()
        .all(|a| a.reason == "adopt: day one" && a.revision == "1"));
    // Created in batches of 250, one transaction each; the lines with an
    // override in batches of their own.
    let overrides = expected.iter().filter(|e| e.source == "OVERRIDE").count();
    assert!(overrides > 0 && overrides % 250 != 0);
    let batch_calls = (5000 - overrides).div_ceil(250) + overrides.div_ceil(250);
    assert_eq!(
        take_calls(&calls),
        [("BatchCreateWorkspaces".to_owned(), batch_calls)].into()
    );

    // Every workspace listed once, in id order, decided as expected.
    let listed = list_all(&mut c, 500, Mode::Unspecified, Source::Unspecified).await;
    let mut want_ids: Vec<String> = expected.iter().map(|e| e.id.clone()).collect();
    want_ids.sort();
    assert_eq!(ids(&listed), want_ids);
    for r in &listed {
        let e = by_id[r.workspace_id.as_str()];
        assert_eq!(
            (mode_str(r.mode), import::source_name(r.source)),
            (e.mode, e.source),
            "line {}",
            e.line
        );
    }
    // page_size 0 means 50; more than 500 means 500.
    for (asked, got) in [(0, 50), (1, 1), (501, 500), (100_000, 500)] {
        let page = c
            .list_workspaces(ListWorkspacesRequest {
                page_size: asked,
                ..ListWorkspacesRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.resolutions.len(), got, "page_size {asked}");
        assert!(!page.next_page_token.is_empty());
    }
    // Filters: the decision's mode and source, across pages. `disabled`
    // is rare, so its pages stop at the scan bound, some short of full
    // yet with a token to continue.
    for (mode, source) in [
        (Mode::Disabled, Source::Unspecified),
        (Mode::Byok, Source::Unspecified),
        (Mode::PlatformManaged, Source::Default),
        (Mode::Unspecified, Source::Override),
        (Mode::PlatformManaged, Source::DerivedProvider),
    ] {
        let pages = list_pages(&mut c, 100, mode, source).await;
        let got: Vec<String> = pages.iter().flat_map(|(p, _)| ids(p)).collect();
        let mut want: Vec<String> = expected
            .iter()
            .filter(|e| mode == Mode::Unspecified || e.mode == mode_str(mode.into()))
            .filter(|e| {
                source == Source::Unspecified || e.source == import::source_name(source.into())
            })
            .map(|e| e.id.clone())
            .collect();
        want.sort();
        assert!(!want.is_empty());
        assert_eq!(got, want, "filter {mode:?} {source:?}");
        if mode == Mode::Disabled {
            assert!(
                pages.iter().any(|(p, more)| *more && p.len() < 100),
                "a rare filter's page stops at the scan bound"
            );
        }
    }

    // The second run changes nothing and says so.
    let again = import_text(&conn, &text, &options(false, false, "adopt: day one")).await;
    assert!(again.failures.is_empty());
    assert_eq!((again.created, again.existing, again.updated), (0, 5000, 0));
    assert!(!again.changed());
    assert!(import::report_text(&again, &[], 5000).contains("nothing changed"));
    assert_eq!(again.decisions, expected_counts(&expected));
    assert_eq!(got_disagreements(&again), want_disagreements);
    assert_eq!(
        take_calls(&calls),
        [("BatchCreateWorkspaces".to_owned(), batch_calls)].into()
    );
    assert_eq!(raw_record_rows(&db).await, records, "no record touched");
    assert_eq!(raw_audit_rows(&db).await.len(), 5000, "no audit row added");
    app.stop().await.unwrap();
}

// ---------------------------------------------------------------------------
// --update against a concurrent writer

backends!(
    a_concurrent_set_during_an_update_import_is_reported_and_not_lost,
    flavor = "multi_thread",
    worker_threads = 4
);
async fn a_concurrent_set_during_an_update_import_is_reported_and_not_lost(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let ws: Vec<String> = (0..6).map(|_| new_workspace()).collect();
    for w in &ws {
        app.set(set_model(w, "opus")).await;
    }
    let text: String = ws
        .iter()
        .map(|w| {
            format!(
                "{}\n",
                json!({"workspace_id": w, "runtime": "claude-code", "model": "haiku"})
            )
        })
        .collect();
    // Concurrency 1: the n-th Resolve reads line n's workspace.
    let disturb: HashMap<usize, String> = [(2, ws[1].clone()), (5, ws[4].clone())]
        .into_iter()
        .collect();
    // After the n-th Resolve reached the server, and before the import
    // sees its answer, a concurrent Set on disturb[n]: a change landing
    // between the import's read and its write, every time.
    let disturbed = Arc::new(Mutex::new(Vec::new()));
    let (side, log) = (app.client().await, disturbed.clone());
    let transport = Hooked::new(app.channel().await, move |when, method, n| {
        let ws = disturb
            .get(&n)
            .filter(|_| when == When::After && method == "Resolve")?
            .clone();
        let (mut side, log) = (side.clone(), log.clone());
        Some(Box::pin(async move {
            side.set(set_model(&ws, "claude-sonnet-4-6"))
                .await
                .expect("the concurrent Set succeeds");
            log.lock().unwrap().push(ws);
        }))
    });
    let conn = Connection::with_transport(Transport::new(transport), None);
    let opts = Options {
        concurrency: 1,
        ..options(false, true, "adopt: update")
    };
    let report = import_text(&conn, &text, &opts).await;
    assert_eq!(
        *disturbed.lock().unwrap(),
        vec![ws[1].clone(), ws[4].clone()]
    );
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let conflicts: Vec<&str> = report
        .conflicts
        .iter()
        .map(|f| f.workspace_id.as_str())
        .collect();
    assert_eq!(
        conflicts,
        vec![ws[1].as_str(), ws[4].as_str()],
        "{:?}",
        db.backend
    );
    assert_eq!(report.conflicts[0].line, 2);
    assert_eq!(report.updated, 4);
    assert!(import::report_text(&report, &[], 6).contains("changed concurrently"));
    for (i, w) in ws.iter().enumerate() {
        let r = app.resolve(w).await;
        let want = if i == 1 || i == 4 {
            "claude-sonnet-4-6"
        } else {
            "haiku"
        };
        assert_eq!(
            r.model, want,
            "the concurrent change is kept, not overwritten"
        );
    }
    // Run again: now nothing moves underneath, so the two are updated too.
    let again = import_text(&conn, &text, &opts).await;
    assert!(again.conflicts.is_empty());
    assert_eq!((again.updated, again.unchanged), (2, 4));
}

// ---------------------------------------------------------------------------
// A registration made while an import runs

backends!(
    an_import_never_overwrites_a_registration_made_while_it_runs,
    flavor = "multi_thread",
    worker_threads = 4
);
async fn an_import_never_overwrites_a_registration_made_while_it_runs(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let ws: Vec<String> = (0..30).map(|_| new_workspace()).collect();
    let text: String = ws
        .iter()
        .map(|w| {
            format!(
                "{}\n",
                json!({"workspace_id": w, "runtime": "claude-code", "model": "haiku"})
            )
        })
        .collect();
    // Just before the first batch is sent, after the file was read, a
    // registration of line 8's workspace with a model of its own.
    let (side, target) = (app.client().await, ws[7].clone());
    let transport = Hooked::new(app.channel().await, move |when, method, n| {
        if (when, method, n) != (When::Before, "BatchCreateWorkspaces", 1) {
            return None;
        }
        let (mut side, ws) = (side.clone(), target.clone());
        Some(Box::pin(async move {
            side.set(SetRequest {
                expected_revision: Some(0),
                ..set_model(&ws, "claude-sonnet-4-6")
            })
            .await
            .expect("the concurrent registration succeeds");
        }))
    });
    let conn = Connection::with_transport(Transport::new(transport), None);
    let report = import_text(&conn, &text, &options(false, false, "adopt")).await;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(
        (report.created, report.existing),
        (29, 1),
        "{:?}",
        db.backend
    );
    let kept = app.resolve(&ws[7]).await;
    assert_eq!(
        (kept.model.as_str(), kept.revision),
        ("claude-sonnet-4-6", 1),
        "the registration made meanwhile is kept"
    );
    assert_eq!(app.resolve(&ws[8]).await.model, "haiku");
    let audit = raw_audit_rows(&db).await;
    assert_eq!(audit.len(), 30);
    assert_eq!(
        audit.iter().filter(|a| a.reason == "adopt").count(),
        29,
        "the import wrote no row for it"
    );
}

// ---------------------------------------------------------------------------
// Interrupting

backends!(
    a_cancelled_import_stops_after_the_calls_in_flight_and_reports_what_it_did,
    flavor = "multi_thread",
    worker_threads = 4
);
async fn a_cancelled_import_stops_after_the_calls_in_flight_and_reports_what_it_did(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let conn = Connection::new(app.channel().await, None);
    let (text, _) = generate(400);
    let parsed = import::parse(Cursor::new(text.as_bytes())).unwrap();
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    let opts = Options {
        concurrency: 4,
        batch_size: 10,
        ..options(false, false, "adopt")
    };
    let mut seen = Vec::new();
    let report = import::run(&conn, parsed.entries, &opts, cancel, |done| {
        seen.push(done);
        if done >= 50 {
            flag.store(true, Ordering::SeqCst);
        }
    })
    .await;
    // (The lines with an override are batched on their own, so one batch
    // may be shorter than 10.)
    assert!(
        seen.iter()
            .zip(std::iter::once(&0).chain(&seen))
            .all(|(n, before)| (1..=10).contains(&(n - before))),
        "progress moves a batch at a time: {seen:?}"
    );
    assert!(report.interrupted);
    assert!(report.done >= 50 && report.done < 400, "{}", report.done);
    assert_eq!(report.created, report.done);
    assert_eq!(
        raw_record_rows(&db).await.len(),
        report.created,
        "what was done is what is reported"
    );
    assert!(import::report_text(&report, &[], 400).contains("INTERRUPTED"));
}

backends!(
    sqlite: a_sigterm_stops_an_import_as_ctrl_c_does_and_it_reports_what_it_did,
    flavor = "multi_thread",
    worker_threads = 2
);
/// `timeout`, a Kubernetes Job or systemd stop a run with SIGTERM: the run
/// finishes the calls in flight and says what it did, as on Ctrl-C, rather
/// than dying with nothing said (a write in flight then unreported).
async fn a_sigterm_stops_an_import_as_ctrl_c_does_and_it_reports_what_it_did(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let (text, _) = generate(3000);
    let path = dir.path().join("workspaces.jsonl");
    std::fs::write(&path, &text).unwrap();
    let child = bin(&[
        "import",
        &path.display().to_string(),
        "--server",
        &app.endpoint(),
        "--reason",
        "adopt",
        "--concurrency",
        "1",
        "--batch-size",
        "10",
        "--json",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let started = std::time::Instant::now();
    while raw_record_rows(&db).await.len() < 50 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the import makes progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let o = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    // 143: stopped by SIGTERM (Ctrl-C gives 130).
    assert_eq!(o.status.code(), Some(143), "{}", describe(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("interrupted: finishing the calls in flight"),
        "{}",
        describe(&o)
    );
    let r: Value = serde_json::from_slice(&o.stdout).expect("the report");
    assert_eq!(r["interrupted"], true, "{r}");
    assert_eq!(r["stopped_by_refusal"], false, "{r}");
    let created = r["created"].as_u64().unwrap() as usize;
    assert!(created < 3000, "{r}");
    assert_eq!(
        raw_record_rows(&db).await.len(),
        created,
        "what was done is what is reported"
    );
}

// ---------------------------------------------------------------------------
// ListWorkspaces

backends!(
    paging_while_a_writer_adds_and_changes_workspaces_lists_each_one_exactly_once,
    flavor = "multi_thread",
    worker_threads = 4
);
async fn paging_while_a_writer_adds_and_changes_workspaces_lists_each_one_exactly_once(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let mut seeded: Vec<String> = (0..150).map(|_| new_workspace()).collect();
    for w in &seeded {
        app.set(set_model(w, "opus")).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (stop, writes, mut w, seeded) = (
            stop.clone(),
            writes.clone(),
            app.client().await,
            seeded.clone(),
        );
        tokio::spawn(async move {
            let mut added = Vec::new();
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) {
                // Alternately a new workspace (anywhere in id order) and a
                // change that flips an existing one's mode and source.
                if i % 2 == 0 {
                    let ws = new_workspace();
                    set(&mut w, set_model(&ws, "sonnet")).await;
                    added.push(ws);
                } else {
                    let ws = &seeded[(i * 7) % seeded.len()];
                    let model = if i % 4 == 1 { "gpt-x" } else { "opus" };
                    set(&mut w, set_model(ws, model)).await;
                }
                i += 1;
                writes.fetch_add(1, Ordering::SeqCst);
            }
            added
        })
    };
    // Pages of 7; between two pages the writer always commits something.
    let mut listed = Vec::new();
    let mut page_token = String::new();
    loop {
        let before = writes.load(Ordering::SeqCst);
        let page = c
            .list_workspaces(ListWorkspacesRequest {
                page_size: 7,
                page_token: page_token.clone(),
                ..ListWorkspacesRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        listed.extend(ids(&page.resolutions));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
        while writes.load(Ordering::SeqCst) < before + 2 {
            tokio::task::yield_now().await;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let added = writer.await.unwrap();
    assert!(
        writes.load(Ordering::SeqCst) > 40,
        "the writer ran during the listing"
    );
    let unique: BTreeSet<&String> = listed.iter().collect();
    assert_eq!(unique.len(), listed.len(), "no workspace listed twice");
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(sorted, listed, "workspace-id order");
    seeded.retain(|w| !unique.contains(w));
    assert!(
        seeded.is_empty(),
        "every workspace that existed throughout is listed: missing {seeded:?}"
    );
    assert!(
        listed.len() > 150,
        "some workspaces added meanwhile were listed too"
    );
    assert!(!added.is_empty());
}

backends!(
    filters_select_by_the_decisions_mode_and_source_across_pages,
    flavor = "multi_thread",
    worker_threads = 4
);
async fn filters_select_by_the_decisions_mode_and_source_across_pages(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    // (model, override) -> the decision the registry's rules give.
    let kinds: [(&str, Option<Mode>, &str, &str); 4] = [
        ("opus", None, BYOK, "DERIVED_PROVIDER"),
        ("claude-opus-4-7", None, PM, "DERIVED_PROVIDER"),
        ("no-such-model", None, PM, "DEFAULT"),
        ("opus", Some(Mode::Disabled), DISABLED, "OVERRIDE"),
    ];
    let mut made: Vec<(String, &str, &str)> = Vec::new();
    for i in 0..40 {
        let (model, o, mode, source) = kinds[i % kinds.len()];
        let ws = new_workspace();
        app.set(SetRequest {
            override_mode: o.map(Into::into),
            reason: "test".into(),
            ..set_model(&ws, model)
        })
        .await;
        made.push((ws, mode, source));
    }
    for (mode, source) in [
        (Mode::Byok, Source::Unspecified),
        (Mode::PlatformManaged, Source::Unspecified),
        (Mode::PlatformManaged, Source::Default),
        (Mode::Unspecified, Source::Override),
        (Mode::Disabled, Source::DerivedProvider),
        (Mode::Unspecified, Source::Unspecified),
    ] {
        let got = ids(&list_all(&mut c, 3, mode, source).await);
        let mut want: Vec<String> = made
            .iter()
            .filter(|(_, m, s)| {
                (mode == Mode::Unspecified || *m == mode_str(mode.into()))
                    && (source == Source::Unspecified || *s == import::source_name(source.into()))
            })
            .map(|(w, _, _)| w.clone())
            .collect();
        want.sort();
        assert_eq!(got, want, "{mode:?} {source:?} on {:?}", db.backend);
    }
}

backends!(
    a_page_token_the_service_did_not_hand_out_is_invalid_argument,
    flavor = "multi_thread",
    worker_threads = 4
);
async fn a_page_token_the_service_did_not_hand_out_is_invalid_argument(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    for _ in 0..3 {
        app.set(set_model(&new_workspace(), "opus")).await;
    }
    let good = c
        .list_workspaces(ListWorkspacesRequest {
            page_size: 1,
            ..ListWorkspacesRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .next_page_token;
    assert!(!good.is_empty());
    let mut tampered = good.clone().into_bytes();
    tampered[3] = if tampered[3] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    // One character changed in the middle (in the position it carries).
    let mut in_the_id = good.clone().into_bytes();
    let mid = good.find('.').unwrap_or(good.len()) / 2;
    in_the_id[mid] = if in_the_id[mid] == b'A' { b'B' } else { b'A' };
    let in_the_id = String::from_utf8(in_the_id).unwrap();
    // Made up in the form of a handed-out token, naming another workspace.
    let (body, check) = good.split_once('.').expect("a body and a check");
    let made_up = {
        use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
        let text = String::from_utf8(URL_SAFE_NO_PAD.decode(body).unwrap()).unwrap();
        let other = text.replace(&text[text.len() - 12..], "000000000000");
        format!("{}.{check}", URL_SAFE_NO_PAD.encode(other))
    };
    for bad in [
        "garbage!".to_owned(),
        "5".to_owned(),
        new_workspace(),
        tampered,
        in_the_id,
        made_up,
        body.to_owned(),
        format!("{good}x"),
    ] {
        let e = c
            .list_workspaces(ListWorkspacesRequest {
                page_token: bad.clone(),
                ..ListWorkspacesRequest::default()
            })
            .await
            .expect_err("refused");
        let message = assert_error(&e, Code::InvalidArgument, "INVALID_FIELD");
        assert!(!message.contains(&bad), "the token is not echoed");
    }
    let e = c
        .list_workspaces(ListWorkspacesRequest {
            mode: 9,
            ..ListWorkspacesRequest::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .list_workspaces(ListWorkspacesRequest {
            source: 9,
            ..ListWorkspacesRequest::default()
        })
        .await
        .expect_err("refused");
    assert_error(&e, Code::InvalidArgument, "INVALID_FIELD");
}

backends!(sqlite: readers_and_admins_may_list_workspaces_and_no_one_else, flavor = "multi_thread", worker_threads = 4);
async fn readers_and_admins_may_list_workspaces_and_no_one_else(db: TestDb) {
    let roles = [
        (Role::Reader, true),
        (Role::Admin, true),
        (Role::Writer, false),
        (Role::Provisioner, false),
        (Role::Meter, false),
    ];
    let tokens: Vec<_> = roles
        .iter()
        .map(|(r, _)| make_token(&format!("{r:?}").to_lowercase(), &[*r]))
        .collect();
    let app = TestApp::spawn_with(config_with_tokens(
        &db,
        tokens.iter().map(|(_, e)| e.clone()).collect(),
    ))
    .await;
    for ((role, allowed), (token, _)) in roles.iter().zip(&tokens) {
        let mut c = app.client_with_token(token).await;
        let r = c.list_workspaces(ListWorkspacesRequest::default()).await;
        match (allowed, r) {
            (true, Ok(_)) => {}
            (false, Err(e)) => {
                assert_error(&e, Code::PermissionDenied, "PERMISSION_DENIED");
            }
            (_, r) => panic!("{role:?}: {r:?}"),
        }
    }
    let e = app
        .client()
        .await
        .list_workspaces(ListWorkspacesRequest::default())
        .await
        .expect_err("no token");
    assert_eq!(e.code(), Code::Unauthenticated);
}

// ---------------------------------------------------------------------------
// BatchCreateWorkspaces, the call behind the import

fn new_ws(ws: &str, runtime: &str, model: &str, keys: &[&str]) -> NewWorkspace {
    NewWorkspace {
        workspace_id: ws.to_owned(),
        runtime: runtime.to_owned(),
        model: model.to_owned(),
        credential_keys: keys.iter().map(|k| k.to_string()).collect(),
        ..NewWorkspace::default()
    }
}

fn batch(workspaces: Vec<NewWorkspace>, reason: &str) -> BatchCreateWorkspacesRequest {
    BatchCreateWorkspacesRequest {
        workspaces,
        reason: reason.to_owned(),
    }
}

backends!(
    a_batch_creates_the_missing_workspaces_and_leaves_the_existing_untouched,
    flavor = "multi_thread",
    worker_threads = 4
);
async fn a_batch_creates_the_missing_workspaces_and_leaves_the_existing_untouched(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let (a, b, d, sentinel) = (
        new_workspace(),
        new_workspace(),
        new_workspace(),
        new_workspace(),
    );
    app.set(set_model(&a, "haiku")).await;
    let mut watch = c
        .watch(WatchRequest::default())
        .await
        .expect("Watch")
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert!(matches!(
        first.event,
        Some(watch_response::Event::Progress(_))
    ));

    let results = c
        .batch_create_workspaces(batch(
            vec![
                new_ws(&b, "claude-code", "opus", &["CLAUDE_CODE_OAUTH_TOKEN"]),
                new_ws(&a, "claude-code", "opus", &["CLAUDE_CODE_OAUTH_TOKEN"]),
                NewWorkspace {
                    override_mode: Mode::Disabled.into(),
                    ..new_ws(&d.to_uppercase(), "codex", "gpt-5", &[])
                },
            ],
            "adopt: batch",
        ))
        .await
        .expect("BatchCreateWorkspaces")
        .into_inner()
        .results;
    let got: Vec<(bool, String, String, u64, &str)> = results
        .iter()
        .map(|r| {
            let res = r.resolution.as_ref().expect("a resolution for each");
            (
                r.created,
                res.workspace_id.clone(),
                res.model.clone(),
                res.revision,
                mode_str(res.mode),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (true, b.clone(), "opus".into(), 1, BYOK),
            (false, a.clone(), "haiku".into(), 1, BYOK),
            (true, d.clone(), "gpt-5".into(), 1, DISABLED),
        ],
        "{:?}",
        db.backend
    );
    // As Resolve answers, and the existing one untouched.
    for r in &results {
        let res = r.resolution.clone().unwrap();
        assert_eq!(app.resolve(&res.workspace_id).await, res);
    }
    let audit = raw_audit_rows(&db).await;
    let of =
        |ws: &str| -> Vec<&RawAuditRow> { audit.iter().filter(|r| r.workspace_id == ws).collect() };
    assert_eq!(of(&a).len(), 1, "no audit row for the existing one");
    for ws in [&b, &d] {
        let rows = of(ws);
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (
                rows[0].revision.as_str(),
                rows[0].reason.as_str(),
                rows[0].before.as_deref()
            ),
            ("1", "adopt: batch", None)
        );
    }

    // The change stream: one event per created workspace, none for the
    // existing one, then the sentinel's.
    app.set(set_model(&sentinel, "opus")).await;
    let mut events = Vec::new();
    loop {
        let m = tokio::time::timeout(std::time::Duration::from_secs(10), watch.message())
            .await
            .expect("the events arrive")
            .unwrap()
            .unwrap();
        if let Some(watch_response::Event::Resolution(r)) = m.event {
            if r.workspace_id == sentinel {
                break;
            }
            events.push((r.workspace_id, r.revision));
        }
    }
    events.sort();
    let mut want = vec![(b.clone(), 1), (d.clone(), 1)];
    want.sort();
    assert_eq!(events, want);
    app.stop().await.unwrap();
}

backends!(
    a_bad_item_fails_the_whole_batch_naming_its_index_and_field_and_never_its_value,
    flavor = "multi_thread",
    worker_threads = 4
);
async fn a_bad_item_fails_the_whole_batch_naming_its_index_and_field_and_never_its_value(
    db: TestDb,
) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let secret = "sk-ant-api03-SECRETVALUE";
    let good = || new_ws(&new_workspace(), "claude-code", "opus", &[]);
    let dup = new_workspace();
    let cases: Vec<(NewWorkspace, Code, &str, &str)> = vec![
        (
            new_ws(secret, "", "", &[]),
            Code::InvalidArgument,
            "INVALID_WORKSPACE_ID",
            "workspaces[2].workspace_id",
        ),
        (
            new_ws(&new_workspace(), "claude-code", &format!("a {secret}"), &[]),
            Code::InvalidArgument,
            "INVALID_FIELD",
            "workspaces[2].model",
        ),
        (
            new_ws(&new_workspace(), &"x".repeat(300), "", &[]),
            Code::InvalidArgument,
            "INVALID_FIELD",
            "workspaces[2].runtime",
        ),
        (
            new_ws(&new_workspace(), "", "", &["OK", &format!("{secret}=x")]),
            Code::InvalidArgument,
            "INVALID_ENV_KEY",
            "workspaces[2].credential_keys",
        ),
        (
            NewWorkspace {
                override_mode: 9,
                ..good()
            },
            Code::InvalidArgument,
            "INVALID_MODE",
            "workspaces[2].override_mode",
        ),
        (
            new_ws(&dup.to_uppercase(), "", "", &[]),
            Code::InvalidArgument,
            "INVALID_FIELD",
            "workspaces[2].workspace_id",
        ),
    ];
    for (bad, code, reason, names) in cases {
        let items = vec![good(), new_ws(&dup, "", "", &[]), bad, good()];
        let e = c
            .batch_create_workspaces(batch(items, "adopt"))
            .await
            .expect_err(names);
        let message = assert_error(&e, code, reason);
        assert!(message.starts_with(names), "{names}: {message}");
        assert!(!message.contains("SECRETVALUE"), "{message}");
    }
    // An override without a reason: named by its item too.
    let e = c
        .batch_create_workspaces(batch(
            vec![
                good(),
                NewWorkspace {
                    override_mode: Mode::Byok.into(),
                    ..good()
                },
            ],
            " ",
        ))
        .await
        .unwrap_err();
    let message = assert_error(&e, Code::InvalidArgument, "REASON_REQUIRED");
    assert!(
        message.starts_with("workspaces[1].override_mode"),
        "{message}"
    );

    // Size: none, and more than 1,000.
    let e = c
        .batch_create_workspaces(batch(vec![], "adopt"))
        .await
        .unwrap_err();
    assert_error(&e, Code::InvalidArgument, "NOTHING_TO_SET");
    let e = c
        .batch_create_workspaces(batch((0..1001).map(|_| good()).collect(), "adopt"))
        .await
        .unwrap_err();
    let message = assert_error(&e, Code::InvalidArgument, "LIMIT_EXCEEDED");
    assert!(message.contains("1000"), "{message}");
    assert!(raw_record_rows(&db).await.is_empty(), "nothing was written");
    assert!(raw_audit_rows(&db).await.is_empty());

    // Exactly 1,000 is allowed.
    let results = c
        .batch_create_workspaces(batch((0..1000).map(|_| good()).collect(), "adopt"))
        .await
        .expect("1,000 workspaces in one call")
        .into_inner()
        .results;
    assert_eq!(results.iter().filter(|r| r.created).count(), 1000);
    assert_eq!(raw_record_rows(&db).await.len(), 1000);
    app.stop().await.unwrap();
}

backends!(sqlite: batch_create_needs_the_roles_of_set_and_reading_an_existing_one_needs_reader, flavor = "multi_thread", worker_threads = 4);
async fn batch_create_needs_the_roles_of_set_and_reading_an_existing_one_needs_reader(db: TestDb) {
    let roles: [&[Role]; 6] = [
        &[Role::Admin],
        &[Role::Writer],
        &[Role::Writer, Role::Reader],
        &[Role::Reader],
        &[Role::Provisioner],
        &[Role::Meter],
    ];
    let tokens: Vec<_> = roles
        .iter()
        .enumerate()
        .map(|(i, r)| make_token(&format!("t{i}"), r))
        .collect();
    let app = TestApp::spawn_with(config_with_tokens(
        &db,
        tokens.iter().map(|(_, e)| e.clone()).collect(),
    ))
    .await;
    let existing = new_workspace();
    let mut admin = app.client_with_token(&tokens[0].0).await;
    admin
        .set(set_model(&existing, "opus"))
        .await
        .expect("admin Set");
    for (roles, (token, _)) in roles.iter().zip(&tokens) {
        let mut c = app.client_with_token(token).await;
        let writes = roles.contains(&Role::Writer) || roles.contains(&Role::Admin);
        let reads = roles.contains(&Role::Reader) || roles.contains(&Role::Admin);
        // Without override_mode: writer or admin.
        let fresh = new_workspace();
        let r = c
            .batch_create_workspaces(batch(
                vec![
                    new_ws(&fresh, "claude-code", "opus", &[]),
                    new_ws(&existing, "claude-code", "haiku", &[]),
                ],
                "adopt",
            ))
            .await;
        match (writes, r) {
            (true, Ok(r)) => {
                let results = r.into_inner().results;
                assert!(results[0].created && results[0].resolution.is_some());
                assert!(!results[1].created);
                assert_eq!(
                    results[1].resolution.is_some(),
                    reads,
                    "{roles:?}: an existing workspace's decision only for a reader"
                );
            }
            (false, Err(e)) => {
                assert_error(&e, Code::PermissionDenied, "PERMISSION_DENIED");
            }
            (_, r) => panic!("{roles:?}: {r:?}"),
        }
        // With override_mode on one item: admin only, checked before the
        // items are validated (the other item is invalid).
        let r = c
            .batch_create_workspaces(batch(
                vec![
                    new_ws("not-a-uuid", "", "", &[]),
                    NewWorkspace {
                        override_mode: Mode::Byok.into(),
                        ..new_ws(&new_workspace(), "", "", &[])
                    },
                ],
                "adopt",
            ))
            .await
            .unwrap_err();
        if roles.contains(&Role::Admin) {
            assert_error(&r, Code::InvalidArgument, "INVALID_WORKSPACE_ID");
        } else {
            assert_error(&r, Code::PermissionDenied, "PERMISSION_DENIED");
        }
    }
    let kept = admin
        .resolve(ResolveRequest {
            workspace_id: existing.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .resolution
        .unwrap();
    assert_eq!(
        (kept.model.as_str(), kept.revision),
        ("opus", 1),
        "untouched"
    );
}

// ---------------------------------------------------------------------------
// Through the binary

backends!(
    malformed_lines_are_named_by_line_and_field_and_nothing_is_written,
    flavor = "multi_thread",
    worker_threads = 4
);
async fn malformed_lines_are_named_by_line_and_field_and_nothing_is_written(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let (good, _) = generate(12);
    let secret = "sk-ant-api03-CANARY-0123456789";
    let mut lines: Vec<String> = good.lines().map(str::to_owned).collect();
    // Lines 3, 5, 7, 9 and 11 are bad.
    lines[2] = json!({"workspace_id": format!("{secret}")}).to_string();
    lines[4] = json!({"workspace_id": new_workspace(), "credential_keys": [format!("{secret}=1")]})
        .to_string();
    lines[6] =
        json!({"workspace_id": new_workspace(), "override_mode": "free", "legacy_mode": "byok"})
            .to_string();
    lines[8] = format!(
        "{{\"workspace_id\": \"{}\", \"model\": {secret}",
        new_workspace()
    );
    lines[10] = json!({"workspace_id": new_workspace(), "model": "x".repeat(1 << 20)}).to_string();
    let path = dir.path().join("workspaces.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let path = path.display().to_string();
    let server = app.endpoint();

    for extra in [
        &["--reason", "adopt"][..],
        &["--dry-run"][..],
        &["--reason", "adopt", "--json"][..],
    ] {
        let mut args = vec!["import", path.as_str(), "--server", server.as_str()];
        args.extend_from_slice(extra);
        let o = run_bin(bin(&args)).await;
        assert!(!o.status.success(), "{}", describe(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        for want in [
            "line 3: workspace_id:",
            "line 5: credential_keys:",
            "line 7: override_mode:",
            "line 9: not valid JSON",
            "line 11: longer than",
            "nothing was written",
        ] {
            assert!(err.contains(want), "{want}\n{}", describe(&o));
        }
        let all = describe(&o);
        assert!(!all.contains("CANARY"), "no value is echoed:\n{all}");
        assert!(!all.contains("free"), "no value is echoed:\n{all}");
        assert!(raw_record_rows(&db).await.is_empty());
    }

    // --skip-invalid imports the rest and reports each skipped line.
    let o = run_bin(bin(&[
        "import",
        &path,
        "--server",
        &server,
        "--reason",
        "adopt",
        "--skip-invalid",
    ]))
    .await;
    assert!(o.status.success(), "{}", describe(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for n in [3, 5, 7, 9, 11] {
        assert!(
            out.contains(&format!("skipped line {n}:")),
            "{}",
            describe(&o)
        );
    }
    assert!(!describe(&o).contains("CANARY"));
    assert_eq!(raw_record_rows(&db).await.len(), 7);
}

backends!(
    the_binary_imports_and_lists,
    flavor = "multi_thread",
    worker_threads = 4
);
async fn the_binary_imports_and_lists(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let (text, expected) = generate(300);
    let path = dir.path().join("workspaces.jsonl");
    std::fs::write(&path, &text).unwrap();
    let path = path.display().to_string();
    let server = app.endpoint();
    let json_of = |o: &Output| -> Value {
        assert!(o.status.success(), "{}", describe(o));
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", describe(o)))
    };

    // Dry run, for machines: counts and the disagreements; nothing written.
    let dry = json_of(
        &run_bin(bin(&[
            "import",
            &path,
            "--server",
            &server,
            "--dry-run",
            "--json",
        ]))
        .await,
    );
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["created"], 300);
    assert_eq!(dry["changed"], true);
    let got: BTreeSet<(usize, String, &str)> = dry["disagreements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["line"].as_u64().unwrap() as usize,
                d["workspace_id"].as_str().unwrap().to_owned(),
                mode_static(d["mode"].as_str().unwrap()),
            )
        })
        .collect();
    assert_eq!(got, expected_disagreements(&expected));
    let counts: BTreeMap<String, usize> = serde_json::from_value(dry["decisions"].clone()).unwrap();
    assert_eq!(counts, expected_counts(&expected));
    assert!(raw_record_rows(&db).await.is_empty());

    // The real run needs a reason.
    let o = run_bin(bin(&["import", &path, "--server", &server])).await;
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--reason"));
    let o = run_bin(bin(&[
        "import", &path, "--server", &server, "--reason", "  ",
    ]))
    .await;
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--reason"));

    // Plain text from standard input; then again: nothing changes.
    let mut cmd = bin(&["import", "-", "--server", &server, "--reason", "adopt"]);
    cmd.stdin(std::fs::File::open(&path).unwrap());
    let o = run_bin(cmd).await;
    assert!(o.status.success(), "{}", describe(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("created:      300"), "{out}");
    assert!(out.contains("differs from legacy_mode:"), "{out}");
    let o = run_bin(bin(&[
        "import", &path, "--server", &server, "--reason", "adopt",
    ]))
    .await;
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("nothing changed"),
        "{}",
        describe(&o)
    );
    assert!(out.contains("existing:     300 (left alone)"), "{out}");
    assert_eq!(raw_audit_rows(&db).await.len(), 300);

    // list: everything, and filtered, in plain text and JSON.
    let all = json_of(
        &run_bin(bin(&[
            "list",
            "--server",
            &server,
            "--json",
            "--page-size",
            "40",
        ]))
        .await,
    );
    // One ListWorkspacesResponse holding every page.
    assert_eq!(all["resolutions"].as_array().map(Vec::len), Some(300));
    let byok = json_of(
        &run_bin(bin(&[
            "list", "--server", &server, "--json", "--mode", "byok",
        ]))
        .await,
    );
    let got: BTreeSet<String> = byok["resolutions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["workspaceId"].as_str().unwrap().to_owned())
        .collect();
    let want: BTreeSet<String> = expected
        .iter()
        .filter(|e| e.mode == BYOK)
        .map(|e| e.id.clone())
        .collect();
    assert_eq!(got, want);
    let o = run_bin(bin(&["list", "--server", &server, "--source", "default"])).await;
    assert!(o.status.success(), "{}", describe(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let n = expected.iter().filter(|e| e.source == "DEFAULT").count();
    assert_eq!(
        out.lines().filter(|l| l.contains("DEFAULT")).count(),
        n,
        "{out}"
    );
    assert!(out.ends_with(&format!("{n} workspaces\n")), "{out}");
    let o = run_bin(bin(&["list", "--server", &server, "--mode", "free"])).await;
    assert!(!o.status.success());
}

backends!(
    a_writers_import_fails_only_the_lines_with_an_override,
    flavor = "multi_thread",
    worker_threads = 4
);
async fn a_writers_import_fails_only_the_lines_with_an_override(db: TestDb) {
    let (writer, writer_entry) = make_token("importer", &[Role::Writer]);
    let (reader, reader_entry) = make_token("auditor", &[Role::Reader]);
    let app = TestApp::spawn_with(config_with_tokens(&db, vec![writer_entry, reader_entry])).await;
    let dir = tempfile::tempdir().unwrap();
    let (text, expected) = generate(300);
    let path = dir.path().join("workspaces.jsonl");
    std::fs::write(&path, &text).unwrap();
    let path = path.display().to_string();
    let server = app.endpoint();
    let overrides: BTreeSet<usize> = expected
        .iter()
        .filter(|e| e.source == "OVERRIDE")
        .map(|e| e.line)
        .collect();
    assert!(!overrides.is_empty() && overrides.len() < 300);
    let import = |extra: &[&str], token: &str| {
        let mut args = vec![
            "import",
            path.as_str(),
            "--server",
            server.as_str(),
            "--json",
        ];
        args.extend_from_slice(&["--token", token]);
        args.extend_from_slice(extra);
        // Small batches, so the lines with an override would share batches
        // with the others.
        args.extend_from_slice(&["--batch-size", "10"]);
        bin(&args)
    };
    let report_of = |o: &Output| -> Value {
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", describe(o)))
    };
    // Only the lines with an override fail, each saying it needs an admin;
    // the run goes on to the end.
    let check = |o: &Output, dry_run: bool| {
        assert!(
            !o.status.success(),
            "the failures fail the run\n{}",
            describe(o)
        );
        let r = report_of(o);
        assert_eq!(r["dry_run"], dry_run);
        assert_eq!(r["interrupted"], false, "{}", describe(o));
        assert_eq!(r["done"], 300, "{}", describe(o));
        assert_eq!(r["created"], 300 - overrides.len(), "{}", describe(o));
        let failures = r["failures"].as_array().unwrap();
        let failed: BTreeSet<usize> = failures
            .iter()
            .map(|f| f["line"].as_u64().unwrap() as usize)
            .collect();
        assert_eq!(failed, overrides, "{}", describe(o));
        for f in failures {
            assert_eq!(f["reason"], "PERMISSION_DENIED", "{f}");
            assert!(f["message"].as_str().unwrap().contains("admin role"), "{f}");
        }
    };
    let o = run_bin(import(&["--dry-run"], &writer)).await;
    check(&o, true);
    assert!(
        raw_record_rows(&db).await.is_empty(),
        "a dry run writes nothing"
    );
    let o = run_bin(import(&["--reason", "adopt"], &writer)).await;
    check(&o, false);
    assert_eq!(raw_record_rows(&db).await.len(), 300 - overrides.len());
    // The text report names the lines and what they need.
    let o = run_bin(bin(&[
        "import", &path, "--server", &server, "--token", &writer, "--reason", "adopt",
    ]))
    .await;
    assert!(!o.status.success(), "{}", describe(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let first = overrides.first().unwrap();
    assert!(
        out.contains(&format!("failed line {first} "))
            && out.contains("override_mode needs the admin role"),
        "{out}"
    );
    // A token refused the lines without an override too is refused every
    // call: the run stops after the calls in flight.
    for extra in [&["--dry-run"][..], &["--reason", "adopt"][..]] {
        let mut args = vec!["--concurrency", "1"];
        args.extend_from_slice(extra);
        let o = run_bin(import(&args, &reader)).await;
        assert!(!o.status.success(), "{}", describe(&o));
        let r = report_of(&o);
        assert_eq!(r["interrupted"], true, "{}", describe(&o));
        assert_eq!(r["stopped_by_refusal"], true, "{}", describe(&o));
        assert!(r["done"].as_u64().unwrap() < 300, "{}", describe(&o));
    }
    // Said as a stop on that refusal, not as an interruption.
    let o = run_bin(bin(&[
        "import",
        &path,
        "--server",
        &server,
        "--token",
        &reader,
        "--dry-run",
        "--concurrency",
        "1",
    ]))
    .await;
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("STOPPED after") && !out.contains("INTERRUPTED"),
        "{}",
        describe(&o)
    );
    assert_eq!(raw_record_rows(&db).await.len(), 300 - overrides.len());
}

backends!(
    a_reason_the_server_would_refuse_is_refused_before_anything_is_sent,
    flavor = "multi_thread",
    worker_threads = 4
);
async fn a_reason_the_server_would_refuse_is_refused_before_anything_is_sent(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let (text, _) = generate(20);
    let path = dir.path().join("workspaces.jsonl");
    std::fs::write(&path, &text).unwrap();
    let path = path.display().to_string();
    let server = app.endpoint();
    let (_reserved, nobody) = refusing_addr();
    let nobody = format!("http://{nobody}");
    let too_long = "x".repeat(1025);
    for (reason, says) in [
        (too_long.as_str(), "--reason must be at most 1024 bytes"),
        (
            "adopt\u{1b}[2J",
            "--reason must not contain control characters",
        ),
        (
            "adopt\rday one",
            "--reason must not contain control characters",
        ),
    ] {
        for extra in [&[][..], &["--dry-run"][..]] {
            // Against the server: refused before any call, nothing written.
            let mut args = vec!["import", path.as_str(), "--server", server.as_str()];
            args.extend_from_slice(&["--reason", reason]);
            args.extend_from_slice(extra);
            let o = run_bin(bin(&args)).await;
            assert!(!o.status.success(), "{}", describe(&o));
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(err.contains(says), "{says}\n{}", describe(&o));
            assert!(o.stdout.is_empty(), "no report: {}", describe(&o));
            // Said before connecting: a server nobody runs is not reached.
            args[3] = nobody.as_str();
            let o = run_bin(bin(&args)).await;
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                !o.status.success() && err.contains(says) && !err.contains("connecting"),
                "{}",
                describe(&o)
            );
        }
    }
    assert!(raw_record_rows(&db).await.is_empty());
    // With --json, an error before the run is JSON on standard output too,
    // as every command says one: a bad reason, an unreadable file, a server
    // nobody runs.
    let missing = dir.path().join("missing.jsonl").display().to_string();
    for (file, reason, at, says) in [
        (
            path.as_str(),
            "adopt\u{1b}",
            server.as_str(),
            "control characters",
        ),
        (missing.as_str(), "adopt", server.as_str(), "missing.jsonl"),
        (path.as_str(), "adopt", nobody.as_str(), "connecting to"),
    ] {
        let o = run_bin(bin(&[
            "import", file, "--server", at, "--reason", reason, "--json",
        ]))
        .await;
        assert!(!o.status.success(), "{}", describe(&o));
        let v: Value =
            serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", describe(&o)));
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{says}: {}", describe(&o));
    }
    // Line breaks and tabs are allowed, and the longest reason.
    for reason in ["adopt:\n\tday one", &"x".repeat(1024)] {
        let o = run_bin(bin(&[
            "import", &path, "--server", &server, "--reason", reason,
        ]))
        .await;
        assert!(o.status.success(), "{}", describe(&o));
    }
    assert_eq!(raw_record_rows(&db).await.len(), 20);
}

fn mode_static(s: &str) -> &'static str {
    match s {
        "platform_managed" => PM,
        "byok" => BYOK,
        "disabled" => DISABLED,
        other => panic!("not a mode: {other}"),
    }
}

#[test]
fn the_generated_file_covers_every_rule_of_the_built_in_registry() {
    // Every rule's pattern is matched by at least one case (the case table
    // above is the test's own; this keeps it complete as rules are added).
    let registry = billing_mode::domain::Registry::builtin().unwrap();
    let cases = cases();
    for rule in registry.rules() {
        for rt in &rule.runtimes {
            assert!(
                cases.iter().any(|c| c.runtime == Some(rt.as_str())
                    && c.model.is_some_and(|m| registry
                        .match_rule(rt, m)
                        .is_some_and(|r| r.number == rule.number))),
                "no case for rule {} on runtime {rt}",
                rule.number
            );
        }
    }
}

backends!(
    an_update_stopped_by_a_refusal_still_reports_what_its_batch_created,
    flavor = "multi_thread",
    worker_threads = 4
);
async fn an_update_stopped_by_a_refusal_still_reports_what_its_batch_created(db: TestDb) {
    // A writer may create, but not read a decision to update one (Resolve
    // needs reader): the first existing workspace stops the run.
    let (writer, writer_entry) = make_token("importer", &[Role::Writer]);
    let app = TestApp::spawn_with(config_with_tokens(&db, vec![writer_entry])).await;
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<String> = (0..10).map(|_| new_workspace()).collect();
    let line = |ws: &String| {
        format!("{{\"workspace_id\":\"{ws}\",\"runtime\":\"claude-code\",\"model\":\"opus\"}}\n")
    };
    let first = dir.path().join("first.jsonl");
    std::fs::write(&first, line(&ids[0])).unwrap();
    let all = dir.path().join("all.jsonl");
    std::fs::write(&all, ids.iter().map(line).collect::<String>()).unwrap();
    let server = app.endpoint();
    let import = |path: &std::path::Path, extra: &[&str]| {
        let path = path.display().to_string();
        let mut args = vec![
            "import", &path, "--server", &server, "--token", &writer, "--reason", "adopt", "--json",
        ];
        args.extend_from_slice(extra);
        bin(&args)
    };
    let o = run_bin(import(&first, &[])).await;
    assert!(o.status.success(), "{}", describe(&o));
    let o = run_bin(import(&all, &["--update", "--batch-size", "10"])).await;
    assert!(!o.status.success(), "{}", describe(&o));
    let r: Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", describe(&o)));
    let stored = raw_record_rows(&db).await.len();
    assert_eq!(stored, 10, "the batch created the nine others");
    assert_eq!(
        r["created"].as_u64().unwrap() as usize,
        stored - 1,
        "what was done is what is reported: {}",
        describe(&o)
    );
    let failures = r["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 1, "{}", describe(&o));
    assert_eq!(failures[0]["line"], 1);
    assert_eq!(failures[0]["reason"], "PERMISSION_DENIED");
}
