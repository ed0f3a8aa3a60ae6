//! Secrets never leak, proved: one test binary with a global TRACE-level
//! subscriber (text and JSON) installed before the server starts in-process.
//! Every RPC is driven (successes and each failure) with unique canary secret
//! values in every env value and with bearer tokens (themselves secrets);
//! then the captured logs, every error (message, details, metadata), every
//! History page, every raw audit and record row, the metrics and every span
//! exported over OTLP (to a real receiver in this test) are searched for them.
//! Values returned in a successful BuildEnv env are the only allowed place.
#[path = "api/helpers.rs"]
#[allow(dead_code, unused_imports, unused_macros)] // the black-box binary uses the rest
mod helpers;
#[path = "support/otlp.rs"]
mod otlp;

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use billing_mode::{
    auth::Role,
    proto::{
        billing_mode_client::BillingModeClient, watch_response, BatchCreateWorkspacesRequest,
        BuildEnvRequest, CheckSpendRequest, ClearRequest, CredentialKeys, EnvVar, HistoryRequest,
        ListDriftRequest, ListWorkspacesRequest, Mode, NewWorkspace, Origin, ReportAppliedRequest,
        ResolveRequest, SetRequest, WatchRequest,
    },
    telemetry::{self, LogFormat, LogLevel, Sink, TelemetryGuard},
};
use helpers::*;
use tonic::{metadata::MetadataValue, Code, Request, Status};

/// Appends everything written to a shared buffer.
#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Logs {
    text: Arc<Mutex<Vec<u8>>>,
    json: Arc<Mutex<Vec<u8>>>,
    _telemetry: TelemetryGuard,
}

impl Logs {
    /// Installs the global subscriber with the server's own
    /// `telemetry::init`: everything, at TRACE, as text and as JSON (with
    /// span fields), each span's opening and closing lines included, plus
    /// `log` records through tracing-log.
    fn install() -> Logs {
        let text = Arc::new(Mutex::new(Vec::new()));
        let json = Arc::new(Mutex::new(Vec::new()));
        let (t, j) = (text.clone(), json.clone());
        let telemetry = telemetry::init(
            &LogLevel::Explicit("trace".to_owned()),
            vec![
                Sink::writer(LogFormat::Text, move || Capture(t.clone())).with_span_events(),
                Sink::writer(LogFormat::Json, move || Capture(j.clone())).with_span_events(),
            ],
        )
        .expect("the subscriber installs");
        Logs {
            text,
            json,
            _telemetry: telemetry,
        }
    }

    /// The captured text and JSON output so far, emptying the buffers.
    fn take(&self) -> (String, String) {
        let t = std::mem::take(&mut *self.text.lock().unwrap());
        let j = std::mem::take(&mut *self.json.lock().unwrap());
        (
            String::from_utf8_lossy(&t).into_owned(),
            String::from_utf8_lossy(&j).into_owned(),
        )
    }
}

/// Every secret the test sends, and every place searched for them. The
/// search runs once at the end, with one regex over all secrets.
#[derive(Default)]
struct Secrets {
    all: Vec<String>,
    places: Vec<(String, String)>,
}

impl Secrets {
    /// A fresh canary value.
    fn canary(&mut self) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let c = format!("CANARY-{id}");
        self.all.push(c.clone());
        // The random part alone, in case the prefix is stripped.
        self.all.push(id);
        c
    }

    /// Registers a secret that is not a canary (a real bearer token).
    fn add(&mut self, s: &str) {
        self.all.push(s.to_owned());
    }

    /// Remembers `haystack` (found at `place`) for the search.
    fn check(&mut self, place: &str, haystack: &str) {
        self.places.push((place.to_owned(), haystack.to_owned()));
    }

    /// Every line of every place that contains a secret or the canary marker.
    ///
    /// Canaries are `CANARY-<uuid>`: a line leaks one if it contains the
    /// marker (any case) or the uuid of any canary (lower or upper case);
    /// the few other secrets (bearer tokens) are searched for literally.
    fn leaks(&self) -> Vec<String> {
        let uuids: HashSet<String> = self
            .all
            .iter()
            .filter(|s| is_uuid(s.as_bytes()))
            .cloned()
            .collect();
        let literals: Vec<&String> = self
            .all
            .iter()
            .filter(|s| !s.starts_with("CANARY-") && !uuids.contains(*s))
            .collect();
        let mut out = Vec::new();
        for (place, text) in &self.places {
            for line in text.lines() {
                let lower = line.to_ascii_lowercase();
                let hit = find_marker(&lower)
                    .or_else(|| find_uuid(&lower, &uuids))
                    .or_else(|| literals.iter().find_map(|l| line.find(l.as_str())));
                if let Some(at) = hit {
                    let mut start = at.saturating_sub(300);
                    while !line.is_char_boundary(start) {
                        start -= 1;
                    }
                    let mut end = (at + 300).min(line.len());
                    while !line.is_char_boundary(end) {
                        end += 1;
                    }
                    out.push(format!("{place}: ...{}...", &line[start..end]));
                }
            }
        }
        out
    }
}

/// `canary-` followed by the start of a uuid, in a lower-cased line.
fn find_marker(lower: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = lower[from..].find("canary-") {
        let at = from + i;
        let rest = &lower.as_bytes()[at + 7..];
        if rest.len() >= 9 && rest[..8].iter().all(u8::is_ascii_hexdigit) && rest[8] == b'-' {
            return Some(at);
        }
        from = at + 7;
    }
    None
}

fn is_uuid(b: &[u8]) -> bool {
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// The position of a uuid from `set` in a lower-cased line.
fn find_uuid(lower: &str, set: &HashSet<String>) -> Option<usize> {
    let b = lower.as_bytes();
    let mut i = 0;
    while i + 36 <= b.len() {
        if b[i + 8] == b'-' && is_uuid(&b[i..i + 36]) {
            if set.contains(&lower[i..i + 36]) {
                return Some(i);
            }
            i += 36;
        } else {
            i += 1;
        }
    }
    None
}

type Client = billing_mode::client::Client;

async fn client_with_header(app: &TestApp, header: &str) -> Client {
    let value: MetadataValue<_> = header.parse().unwrap();
    BillingModeClient::with_interceptor(
        app.channel().await,
        billing_mode::client::Bearer::from(value),
    )
}

/// Checks an error: its code and reason, then searches all of it.
fn refused(secrets: &mut Secrets, what: &str, r: Result<(), Status>, code: Code, reason: &str) {
    let s = match r {
        Ok(()) => panic!("{what}: expected {reason}, got success"),
        Err(s) => s,
    };
    assert_error(&s, code, reason);
    secrets.check(&format!("error message ({what})"), s.message());
    secrets.check(
        &format!("error details ({what})"),
        &String::from_utf8_lossy(s.details()),
    );
    secrets.check(
        &format!("error metadata ({what})"),
        &format!("{:?}", s.metadata()),
    );
    secrets.check(&format!("error debug ({what})"), &format!("{s:?}"));
}

fn e(origin: Origin, key: &str, value: &str) -> EnvVar {
    env(origin, key, value)
}

async fn build(c: &mut Client, ws: &str, env: Vec<EnvVar>) -> Result<(), Status> {
    c.build_env(BuildEnvRequest {
        workspace_id: ws.to_owned(),
        env,
    })
    .await
    .map(drop)
}

/// Clear on `ws` (reason "x"): success or the status.
async fn try_clear(c: &mut Client, ws: &str) -> Result<(), Status> {
    c.clear(ClearRequest {
        workspace_id: ws.to_owned(),
        expected_revision: None,
        reason: "x".into(),
        dry_run: false,
    })
    .await
    .map(drop)
}

/// Drives every RPC on one backend; returns the secrets and leaks found in
/// errors, History, the database and the logs.
async fn drive(db: &TestDb, logs: &Logs) -> Secrets {
    let started = Instant::now();
    let mut s = Secrets::default();
    let (admin_t, a) = make_token("canary-admin", &[Role::Admin]);
    let (prov_t, p) = make_token("canary-provisioner", &[Role::Provisioner]);
    let (reader_t, r) = make_token("canary-reader", &[Role::Reader]);
    let (writer_t, w) = make_token("canary-writer", &[Role::Writer]);
    let (meter_t, m) = make_token("canary-meter", &[Role::Meter]);
    for t in [&admin_t, &prov_t, &reader_t, &writer_t, &meter_t] {
        s.add(t);
        // The random part alone, in case a prefix is stripped.
        s.add(t.trim_start_matches("bmt_"));
    }
    let app = TestApp::spawn_with(config_with_tokens(db, vec![a, p, r, w, m])).await;
    let mut admin = client_with_header(&app, &format!("Bearer {admin_t}")).await;
    let mut prov = client_with_header(&app, &format!("Bearer {prov_t}")).await;
    let mut reader = client_with_header(&app, &format!("Bearer {reader_t}")).await;
    let mut writer = client_with_header(&app, &format!("Bearer {writer_t}")).await;
    let mut meter = client_with_header(&app, &format!("Bearer {meter_t}")).await;
    let bad_token = s.canary();
    let mut stranger = client_with_header(&app, &format!("Bearer {bad_token}")).await;
    let bad_basic = s.canary();
    let mut basic = client_with_header(&app, &format!("Basic {bad_basic}")).await;

    // --- Set / Clear / Resolve / History successes -------------------------
    let ws_byok = new_workspace();
    admin
        .set(SetRequest {
            workspace_id: ws_byok.clone(),
            runtime: Some("claude-code".into()),
            model: Some("opus".into()),
            credential_keys: Some(CredentialKeys {
                keys: vec!["CLAUDE_CODE_OAUTH_TOKEN".into()],
            }),
            reason: "onboarding".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let ws_pm = new_workspace();
    writer
        .set(SetRequest {
            workspace_id: ws_pm.clone(),
            runtime: Some("langgraph".into()),
            model: Some("anthropic:claude-sonnet-4-6".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let ws_ovr = new_workspace();
    admin
        .set(SetRequest {
            workspace_id: ws_ovr.clone(),
            runtime: Some("hermes".into()),
            model: Some("openai/gpt-4o".into()),
            credential_keys: Some(CredentialKeys {
                keys: vec!["OPENAI_API_KEY".into()],
            }),
            override_mode: Some(Mode::Disabled.into()),
            reason: "suspended for review".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .clear(ClearRequest {
            workspace_id: ws_ovr.clone(),
            expected_revision: Some(1),
            reason: "review done".into(),
            dry_run: false,
        })
        .await
        .unwrap();
    let resolved = reader
        .resolve(ResolveRequest {
            workspace_id: ws_byok.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    s.check("Resolve response", &format!("{resolved:?}"));

    // --- BuildEnv successes, canaries in every value --------------------------
    let byok_own = s.canary();
    let mut byok_env = vec![
        e(Origin::Workspace, "CLAUDE_CODE_OAUTH_TOKEN", &byok_own),
        e(Origin::Global, "CLAUDE_CODE_OAUTH_TOKEN", &s.canary()),
        e(Origin::Global, "ANTHROPIC_API_KEY", &s.canary()),
        e(Origin::Workspace, "ANTHROPIC_BASE_URL", &s.canary()),
        e(
            Origin::Platform,
            "MOLECULE_LLM_ANTHROPIC_BASE_URL",
            &format!("https://{}.proxy.test/v1", s.canary()),
        ),
        e(Origin::Platform, "MOLECULE_LLM_USAGE_TOKEN", &s.canary()),
        e(Origin::Workspace, "MOLECULE_LLM_USAGE_TOKEN", &s.canary()),
        e(Origin::Workspace, "DATABASE_PASSWORD", &s.canary()),
        e(Origin::Global, "SENTRY_DSN", &s.canary()),
        e(Origin::Platform, "PLATFORM_SETTING", &s.canary()),
        e(Origin::Workspace, "EMPTY_ONE", ""),
    ];
    byok_env.push(e(Origin::Workspace, "MODEL_PROVIDER", "opus"));
    let built = prov
        .build_env(BuildEnvRequest {
            workspace_id: ws_byok.clone(),
            env: byok_env.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        built.resolution.as_ref().unwrap().mode,
        Mode::Byok as i32,
        "{built:?}"
    );
    assert!(
        built
            .env
            .iter()
            .any(|v| v.key == "CLAUDE_CODE_OAUTH_TOKEN" && v.value == byok_own),
        "the test drives real values: the customer's own token is kept: {built:?}"
    );
    // Names only outside the env.
    s.check("BuildEnv resolution", &format!("{:?}", built.resolution));
    s.check("BuildEnv removed_keys", &built.removed_keys.join(","));
    s.check("BuildEnv added_keys", &built.added_keys.join(","));

    let pm_env = vec![
        e(
            Origin::Platform,
            "MOLECULE_LLM_ANTHROPIC_BASE_URL",
            &format!("https://{}.proxy.test", s.canary()),
        ),
        e(
            Origin::Platform,
            "MOLECULE_LLM_OPENAI_BASE_URL",
            &format!("https://{}.proxy.test", s.canary()),
        ),
        e(Origin::Platform, "MOLECULE_LLM_USAGE_TOKEN", &s.canary()),
        e(Origin::Global, "ANTHROPIC_API_KEY", &s.canary()),
        e(Origin::Workspace, "OPENAI_API_KEY", &s.canary()),
        e(Origin::Workspace, "APP_SECRET", &s.canary()),
        e(
            Origin::Workspace,
            "MODEL_PROVIDER",
            "anthropic:claude-sonnet-4-6",
        ),
    ];
    let built = prov
        .build_env(BuildEnvRequest {
            workspace_id: ws_pm.clone(),
            env: pm_env.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        built.resolution.as_ref().unwrap().mode,
        Mode::PlatformManaged as i32
    );
    // Not vacuous: the canaries went through the server (the built env is
    // the one place a value may come back).
    assert!(
        built.env.iter().any(|v| v.value.starts_with("CANARY-")),
        "a canary value came back in the built env: {:?}",
        built.env.iter().map(|v| &v.key).collect::<Vec<_>>()
    );
    s.check("BuildEnv resolution", &format!("{:?}", built.resolution));
    s.check("BuildEnv removed_keys", &built.removed_keys.join(","));
    s.check("BuildEnv added_keys", &built.added_keys.join(","));
    // Admin may BuildEnv too (disabled-free path on the cleared workspace).
    let env = vec![
        e(Origin::Workspace, "OPENAI_API_KEY", &s.canary()),
        e(Origin::Workspace, "OPENROUTER_API_KEY", &s.canary()),
        e(Origin::Workspace, "HERMES_DEFAULT_MODEL", "openai/gpt-4o"),
    ];
    // The workspace is byok and the env carries its key: the env is built,
    // and nothing but the env may carry a value.
    let built = admin
        .build_env(BuildEnvRequest {
            workspace_id: ws_ovr.clone(),
            env,
        })
        .await
        .expect("an admin's BuildEnv of a byok workspace with its key")
        .into_inner();
    assert_eq!(built.resolution.as_ref().unwrap().mode, Mode::Byok as i32);
    s.check(
        "BuildEnv hermes resolution",
        &format!("{:?}", built.resolution),
    );
    s.check(
        "BuildEnv hermes removed_keys",
        &built.removed_keys.join(","),
    );
    s.check("BuildEnv hermes added_keys", &built.added_keys.join(","));

    // --- Each failure, with canaries in every value ---------------------------
    let extra = vec![e(Origin::Workspace, "1BAD-KEY", &s.canary())];
    let env = with(&mut s, extra);
    let r = build(&mut prov, &ws_byok, env).await;
    refused(
        &mut s,
        "bad key",
        r,
        Code::InvalidArgument,
        "INVALID_ENV_KEY",
    );

    // A dotenv-style mistake: the value pasted into the key.
    let pasted = format!("OPENAI_API_KEY={}", s.canary());
    let extra = vec![e(Origin::Workspace, &pasted, "")];
    let env = with(&mut s, extra);
    let r = build(&mut prov, &ws_byok, env).await;
    refused(
        &mut s,
        "a value pasted into a key",
        r,
        Code::InvalidArgument,
        "INVALID_ENV_KEY",
    );

    let extra = vec![
        e(Origin::Workspace, "DUP", &s.canary()),
        e(Origin::Workspace, "DUP", &s.canary()),
    ];
    let env = with(&mut s, extra);
    let r = build(&mut prov, &ws_byok, env).await;
    refused(
        &mut s,
        "duplicate",
        r,
        Code::InvalidArgument,
        "DUPLICATE_ENV_KEY",
    );

    let long = s.canary().repeat(64 * 1024 / 40 + 2);
    assert!(long.len() > 64 * 1024);
    let env = with(&mut s, vec![e(Origin::Workspace, "BIG", &long)]);
    let r = build(&mut prov, &ws_byok, env).await;
    refused(
        &mut s,
        "value limit",
        r,
        Code::InvalidArgument,
        "LIMIT_EXCEEDED",
    );

    let many: Vec<EnvVar> = (0..1025)
        .map(|i| e(Origin::Workspace, &format!("K{i}"), &s.canary()))
        .collect();
    let r = build(&mut prov, &ws_byok, many).await;
    refused(
        &mut s,
        "entry limit",
        r,
        Code::InvalidArgument,
        "LIMIT_EXCEEDED",
    );

    for origin in [Origin::Unspecified, Origin::Authority] {
        let extra = vec![e(origin, "ANTHROPIC_BASE_URL", &s.canary())];
        let env = with(&mut s, extra);
        let r = build(&mut prov, &ws_pm, env).await;
        refused(
            &mut s,
            "bad origin",
            r,
            Code::InvalidArgument,
            "INVALID_FIELD",
        );
    }

    let env = with(&mut s, vec![]);
    let r = build(&mut prov, "not-a-workspace", env).await;
    refused(
        &mut s,
        "bad workspace id",
        r,
        Code::InvalidArgument,
        "INVALID_WORKSPACE_ID",
    );

    // The candidate's model value is itself a canary: it must not be echoed.
    let mut env = pm_env.clone();
    env.retain(|v| v.key != "MODEL_PROVIDER");
    env.push(e(Origin::Workspace, "MODEL_PROVIDER", &s.canary()));
    let r = build(&mut prov, &ws_pm, env).await;
    refused(
        &mut s,
        "model mismatch",
        r,
        Code::FailedPrecondition,
        "MODEL_MISMATCH",
    );
    let mut env = byok_env.clone();
    env.retain(|v| v.key != "MODEL_PROVIDER");
    env.push(e(Origin::Global, "MODEL_PROVIDER", &s.canary()));
    let r = build(&mut prov, &ws_byok, env).await;
    refused(
        &mut s,
        "model mismatch (global)",
        r,
        Code::FailedPrecondition,
        "MODEL_MISMATCH",
    );

    let env = vec![
        e(Origin::Global, "CLAUDE_CODE_OAUTH_TOKEN", &s.canary()),
        e(Origin::Global, "ANTHROPIC_API_KEY", &s.canary()),
        e(Origin::Workspace, "ANTHROPIC_API_KEY", &s.canary()),
        e(
            Origin::Platform,
            "MOLECULE_LLM_ANTHROPIC_BASE_URL",
            &s.canary(),
        ),
        e(Origin::Platform, "MOLECULE_LLM_USAGE_TOKEN", &s.canary()),
        e(Origin::Workspace, "APP_TOKEN", &s.canary()),
    ];
    let r = build(&mut prov, &ws_byok, env).await;
    refused(
        &mut s,
        "missing byok credential",
        r,
        Code::FailedPrecondition,
        "MISSING_BYOK_CREDENTIAL",
    );

    let env = vec![
        e(Origin::Global, "ANTHROPIC_API_KEY", &s.canary()),
        e(Origin::Workspace, "ANTHROPIC_API_KEY", &s.canary()),
        e(
            Origin::Workspace,
            "MOLECULE_LLM_ANTHROPIC_BASE_URL",
            &s.canary(),
        ),
        e(Origin::Platform, "MOLECULE_LLM_USAGE_TOKEN", &s.canary()),
        e(Origin::Workspace, "APP_TOKEN", &s.canary()),
    ];
    let r = build(&mut prov, &ws_pm, env).await;
    refused(
        &mut s,
        "missing proxy",
        r,
        Code::FailedPrecondition,
        "MISSING_PLATFORM_PROXY",
    );

    let env = with(&mut s, vec![]);
    let r = build(&mut prov, &new_workspace(), env).await;
    refused(
        &mut s,
        "not found",
        r,
        Code::NotFound,
        "WORKSPACE_NOT_FOUND",
    );
    let r = reader
        .resolve(ResolveRequest {
            workspace_id: new_workspace(),
        })
        .await
        .map(drop);
    refused(
        &mut s,
        "resolve not found",
        r,
        Code::NotFound,
        "WORKSPACE_NOT_FOUND",
    );

    let r = admin
        .set(SetRequest {
            workspace_id: ws_byok.clone(),
            model: Some("sonnet".into()),
            expected_revision: Some(99),
            ..Default::default()
        })
        .await
        .map(drop);
    refused(
        &mut s,
        "set revision mismatch",
        r,
        Code::Aborted,
        "REVISION_MISMATCH",
    );
    let r = admin
        .clear(ClearRequest {
            workspace_id: ws_ovr.clone(),
            expected_revision: Some(99),
            reason: "stale".into(),
            dry_run: false,
        })
        .await
        .map(drop);
    refused(
        &mut s,
        "clear revision mismatch",
        r,
        Code::Aborted,
        "REVISION_MISMATCH",
    );
    let pasted_credential = format!("CLAUDE_CODE_OAUTH_TOKEN={}", s.canary());
    for (what, req, reason) in [
        (
            "a value pasted into a credential key",
            SetRequest {
                workspace_id: ws_byok.clone(),
                credential_keys: Some(CredentialKeys {
                    keys: vec!["ANTHROPIC_API_KEY".into(), pasted_credential.clone()],
                }),
                ..Default::default()
            },
            "INVALID_ENV_KEY",
        ),
        (
            "nothing to set",
            SetRequest {
                workspace_id: ws_byok.clone(),
                ..Default::default()
            },
            "NOTHING_TO_SET",
        ),
        (
            "override without reason",
            SetRequest {
                workspace_id: ws_byok.clone(),
                override_mode: Some(Mode::Byok.into()),
                ..Default::default()
            },
            "REASON_REQUIRED",
        ),
        (
            "unspecified mode",
            SetRequest {
                workspace_id: ws_byok.clone(),
                override_mode: Some(0),
                reason: "x".into(),
                ..Default::default()
            },
            "INVALID_MODE",
        ),
    ] {
        // A dry run is checked exactly as the write: the same refusals.
        for dry_run in [false, true] {
            let r = admin
                .set(SetRequest {
                    dry_run,
                    ..req.clone()
                })
                .await
                .map(drop);
            let what = if dry_run {
                format!("{what} (dry run)")
            } else {
                what.to_owned()
            };
            refused(&mut s, &what, r, Code::InvalidArgument, reason);
        }
    }
    // Dry runs that succeed: the Resolution the write would give.
    let dry = admin
        .set(SetRequest {
            workspace_id: ws_byok.clone(),
            model: Some("sonnet".into()),
            dry_run: true,
            ..Default::default()
        })
        .await
        .expect("a dry-run Set")
        .into_inner();
    s.check("Set (dry run) response", &format!("{dry:?}"));
    let dry = admin
        .set(SetRequest {
            workspace_id: ws_ovr.clone(),
            override_mode: Some(Mode::Disabled.into()),
            reason: "dry".into(),
            dry_run: true,
            ..Default::default()
        })
        .await
        .expect("a dry-run override")
        .into_inner();
    s.check("Set override (dry run) response", &format!("{dry:?}"));
    match admin
        .clear(ClearRequest {
            workspace_id: ws_ovr.clone(),
            expected_revision: None,
            reason: "dry".into(),
            dry_run: true,
        })
        .await
    {
        Ok(dry) => s.check("Clear (dry run) response", &format!("{:?}", dry.get_ref())),
        Err(st) => refused_any(&mut s, "Clear (dry run)", st),
    }

    // Unauthenticated: a canary token that is not configured, on every RPC.
    for c in [&mut stranger, &mut basic] {
        let env = with(&mut s, vec![]);
        let r = build(c, &ws_byok, env).await;
        refused(
            &mut s,
            "unauthenticated BuildEnv",
            r,
            Code::Unauthenticated,
            "UNAUTHENTICATED",
        );
        let r = c
            .resolve(ResolveRequest {
                workspace_id: ws_byok.clone(),
            })
            .await
            .map(drop);
        refused(
            &mut s,
            "unauthenticated Resolve",
            r,
            Code::Unauthenticated,
            "UNAUTHENTICATED",
        );
        let r = c
            .set(SetRequest {
                workspace_id: ws_byok.clone(),
                model: Some("haiku".into()),
                ..Default::default()
            })
            .await
            .map(drop);
        refused(
            &mut s,
            "unauthenticated Set",
            r,
            Code::Unauthenticated,
            "UNAUTHENTICATED",
        );
        let r = try_clear(c, &ws_byok).await;
        refused(
            &mut s,
            "unauthenticated Clear",
            r,
            Code::Unauthenticated,
            "UNAUTHENTICATED",
        );
        let r = try_history(c, &ws_byok, 0, "").await.map(drop);
        refused(
            &mut s,
            "unauthenticated History",
            r,
            Code::Unauthenticated,
            "UNAUTHENTICATED",
        );
    }

    // Permission denied, with canaries in the env.
    let env = with(&mut s, vec![]);
    let r = build(&mut reader, &ws_byok, env).await;
    refused(
        &mut s,
        "reader BuildEnv",
        r,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    let env = with(&mut s, vec![]);
    let r = build(&mut writer, &ws_byok, env).await;
    refused(
        &mut s,
        "writer BuildEnv",
        r,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    let r = writer
        .set(SetRequest {
            workspace_id: ws_byok.clone(),
            override_mode: Some(Mode::PlatformManaged.into()),
            reason: "x".into(),
            ..Default::default()
        })
        .await
        .map(drop);
    refused(
        &mut s,
        "writer override",
        r,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    let r = try_clear(&mut prov, &ws_byok).await;
    refused(
        &mut s,
        "provisioner Clear",
        r,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    let r = try_history(&mut prov, &ws_byok, 0, "").await.map(drop);
    refused(
        &mut s,
        "provisioner History",
        r,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );

    // --- ReportApplied and ListDrift -------------------------------------------
    let reported = prov
        .report_applied(ReportAppliedRequest {
            workspace_id: ws_byok.clone(),
            revision: 1,
            mode: Mode::Byok.into(),
            instance: "pod-canary-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    s.check("ReportApplied response", &format!("{reported:?}"));
    for (what, instance, revision, mode, reason) in [
        (
            "instance with a value",
            format!("pod {}", s.canary()),
            1,
            Mode::Byok,
            "INVALID_FIELD",
        ),
        (
            "instance with a newline",
            format!("pod\n{}", s.canary()),
            1,
            Mode::Byok,
            "INVALID_FIELD",
        ),
        (
            "instance too long",
            format!("{}{}", s.canary(), "x".repeat(300)),
            1,
            Mode::Byok,
            "INVALID_FIELD",
        ),
        (
            "wrong mode",
            "pod-canary-2".to_owned(),
            1,
            Mode::PlatformManaged,
            "INVALID_FIELD",
        ),
        (
            "never-existed revision",
            "pod-canary-3".to_owned(),
            99,
            Mode::Byok,
            "INVALID_FIELD",
        ),
    ] {
        let r = prov
            .report_applied(ReportAppliedRequest {
                workspace_id: ws_byok.clone(),
                revision,
                mode: mode.into(),
                instance,
            })
            .await
            .map(drop);
        refused(
            &mut s,
            &format!("ReportApplied {what}"),
            r,
            Code::InvalidArgument,
            reason,
        );
    }
    let r = stranger
        .report_applied(ReportAppliedRequest {
            workspace_id: ws_byok.clone(),
            revision: 1,
            mode: Mode::Byok.into(),
            instance: "pod-canary-4".into(),
        })
        .await
        .map(drop);
    refused(
        &mut s,
        "stranger ReportApplied",
        r,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
    );
    admin
        .set(SetRequest {
            workspace_id: ws_byok.clone(),
            override_mode: Some(Mode::PlatformManaged.into()),
            reason: "drift for the canary".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let drift = reader
        .list_drift(ListDriftRequest {
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(drift.drift.len(), 1, "the byok instance drifts: {drift:?}");
    s.check("ListDrift response", &format!("{drift:?}"));
    let r = reader
        .list_drift(ListDriftRequest {
            page_size: 1,
            page_token: s.canary(),
        })
        .await
        .map(drop);
    refused(
        &mut s,
        "ListDrift foreign token",
        r,
        Code::InvalidArgument,
        "INVALID_FIELD",
    );
    let r = prov.list_drift(ListDriftRequest::default()).await.map(drop);
    refused(
        &mut s,
        "provisioner ListDrift",
        r,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );

    // --- ListWorkspaces: every page, and the refusals -----------------------------
    {
        let mut page_token = String::new();
        loop {
            let page = reader
                .list_workspaces(ListWorkspacesRequest {
                    page_size: 2,
                    page_token,
                    ..ListWorkspacesRequest::default()
                })
                .await
                .expect("ListWorkspaces")
                .into_inner();
            s.check("ListWorkspaces response", &format!("{page:?}"));
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        let r = reader
            .list_workspaces(ListWorkspacesRequest {
                page_token: s.canary(),
                ..ListWorkspacesRequest::default()
            })
            .await
            .map(drop);
        refused(
            &mut s,
            "ListWorkspaces foreign token",
            r,
            Code::InvalidArgument,
            "INVALID_FIELD",
        );
        let r = prov
            .list_workspaces(ListWorkspacesRequest::default())
            .await
            .map(drop);
        refused(
            &mut s,
            "provisioner ListWorkspaces",
            r,
            Code::PermissionDenied,
            "PERMISSION_DENIED",
        );
    }

    // --- BatchCreateWorkspaces: a success, and canaries in every field refused ----
    {
        let item = |ws: String, model: &str, keys: Vec<String>| NewWorkspace {
            workspace_id: ws,
            runtime: "claude-code".into(),
            model: model.to_owned(),
            credential_keys: keys,
            ..NewWorkspace::default()
        };
        let created = writer
            .batch_create_workspaces(BatchCreateWorkspacesRequest {
                workspaces: vec![
                    item(
                        new_workspace(),
                        "opus",
                        vec!["CLAUDE_CODE_OAUTH_TOKEN".into()],
                    ),
                    item(ws_byok.clone(), "haiku", vec![]),
                ],
                reason: "canary: batch".into(),
            })
            .await
            .expect("BatchCreateWorkspaces")
            .into_inner();
        assert!(created.results[0].created && !created.results[1].created);
        s.check("BatchCreateWorkspaces response", &format!("{created:?}"));
        let good = || item(new_workspace(), "opus", vec![]);
        for (what, bad, reason) in [
            (
                "canary id",
                item(s.canary(), "opus", vec![]),
                "INVALID_WORKSPACE_ID",
            ),
            (
                "canary model",
                item(new_workspace(), &format!("a {}", s.canary()), vec![]),
                "INVALID_FIELD",
            ),
            (
                "canary runtime",
                NewWorkspace {
                    runtime: format!("{} {}", s.canary(), "x".repeat(300)),
                    ..good()
                },
                "INVALID_FIELD",
            ),
            (
                "canary key",
                item(new_workspace(), "opus", vec![format!("{}=v", s.canary())]),
                "INVALID_ENV_KEY",
            ),
            (
                "canary duplicate",
                item(ws_pm.to_uppercase(), "opus", vec![]),
                "INVALID_FIELD",
            ),
        ] {
            let r = admin
                .batch_create_workspaces(BatchCreateWorkspacesRequest {
                    workspaces: vec![item(ws_pm.clone(), "opus", vec![]), bad],
                    reason: "canary".into(),
                })
                .await
                .map(drop);
            refused(
                &mut s,
                &format!("BatchCreateWorkspaces {what}"),
                r,
                Code::InvalidArgument,
                reason,
            );
        }
        let r = reader
            .batch_create_workspaces(BatchCreateWorkspacesRequest {
                workspaces: vec![item(s.canary(), &s.canary(), vec![s.canary()])],
                reason: s.canary(),
            })
            .await
            .map(drop);
        refused(
            &mut s,
            "reader BatchCreateWorkspaces",
            r,
            Code::PermissionDenied,
            "PERMISSION_DENIED",
        );
        let r = stranger
            .batch_create_workspaces(BatchCreateWorkspacesRequest {
                workspaces: vec![item(s.canary(), "opus", vec![])],
                reason: String::new(),
            })
            .await
            .map(drop);
        refused(
            &mut s,
            "unauthenticated BatchCreateWorkspaces",
            r,
            Code::Unauthenticated,
            "UNAUTHENTICATED",
        );
    }

    // --- CheckSpend ---------------------------------------------------------------
    let spend = meter
        .check_spend(CheckSpendRequest {
            workspace_id: ws_pm.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    s.check("CheckSpend response", &format!("{spend:?}"));
    // Its refusals: a canary as id, an unknown workspace, a role that may
    // not, a token nobody issued.
    let canary_id = s.canary();
    for (who, workspace_id, what, code, reason) in [
        (
            "meter",
            canary_id,
            "CheckSpend canary id",
            Code::InvalidArgument,
            "INVALID_WORKSPACE_ID",
        ),
        (
            "meter",
            new_workspace(),
            "CheckSpend unknown workspace",
            Code::NotFound,
            "WORKSPACE_NOT_FOUND",
        ),
        (
            "reader",
            ws_pm.clone(),
            "reader CheckSpend",
            Code::PermissionDenied,
            "PERMISSION_DENIED",
        ),
        (
            "stranger",
            ws_pm.clone(),
            "stranger CheckSpend",
            Code::Unauthenticated,
            "UNAUTHENTICATED",
        ),
    ] {
        let c = match who {
            "meter" => &mut meter,
            "reader" => &mut reader,
            _ => &mut stranger,
        };
        let r = c
            .check_spend(CheckSpendRequest { workspace_id })
            .await
            .map(drop);
        refused(&mut s, what, r, code, reason);
    }
    let r = meter
        .resolve(ResolveRequest {
            workspace_id: ws_pm.clone(),
        })
        .await
        .map(drop);
    refused(
        &mut s,
        "meter Resolve",
        r,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );

    // Health with a canary bearer header (health does not check it).
    {
        use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
        let header: MetadataValue<_> = format!("Bearer {}", s.canary()).parse().unwrap();
        let mut h =
            HealthClient::with_interceptor(app.channel().await, move |mut r: Request<()>| {
                r.metadata_mut().insert("authorization", header.clone());
                Ok(r)
            });
        h.check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health ignores the header");
    }

    // --- Watch: a snapshot of every workspace, and the refusals ---------------
    {
        let mut stream = reader
            .watch(WatchRequest {
                include_snapshot: true,
                ..WatchRequest::default()
            })
            .await
            .expect("Watch with a snapshot")
            .into_inner();
        loop {
            let m = stream.message().await.unwrap().expect("the snapshot");
            s.check("Watch", &format!("{m:?}"));
            if matches!(m.event, Some(watch_response::Event::Progress(_))) {
                break;
            }
        }
        // A change after the snapshot, as the stream carries it.
        let ws_watched = new_workspace();
        writer
            .set(SetRequest {
                workspace_id: ws_watched.clone(),
                runtime: Some("claude-code".into()),
                model: Some("opus".into()),
                credential_keys: Some(CredentialKeys {
                    keys: vec!["CLAUDE_CODE_OAUTH_TOKEN".into()],
                }),
                ..Default::default()
            })
            .await
            .expect("a Set while watching");
        loop {
            let m = stream.message().await.unwrap().expect("the change");
            s.check("Watch change", &format!("{m:?}"));
            if let Some(watch_response::Event::Resolution(r)) = &m.event {
                if r.workspace_id == ws_watched {
                    break;
                }
            }
        }
        let (cursor, workspace) = (s.canary(), s.canary());
        for (what, req, reason) in [
            (
                "Watch with a secret as cursor",
                WatchRequest {
                    cursor,
                    ..WatchRequest::default()
                },
                "INVALID_CURSOR",
            ),
            (
                "Watch with a secret as workspace id",
                WatchRequest {
                    workspace_ids: vec![workspace],
                    ..WatchRequest::default()
                },
                "INVALID_WORKSPACE_ID",
            ),
        ] {
            let r = reader.watch(req).await.map(drop);
            refused(&mut s, what, r, Code::InvalidArgument, reason);
        }
        let r = stranger.watch(WatchRequest::default()).await.map(drop);
        refused(
            &mut s,
            "unauthenticated Watch",
            r,
            Code::Unauthenticated,
            "UNAUTHENTICATED",
        );
        let r = meter.watch(WatchRequest::default()).await.map(drop);
        refused(
            &mut s,
            "meter Watch",
            r,
            Code::PermissionDenied,
            "PERMISSION_DENIED",
        );
    }

    eprintln!("{:?}: RPCs driven in {:?}", db.backend, started.elapsed());
    // --- History, through the service ----------------------------------------
    for ws in [&ws_byok, &ws_pm, &ws_ovr] {
        let mut token = String::new();
        loop {
            let page = reader
                .history(HistoryRequest {
                    workspace_id: ws.clone(),
                    page_size: 1,
                    page_token: token.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            assert!(!page.entries.is_empty());
            s.check("History", &format!("{page:?}"));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
    }

    // --- The database, read directly -------------------------------------------
    let rows = raw_audit_rows(db).await;
    assert!(rows.len() >= 4, "audit rows were written: {rows:?}");
    let actors: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.actor.as_str()).collect();
    assert!(actors.contains("canary-admin") && actors.contains("canary-writer"));
    for row in &rows {
        s.check("billing_audit row", &format!("{row:?}"));
    }
    for row in raw_record_rows(db).await {
        s.check("billing_records row", &row);
    }
    let applied = raw_applied_rows(db).await;
    assert!(!applied.is_empty(), "applied reports were kept");
    for row in applied {
        s.check("billing_applied row", &row);
    }

    // --- A store failure, with canaries in the request -------------------------
    db.break_the_store().await;
    let r = reader
        .list_drift(ListDriftRequest::default())
        .await
        .map(drop);
    refused(
        &mut s,
        "ListDrift store unavailable",
        r,
        Code::Unavailable,
        "STORE_UNAVAILABLE",
    );
    let env = with(&mut s, vec![]);
    let r = build(&mut prov, &ws_byok, env).await;
    refused(
        &mut s,
        "store unavailable",
        r,
        Code::Unavailable,
        "STORE_UNAVAILABLE",
    );
    // Every other RPC that reads or writes the store, each with a token
    // (a secret) and a valid request, so the refusal is the store's.
    let unavailable = [
        (
            "Resolve store unavailable",
            reader
                .resolve(ResolveRequest {
                    workspace_id: ws_byok.clone(),
                })
                .await
                .map(drop),
        ),
        (
            "Set store unavailable",
            admin
                .set(SetRequest {
                    workspace_id: ws_byok.clone(),
                    model: Some("sonnet".into()),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "Clear store unavailable",
            admin
                .clear(ClearRequest {
                    workspace_id: ws_ovr.clone(),
                    expected_revision: None,
                    reason: "x".into(),
                    dry_run: false,
                })
                .await
                .map(drop),
        ),
        (
            "History store unavailable",
            reader
                .history(HistoryRequest {
                    workspace_id: ws_byok.clone(),
                    page_size: 1,
                    page_token: String::new(),
                })
                .await
                .map(drop),
        ),
        (
            "ReportApplied store unavailable",
            prov.report_applied(ReportAppliedRequest {
                workspace_id: ws_byok.clone(),
                revision: 1,
                mode: Mode::Byok.into(),
                instance: "pod-canary-2".into(),
            })
            .await
            .map(drop),
        ),
        (
            "ListWorkspaces store unavailable",
            reader
                .list_workspaces(ListWorkspacesRequest::default())
                .await
                .map(drop),
        ),
        (
            "BatchCreateWorkspaces store unavailable",
            writer
                .batch_create_workspaces(BatchCreateWorkspacesRequest {
                    workspaces: vec![NewWorkspace {
                        workspace_id: new_workspace(),
                        runtime: "claude-code".into(),
                        model: "opus".into(),
                        ..NewWorkspace::default()
                    }],
                    reason: "canary".into(),
                })
                .await
                .map(drop),
        ),
    ];
    for (what, r) in unavailable {
        refused(&mut s, what, r, Code::Unavailable, "STORE_UNAVAILABLE");
    }
    // CheckSpend answers from memory until its bound; a Watch opens from
    // the feed. Whatever they answer must carry no secret.
    match meter
        .check_spend(CheckSpendRequest {
            workspace_id: ws_pm.clone(),
        })
        .await
    {
        Ok(a) => s.check("CheckSpend, store down", &format!("{:?}", a.get_ref())),
        Err(st) => refused_any(&mut s, "CheckSpend, store down", st),
    }
    match reader.watch(WatchRequest::default()).await {
        Ok(stream) => {
            let mut stream = stream.into_inner();
            let first = tokio::time::timeout(Duration::from_secs(10), stream.message()).await;
            s.check("Watch, store down", &format!("{first:?}"));
        }
        Err(st) => refused_any(&mut s, "Watch, store down", st),
    }

    // --- Metric labels ----------------------------------------------------------
    let metrics = billing_mode::metrics::global().encode();
    assert!(
        metrics.contains("billing_mode_refusals_total{"),
        "the refusals were counted: {metrics}"
    );
    s.check("metrics", &metrics);

    app.stop().await.unwrap();

    // Self-test of the search: three planted leaks, at TRACE, that the
    // search below must find (and that the caller then discounts).
    let planted = s.canary();
    let uuid_only = planted.trim_start_matches("CANARY-").to_uppercase();
    tracing::trace!(target: "canary_selftest", secret = %planted, "planted 1");
    tracing::trace!(target: "canary_selftest", "planted 2: {uuid_only}");
    tracing::trace!(target: "canary_selftest", "planted 3: Bearer {admin_t}");

    // --- The logs ---------------------------------------------------------------
    let (text, json) = logs.take();
    eprintln!(
        "{:?}: {} bytes of text log, {} of JSON, after {:?}",
        db.backend,
        text.len(),
        json.len(),
        started.elapsed()
    );
    if let Some(dir) = std::env::var_os("CANARY_LOG_DIR") {
        // For inspection: CANARY_LOG_DIR=/tmp/x cargo test --test canary
        let dir = std::path::PathBuf::from(dir);
        std::fs::write(dir.join(format!("{:?}.log", db.backend)), &text).unwrap();
        std::fs::write(dir.join(format!("{:?}.json", db.backend)), &json).unwrap();
    }
    // Not vacuous: the decision log, the refusals and TRACE output are there.
    let decisions: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("billing_mode::decision"))
        .collect();
    assert!(
        decisions
            .iter()
            .any(|l| l.contains("BuildEnv") && l.contains("canary-provisioner")),
        "the BuildEnv decision was logged with its actor: {decisions:#?}"
    );
    assert!(
        decisions
            .iter()
            .any(|l| l.contains("BatchCreateWorkspaces") && l.contains("canary-writer")),
        "the batch's decisions were logged with their actor: {decisions:#?}"
    );
    for reason in [
        "MISSING_BYOK_CREDENTIAL",
        "MODEL_MISMATCH",
        "PERMISSION_DENIED",
        "STORE_UNAVAILABLE",
    ] {
        assert!(
            decisions.iter().any(|l| l.contains(reason)),
            "the refusal {reason} was logged: {decisions:#?}"
        );
    }
    assert!(
        text.lines().any(|l| l.contains(" TRACE ")),
        "TRACE-level events were captured"
    );
    assert!(json.contains("\"billing_mode::decision\""), "JSON captured");
    for line in &decisions {
        s.check("decision log", line);
    }
    s.check("text log", &text);
    s.check("json log", &json);
    s
}

/// A few canary entries, then `extra`.
fn with(s: &mut Secrets, extra: Vec<EnvVar>) -> Vec<EnvVar> {
    let mut v = vec![
        e(Origin::Workspace, "CLAUDE_CODE_OAUTH_TOKEN", &s.canary()),
        e(Origin::Global, "ANTHROPIC_API_KEY", &s.canary()),
        e(Origin::Workspace, "SOME_APP_PASSWORD", &s.canary()),
    ];
    v.extend(extra);
    v
}

/// Any outcome is fine here; an error must still carry no value.
fn refused_any(s: &mut Secrets, what: &str, st: Status) {
    s.check(&format!("error ({what})"), &format!("{st:?}"));
}

/// Every `billing_applied` row, by raw SQL, as one line of text each.
async fn raw_applied_rows(db: &TestDb) -> Vec<String> {
    use sqlx::Connection;
    let rows: Vec<(String,)> = match db.backend {
        Backend::Sqlite => {
            let mut c = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::query_as(
                "SELECT workspace_id || '|' || instance || '|' || revision || '|' || mode \
                 || '|' || reported_at FROM billing_applied",
            )
            .fetch_all(&mut c)
            .await
            .unwrap()
        }
        Backend::Postgres => {
            let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::query_as(
                "SELECT workspace_id::text || '|' || instance || '|' || revision::text || '|' \
                 || mode || '|' || reported_at::text FROM billing_applied",
            )
            .fetch_all(&mut c)
            .await
            .unwrap()
        }
    };
    rows.into_iter().map(|(r,)| r).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_appears_in_logs_errors_history_or_audit() {
    // Traces are exported to a real OTLP receiver, configured as an operator
    // would (the variable is read when the subscriber is installed; this
    // test is its binary's only one).
    let receiver = otlp::Receiver::default();
    std::env::set_var(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        otlp::start_receiver(receiver.clone()).await,
    );
    let logs = Logs::install();
    let mut report = Vec::new();
    let mut every_secret = Vec::new();
    for backend in [Backend::Sqlite, Backend::Postgres] {
        // One test for both backends: the subscriber is installed once per
        // process, and the leaks of both are reported together.
        let (logs, report, every_secret) = (&logs, &mut report, &mut every_secret);
        run_on(backend, |db| async move {
            let s = drive(&db, logs).await;
            every_secret.extend(s.all.iter().cloned());
            let searching = Instant::now();
            let (planted, leaks): (Vec<String>, Vec<String>) = s
                .leaks()
                .into_iter()
                .partition(|l| l.contains("canary_selftest"));
            eprintln!("{backend:?}: searched in {:?}", searching.elapsed());
            // Each planted leak is found in the text log and in the JSON log.
            for n in 1..=3 {
                for place in ["text log", "json log"] {
                    assert!(
                        planted
                            .iter()
                            .any(|l| l.starts_with(place) && l.contains(&format!("planted {n}"))),
                        "the search missed planted leak {n} in the {place}: {planted:#?}"
                    );
                }
            }
            report.extend(leaks.into_iter().map(|l| format!("[{backend:?}] {l}")));
        })
        .await;
    }

    // --- Exported spans ---------------------------------------------------------
    // A planted leak the search must find: an exported span's attribute.
    let mut traces = Secrets {
        all: every_secret,
        places: Vec::new(),
    };
    let planted = traces.canary();
    tracing::info_span!(target: "billing_mode::canary_selftest", "planted_span", secret = %planted)
        .in_scope(|| {});
    // Dropping the subscriber's guard flushes the exporter.
    drop(logs);
    let received = receiver.received.lock().unwrap().clone();
    let strings: Vec<String> = received.iter().flat_map(otlp::every_string).collect();
    for rpc in [
        "BuildEnv",
        "BatchCreateWorkspaces",
        "CheckSpend",
        "Watch",
        "ListDrift",
    ] {
        let name = format!("molecule.billing.v1.BillingMode/{rpc}");
        assert!(
            strings.contains(&name),
            "the {rpc} calls' spans were exported ({} export requests)",
            received.len()
        );
    }
    traces.check("exported spans", &strings.join("\n"));
    let (planted_found, leaks): (Vec<String>, Vec<String>) = traces
        .leaks()
        .into_iter()
        .partition(|l| l.contains(planted.trim_start_matches("CANARY-")));
    assert!(
        !planted_found.is_empty(),
        "the search missed the planted span attribute"
    );
    report.extend(leaks.into_iter().map(|l| format!("[traces] {l}")));

    assert!(
        report.is_empty(),
        "{} leak(s) of secret values:\n{}",
        report.len(),
        report
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
