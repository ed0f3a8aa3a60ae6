//! Adoption, black-box on both backends: `ListWorkspaces` through the real
//! gRPC server, the import (`billing_mode::import`, the library behind
//! `billing-mode import`) against the real server, and both commands through
//! the real binary.
//!
//! The expected decisions below are the test's own table, written from the
//! registry's documented rules (docs/registry.md), not a call to the
//! resolver the server uses.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::Cursor,
    process::{Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use billing_mode::{
    auth::Role,
    import::{self, Connection, Options, Report, Transport},
    proto::{ListWorkspacesRequest, Mode, Resolution, SetRequest, Source},
};
use common::*;
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

// ---------------------------------------------------------------------------
// ListWorkspaces

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paging_while_a_writer_adds_and_changes_workspaces_lists_each_one_exactly_once() {
    each_backend(|db| async move {
        let app = TestApp::spawn(&db).await;
        let mut c = app.client().await;
        let mut seeded: Vec<String> = (0..150).map(|_| new_workspace()).collect();
        for w in &seeded {
            set(&mut c, set_model(w, "opus")).await;
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
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn filters_select_by_the_decisions_mode_and_source_across_pages() {
    each_backend(|db| async move {
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
            set(
                &mut c,
                SetRequest {
                    override_mode: o.map(Into::into),
                    reason: "test".into(),
                    ..set_model(&ws, model)
                },
            )
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
                        && (source == Source::Unspecified
                            || *s == import::source_name(source.into()))
                })
                .map(|(w, _, _)| w.clone())
                .collect();
            want.sort();
            assert_eq!(got, want, "{mode:?} {source:?} on {:?}", db.backend);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_page_token_the_service_did_not_hand_out_is_invalid_argument() {
    each_backend(|db| async move {
        let app = TestApp::spawn(&db).await;
        let mut c = app.client().await;
        for _ in 0..3 {
            set(&mut c, set_model(&new_workspace(), "opus")).await;
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
        for bad in [
            "garbage!".to_owned(),
            "5".to_owned(),
            new_workspace(),
            tampered,
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
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_and_admins_may_list_workspaces_and_no_one_else() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
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
    let app = TestApp::spawn_with(
        &db,
        config_with_tokens(&db, tokens.iter().map(|(_, e)| e.clone()).collect()),
    )
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
