//! The contract's four seed cases, end to end over gRPC, and the parity test
//! between Resolve and BuildEnv. Each runs on SQLite and, when `DATABASE_URL`
//! points at Postgres, on Postgres too.

use std::{collections::BTreeMap, time::Duration};

use crate::helpers::*;
use billing_mode::proto::{ClearRequest, EnvVar, Mode, Origin, SetRequest, Source};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use tonic::Code;

// ---------------------------------------------------------------------------
// Helpers

fn value<'a>(m: &'a BTreeMap<String, (String, Origin)>, key: &str) -> Option<&'a str> {
    m.get(key).map(|(v, _)| v.as_str())
}

const PROXY_URL: &str = "https://proxy.example/anthropic";
const USAGE_TOKEN: &str = "usage-token-ws";

fn proxy_inputs() -> Vec<EnvVar> {
    vec![
        env(
            Origin::Platform,
            "MOLECULE_LLM_ANTHROPIC_BASE_URL",
            PROXY_URL,
        ),
        env(Origin::Platform, "MOLECULE_LLM_USAGE_TOKEN", USAGE_TOKEN),
    ]
}

/// Writes `override_mode` straight into the database, as an operator would
/// have to: the schema's CHECK constraint refuses anything but a valid mode,
/// so `bypass_check` switches it off first (SQLite: `ignore_check_constraints`
/// on this connection; Postgres: drop the constraint).
async fn write_override_by_hand(
    db: &TestDb,
    ws: &str,
    raw: &str,
    bypass_check: bool,
) -> Result<u64, sqlx::Error> {
    use sqlx::Connection;
    match db.backend {
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(&db.url).await?;
            if bypass_check {
                sqlx::query("PRAGMA ignore_check_constraints = ON")
                    .execute(&mut conn)
                    .await?;
            }
            let done = sqlx::query(
                "UPDATE billing_records SET override_mode = ?1 WHERE workspace_id = ?2",
            )
            .bind(raw)
            .bind(ws)
            .execute(&mut conn)
            .await?;
            conn.close().await?;
            Ok(done.rows_affected())
        }
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(&db.url).await?;
            if bypass_check {
                sqlx::query("ALTER TABLE billing_records DROP CONSTRAINT IF EXISTS billing_records_override_mode_check")
                    .execute(&mut conn)
                    .await?;
            }
            let done = sqlx::query(
                "UPDATE billing_records SET override_mode = $1 WHERE workspace_id = $2::uuid",
            )
            .bind(raw)
            .bind(ws)
            .execute(&mut conn)
            .await?;
            conn.close().await?;
            Ok(done.rows_affected())
        }
    }
}

/// Writes the `model` column straight into the database (no CHECK guards it).
async fn write_model_by_hand(db: &TestDb, ws: &str, raw: &str) {
    use sqlx::Connection;
    match db.backend {
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::query("UPDATE billing_records SET model = ?1 WHERE workspace_id = ?2")
                .bind(raw)
                .bind(ws)
                .execute(&mut conn)
                .await
                .unwrap();
            conn.close().await.unwrap();
        }
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::query("UPDATE billing_records SET model = $1 WHERE workspace_id = $2::uuid")
                .bind(raw)
                .bind(ws)
                .execute(&mut conn)
                .await
                .unwrap();
            conn.close().await.unwrap();
        }
    }
}

// ---------------------------------------------------------------------------
// Seed case 1

backends!(case_1_a_byok_override_beats_the_derivation_until_cleared_and_a_garbled_one_is_ignored);
async fn case_1_a_byok_override_beats_the_derivation_until_cleared_and_a_garbled_one_is_ignored(
    db: TestDb,
) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let ws = new_workspace();
    // A model that derives platform_managed: versioned id, no key of the customer's.
    let derived = app
        .register(&ws, Some("claude-code"), Some("claude-sonnet-4-6"), &[])
        .await;
    assert_eq!(
        (derived.mode(), derived.source()),
        (Mode::PlatformManaged, Source::DerivedProvider)
    );
    assert_eq!(derived.provider, "platform-anthropic");

    let o = app
        .set_override(&ws, Mode::Byok, "customer brings their own Anthropic key")
        .await;
    assert_eq!(
        (o.mode(), o.source(), o.override_mode()),
        (Mode::Byok, Source::Override, Mode::Byok)
    );
    assert_eq!(o.revision, 2);
    assert!(o.forbidden_secret_keys.is_empty());
    assert_eq!(app.resolve(&ws).await, o);
    let own_key = env(Origin::Workspace, "ANTHROPIC_API_KEY", "customer-key");
    let mut candidate = proxy_inputs();
    candidate.push(own_key.clone());
    let built = app.build(&ws, candidate.clone()).await.unwrap();
    assert_eq!(built.resolution.as_ref(), Some(&o));
    let m = env_map(&built);
    assert_eq!(value(&m, "MOLECULE_LLM_BILLING_MODE"), Some("byok"));
    assert_eq!(
        m["ANTHROPIC_API_KEY"],
        ("customer-key".to_owned(), Origin::Workspace)
    );
    assert_eq!(value(&m, "ANTHROPIC_BASE_URL"), None);

    let cleared = c
        .clear(ClearRequest {
            workspace_id: ws.clone(),
            expected_revision: Some(2),
            reason: "customer key revoked".into(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner()
        .resolution
        .unwrap();
    assert_eq!(
        (cleared.mode(), cleared.source()),
        (Mode::PlatformManaged, Source::DerivedProvider)
    );
    assert_eq!(
        (cleared.override_mode(), cleared.revision),
        (Mode::Unspecified, 3)
    );
    assert_eq!(app.resolve(&ws).await, cleared);
    let m = env_map(&app.build(&ws, candidate.clone()).await.unwrap());
    assert_eq!(
        value(&m, "MOLECULE_LLM_BILLING_MODE"),
        Some("platform_managed")
    );
    assert_eq!(
        value(&m, "ANTHROPIC_API_KEY"),
        Some(USAGE_TOKEN),
        "the customer's key is replaced"
    );

    // The schema refuses a garbled override...
    let refused = write_override_by_hand(&db, &ws, "Byok", false)
        .await
        .unwrap_err();
    let kind = refused.as_database_error().map(|e| e.kind());
    assert_eq!(
        kind,
        Some(sqlx::error::ErrorKind::CheckViolation),
        "{refused}"
    );
    assert_eq!(app.resolve(&ws).await, cleared);

    // ... so an operator has to bypass the CHECK to write one.
    for garbled in ["Byok", "byok ", "bring-your-own-key"] {
        assert_eq!(
            write_override_by_hand(&db, &ws, garbled, true)
                .await
                .unwrap(),
            1
        );
        let r = app.resolve(&ws).await;
        assert_eq!(r.override_mode(), Mode::Unspecified, "{garbled:?}");
        assert_eq!(
            (r.mode(), r.source()),
            (Mode::PlatformManaged, Source::DerivedProvider),
            "{garbled:?}"
        );
        assert_eq!((r.provider.as_str(), r.revision), ("platform-anthropic", 3));
        assert!(
            r.trace
                .iter()
                .any(|l| l.contains(garbled) && l.to_lowercase().contains("override")),
            "the trace names the ignored override {garbled:?}: {:?}",
            r.trace
        );
        // Apart from that trace line, it resolves exactly as if absent.
        let mut without = r.clone();
        without.trace.retain(|l| !l.contains(garbled));
        let mut absent = cleared.clone();
        absent.trace.retain(|l| !l.starts_with("override"));
        assert_eq!(without, absent);
        // The provision path ignores it too.
        let built = app.build(&ws, candidate.clone()).await.unwrap();
        assert_eq!(built.resolution.as_ref(), Some(&r));
        assert_eq!(
            value(&env_map(&built), "MOLECULE_LLM_BILLING_MODE"),
            Some("platform_managed")
        );
    }
    app.stop().await.unwrap();
}

backends!(case_1_a_garbled_stored_model_is_ignored_named_in_the_trace_and_never_provisioned);
async fn case_1_a_garbled_stored_model_is_ignored_named_in_the_trace_and_never_provisioned(
    db: TestDb,
) {
    let app = TestApp::spawn(&db).await;
    let ws = new_workspace();
    let byok = app
        .register(
            &ws,
            Some("claude-code"),
            Some("opus"),
            &["CLAUDE_CODE_OAUTH_TOKEN"],
        )
        .await;
    assert_eq!(byok.mode(), Mode::Byok);

    // "op us" can only get there by hand; it must not keep the workspace byok.
    write_model_by_hand(&db, &ws, "op us").await;
    let r = app.resolve(&ws).await;
    assert_eq!(
        (r.mode(), r.source()),
        (Mode::PlatformManaged, Source::Default),
        "{:?}",
        r.trace
    );
    assert_eq!(
        (r.model.as_str(), r.provider.as_str(), r.revision),
        ("", "", 1)
    );
    assert!(
        r.trace
            .iter()
            .any(|l| l.contains("op us") && l.contains("model")),
        "the trace names the ignored model: {:?}",
        r.trace
    );
    let mut candidate = proxy_inputs();
    candidate.push(env(
        Origin::Workspace,
        "CLAUDE_CODE_OAUTH_TOKEN",
        "customer-oauth",
    ));
    let built = app.build(&ws, candidate.clone()).await.unwrap();
    assert_eq!(built.resolution.as_ref(), Some(&r));
    let m = env_map(&built);
    assert_eq!(
        value(&m, "MOLECULE_LLM_BILLING_MODE"),
        Some("platform_managed")
    );
    assert!(
        !m.contains_key("MODEL_PROVIDER"),
        "the garbled model is never provisioned"
    );
    assert!(!m.contains_key("CLAUDE_CODE_OAUTH_TOKEN"));
    candidate.push(env(Origin::Global, "MODEL_PROVIDER", "op us"));
    let e = app.build(&ws, candidate).await.unwrap_err();
    assert_error(&e, Code::FailedPrecondition, "MODEL_MISMATCH");

    // Recording a valid model repairs it.
    let fixed = app
        .set(SetRequest {
            workspace_id: ws.clone(),
            model: Some("opus".into()),
            ..SetRequest::default()
        })
        .await;
    assert_eq!((fixed.mode(), fixed.revision), (Mode::Byok, 2));
    app.stop().await.unwrap();
}

// ---------------------------------------------------------------------------
// Seed case 2

backends!(case_2_byok_keeps_the_customers_own_token_and_platform_managed_is_forced_to_the_proxy);
async fn case_2_byok_keeps_the_customers_own_token_and_platform_managed_is_forced_to_the_proxy(
    db: TestDb,
) {
    let app = TestApp::spawn(&db).await;
    let mut candidate = vec![
        env(
            Origin::Workspace,
            "CLAUDE_CODE_OAUTH_TOKEN",
            "customer-oauth",
        ),
        env(Origin::Global, "ANTHROPIC_API_KEY", "platform-key"),
        env(
            Origin::Global,
            "ANTHROPIC_BASE_URL",
            "https://vendor.example",
        ),
        env(Origin::Global, "OPENAI_API_KEY", "platform-openai"),
        env(Origin::Workspace, "GEMINI_API_KEY", "customer-gemini"),
        env(Origin::Workspace, "APP_NAME", "demo"),
    ];
    candidate.extend(proxy_inputs());

    let byok = new_workspace();
    app.register(
        &byok,
        Some("claude-code"),
        Some("opus"),
        &["CLAUDE_CODE_OAUTH_TOKEN"],
    )
    .await;
    let built = app.build(&byok, candidate.clone()).await.unwrap();
    assert_eq!(built.resolution.as_ref().unwrap().mode(), Mode::Byok);
    let m = env_map(&built);
    assert_eq!(
        m["CLAUDE_CODE_OAUTH_TOKEN"],
        ("customer-oauth".to_owned(), Origin::Workspace)
    );
    for gone in [
        "ANTHROPIC_BASE_URL",
        "ANTHROPIC_API_KEY",
        "MOLECULE_LLM_USAGE_TOKEN",
        "MOLECULE_LLM_ANTHROPIC_BASE_URL",
        "OPENAI_API_KEY",
    ] {
        assert!(!m.contains_key(gone), "byok env has {gone}");
        assert!(
            built.removed_keys.iter().any(|k| k == gone),
            "{gone} listed as removed"
        );
    }
    assert_eq!(value(&m, "MOLECULE_LLM_BILLING_MODE"), Some("byok"));
    assert_eq!(
        value(&m, "MOLECULE_LLM_BILLING_MODE_RESOLVED"),
        Some("byok")
    );
    assert_eq!(m["APP_NAME"], ("demo".to_owned(), Origin::Workspace));
    // "No ANTHROPIC_API_KEY" means none injected: one the workspace owns is kept.
    let mut with_own = candidate.clone();
    with_own.push(env(Origin::Workspace, "ANTHROPIC_API_KEY", "customer-key"));
    let m = env_map(&app.build(&byok, with_own).await.unwrap());
    assert_eq!(
        m["ANTHROPIC_API_KEY"],
        ("customer-key".to_owned(), Origin::Workspace)
    );

    let pm = new_workspace();
    let r = app
        .register(&pm, Some("claude-code"), Some("claude-sonnet-4-6"), &[])
        .await;
    assert_eq!(r.mode(), Mode::PlatformManaged);
    let built = app.build(&pm, candidate.clone()).await.unwrap();
    let m = env_map(&built);
    // Every vendor key stripped, whatever its origin ...
    for key in &r.forbidden_secret_keys {
        if let Some((_, origin)) = m.get(key) {
            assert_eq!(
                *origin,
                Origin::Authority,
                "{key} survived from the candidate"
            );
        }
    }
    for gone in [
        "CLAUDE_CODE_OAUTH_TOKEN",
        "OPENAI_API_KEY",
        "GEMINI_API_KEY",
    ] {
        assert!(!m.contains_key(gone), "platform_managed env has {gone}");
    }
    // ... and the proxy forced.
    assert_eq!(value(&m, "ANTHROPIC_BASE_URL"), Some(PROXY_URL));
    assert_eq!(value(&m, "ANTHROPIC_API_KEY"), Some(USAGE_TOKEN));
    assert_eq!(
        value(&m, "MOLECULE_LLM_ANTHROPIC_BASE_URL"),
        Some(PROXY_URL)
    );
    assert_eq!(value(&m, "MOLECULE_LLM_USAGE_TOKEN"), Some(USAGE_TOKEN));
    assert_eq!(
        value(&m, "MOLECULE_LLM_BILLING_MODE"),
        Some("platform_managed")
    );
    assert_eq!(
        value(&m, "MOLECULE_LLM_BILLING_MODE_RESOLVED"),
        Some("platform_managed")
    );
    assert_eq!(m["APP_NAME"], ("demo".to_owned(), Origin::Workspace));
    app.stop().await.unwrap();
}

// ---------------------------------------------------------------------------
// Seed case 3

/// (runtime, model, owned keys) -> (mode, source, provider, provider_is_platform)
type Case3 = (
    Option<&'static str>,
    Option<&'static str>,
    &'static [&'static str],
    Mode,
    Source,
    &'static str,
    bool,
);

backends!(case_3_customer_provider_is_byok_platform_provider_is_platform_managed_none_is_default);
async fn case_3_customer_provider_is_byok_platform_provider_is_platform_managed_none_is_default(
    db: TestDb,
) {
    let app = TestApp::spawn(&db).await;

    let cases: [Case3; 11] = [
        (
            Some("langgraph"),
            Some("openai:gpt-4o"),
            &["OPENAI_API_KEY"],
            Mode::Byok,
            Source::DerivedProvider,
            "openai",
            false,
        ),
        (
            Some("hermes"),
            Some("gemini/gemini-2.5-pro"),
            &[],
            Mode::Byok,
            Source::DerivedProvider,
            "google",
            false,
        ),
        (
            Some("hermes"),
            Some("openai/gpt-4o"),
            &["OPENROUTER_API_KEY", "OPENAI_API_KEY"],
            Mode::Byok,
            Source::DerivedProvider,
            "openrouter",
            false,
        ),
        (
            Some("langgraph"),
            Some("openrouter:meta/llama-3"),
            &[],
            Mode::Byok,
            Source::DerivedProvider,
            "openrouter",
            false,
        ),
        (
            Some("langgraph"),
            Some("openai:gpt-4o"),
            &[],
            Mode::PlatformManaged,
            Source::DerivedProvider,
            "platform-openai",
            true,
        ),
        (
            Some("langgraph"),
            Some("claude-sonnet-4-6"),
            &["GROQ_API_KEY"],
            Mode::PlatformManaged,
            Source::DerivedProvider,
            "platform-anthropic",
            true,
        ),
        (
            Some("claude-code"),
            None,
            &["CLAUDE_CODE_OAUTH_TOKEN"],
            Mode::PlatformManaged,
            Source::Default,
            "",
            false,
        ),
        (
            None,
            Some("opus"),
            &["CLAUDE_CODE_OAUTH_TOKEN"],
            Mode::PlatformManaged,
            Source::Default,
            "",
            false,
        ),
        (
            Some("mystery-runtime"),
            Some("opus"),
            &["CLAUDE_CODE_OAUTH_TOKEN"],
            Mode::PlatformManaged,
            Source::Default,
            "",
            false,
        ),
        (
            Some("claude-code"),
            Some("gpt-4o"),
            &["OPENAI_API_KEY"],
            Mode::PlatformManaged,
            Source::Default,
            "",
            false,
        ),
        // Matching is case-sensitive: "Opus" is not a claude-code alias.
        (
            Some("claude-code"),
            Some("Opus"),
            &["CLAUDE_CODE_OAUTH_TOKEN"],
            Mode::PlatformManaged,
            Source::Default,
            "",
            false,
        ),
    ];
    for (runtime, model, keys, mode, source, provider, is_platform) in cases {
        let ws = new_workspace();
        app.register(&ws, runtime, model, keys).await;
        let r = app.resolve(&ws).await;
        let what = format!("{runtime:?} {model:?} {keys:?}");
        assert_eq!(
            (r.mode(), r.source()),
            (mode, source),
            "{what}: {:?}",
            r.trace
        );
        assert_eq!(
            (r.provider.as_str(), r.provider_is_platform),
            (provider, is_platform),
            "{what}"
        );
        assert_eq!(
            r.forbidden_secret_keys.is_empty(),
            mode != Mode::PlatformManaged,
            "{what}"
        );
        if source == Source::Default {
            assert!(
                r.trace.iter().any(|l| l.to_lowercase().contains("default")),
                "{what}: the trace names the default: {:?}",
                r.trace
            );
        } else {
            assert!(
                r.trace.iter().any(|l| l.contains(provider)),
                "{what}: {:?}",
                r.trace
            );
        }
    }
    app.stop().await.unwrap();
}

backends!(case_3_a_store_failure_gives_no_decision_at_all);
async fn case_3_a_store_failure_gives_no_decision_at_all(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let byok = new_workspace();
    app.register(
        &byok,
        Some("claude-code"),
        Some("opus"),
        &["CLAUDE_CODE_OAUTH_TOKEN"],
    )
    .await;
    let pm = new_workspace();
    app.register(&pm, Some("claude-code"), Some("claude-sonnet-4-6"), &[])
        .await;
    let mut candidate = proxy_inputs();
    candidate.push(env(
        Origin::Workspace,
        "CLAUDE_CODE_OAUTH_TOKEN",
        "customer-oauth",
    ));
    for ws in [&byok, &pm] {
        app.build(ws, candidate.clone()).await.unwrap();
    }

    // No default, no last known answer: no mode and no env.
    db.break_the_store().await;
    for ws in [&byok, &pm] {
        let e = app.try_resolve(ws).await.unwrap_err();
        assert_error(&e, Code::Unavailable, "STORE_UNAVAILABLE");
        let e = app.build(ws, candidate.clone()).await.unwrap_err();
        assert_error(&e, Code::Unavailable, "STORE_UNAVAILABLE");
    }
    app.stop().await.unwrap();
}

// ---------------------------------------------------------------------------
// Seed case 4

backends!(case_4_claude_code_on_opus_is_byok_on_read_and_provision_and_never_bills_the_platform);
async fn case_4_claude_code_on_opus_is_byok_on_read_and_provision_and_never_bills_the_platform(
    db: TestDb,
) {
    let app = TestApp::spawn(&db).await;
    let ws = new_workspace();
    app.register(
        &ws,
        Some("claude-code"),
        Some("opus"),
        &["CLAUDE_CODE_OAUTH_TOKEN"],
    )
    .await;

    let read = app.resolve(&ws).await;
    assert_eq!(
        (read.mode(), read.source()),
        (Mode::Byok, Source::DerivedProvider)
    );
    assert_eq!(
        (read.provider.as_str(), read.provider_is_platform),
        ("anthropic-oauth", false)
    );

    let mut base = vec![
        env(
            Origin::Workspace,
            "CLAUDE_CODE_OAUTH_TOKEN",
            "customer-oauth",
        ),
        env(Origin::Global, "CLAUDE_CODE_OAUTH_TOKEN", "platform-oauth"),
    ];
    base.extend(proxy_inputs());
    let mut first = base.clone();
    first.push(env(Origin::Global, "MODEL_PROVIDER", "opus"));

    let provision = app.build(&ws, first).await.unwrap();
    assert_eq!(
        provision.resolution.as_ref(),
        Some(&read),
        "Resolve and BuildEnv say the same"
    );
    let m = env_map(&provision);
    assert_eq!(
        m["CLAUDE_CODE_OAUTH_TOKEN"],
        ("customer-oauth".to_owned(), Origin::Workspace)
    );
    assert_eq!(value(&m, "MOLECULE_LLM_BILLING_MODE"), Some("byok"));
    for proxy in [
        "ANTHROPIC_BASE_URL",
        "ANTHROPIC_API_KEY",
        "MOLECULE_LLM_USAGE_TOKEN",
        "MOLECULE_LLM_ANTHROPIC_BASE_URL",
    ] {
        assert!(!m.contains_key(proxy), "no proxy in byok: {proxy}");
    }
    assert_eq!(value(&m, "MODEL_PROVIDER"), Some("opus"));

    // Re-provision: the request carries no model at all. Same answer.
    let again = app.build(&ws, base.clone()).await.unwrap();
    assert_eq!(again.resolution.as_ref(), Some(&read));
    assert_eq!(again.env, provision.env);

    // Without the customer's own token: refused, not billed to the platform.
    let platform_only: Vec<EnvVar> = base
        .iter()
        .filter(|e| e.origin() != Origin::Workspace)
        .cloned()
        .collect();
    let e = app.build(&ws, platform_only).await.unwrap_err();
    assert_error(&e, Code::FailedPrecondition, "MISSING_BYOK_CREDENTIAL");

    // "Whatever else is present": other owned keys, or none recorded, change nothing.
    for keys in [
        &[
            "ANTHROPIC_API_KEY",
            "CLAUDE_CODE_OAUTH_TOKEN",
            "OPENAI_API_KEY",
        ][..],
        &["ANTHROPIC_API_KEY"][..],
        &[][..],
    ] {
        let r = app
            .register(&ws, Some("claude-code"), Some("opus"), keys)
            .await;
        assert_eq!(
            (r.mode(), r.provider.as_str()),
            (Mode::Byok, "anthropic-oauth"),
            "{keys:?}"
        );
        let b = app.build(&ws, base.clone()).await.unwrap();
        assert_eq!(b.resolution.as_ref(), Some(&r));
    }
    app.stop().await.unwrap();
}

// ---------------------------------------------------------------------------
// Parity: the provision path and the read path make one decision

const RUNTIMES: [&str; 10] = [
    "claude-code",
    "claude-code",
    "hermes",
    "hermes",
    "langgraph",
    "crewai",
    "gemini-cli",
    "codex",
    "mystery-runtime",
    "",
];

const MODELS: [&str; 26] = [
    "opus",
    "sonnet",
    "haiku",
    "claude-sonnet-4-6",
    "claude-opus-4-7",
    "anthropic:claude-sonnet-4-6",
    "openai:gpt-4o",
    "openrouter:meta/llama-3",
    "groq:llama3-70b",
    "google_genai:gemini-2.0-flash",
    "gpt-4o",
    "anthropic/claude-3-5-sonnet",
    "openai/gpt-4o",
    "openrouter/mistral-large",
    "custom/my-model",
    "gemini/gemini-2.5-pro",
    "minimax/abab6",
    "deepseek/deepseek-chat",
    "qwen/qwen-max",
    "nousresearch/hermes-3",
    "gemini-2.5-pro",
    "gpt-5",
    "MiniMax-M1",
    "Opus",
    "unknown-model",
    "",
];

/// (runtime, model, a credential that makes it the customer's provider).
const FITTING: [(&str, &str, &str); 12] = [
    ("claude-code", "opus", "CLAUDE_CODE_OAUTH_TOKEN"),
    ("claude-code", "sonnet", "CLAUDE_CODE_OAUTH_TOKEN"),
    ("claude-code", "claude-opus-4-7", "ANTHROPIC_API_KEY"),
    ("langgraph", "openai:gpt-4o", "OPENAI_API_KEY"),
    (
        "langgraph",
        "anthropic:claude-sonnet-4-6",
        "ANTHROPIC_API_KEY",
    ),
    ("crewai", "groq:llama3-70b", "GROQ_API_KEY"),
    ("hermes", "openai/gpt-4o", "OPENROUTER_API_KEY"),
    ("hermes", "deepseek/deepseek-chat", "DEEPSEEK_API_KEY"),
    ("hermes", "custom/my-model", "HERMES_CUSTOM_API_KEY"),
    ("hermes", "nousresearch/hermes-3", "NOUS_API_KEY"),
    ("gemini-cli", "gemini-2.5-pro", "GEMINI_API_KEY"),
    ("codex", "gpt-5", "OPENAI_API_KEY"),
];

const CREDENTIALS: [&str; 12] = [
    "CLAUDE_CODE_OAUTH_TOKEN",
    "ANTHROPIC_API_KEY",
    "OPENAI_API_KEY",
    "OPENROUTER_API_KEY",
    "GEMINI_API_KEY",
    "GROQ_API_KEY",
    "HERMES_CUSTOM_API_KEY",
    "DEEPSEEK_API_KEY",
    "MINIMAX_API_KEY",
    "QWEN_API_KEY",
    "NOUS_API_KEY",
    "UNKNOWN_VENDOR_KEY",
];

backends!(build_env_and_resolve_make_the_same_decision_for_sixty_random_workspaces);
/// The parity test guards the incident behind seed case 4: the read API said
/// `byok` while the provisioner provisioned `platform_managed`. For many random
/// workspaces it checks that BuildEnv's resolution is exactly Resolve's at the
/// same revision, that the env it builds says the same mode, and that every
/// refusal is the one Resolve's mode implies.
///
/// Forcing the provision path to `platform_managed` (e.g. in
/// `src/service/mod.rs`, `build_env`, replacing the resolution from
/// `resolve(&record, &self.registry)` with one whose `mode` is
/// `Mode::PlatformManaged`) turns this test red: the byok workspaces then get a
/// platform_managed resolution and env (or MISSING_PLATFORM_PROXY), which
/// differs from Resolve's. Both variants were tried and turned this test red:
/// returning the forced resolution (BuildEnv's resolution differs from
/// Resolve's), and building the env from a forced resolution while returning
/// the real one (`MOLECULE_LLM_BILLING_MODE` differs from Resolve's mode).
async fn build_env_and_resolve_make_the_same_decision_for_sixty_random_workspaces(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    // The same workspaces on both backends.
    let mut rng = StdRng::seed_from_u64(0x00b1_11ed);
    let mut successes: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut refusals: BTreeMap<String, usize> = BTreeMap::new();
    // Every LLM key, by name: what a platform_managed resolution forbids.
    let reference = new_workspace();
    let llm_keys = app
        .register(
            &reference,
            Some("claude-code"),
            Some("claude-sonnet-4-6"),
            &[],
        )
        .await
        .forbidden_secret_keys;
    assert!(llm_keys.len() > 10, "{llm_keys:?}");

    for i in 0..60 {
        let ws = new_workspace();
        let n_keys = rng.gen_range(0..=2);
        let mut keys: Vec<&str> = CREDENTIALS
            .choose_multiple(&mut rng, n_keys)
            .copied()
            .collect();
        // Usually a combination the registry knows, often with its key.
        let (runtime, model) = if rng.gen_bool(0.6) {
            let (runtime, model, key) = *FITTING.choose(&mut rng).unwrap();
            if rng.gen_bool(0.7) && !keys.contains(&key) {
                keys.push(key);
            }
            (runtime, model)
        } else {
            (
                *RUNTIMES.choose(&mut rng).unwrap(),
                *MODELS.choose(&mut rng).unwrap(),
            )
        };
        let over = match rng.gen_range(0..10) {
            0 => Some(Mode::PlatformManaged),
            1 | 2 => Some(Mode::Byok),
            3 => Some(Mode::Disabled),
            _ => None,
        };
        app.register(&ws, Some(runtime), Some(model), &keys).await;
        if let Some(m) = over {
            app.set_override(&ws, m, "parity test").await;
        }

        // The candidate env, built from the record's inputs only.
        let mut candidate = vec![
            env(Origin::Workspace, "APP_NAME", "demo"),
            env(Origin::Global, "LOG_LEVEL", "info"),
        ];
        if rng.gen_bool(0.85) {
            for k in &keys {
                candidate.push(env(Origin::Workspace, k, &format!("customer-{k}")));
            }
        }
        if rng.gen_bool(0.2) {
            let extra = *CREDENTIALS.choose(&mut rng).unwrap();
            if !keys.contains(&extra) {
                candidate.push(env(Origin::Workspace, extra, "customer-extra"));
            }
        }
        let with_proxy = rng.gen_bool(0.85);
        if with_proxy {
            candidate.extend(proxy_inputs());
            candidate.push(env(
                Origin::Platform,
                "MOLECULE_LLM_OPENAI_BASE_URL",
                "https://proxy.example/openai",
            ));
        }
        if rng.gen_bool(0.5) {
            candidate.push(env(Origin::Global, "ANTHROPIC_API_KEY", "platform-key"));
            candidate.push(env(
                Origin::Global,
                "CLAUDE_CODE_OAUTH_TOKEN",
                "platform-oauth",
            ));
        }
        let wrong_model = match rng.gen_range(0..10) {
            0 => {
                candidate.push(env(Origin::Global, "MODEL_PROVIDER", "some-other-model"));
                true
            }
            1..=3 if !model.is_empty() => {
                candidate.push(env(Origin::Workspace, "MODEL_PROVIDER", model));
                false
            }
            _ => false,
        };
        candidate.shuffle(&mut rng);

        let read = app.resolve(&ws).await;
        let what = format!("#{i} {runtime:?} {model:?} {keys:?} override {over:?}");
        match app.build(&ws, candidate).await {
            Ok(resp) => {
                assert!(!wrong_model, "{what}: a wrong model was accepted");
                assert_eq!(
                    resp.resolution.as_ref(),
                    Some(&read),
                    "{what}: BuildEnv decided otherwise"
                );
                let m = env_map(&resp);
                let mode = match read.mode() {
                    Mode::PlatformManaged => "platform_managed",
                    Mode::Byok => "byok",
                    Mode::Disabled => "disabled",
                    Mode::Unspecified => panic!("{what}: Resolve returned no mode"),
                };
                for var in [
                    "MOLECULE_LLM_BILLING_MODE",
                    "MOLECULE_LLM_BILLING_MODE_RESOLVED",
                ] {
                    assert_eq!(
                        m[var],
                        (mode.to_owned(), Origin::Authority),
                        "{what}: {var}"
                    );
                }
                if read.mode() == Mode::PlatformManaged {
                    assert_eq!(read.forbidden_secret_keys, llm_keys, "{what}");
                    for key in &read.forbidden_secret_keys {
                        if let Some((_, origin)) = m.get(key) {
                            assert_eq!(
                                *origin,
                                Origin::Authority,
                                "{what}: {key} kept in platform_managed"
                            );
                        }
                    }
                } else {
                    assert!(
                        !m.contains_key("MOLECULE_LLM_USAGE_TOKEN"),
                        "{what}: usage token outside platform_managed"
                    );
                    assert!(
                        !m.contains_key("MOLECULE_LLM_ANTHROPIC_BASE_URL"),
                        "{what}: proxy outside platform_managed"
                    );
                    for (key, (_, origin)) in &m {
                        if read.mode() == Mode::Byok && *origin == Origin::Workspace {
                            continue;
                        }
                        let marker = key.starts_with("MOLECULE_LLM_BILLING_MODE");
                        assert!(
                            marker || !llm_keys.contains(key),
                            "{what}: {key} ({origin:?}) in a {mode} env"
                        );
                    }
                }
                *successes.entry(mode).or_default() += 1;
            }
            Err(e) => {
                let info = tonic_types::StatusExt::get_details_error_info(&e).expect("ErrorInfo");
                assert_eq!(e.code(), Code::FailedPrecondition, "{what}: {e:?}");
                match info.reason.as_str() {
                    "MODEL_MISMATCH" => assert!(wrong_model, "{what}: {e:?}"),
                    "MISSING_BYOK_CREDENTIAL" => {
                        assert!(!wrong_model, "{what}: MODEL_MISMATCH comes first");
                        assert_eq!(
                            read.mode(),
                            Mode::Byok,
                            "{what}: refused as byok but Resolve says otherwise"
                        );
                    }
                    "MISSING_PLATFORM_PROXY" => {
                        assert!(!wrong_model, "{what}: MODEL_MISMATCH comes first");
                        assert_eq!(
                            read.mode(),
                            Mode::PlatformManaged,
                            "{what}: refused as platform_managed but Resolve says otherwise"
                        );
                        assert!(!with_proxy, "{what}: the proxy inputs were given");
                    }
                    other => panic!("{what}: unexpected refusal {other}: {e:?}"),
                }
                *refusals.entry(info.reason).or_default() += 1;
            }
        }
    }
    eprintln!(
        "{:?}: successes {successes:?}, refusals {refusals:?}",
        db.backend
    );
    let total: usize = successes.values().sum();
    assert!(
        total >= 35,
        "too few successes to mean anything: {successes:?} {refusals:?}"
    );
    for mode in ["platform_managed", "byok", "disabled"] {
        assert!(
            successes.get(mode).copied().unwrap_or(0) >= 3,
            "too few {mode} successes: {successes:?}"
        );
    }
    app.stop().await.unwrap();
}

// ---------------------------------------------------------------------------
// Seed case 1, after the decision: a hand-edited record and ListDrift

backends!(a_record_edited_by_hand_is_drift_of_its_own_and_hides_no_other_drift);
async fn a_record_edited_by_hand_is_drift_of_its_own_and_hides_no_other_drift(db: TestDb) {
    use billing_mode::proto::{ListDriftRequest, ReportAppliedRequest};
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let report = |ws: &str, revision: u64, mode: Mode, instance: &str| ReportAppliedRequest {
        workspace_id: ws.to_owned(),
        revision,
        mode: mode.into(),
        instance: instance.to_owned(),
    };
    // Edited: started byok at revision 1; then its override garbled by hand.
    let edited = new_workspace();
    app.set_override(&edited, Mode::Byok, "customer key").await;
    c.report_applied(report(&edited, 1, Mode::Byok, "pod-edited"))
        .await
        .unwrap();
    // Drifted the usual way: byok at revision 1, platform_managed at 2.
    let moved = new_workspace();
    app.set_override(&moved, Mode::Byok, "customer key").await;
    c.report_applied(report(&moved, 1, Mode::Byok, "pod-moved"))
        .await
        .unwrap();
    app.set_override(&moved, Mode::PlatformManaged, "back to the platform")
        .await;
    write_override_by_hand(&db, &edited, "Byok", true)
        .await
        .unwrap();
    let now = app.resolve(&edited).await;
    assert_ne!(now.mode(), Mode::Byok, "the garbled override is ignored");
    assert_eq!(now.revision, 1, "a hand edit is no revision");

    let listed = c
        .list_drift(ListDriftRequest::default())
        .await
        .expect("one hand-edited record does not fail the listing")
        .into_inner()
        .drift;
    let find = |instance: &str| {
        listed
            .iter()
            .find(|d| d.instance == instance)
            .unwrap_or_else(|| panic!("{instance} not listed: {listed:?}"))
    };
    let moved_drift = find("pod-moved");
    assert_eq!(
        moved_drift.current.as_ref().unwrap().mode(),
        Mode::PlatformManaged
    );
    // The edited record is in force (Resolve and BuildEnv answer from it),
    // so its instance, started byok, has drifted since its revision was
    // committed.
    let edited_drift = find("pod-edited");
    assert_eq!(edited_drift.current.as_ref().unwrap(), &now);
    assert_eq!(edited_drift.applied_mode(), Mode::Byok);
    let committed = c
        .history(billing_mode::proto::HistoryRequest {
            workspace_id: edited.clone(),
            page_size: 10,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .find(|e| e.revision == 1)
        .and_then(|e| e.time);
    assert!(committed.is_some());
    assert_eq!(edited_drift.since, committed);
}

// ---------------------------------------------------------------------------
// Seed case 1, and the spend snapshot

/// CheckSpend on `app` until it answers `ws` with `mode` at `revision`;
/// panics after `bound`, naming the last answer.
async fn spend_answers(app: &TestApp, ws: &str, mode: Mode, revision: u64, bound: Duration) {
    use billing_mode::proto::CheckSpendRequest;
    let mut c = app.client().await;
    let start = std::time::Instant::now();
    loop {
        let last = c
            .check_spend(CheckSpendRequest {
                workspace_id: ws.to_owned(),
            })
            .await
            .map(|r| r.into_inner());
        if let Ok(a) = &last {
            if a.mode() == mode && a.revision == revision {
                assert_eq!(a.allowed, mode == Mode::PlatformManaged, "{a:?}");
                return;
            }
        }
        assert!(
            start.elapsed() < bound,
            "CheckSpend does not answer {mode:?} at revision {revision} within {bound:?}: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

backends!(
    a_record_changed_by_hand_reaches_check_spend_too,
    flavor = "multi_thread",
    worker_threads = 2
);
/// Seed case 1's operator, who wrote an override straight into the
/// database: no change is logged, so nothing tells the replicas' spend
/// snapshots. Resolve reads the record and ignores the garbled override;
/// CheckSpend, answering from memory, must come to the same answer (here:
/// the platform stops paying), not keep the old one until a restart.
async fn a_record_changed_by_hand_reaches_check_spend_too(db: TestDb) {
    const RECHECK: Duration = Duration::from_millis(300);
    let app = TestApp::spawn_with(billing_mode::config::Config {
        spend_recheck_interval: RECHECK,
        ..config(&db)
    })
    .await;
    let ws = new_workspace();
    app.set(SetRequest {
        workspace_id: ws.clone(),
        runtime: Some("claude-code".into()),
        model: Some("opus".into()),
        credential_keys: Some(billing_mode::proto::CredentialKeys {
            keys: vec!["CLAUDE_CODE_OAUTH_TOKEN".into()],
        }),
        reason: "register".into(),
        ..SetRequest::default()
    })
    .await;
    let forced = app
        .set_override(&ws, Mode::PlatformManaged, "the platform pays")
        .await;
    assert_eq!(forced.revision, 2);
    let bound = Duration::from_secs(10);
    spend_answers(&app, &ws, Mode::PlatformManaged, 2, bound).await;

    // Garbled by hand: the record's decision is no longer platform_managed.
    assert_eq!(
        write_override_by_hand(&db, &ws, "Platform_managed", true)
            .await
            .unwrap(),
        1
    );
    let now = app.resolve(&ws).await;
    assert_eq!(now.revision, 2);
    assert_ne!(now.mode(), Mode::PlatformManaged, "{now:?}");
    spend_answers(&app, &ws, now.mode(), 2, bound).await;

    // A hand edit that also moved the revision on, to a valid override.
    let edit = match db.backend {
        Backend::Sqlite => format!(
            "UPDATE billing_records SET override_mode = 'disabled', revision = 3 \
             WHERE workspace_id = '{ws}'"
        ),
        Backend::Postgres => format!(
            "UPDATE billing_records SET override_mode = 'disabled', revision = 3 \
             WHERE workspace_id = '{ws}'::uuid"
        ),
    };
    db.execute(&[edit.as_str()]).await;
    assert_eq!(app.resolve(&ws).await.mode(), Mode::Disabled);
    spend_answers(&app, &ws, Mode::Disabled, 3, bound).await;
}
