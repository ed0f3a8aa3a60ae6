//! Black-box tests of `molecule.billing.v1.BillingMode` over gRPC: every RPC
//! succeeding, every error reason a server without tokens can produce (with
//! its code and precedence), idempotent retries, health, reflection, restart
//! and shutdown. Every test runs on SQLite and, when `DATABASE_URL` points at
//! Postgres, on Postgres too.

use crate::helpers::*;
use billing_mode::config::Config;
use billing_mode::proto::{
    BuildEnvResponse, ClearRequest, EnvVar, Mode, Origin, RecordFields, Resolution, SetRequest,
    Source,
};
use tonic::{Code, Status};

// ---------------------------------------------------------------------------
// Helpers

async fn clear(c: &mut Client, ws: &str, reason: &str) -> Result<Resolution, Status> {
    c.clear(ClearRequest {
        workspace_id: ws.to_owned(),
        expected_revision: None,
        reason: reason.to_owned(),
        dry_run: false,
    })
    .await
    .map(|r| {
        r.into_inner()
            .resolution
            .expect("Clear returns a resolution")
    })
}

async fn history_revisions(c: &mut Client, ws: &str) -> Vec<u64> {
    try_history(c, ws, 0, "")
        .await
        .expect("History succeeds")
        .entries
        .iter()
        .map(|e| e.revision)
        .collect()
}

/// The PLATFORM-origin proxy inputs for the Anthropic family.
fn anthropic_proxy() -> Vec<EnvVar> {
    vec![
        env(
            Origin::Platform,
            "MOLECULE_LLM_ANTHROPIC_BASE_URL",
            "https://proxy.example/anthropic",
        ),
        env(
            Origin::Platform,
            "MOLECULE_LLM_USAGE_TOKEN",
            "usage-token-1",
        ),
    ]
}

/// The final env as (key, value, origin) triples, in response order.
fn triples(resp: &BuildEnvResponse) -> Vec<(String, String, Origin)> {
    resp.env
        .iter()
        .map(|e| (e.key.clone(), e.value.clone(), e.origin()))
        .collect()
}

fn t(key: &str, value: &str, origin: Origin) -> (String, String, Origin) {
    (key.to_owned(), value.to_owned(), origin)
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

fn trace_has(r: &Resolution, needles: &[&str]) -> bool {
    r.trace
        .iter()
        .any(|line| needles.iter().all(|n| line.contains(n)))
}

/// Keys that must be in every `forbidden_secret_keys` list (built-in registry).
const MUST_FORBID: [&str; 12] = [
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "ANTHROPIC_BASE_URL",
    "CLAUDE_CODE_OAUTH_TOKEN",
    "GEMINI_API_KEY",
    "HERMES_CUSTOM_BASE_URL",
    "MOLECULE_LLM_ANTHROPIC_BASE_URL",
    "MOLECULE_LLM_OPENAI_BASE_URL",
    "MOLECULE_LLM_USAGE_TOKEN",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "OPENROUTER_API_KEY",
];

fn assert_forbidden_list(r: &Resolution) {
    let keys = &r.forbidden_secret_keys;
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(keys, &sorted, "forbidden_secret_keys sorted and unique");
    for k in MUST_FORBID {
        assert!(keys.iter().any(|x| x == k), "{k} missing from {keys:?}");
    }
    for k in keys {
        // Credentials, endpoints and proxy inputs only: never a model
        // variable or the billing-mode markers.
        assert!(
            k.starts_with("MOLECULE_LLM_") && !k.starts_with("MOLECULE_LLM_BILLING_MODE")
                || k.ends_with("_KEY")
                || k.ends_with("_TOKEN")
                || k.ends_with("_BASE_URL"),
            "{k} is not a credential, endpoint or proxy input"
        );
    }
    assert!(!keys
        .iter()
        .any(|k| k == "MODEL_PROVIDER" || k == "HERMES_DEFAULT_MODEL"));
}

// ---------------------------------------------------------------------------
// Every RPC succeeding

backends!(resolve_returns_the_recorded_decision_with_provider_trace_and_sorted_credentials);
async fn resolve_returns_the_recorded_decision_with_provider_trace_and_sorted_credentials(
    db: TestDb,
) {
    let app = TestApp::spawn(&db).await;
    let ws = new_workspace();
    app.set(fields(
        &ws,
        Some("claude-code"),
        Some("opus"),
        Some(&[
            "OPENAI_API_KEY",
            "CLAUDE_CODE_OAUTH_TOKEN",
            "OPENAI_API_KEY",
        ]),
    ))
    .await;

    let r = app.resolve(&ws).await;
    assert_eq!(r.workspace_id, ws);
    assert_eq!(r.mode(), Mode::Byok);
    assert_eq!(r.source(), Source::DerivedProvider);
    assert_eq!(r.provider, "anthropic-oauth");
    assert!(!r.provider_is_platform);
    assert_eq!(r.runtime, "claude-code");
    assert_eq!(r.model, "opus");
    assert_eq!(r.override_mode(), Mode::Unspecified);
    assert_eq!(r.revision, 1);
    assert_eq!(
        r.credential_keys,
        strings(&["CLAUDE_CODE_OAUTH_TOKEN", "OPENAI_API_KEY"])
    );
    assert!(r.forbidden_secret_keys.is_empty(), "byok forbids nothing");
    assert!(!r.trace.is_empty());
    assert!(
        trace_has(&r, &["rule", "opus"]),
        "trace names the matching rule: {:?}",
        r.trace
    );
    assert!(trace_has(&r, &["anthropic-oauth"]), "{:?}", r.trace);
    assert!(trace_has(&r, &["DERIVED_PROVIDER"]), "{:?}", r.trace);

    // Any case in, lower case out: the same record.
    let upper = app.resolve(&ws.to_uppercase()).await;
    assert_eq!(upper, r);
    app.stop().await.unwrap();
}

backends!(set_creates_the_record_then_replaces_only_the_fields_present_and_empty_clears);
async fn set_creates_the_record_then_replaces_only_the_fields_present_and_empty_clears(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let ws = new_workspace();

    // Create with an upper-case id: stored and echoed in lower case.
    let r1 = app
        .register(
            &ws.to_uppercase(),
            "hermes",
            "openai/gpt-4o",
            &["OPENROUTER_API_KEY"],
        )
        .await;
    assert_eq!(r1.workspace_id, ws);
    assert_eq!(r1.revision, 1);
    assert_eq!(
        (r1.mode(), r1.source()),
        (Mode::Byok, Source::DerivedProvider)
    );
    assert_eq!(r1.provider, "openrouter");

    // Only the credential set changes: runtime and model are kept.
    let r2 = app
        .set(fields(&ws, None, None, Some(&["OPENAI_API_KEY"])))
        .await;
    assert_eq!(r2.revision, 2);
    assert_eq!(
        (r2.runtime.as_str(), r2.model.as_str()),
        ("hermes", "openai/gpt-4o")
    );
    assert_eq!(r2.credential_keys, strings(&["OPENAI_API_KEY"]));
    assert_eq!((r2.mode(), r2.provider.as_str()), (Mode::Byok, "openai"));

    // A present, empty credential list clears the set: the platform's provider.
    let r3 = app.set(fields(&ws, None, None, Some(&[]))).await;
    assert_eq!(r3.revision, 3);
    assert!(r3.credential_keys.is_empty());
    assert_eq!(
        (r3.mode(), r3.source()),
        (Mode::PlatformManaged, Source::DerivedProvider)
    );
    assert_eq!(r3.provider, "platform-openai");
    assert!(r3.provider_is_platform);
    assert_forbidden_list(&r3);

    // An empty model clears it: the closed default.
    let r4 = app.set(fields(&ws, None, Some(""), None)).await;
    assert_eq!(r4.revision, 4);
    assert_eq!((r4.runtime.as_str(), r4.model.as_str()), ("hermes", ""));
    assert_eq!(
        (r4.mode(), r4.source()),
        (Mode::PlatformManaged, Source::Default)
    );
    assert_eq!(r4.provider, "");
    assert!(!r4.provider_is_platform);
    assert!(
        trace_has(&r4, &["model"]),
        "trace says no model: {:?}",
        r4.trace
    );
    assert!(
        r4.trace
            .iter()
            .any(|l| l.to_lowercase().contains("default")),
        "trace names the default rung: {:?}",
        r4.trace
    );

    // An empty runtime clears it too; the record still exists.
    let r5 = app.set(fields(&ws, Some(""), None, None)).await;
    assert_eq!((r5.revision, r5.runtime.as_str()), (5, ""));
    assert_eq!(app.resolve(&ws).await, r5);
    app.stop().await.unwrap();
}

backends!(an_override_decides_the_mode_the_derived_provider_is_still_shown_and_clear_removes_it);
async fn an_override_decides_the_mode_the_derived_provider_is_still_shown_and_clear_removes_it(
    db: TestDb,
) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let ws = new_workspace();
    let derived = app
        .register(&ws, "claude-code", "claude-sonnet-4-6", &[])
        .await;
    assert_eq!(
        (derived.mode(), derived.provider.as_str()),
        (Mode::PlatformManaged, "platform-anthropic")
    );

    let o = app
        .set_override(&ws, Mode::Disabled, "customer suspended")
        .await;
    assert_eq!(o.revision, 2);
    assert_eq!((o.mode(), o.source()), (Mode::Disabled, Source::Override));
    assert_eq!(o.override_mode(), Mode::Disabled);
    assert_eq!(
        o.provider, "platform-anthropic",
        "provider filled under an override"
    );
    assert!(o.provider_is_platform);
    assert!(
        o.forbidden_secret_keys.is_empty(),
        "only platform_managed forbids keys"
    );
    assert!(trace_has(&o, &["override", "disabled"]), "{:?}", o.trace);
    assert_eq!(app.resolve(&ws).await, o);

    let p = app
        .set_override(&ws, Mode::PlatformManaged, "explicitly platform")
        .await;
    assert_eq!(
        (p.mode(), p.source(), p.revision),
        (Mode::PlatformManaged, Source::Override, 3)
    );
    assert_forbidden_list(&p);

    let cleared = clear(&mut c, &ws, "back to derivation").await.unwrap();
    assert_eq!(cleared.revision, 4);
    assert_eq!(cleared.override_mode(), Mode::Unspecified);
    assert_eq!(
        (cleared.mode(), cleared.source()),
        (Mode::PlatformManaged, Source::DerivedProvider)
    );
    assert_eq!(app.resolve(&ws).await, cleared);
    app.stop().await.unwrap();
}

backends!(build_env_in_platform_managed_strips_every_vendor_key_and_routes_through_the_proxy);
async fn build_env_in_platform_managed_strips_every_vendor_key_and_routes_through_the_proxy(
    db: TestDb,
) {
    let app = TestApp::spawn(&db).await;
    let ws = new_workspace();
    app.register(&ws, "claude-code", "claude-sonnet-4-6", &[])
        .await;
    let mut candidate = vec![
        env(Origin::Workspace, "ANTHROPIC_API_KEY", "customer-key"),
        env(Origin::Global, "ANTHROPIC_API_KEY", "platform-key"),
        env(Origin::Global, "ANTHROPIC_AUTH_TOKEN", "platform-auth"),
        env(
            Origin::Workspace,
            "CLAUDE_CODE_OAUTH_TOKEN",
            "customer-oauth",
        ),
        env(Origin::Global, "OPENAI_API_KEY", "global-openai"),
        env(
            Origin::Workspace,
            "HERMES_CUSTOM_BASE_URL",
            "https://custom.example",
        ),
        env(
            Origin::Workspace,
            "MOLECULE_LLM_USAGE_TOKEN",
            "forged-token",
        ),
        env(Origin::Workspace, "MOLECULE_LLM_BILLING_MODE", "byok"),
        env(Origin::Workspace, "APP_NAME", "demo"),
        env(Origin::Platform, "REGION", "eu"),
    ];
    candidate.extend(anthropic_proxy());
    let resp = app.build(&ws, candidate.clone()).await.unwrap();
    let r = resp.resolution.clone().unwrap();
    assert_eq!(
        (r.mode(), r.provider.as_str()),
        (Mode::PlatformManaged, "platform-anthropic")
    );
    assert_eq!(r, app.resolve(&ws).await);
    let proxy = "https://proxy.example/anthropic";
    assert_eq!(
        triples(&resp),
        vec![
            t("ANTHROPIC_API_KEY", "usage-token-1", Origin::Authority),
            t("ANTHROPIC_BASE_URL", proxy, Origin::Authority),
            t("APP_NAME", "demo", Origin::Workspace),
            t("MODEL_PROVIDER", "claude-sonnet-4-6", Origin::Authority),
            t("MOLECULE_LLM_ANTHROPIC_BASE_URL", proxy, Origin::Authority),
            t(
                "MOLECULE_LLM_BILLING_MODE",
                "platform_managed",
                Origin::Authority
            ),
            t(
                "MOLECULE_LLM_BILLING_MODE_RESOLVED",
                "platform_managed",
                Origin::Authority
            ),
            t(
                "MOLECULE_LLM_USAGE_TOKEN",
                "usage-token-1",
                Origin::Authority
            ),
            t("REGION", "eu", Origin::Platform),
        ]
    );
    assert_eq!(
        resp.removed_keys,
        strings(&[
            "ANTHROPIC_AUTH_TOKEN",
            "CLAUDE_CODE_OAUTH_TOKEN",
            "HERMES_CUSTOM_BASE_URL",
            "OPENAI_API_KEY"
        ])
    );
    assert_eq!(
        resp.added_keys,
        strings(&[
            "ANTHROPIC_API_KEY",
            "ANTHROPIC_BASE_URL",
            "MODEL_PROVIDER",
            "MOLECULE_LLM_ANTHROPIC_BASE_URL",
            "MOLECULE_LLM_BILLING_MODE",
            "MOLECULE_LLM_BILLING_MODE_RESOLVED",
            "MOLECULE_LLM_USAGE_TOKEN",
        ])
    );

    // With the OpenAI family's proxy given too, that family is routed as well.
    candidate.push(env(
        Origin::Platform,
        "MOLECULE_LLM_OPENAI_BASE_URL",
        "https://proxy.example/openai",
    ));
    let resp = app.build(&ws, candidate).await.unwrap();
    let m = env_map(&resp);
    assert_eq!(
        m["OPENAI_API_KEY"],
        ("usage-token-1".to_owned(), Origin::Authority)
    );
    assert_eq!(
        m["OPENAI_BASE_URL"],
        ("https://proxy.example/openai".to_owned(), Origin::Authority)
    );
    assert!(!resp.removed_keys.contains(&"OPENAI_API_KEY".to_owned()));
    assert!(resp.added_keys.contains(&"OPENAI_BASE_URL".to_owned()));
    app.stop().await.unwrap();
}

backends!(build_env_in_byok_keeps_only_the_workspaces_own_credentials_and_no_proxy);
async fn build_env_in_byok_keeps_only_the_workspaces_own_credentials_and_no_proxy(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let ws = new_workspace();
    app.register(&ws, "claude-code", "opus", &["CLAUDE_CODE_OAUTH_TOKEN"])
        .await;
    let mut candidate = vec![
        env(
            Origin::Workspace,
            "CLAUDE_CODE_OAUTH_TOKEN",
            "customer-oauth",
        ),
        env(Origin::Global, "CLAUDE_CODE_OAUTH_TOKEN", "platform-oauth"),
        env(Origin::Workspace, "ANTHROPIC_API_KEY", "customer-api-key"),
        env(Origin::Global, "OPENAI_API_KEY", "platform-openai"),
        env(
            Origin::Global,
            "ANTHROPIC_BASE_URL",
            "https://global.example",
        ),
        env(Origin::Workspace, "MOLECULE_LLM_CUSTOM", "self-minted"),
        env(Origin::Workspace, "APP_NAME", "demo"),
        env(Origin::Global, "LOG_LEVEL", "debug"),
        env(Origin::Platform, "REGION", "eu"),
        env(Origin::Global, "MODEL_PROVIDER", "opus"),
    ];
    candidate.extend(anthropic_proxy());
    let resp = app.build(&ws, candidate).await.unwrap();
    let r = resp.resolution.clone().unwrap();
    assert_eq!(
        (r.mode(), r.provider.as_str()),
        (Mode::Byok, "anthropic-oauth")
    );
    assert_eq!(r, app.resolve(&ws).await);
    assert_eq!(
        triples(&resp),
        vec![
            t("ANTHROPIC_API_KEY", "customer-api-key", Origin::Workspace),
            t("APP_NAME", "demo", Origin::Workspace),
            t(
                "CLAUDE_CODE_OAUTH_TOKEN",
                "customer-oauth",
                Origin::Workspace
            ),
            t("LOG_LEVEL", "debug", Origin::Global),
            t("MODEL_PROVIDER", "opus", Origin::Authority),
            t("MOLECULE_LLM_BILLING_MODE", "byok", Origin::Authority),
            t(
                "MOLECULE_LLM_BILLING_MODE_RESOLVED",
                "byok",
                Origin::Authority
            ),
            t("REGION", "eu", Origin::Platform),
        ]
    );
    assert_eq!(
        resp.removed_keys,
        strings(&[
            "ANTHROPIC_BASE_URL",
            "MOLECULE_LLM_ANTHROPIC_BASE_URL",
            "MOLECULE_LLM_CUSTOM",
            "MOLECULE_LLM_USAGE_TOKEN",
            "OPENAI_API_KEY",
        ])
    );
    assert_eq!(
        resp.added_keys,
        strings(&[
            "MODEL_PROVIDER",
            "MOLECULE_LLM_BILLING_MODE",
            "MOLECULE_LLM_BILLING_MODE_RESOLVED"
        ])
    );
    app.stop().await.unwrap();
}

backends!(build_env_in_disabled_removes_every_llm_key_and_needs_no_credential_or_proxy);
async fn build_env_in_disabled_removes_every_llm_key_and_needs_no_credential_or_proxy(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let ws = new_workspace();
    app.register(&ws, "claude-code", "opus", &["CLAUDE_CODE_OAUTH_TOKEN"])
        .await;
    app.set_override(&ws, Mode::Disabled, "unpaid invoice")
        .await;
    let mut candidate = vec![
        env(
            Origin::Workspace,
            "CLAUDE_CODE_OAUTH_TOKEN",
            "customer-oauth",
        ),
        env(Origin::Global, "ANTHROPIC_API_KEY", "platform-key"),
        env(Origin::Workspace, "APP_NAME", "demo"),
    ];
    candidate.extend(anthropic_proxy());
    let resp = app.build(&ws, candidate).await.unwrap();
    assert_eq!(resp.resolution.as_ref().unwrap().mode(), Mode::Disabled);
    assert_eq!(
        triples(&resp),
        vec![
            t("APP_NAME", "demo", Origin::Workspace),
            t("MODEL_PROVIDER", "opus", Origin::Authority),
            t("MOLECULE_LLM_BILLING_MODE", "disabled", Origin::Authority),
            t(
                "MOLECULE_LLM_BILLING_MODE_RESOLVED",
                "disabled",
                Origin::Authority
            ),
        ]
    );
    assert_eq!(
        resp.removed_keys,
        strings(&[
            "ANTHROPIC_API_KEY",
            "CLAUDE_CODE_OAUTH_TOKEN",
            "MOLECULE_LLM_ANTHROPIC_BASE_URL",
            "MOLECULE_LLM_USAGE_TOKEN",
        ])
    );
    // Nothing at all in the candidate: still fine.
    let empty = app.build(&ws, vec![]).await.unwrap();
    assert_eq!(empty.env.len(), 3);
    assert!(empty.removed_keys.is_empty());
    app.stop().await.unwrap();
}

backends!(build_env_for_hermes_writes_every_model_variable_of_the_runtime);
async fn build_env_for_hermes_writes_every_model_variable_of_the_runtime(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let ws = new_workspace();
    app.register(&ws, "hermes", "openai/gpt-4o", &["OPENROUTER_API_KEY"])
        .await;
    let resp = app
        .build(
            &ws,
            vec![
                env(Origin::Workspace, "OPENROUTER_API_KEY", "customer-or"),
                env(Origin::Global, "HERMES_DEFAULT_MODEL", "openai/gpt-4o"),
            ],
        )
        .await
        .unwrap();
    let r = resp.resolution.clone().unwrap();
    assert_eq!((r.mode(), r.provider.as_str()), (Mode::Byok, "openrouter"));
    let m = env_map(&resp);
    assert_eq!(
        m["MODEL_PROVIDER"],
        ("openai/gpt-4o".to_owned(), Origin::Authority)
    );
    assert_eq!(
        m["HERMES_DEFAULT_MODEL"],
        ("openai/gpt-4o".to_owned(), Origin::Authority)
    );
    assert_eq!(
        m["OPENROUTER_API_KEY"],
        ("customer-or".to_owned(), Origin::Workspace)
    );
    assert!(resp.added_keys.contains(&"HERMES_DEFAULT_MODEL".to_owned()));

    // A hermes-only model variable naming another model is refused.
    let err = app
        .build(
            &ws,
            vec![
                env(Origin::Workspace, "OPENROUTER_API_KEY", "customer-or"),
                env(Origin::Global, "HERMES_DEFAULT_MODEL", "anthropic/claude-3"),
            ],
        )
        .await
        .unwrap_err();
    assert_error(&err, Code::FailedPrecondition, "MODEL_MISMATCH");
    app.stop().await.unwrap();
}

backends!(build_env_without_a_recorded_model_writes_no_model_variable);
async fn build_env_without_a_recorded_model_writes_no_model_variable(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let ws = new_workspace();
    app.set(fields(&ws, Some("claude-code"), None, None)).await;
    let resp = app.build(&ws, anthropic_proxy()).await.unwrap();
    let r = resp.resolution.clone().unwrap();
    assert_eq!(
        (r.mode(), r.source()),
        (Mode::PlatformManaged, Source::Default)
    );
    // No provider derived: the default (Anthropic) family is routed.
    let m = env_map(&resp);
    assert!(!m.contains_key("MODEL_PROVIDER"));
    assert_eq!(m["ANTHROPIC_BASE_URL"].0, "https://proxy.example/anthropic");
    assert_eq!(m["ANTHROPIC_API_KEY"].0, "usage-token-1");
    app.stop().await.unwrap();
}

backends!(a_byok_override_over_a_platform_provider_accepts_any_own_vendor_credential);
async fn a_byok_override_over_a_platform_provider_accepts_any_own_vendor_credential(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let ws = new_workspace();
    app.register(&ws, "claude-code", "claude-sonnet-4-6", &[])
        .await;
    let o = app
        .set_override(&ws, Mode::Byok, "customer brings a key")
        .await;
    assert_eq!(
        (o.mode(), o.source(), o.provider.as_str()),
        (Mode::Byok, Source::Override, "platform-anthropic")
    );

    let resp = app
        .build(
            &ws,
            vec![
                env(Origin::Workspace, "OPENAI_API_KEY", "customer-openai"),
                env(Origin::Global, "ANTHROPIC_API_KEY", "platform-key"),
            ],
        )
        .await
        .unwrap();
    let m = env_map(&resp);
    assert_eq!(
        m["OPENAI_API_KEY"],
        ("customer-openai".to_owned(), Origin::Workspace)
    );
    assert!(
        !m.contains_key("ANTHROPIC_API_KEY"),
        "the platform's key never reaches byok"
    );
    assert_eq!(m["MOLECULE_LLM_BILLING_MODE"].0, "byok");

    // Only the platform's credential: refused, never used instead.
    let err = app
        .build(
            &ws,
            vec![env(Origin::Global, "ANTHROPIC_API_KEY", "platform-key")],
        )
        .await
        .unwrap_err();
    assert_error(&err, Code::FailedPrecondition, "MISSING_BYOK_CREDENTIAL");
    app.stop().await.unwrap();
}

backends!(the_same_key_under_two_origins_resolves_workspace_over_global_over_platform);
async fn the_same_key_under_two_origins_resolves_workspace_over_global_over_platform(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let ws = new_workspace();
    app.set_override(&ws, Mode::Disabled, "no llm").await;
    let resp = app
        .build(
            &ws,
            vec![
                env(Origin::Platform, "A_SETTING", "platform"),
                env(Origin::Global, "A_SETTING", "global"),
                env(Origin::Workspace, "A_SETTING", "workspace"),
                env(Origin::Platform, "B_SETTING", "platform"),
                env(Origin::Global, "B_SETTING", "global"),
            ],
        )
        .await
        .unwrap();
    let m = env_map(&resp);
    assert_eq!(m["A_SETTING"], ("workspace".to_owned(), Origin::Workspace));
    assert_eq!(m["B_SETTING"], ("global".to_owned(), Origin::Global));
    assert!(resp.removed_keys.is_empty());
    app.stop().await.unwrap();
}

backends!(history_lists_every_change_newest_first_one_page_at_a_time);
async fn history_lists_every_change_newest_first_one_page_at_a_time(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let ws = new_workspace();
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    app.set(SetRequest {
        reason: "onboarding".into(),
        ..fields(
            &ws,
            Some("claude-code"),
            Some("opus"),
            Some(&["CLAUDE_CODE_OAUTH_TOKEN"]),
        )
    })
    .await;
    app.set(fields(&ws, None, Some("claude-sonnet-4-6"), None))
        .await;
    app.set_override(&ws, Mode::Byok, "ticket 42").await;
    clear(&mut c, &ws, "ticket 43").await.unwrap();

    let all = app.history(&ws.to_uppercase(), 0, "").await.unwrap();
    assert!(all.next_page_token.is_empty());
    let revs: Vec<u64> = all.entries.iter().map(|e| e.revision).collect();
    assert_eq!(revs, vec![4, 3, 2, 1]);
    let e = &all.entries;
    for entry in e {
        assert_eq!(entry.actor, "anonymous");
        let secs = entry.time.as_ref().expect("time").seconds;
        assert!(
            (started - 5..=started + 120).contains(&secs),
            "time {secs} near {started}"
        );
    }
    assert!(e.windows(2).all(|w| {
        let (a, b) = (w[0].time.as_ref().unwrap(), w[1].time.as_ref().unwrap());
        (a.seconds, a.nanos) >= (b.seconds, b.nanos)
    }));
    let created = RecordFields {
        runtime: "claude-code".into(),
        model: "opus".into(),
        credential_keys: strings(&["CLAUDE_CODE_OAUTH_TOKEN"]),
        override_mode: String::new(),
    };
    assert_eq!(e[3].reason, "onboarding");
    assert_eq!(e[3].before, None, "the creating change has no before");
    assert_eq!(e[3].after.as_ref(), Some(&created));
    let sonnet = RecordFields {
        model: "claude-sonnet-4-6".into(),
        ..created.clone()
    };
    assert_eq!(e[2].before.as_ref(), Some(&created));
    assert_eq!(e[2].after.as_ref(), Some(&sonnet));
    let overridden = RecordFields {
        override_mode: "byok".into(),
        ..sonnet.clone()
    };
    assert_eq!(
        (e[1].reason.as_str(), e[1].after.as_ref()),
        ("ticket 42", Some(&overridden))
    );
    assert_eq!(
        (e[0].reason.as_str(), e[0].before.as_ref()),
        ("ticket 43", Some(&overridden))
    );
    assert_eq!(e[0].after.as_ref(), Some(&sonnet));

    // Paging: 3 + 1.
    let p1 = app.history(&ws, 3, "").await.unwrap();
    assert_eq!(
        p1.entries.iter().map(|e| e.revision).collect::<Vec<_>>(),
        vec![4, 3, 2]
    );
    assert!(!p1.next_page_token.is_empty());
    let p2 = app.history(&ws, 3, &p1.next_page_token).await.unwrap();
    assert_eq!(
        p2.entries.iter().map(|e| e.revision).collect::<Vec<_>>(),
        vec![1]
    );
    assert!(p2.next_page_token.is_empty());
    assert_eq!(
        p1.entries.into_iter().chain(p2.entries).collect::<Vec<_>>(),
        all.entries
    );
    app.stop().await.unwrap();
}

// ---------------------------------------------------------------------------
// Errors, one reason at a time

const BAD_IDS: [&str; 10] = [
    "",
    "not-a-uuid",
    "6b66de8d93374fb4be8d6d49dca0d809",
    "{6b66de8d-9337-4fb4-be8d-6d49dca0d809}",
    "urn:uuid:6b66de8d-9337-4fb4-be8d-6d49dca0d809",
    "6b66de8d-9337-4fb4-be8d-6d49dca0d80",
    "6b66de8d-9337-4fb4-be8d-6d49dca0d80g",
    "6b66de8d-9337-4fb4-be8d_6d49dca0d809",
    " 6b66de8d-9337-4fb4-be8d-6d49dca0d809",
    "6b66de8d-9337-4fb4-be8d-6d49dca0d809\n",
];

backends!(malformed_workspace_ids_are_invalid_workspace_id_on_every_rpc);
async fn malformed_workspace_ids_are_invalid_workspace_id_on_every_rpc(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    for bad in BAD_IDS {
        let e = app.try_resolve(bad).await.unwrap_err();
        let msg = assert_error(&e, Code::InvalidArgument, "INVALID_WORKSPACE_ID");
        assert!(
            msg.contains("workspace_id"),
            "message names the field: {msg}"
        );
        let e = c
            .set(fields(bad, Some("claude-code"), None, None))
            .await
            .unwrap_err();
        assert_error(&e, Code::InvalidArgument, "INVALID_WORKSPACE_ID");
        let e = clear(&mut c, bad, "why").await.unwrap_err();
        assert_error(&e, Code::InvalidArgument, "INVALID_WORKSPACE_ID");
        let e = app.build(bad, anthropic_proxy()).await.unwrap_err();
        assert_error(&e, Code::InvalidArgument, "INVALID_WORKSPACE_ID");
        let e = app.history(bad, 0, "").await.unwrap_err();
        assert_error(&e, Code::InvalidArgument, "INVALID_WORKSPACE_ID");
    }
    app.stop().await.unwrap();
}

backends!(set_refuses_an_unspecified_or_unknown_override_mode_with_invalid_mode);
async fn set_refuses_an_unspecified_or_unknown_override_mode_with_invalid_mode(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let ws = new_workspace();
    for mode in [Mode::Unspecified as i32, 7, -1] {
        let e = c
            .set(SetRequest {
                workspace_id: ws.clone(),
                override_mode: Some(mode),
                reason: "a reason".into(),
                ..SetRequest::default()
            })
            .await
            .unwrap_err();
        assert_error(&e, Code::InvalidArgument, "INVALID_MODE");
    }
    // Nothing was written.
    assert_error(
        &app.try_resolve(&ws).await.unwrap_err(),
        Code::NotFound,
        "WORKSPACE_NOT_FOUND",
    );
    app.stop().await.unwrap();
}

backends!(malformed_fields_are_invalid_field_and_the_limits_are_inclusive);
async fn malformed_fields_are_invalid_field_and_the_limits_are_inclusive(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let ws = new_workspace();
    for runtime in [
        "claude code",
        "claude-code\t",
        " claude-code",
        "claude\u{7}code",
        "claude\u{a0}code",
    ] {
        let e = c
            .set(fields(&ws, Some(runtime), None, None))
            .await
            .unwrap_err();
        let msg = assert_error(&e, Code::InvalidArgument, "INVALID_FIELD");
        assert!(msg.contains("runtime"), "{msg}");
    }
    let e = c
        .set(fields(&ws, None, Some(&"m".repeat(257)), None))
        .await
        .unwrap_err();
    let msg = assert_error(&e, Code::InvalidArgument, "INVALID_FIELD");
    assert!(msg.contains("model"), "{msg}");
    let e = c
        .set(fields(&ws, None, Some("op us"), None))
        .await
        .unwrap_err();
    assert_error(&e, Code::InvalidArgument, "INVALID_FIELD");
    // 256 bytes is allowed (multi-byte characters count in bytes).
    let r = app
        .set(fields(
            &ws,
            Some(&"r".repeat(256)),
            Some(&"é".repeat(128)),
            None,
        ))
        .await;
    assert_eq!((r.runtime.len(), r.model.len()), (256, 256));
    let e = c
        .set(fields(&ws, None, Some(&"é".repeat(129)), None))
        .await
        .unwrap_err();
    assert_error(&e, Code::InvalidArgument, "INVALID_FIELD");

    // Env entries must come from WORKSPACE, GLOBAL or PLATFORM.
    for origin in [Origin::Unspecified as i32, Origin::Authority as i32, 9] {
        let mut candidate = anthropic_proxy();
        candidate.push(EnvVar {
            key: "APP_NAME".into(),
            value: "demo".into(),
            origin,
        });
        let e = app.build(&ws, candidate).await.unwrap_err();
        assert_error(&e, Code::InvalidArgument, "INVALID_FIELD");
    }

    // History page tokens only come from a previous page.
    for token in ["abc", "0", "-1", "1.5", " 2"] {
        let e = app.history(&ws, 0, token).await.unwrap_err();
        assert_error(&e, Code::InvalidArgument, "INVALID_FIELD");
    }
    app.stop().await.unwrap();
}

backends!(a_set_carrying_only_a_reason_or_expected_revision_is_nothing_to_set);
async fn a_set_carrying_only_a_reason_or_expected_revision_is_nothing_to_set(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let ws = new_workspace();
    app.register(&ws, "claude-code", "opus", &[]).await;
    for (reason, expected) in [
        ("", None),
        ("just because", None),
        ("", Some(1)),
        ("why", Some(1)),
        ("", Some(0)),
    ] {
        let e = c
            .set(SetRequest {
                workspace_id: ws.clone(),
                expected_revision: expected,
                reason: reason.into(),
                ..SetRequest::default()
            })
            .await
            .unwrap_err();
        assert_error(&e, Code::InvalidArgument, "NOTHING_TO_SET");
    }
    assert_eq!(app.resolve(&ws).await.revision, 1);
    app.stop().await.unwrap();
}

backends!(overrides_and_clears_without_a_real_reason_are_reason_required);
async fn overrides_and_clears_without_a_real_reason_are_reason_required(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let ws = new_workspace();
    app.register(&ws, "claude-code", "opus", &[]).await;
    for reason in ["", "   ", " \t\n "] {
        let e = c
            .set(SetRequest {
                workspace_id: ws.clone(),
                override_mode: Some(Mode::Byok.into()),
                reason: reason.into(),
                ..SetRequest::default()
            })
            .await
            .unwrap_err();
        assert_error(&e, Code::InvalidArgument, "REASON_REQUIRED");
        let e = clear(&mut c, &ws, reason).await.unwrap_err();
        assert_error(&e, Code::InvalidArgument, "REASON_REQUIRED");
    }
    // Fields other than the override need no reason.
    assert_eq!(
        app.set(fields(&ws, None, Some("sonnet"), None))
            .await
            .revision,
        2
    );
    assert_eq!(app.resolve(&ws).await.override_mode(), Mode::Unspecified);
    app.stop().await.unwrap();
}

backends!(malformed_env_and_credential_keys_are_invalid_env_key);
async fn malformed_env_and_credential_keys_are_invalid_env_key(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let ws = new_workspace();
    app.set_override(&ws, Mode::Disabled, "off").await;
    let long = "K".repeat(257);
    for key in ["", "1ABC", "A-B", "A B", "A=B", "Ä", "KEY\n", long.as_str()] {
        let e = app
            .build(&ws, vec![env(Origin::Workspace, key, "v")])
            .await
            .unwrap_err();
        assert_error(&e, Code::InvalidArgument, "INVALID_ENV_KEY");
        let e = c
            .set(fields(&ws, None, None, Some(&["OPENAI_API_KEY", key])))
            .await
            .unwrap_err();
        assert_error(&e, Code::InvalidArgument, "INVALID_ENV_KEY");
    }
    // The longest valid key is fine.
    app.build(&ws, vec![env(Origin::Workspace, &"K".repeat(256), "v")])
        .await
        .unwrap();
    app.stop().await.unwrap();
}

backends!(a_key_repeated_under_one_origin_is_duplicate_env_key);
async fn a_key_repeated_under_one_origin_is_duplicate_env_key(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let ws = new_workspace();
    app.set_override(&ws, Mode::Disabled, "off").await;
    for origin in [Origin::Workspace, Origin::Global, Origin::Platform] {
        let e = app
            .build(
                &ws,
                vec![
                    env(origin, "APP_NAME", "one"),
                    env(Origin::Workspace, "OTHER", "x"),
                    env(origin, "APP_NAME", "two"),
                ],
            )
            .await
            .unwrap_err();
        let msg = assert_error(&e, Code::InvalidArgument, "DUPLICATE_ENV_KEY");
        assert!(msg.contains("APP_NAME"), "{msg}");
        assert!(
            !msg.contains("one") && !msg.contains("two"),
            "no values in messages: {msg}"
        );
    }
    app.stop().await.unwrap();
}

backends!(env_size_value_size_and_credential_count_limits_are_limit_exceeded);
async fn env_size_value_size_and_credential_count_limits_are_limit_exceeded(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let ws = new_workspace();
    app.set_override(&ws, Mode::Disabled, "off").await;

    let filler = |n: usize| -> Vec<EnvVar> {
        (0..n)
            .map(|i| env(Origin::Global, &format!("SETTING_{i}"), "v"))
            .collect()
    };
    let ok = app.build(&ws, filler(1024)).await.unwrap();
    assert_eq!(ok.env.len(), 1024 + 2);
    let e = app.build(&ws, filler(1025)).await.unwrap_err();
    assert_error(&e, Code::InvalidArgument, "LIMIT_EXCEEDED");

    app.build(
        &ws,
        vec![env(Origin::Workspace, "BIG", &"v".repeat(64 * 1024))],
    )
    .await
    .unwrap();
    let e = app
        .build(
            &ws,
            vec![env(Origin::Workspace, "BIG", &"v".repeat(64 * 1024 + 1))],
        )
        .await
        .unwrap_err();
    let msg = assert_error(&e, Code::InvalidArgument, "LIMIT_EXCEEDED");
    assert!(msg.contains("BIG"), "names the key: {msg}");

    let keys = |n: usize| -> Vec<String> { (0..n).map(|i| format!("KEY_{i:03}")).collect() };
    let k64 = keys(64);
    let k64: Vec<&str> = k64.iter().map(String::as_str).collect();
    let r = app.set(fields(&ws, None, None, Some(&k64))).await;
    assert_eq!(r.credential_keys.len(), 64);
    for n in [65, 300] {
        let kn = keys(n);
        let kn: Vec<&str> = kn.iter().map(String::as_str).collect();
        let e = c.set(fields(&ws, None, None, Some(&kn))).await.unwrap_err();
        assert_error(&e, Code::InvalidArgument, "LIMIT_EXCEEDED");
    }
    assert_eq!(app.resolve(&ws).await.credential_keys.len(), 64);
    app.stop().await.unwrap();
}

backends!(an_unregistered_workspace_is_not_found_on_resolve_build_env_clear_and_history);
async fn an_unregistered_workspace_is_not_found_on_resolve_build_env_clear_and_history(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let ws = new_workspace();
    let e = app.try_resolve(&ws).await.unwrap_err();
    let msg = assert_error(&e, Code::NotFound, "WORKSPACE_NOT_FOUND");
    assert!(msg.contains("Set"), "tells the caller what to do: {msg}");
    let e = app.build(&ws, anthropic_proxy()).await.unwrap_err();
    assert_error(&e, Code::NotFound, "WORKSPACE_NOT_FOUND");
    let e = clear(&mut c, &ws, "cleanup").await.unwrap_err();
    assert_error(&e, Code::NotFound, "WORKSPACE_NOT_FOUND");
    let e = app.history(&ws, 0, "").await.unwrap_err();
    assert_error(&e, Code::NotFound, "WORKSPACE_NOT_FOUND");
    // Clear did not create the record.
    assert_error(
        &app.try_resolve(&ws).await.unwrap_err(),
        Code::NotFound,
        "WORKSPACE_NOT_FOUND",
    );
    app.stop().await.unwrap();
}

backends!(a_stale_or_create_only_expected_revision_is_aborted_and_the_current_one_succeeds);
async fn a_stale_or_create_only_expected_revision_is_aborted_and_the_current_one_succeeds(
    db: TestDb,
) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let ws = new_workspace();

    // On a missing record: 0 creates, anything else is aborted.
    let e = c
        .set(SetRequest {
            expected_revision: Some(3),
            ..fields(&ws, Some("claude-code"), None, None)
        })
        .await
        .unwrap_err();
    assert_error(&e, Code::Aborted, "REVISION_MISMATCH");
    let r1 = app
        .set(SetRequest {
            expected_revision: Some(0),
            ..fields(&ws, Some("claude-code"), None, None)
        })
        .await;
    assert_eq!(r1.revision, 1);
    // Create-only on an existing record.
    let e = c
        .set(SetRequest {
            expected_revision: Some(0),
            ..fields(&ws, None, Some("opus"), None)
        })
        .await
        .unwrap_err();
    let msg = assert_error(&e, Code::Aborted, "REVISION_MISMATCH");
    assert!(msg.contains('1'), "names the current revision: {msg}");

    let r2 = app
        .set(SetRequest {
            expected_revision: Some(1),
            ..fields(&ws, None, Some("opus"), None)
        })
        .await;
    assert_eq!(r2.revision, 2);
    // Stale Set.
    let e = c
        .set(SetRequest {
            expected_revision: Some(1),
            ..fields(&ws, None, Some("sonnet"), None)
        })
        .await
        .unwrap_err();
    assert_error(&e, Code::Aborted, "REVISION_MISMATCH");

    let o = app
        .set(SetRequest {
            workspace_id: ws.clone(),
            override_mode: Some(Mode::PlatformManaged.into()),
            expected_revision: Some(2),
            reason: "pilot".into(),
            ..SetRequest::default()
        })
        .await;
    assert_eq!(o.revision, 3);
    // Stale Clear, then the current one.
    for stale in [0, 2, 4] {
        let e = c
            .clear(ClearRequest {
                workspace_id: ws.clone(),
                expected_revision: Some(stale),
                reason: "end of pilot".into(),
                dry_run: false,
            })
            .await
            .unwrap_err();
        assert_error(&e, Code::Aborted, "REVISION_MISMATCH");
    }
    let cleared = c
        .clear(ClearRequest {
            workspace_id: ws.clone(),
            expected_revision: Some(3),
            reason: "end of pilot".into(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner()
        .resolution
        .unwrap();
    assert_eq!(
        (cleared.revision, cleared.override_mode()),
        (4, Mode::Unspecified)
    );
    let r = app.resolve(&ws).await;
    assert_eq!(
        (r.revision, r.model.as_str()),
        (4, "opus"),
        "the stale writes changed nothing"
    );
    app.stop().await.unwrap();
}

backends!(byok_without_the_workspaces_own_credential_fails_closed_even_with_the_platforms_present);
async fn byok_without_the_workspaces_own_credential_fails_closed_even_with_the_platforms_present(
    db: TestDb,
) {
    let app = TestApp::spawn(&db).await;
    let ws = new_workspace();
    app.register(&ws, "claude-code", "opus", &["CLAUDE_CODE_OAUTH_TOKEN"])
        .await;
    let mut platform_only = vec![
        env(
            Origin::Global,
            "CLAUDE_CODE_OAUTH_TOKEN",
            "platform-oauth-secret",
        ),
        env(Origin::Global, "ANTHROPIC_API_KEY", "platform-key-secret"),
        // Another provider's credential does not count either.
        env(
            Origin::Workspace,
            "ANTHROPIC_API_KEY",
            "customer-api-key-secret",
        ),
    ];
    platform_only.extend(anthropic_proxy());
    let e = app.build(&ws, platform_only.clone()).await.unwrap_err();
    let msg = assert_error(&e, Code::FailedPrecondition, "MISSING_BYOK_CREDENTIAL");
    assert!(
        msg.contains("CLAUDE_CODE_OAUTH_TOKEN"),
        "names the wanted key: {msg}"
    );
    assert!(!msg.contains("secret"), "no values in messages: {msg}");

    // An empty value counts as absent.
    platform_only.push(env(Origin::Workspace, "CLAUDE_CODE_OAUTH_TOKEN", ""));
    let e = app.build(&ws, platform_only).await.unwrap_err();
    assert_error(&e, Code::FailedPrecondition, "MISSING_BYOK_CREDENTIAL");
    app.stop().await.unwrap();
}

backends!(platform_managed_without_the_platform_origin_proxy_inputs_fails_closed);
async fn platform_managed_without_the_platform_origin_proxy_inputs_fails_closed(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let ws = new_workspace();
    app.register(&ws, "claude-code", "claude-sonnet-4-6", &[])
        .await;
    let base = (
        "MOLECULE_LLM_ANTHROPIC_BASE_URL",
        "https://proxy.example/anthropic",
    );
    let token = ("MOLECULE_LLM_USAGE_TOKEN", "usage-token-1");
    let cases: Vec<Vec<EnvVar>> = vec![
        vec![],
        vec![env(Origin::Platform, base.0, base.1)],
        vec![env(Origin::Platform, token.0, token.1)],
        // Proxy inputs are read only from PLATFORM entries.
        vec![
            env(Origin::Global, base.0, base.1),
            env(Origin::Global, token.0, token.1),
        ],
        vec![
            env(Origin::Workspace, base.0, base.1),
            env(Origin::Platform, token.0, token.1),
        ],
        // An empty value counts as absent.
        vec![
            env(Origin::Platform, base.0, base.1),
            env(Origin::Platform, token.0, ""),
        ],
        vec![
            env(Origin::Platform, base.0, ""),
            env(Origin::Platform, token.0, token.1),
        ],
        // The wrong family's proxy does not help.
        vec![
            env(
                Origin::Platform,
                "MOLECULE_LLM_OPENAI_BASE_URL",
                "https://proxy.example/openai",
            ),
            env(Origin::Platform, token.0, token.1),
        ],
    ];
    for candidate in cases {
        let e = app.build(&ws, candidate.clone()).await.unwrap_err();
        let msg = assert_error(&e, Code::FailedPrecondition, "MISSING_PLATFORM_PROXY");
        assert!(
            msg.contains("MOLECULE_LLM_"),
            "names the missing input: {msg}"
        );
        assert!(
            !msg.contains("usage-token-1") && !msg.contains("proxy.example"),
            "{msg}"
        );
    }

    // An OpenAI-family platform provider needs the OpenAI proxy.
    let ws2 = new_workspace();
    let r = app.register(&ws2, "hermes", "openai/gpt-4o", &[]).await;
    assert_eq!(
        (r.mode(), r.provider.as_str()),
        (Mode::PlatformManaged, "platform-openai")
    );
    let e = app.build(&ws2, anthropic_proxy()).await.unwrap_err();
    let msg = assert_error(&e, Code::FailedPrecondition, "MISSING_PLATFORM_PROXY");
    assert!(msg.contains("MOLECULE_LLM_OPENAI_BASE_URL"), "{msg}");
    app.stop().await.unwrap();
}

backends!(a_candidate_naming_another_model_is_model_mismatch_and_the_value_is_not_echoed);
async fn a_candidate_naming_another_model_is_model_mismatch_and_the_value_is_not_echoed(
    db: TestDb,
) {
    let app = TestApp::spawn(&db).await;
    let ws = new_workspace();
    app.register(&ws, "claude-code", "opus", &["CLAUDE_CODE_OAUTH_TOKEN"])
        .await;
    let own = env(
        Origin::Workspace,
        "CLAUDE_CODE_OAUTH_TOKEN",
        "customer-oauth",
    );
    let e = app
        .build(
            &ws,
            vec![
                own.clone(),
                env(Origin::Global, "MODEL_PROVIDER", "secret-model-x"),
            ],
        )
        .await
        .unwrap_err();
    let msg = assert_error(&e, Code::FailedPrecondition, "MODEL_MISMATCH");
    assert!(msg.contains("MODEL_PROVIDER"), "{msg}");
    assert!(
        !msg.contains("secret-model-x"),
        "the candidate's value stays in the request: {msg}"
    );

    // Matching is case-sensitive.
    let e = app
        .build(
            &ws,
            vec![
                own.clone(),
                env(Origin::Workspace, "MODEL_PROVIDER", "Opus"),
            ],
        )
        .await
        .unwrap_err();
    assert_error(&e, Code::FailedPrecondition, "MODEL_MISMATCH");

    // The winning value after precedence is the one compared.
    let e = app
        .build(
            &ws,
            vec![
                own.clone(),
                env(Origin::Workspace, "MODEL_PROVIDER", "sonnet"),
                env(Origin::Global, "MODEL_PROVIDER", "opus"),
            ],
        )
        .await
        .unwrap_err();
    assert_error(&e, Code::FailedPrecondition, "MODEL_MISMATCH");
    app.build(
        &ws,
        vec![
            own.clone(),
            env(Origin::Workspace, "MODEL_PROVIDER", "opus"),
            env(Origin::Platform, "MODEL_PROVIDER", "sonnet"),
        ],
    )
    .await
    .unwrap();

    // No recorded model: a candidate naming one is a mismatch too.
    let ws2 = new_workspace();
    app.set(fields(&ws2, Some("claude-code"), None, None)).await;
    let mut candidate = anthropic_proxy();
    candidate.push(env(Origin::Global, "MODEL_PROVIDER", "opus"));
    let e = app.build(&ws2, candidate).await.unwrap_err();
    assert_error(&e, Code::FailedPrecondition, "MODEL_MISMATCH");
    app.stop().await.unwrap();
}

backends!(invalid_arguments_beat_not_found_and_aborted_and_model_mismatch_beats_the_env_checks);
async fn invalid_arguments_beat_not_found_and_aborted_and_model_mismatch_beats_the_env_checks(
    db: TestDb,
) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let unknown = new_workspace();

    // INVALID_ARGUMENT before NOT_FOUND.
    let e = app
        .build(&unknown, vec![env(Origin::Workspace, "BAD-KEY", "v")])
        .await
        .unwrap_err();
    assert_error(&e, Code::InvalidArgument, "INVALID_ENV_KEY");
    let e = app
        .build(&unknown, vec![env(Origin::Unspecified, "OK_KEY", "v")])
        .await
        .unwrap_err();
    assert_error(&e, Code::InvalidArgument, "INVALID_FIELD");
    let e = app
        .build(
            &unknown,
            vec![env(Origin::Global, "A", "1"), env(Origin::Global, "A", "2")],
        )
        .await
        .unwrap_err();
    assert_error(&e, Code::InvalidArgument, "DUPLICATE_ENV_KEY");
    let e = clear(&mut c, &unknown, "").await.unwrap_err();
    assert_error(&e, Code::InvalidArgument, "REASON_REQUIRED");
    let e = app.history(&unknown, 0, "zzz").await.unwrap_err();
    assert_error(&e, Code::InvalidArgument, "INVALID_FIELD");

    // NOT_FOUND before ABORTED.
    let e = c
        .clear(ClearRequest {
            workspace_id: unknown.clone(),
            expected_revision: Some(7),
            reason: "cleanup".into(),
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_error(&e, Code::NotFound, "WORKSPACE_NOT_FOUND");

    // INVALID_ARGUMENT before ABORTED.
    let ws = new_workspace();
    app.register(&ws, "claude-code", "opus", &["CLAUDE_CODE_OAUTH_TOKEN"])
        .await;
    let e = c
        .set(SetRequest {
            expected_revision: Some(9),
            ..fields(&ws, Some("bad runtime"), None, None)
        })
        .await
        .unwrap_err();
    assert_error(&e, Code::InvalidArgument, "INVALID_FIELD");

    // MODEL_MISMATCH before MISSING_BYOK_CREDENTIAL ...
    let e = app
        .build(&ws, vec![env(Origin::Global, "MODEL_PROVIDER", "sonnet")])
        .await
        .unwrap_err();
    assert_error(&e, Code::FailedPrecondition, "MODEL_MISMATCH");
    // ... and before MISSING_PLATFORM_PROXY.
    let pm = new_workspace();
    app.register(&pm, "claude-code", "claude-sonnet-4-6", &[])
        .await;
    let e = app
        .build(&pm, vec![env(Origin::Global, "MODEL_PROVIDER", "sonnet")])
        .await
        .unwrap_err();
    assert_error(&e, Code::FailedPrecondition, "MODEL_MISMATCH");
    app.stop().await.unwrap();
}

fn assert_store_unavailable(e: &Status) {
    let msg = assert_error(e, Code::Unavailable, "STORE_UNAVAILABLE");
    let lower = msg.to_lowercase();
    for leak in [
        "no such table",
        "relation",
        "billing_records",
        "billing_audit",
        "select",
        "sqlx",
        "sqlite",
        "postgres",
        "database",
        "error returned",
        "/tmp",
    ] {
        assert!(!lower.contains(leak), "message leaks {leak:?}: {msg}");
    }
    assert!(
        lower.contains("retry"),
        "tells the caller what to do: {msg}"
    );
}

backends!(a_store_that_cannot_be_read_gives_unavailable_and_no_decision_without_leaking_internals);
async fn a_store_that_cannot_be_read_gives_unavailable_and_no_decision_without_leaking_internals(
    db: TestDb,
) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let ws = new_workspace();
    app.register(&ws, "claude-code", "opus", &["CLAUDE_CODE_OAUTH_TOKEN"])
        .await;
    assert_eq!(app.resolve(&ws).await.mode(), Mode::Byok);

    db.break_the_store().await;

    assert_store_unavailable(&app.try_resolve(&ws).await.unwrap_err());
    let candidate = vec![env(
        Origin::Workspace,
        "CLAUDE_CODE_OAUTH_TOKEN",
        "customer-oauth",
    )];
    assert_store_unavailable(&app.build(&ws, candidate).await.unwrap_err());
    assert_store_unavailable(
        &c.set(fields(&ws, None, Some("sonnet"), None))
            .await
            .unwrap_err(),
    );
    assert_store_unavailable(&clear(&mut c, &ws, "why").await.unwrap_err());
    assert_store_unavailable(&app.history(&ws, 0, "").await.unwrap_err());
    // UNAVAILABLE before NOT_FOUND: an unknown workspace cannot be told apart.
    assert_store_unavailable(&app.try_resolve(&new_workspace()).await.unwrap_err());
    // INVALID_ARGUMENT still comes first.
    let e = app.try_resolve("nope").await.unwrap_err();
    assert_error(&e, Code::InvalidArgument, "INVALID_WORKSPACE_ID");
    app.stop().await.unwrap();
}

/// Runs one statement against the test database, behind the server's back.
async fn hand_edit(db: &TestDb, sql: &str) {
    use sqlx::Connection;
    match db.backend {
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::query(sql).execute(&mut conn).await.unwrap();
            conn.close().await.unwrap();
        }
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::query(sql).execute(&mut conn).await.unwrap();
            conn.close().await.unwrap();
        }
    }
}

backends!(a_stored_entry_the_service_cannot_read_gives_data_loss_without_its_cause);
async fn a_stored_entry_the_service_cannot_read_gives_data_loss_without_its_cause(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let ws = new_workspace();
    app.register(&ws, "claude-code", "opus", &["CLAUDE_CODE_OAUTH_TOKEN"])
        .await;
    assert_eq!(history_revisions(&mut c, &ws).await, vec![1]);

    // Valid JSON (Postgres checks that), but not a record's fields.
    hand_edit(
        &db,
        &format!(
            "UPDATE billing_audit SET after = '{{\"runtime\": 5}}' \
                 WHERE workspace_id = '{ws}'"
        ),
    )
    .await;

    let e = app.history(&ws, 0, "").await.unwrap_err();
    let msg = assert_error(&e, Code::DataLoss, "STORE_CORRUPT");
    // Retrying reads the same bytes: no RetryInfo.
    assert!(tonic_types::StatusExt::get_details_retry_info(&e).is_none());
    let lower = msg.to_lowercase();
    for leak in [
        "runtime",
        "invalid type",
        "expected",
        "audit",
        "json",
        "column",
        "sqlx",
        "sqlite",
        "postgres",
        "database",
    ] {
        assert!(!lower.contains(leak), "message leaks {leak:?}: {msg}");
    }
    assert!(
        lower.contains("operator"),
        "tells the caller what to do: {msg}"
    );
    // The record itself is still read.
    assert_eq!(app.resolve(&ws).await.mode(), Mode::Byok);
    app.stop().await.unwrap();
}

// ---------------------------------------------------------------------------
// Idempotent retries

backends!(repeating_the_same_set_keeps_the_revision_and_writes_no_history);
async fn repeating_the_same_set_keeps_the_revision_and_writes_no_history(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let ws = new_workspace();
    let first = app
        .register(
            &ws,
            "claude-code",
            "opus",
            &["CLAUDE_CODE_OAUTH_TOKEN", "OPENAI_API_KEY"],
        )
        .await;
    let again = app
        .register(
            &ws,
            "claude-code",
            "opus",
            &["CLAUDE_CODE_OAUTH_TOKEN", "OPENAI_API_KEY"],
        )
        .await;
    assert_eq!(again, first);
    // The same set in another order, with duplicates: the same record.
    let reordered = app
        .register(
            &ws,
            "claude-code",
            "opus",
            &[
                "OPENAI_API_KEY",
                "CLAUDE_CODE_OAUTH_TOKEN",
                "OPENAI_API_KEY",
            ],
        )
        .await;
    assert_eq!(reordered.revision, 1);
    assert_eq!(history_revisions(&mut c, &ws).await, vec![1]);

    let o1 = app.set_override(&ws, Mode::PlatformManaged, "pilot").await;
    let o2 = app
        .set_override(&ws, Mode::PlatformManaged, "pilot, retried")
        .await;
    assert_eq!((o1.revision, o2.revision), (2, 2));
    assert_eq!(o2, o1);
    // A retry with the expected revision it was sent with is no conflict.
    let retry = app
        .set(SetRequest {
            expected_revision: Some(2),
            ..fields(&ws, Some("claude-code"), None, None)
        })
        .await;
    assert_eq!(retry.revision, 2);
    assert_eq!(history_revisions(&mut c, &ws).await, vec![2, 1]);
    app.stop().await.unwrap();
}

backends!(clearing_when_there_is_no_override_keeps_the_revision_and_writes_no_history);
async fn clearing_when_there_is_no_override_keeps_the_revision_and_writes_no_history(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let ws = new_workspace();
    let r = app.register(&ws, "claude-code", "opus", &[]).await;
    let c1 = clear(&mut c, &ws, "tidy up").await.unwrap();
    assert_eq!(c1, r);
    app.set_override(&ws, Mode::Disabled, "pause").await;
    let c2 = clear(&mut c, &ws, "resume").await.unwrap();
    assert_eq!(c2.revision, 3);
    let c3 = clear(&mut c, &ws, "resume (retry)").await.unwrap();
    assert_eq!(c3, c2);
    assert_eq!(history_revisions(&mut c, &ws).await, vec![3, 2, 1]);
    app.stop().await.unwrap();
}

// ---------------------------------------------------------------------------
// Health, reflection, restart, shutdown

backends!(health_reports_serving_for_the_server_and_the_billing_service);
async fn health_reports_serving_for_the_server_and_the_billing_service(db: TestDb) {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let app = TestApp::spawn(&db).await;
    let mut h = HealthClient::new(app.channel().await);
    for service in ["", "molecule.billing.v1.BillingMode"] {
        let resp = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.status(), ServingStatus::Serving, "{service:?}");
    }
    let e = h
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    app.stop().await.unwrap();
}

/// Decodes a FileDescriptorResponse's files.
fn decode_files(files: &[Vec<u8>]) -> Vec<prost_types::FileDescriptorProto> {
    use prost::Message;
    files
        .iter()
        .map(|b| prost_types::FileDescriptorProto::decode(b.as_slice()).expect("a file descriptor"))
        .collect()
}

/// Checks a file_by_filename answer for google/protobuf/timestamp.proto, so a
/// client with no proto files can resolve AuditEntry.time.
fn assert_is_timestamp_proto(files: &[Vec<u8>]) {
    let files = decode_files(files);
    assert!(
        files
            .iter()
            .any(|f| f.name() == "google/protobuf/timestamp.proto"
                && f.message_type.iter().any(|m| m.name() == "Timestamp")),
        "{:?}",
        files.iter().map(|f| f.name()).collect::<Vec<_>>()
    );
}

/// Checks a FileDescriptorResponse holds the BillingMode service with its RPCs.
fn assert_describes_billing_mode(files: &[Vec<u8>]) {
    let files = decode_files(files);
    let file = files
        .iter()
        .find(|f| {
            f.package() == "molecule.billing.v1"
                && f.service.iter().any(|s| s.name() == "BillingMode")
        })
        .unwrap_or_else(|| {
            panic!(
                "no molecule.billing.v1 file among {:?}",
                files.iter().map(|f| f.name()).collect::<Vec<_>>()
            )
        });
    let service = file
        .service
        .iter()
        .find(|s| s.name() == "BillingMode")
        .unwrap();
    let methods: Vec<&str> = service.method.iter().map(|m| m.name()).collect();
    for rpc in ["Resolve", "Set", "Clear", "BuildEnv", "History"] {
        assert!(methods.contains(&rpc), "{rpc} missing from {methods:?}");
    }
    assert_eq!(
        file.dependency,
        vec!["google/protobuf/timestamp.proto".to_owned()],
        "the imports a client must fetch by file name"
    );
    for message in ["Resolution", "SetRequest", "BuildEnvResponse", "EnvVar"] {
        assert!(
            file.message_type.iter().any(|m| m.name() == message),
            "{message}"
        );
    }
}

/// Lists the services, asks for the file declaring BillingMode and for a
/// file by name, over reflection `$version` (v1 and v1alpha have the same
/// messages as separate generated types), and checks the three answers.
macro_rules! check_reflection {
    ($version:ident, $app:expr, $wanted:expr) => {{
        use tonic_reflection::pb::$version::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let version = stringify!($version);
        let mut r = ServerReflectionClient::new($app.channel().await);
        let reqs = [
            MessageRequest::ListServices(String::new()),
            MessageRequest::FileContainingSymbol("molecule.billing.v1.BillingMode".into()),
            MessageRequest::FileByFilename("google/protobuf/timestamp.proto".into()),
        ]
        .map(|m| ServerReflectionRequest {
            host: String::new(),
            message_request: Some(m),
        });
        let mut stream = r
            .server_reflection_info(tokio_stream::iter(reqs))
            .await
            .unwrap()
            .into_inner();
        match stream.message().await.unwrap().unwrap().message_response {
            Some(MessageResponse::ListServicesResponse(l)) => {
                let names: Vec<&str> = l.service.iter().map(|s| s.name.as_str()).collect();
                for w in $wanted {
                    assert!(names.contains(&w), "{version}: {w} missing from {names:?}");
                }
            }
            other => panic!("{version} list_services: {other:?}"),
        }
        match stream.message().await.unwrap().unwrap().message_response {
            Some(MessageResponse::FileDescriptorResponse(f)) => {
                assert_describes_billing_mode(&f.file_descriptor_proto)
            }
            other => panic!("{version} file_containing_symbol: {other:?}"),
        }
        match stream.message().await.unwrap().unwrap().message_response {
            Some(MessageResponse::FileDescriptorResponse(f)) => {
                assert_is_timestamp_proto(&f.file_descriptor_proto)
            }
            other => panic!("{version} file_by_filename: {other:?}"),
        }
    }};
}

backends!(reflection_lists_the_services_and_describes_billing_mode_on_v1_and_v1alpha);
async fn reflection_lists_the_services_and_describes_billing_mode_on_v1_and_v1alpha(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let wanted = ["molecule.billing.v1.BillingMode", "grpc.health.v1.Health"];
    check_reflection!(v1, app, wanted);
    check_reflection!(v1alpha, app, wanted);
    app.stop().await.unwrap();
}

backends!(the_record_and_its_revision_survive_a_server_restart);
async fn the_record_and_its_revision_survive_a_server_restart(db: TestDb) {
    let ws = new_workspace();
    let before = {
        let app = TestApp::spawn(&db).await;
        let mut c = app.client().await;
        register(&mut c, &ws, "hermes", "openai/gpt-4o", &["OPENAI_API_KEY"]).await;
        let r = set_override(&mut c, &ws, Mode::Disabled, "paused").await;
        assert_eq!(r.revision, 2);
        app.stop().await.unwrap();
        r
    };
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let after = resolve(&mut c, &ws).await;
    assert_eq!(after, before);
    assert_eq!(history_revisions(&mut c, &ws).await, vec![2, 1]);
    // And it keeps counting from there.
    assert_eq!(clear(&mut c, &ws, "resumed").await.unwrap().revision, 3);
    app.stop().await.unwrap();
}

backends!(after_a_stop_nothing_listens_on_the_port);
async fn after_a_stop_nothing_listens_on_the_port(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let addr = app.endpoint();
    let ws = new_workspace();
    app.register(&ws, "claude-code", "opus", &[]).await;
    app.stop().await.expect("graceful shutdown returns Ok");
    let reconnect = tonic::transport::Endpoint::from_shared(addr)
        .unwrap()
        .connect_timeout(std::time::Duration::from_secs(2))
        .connect()
        .await;
    assert!(reconnect.is_err(), "nothing listens after shutdown");
}

backends!(concurrent_compare_and_set_writers_let_exactly_one_win);
async fn concurrent_compare_and_set_writers_let_exactly_one_win(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let c = app.client().await;
    let ws = new_workspace();

    // Eight racing create-only writes: one creates, the rest are aborted.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut c = c.clone();
        let req = SetRequest {
            expected_revision: Some(0),
            ..fields(&ws, Some("claude-code"), Some(&format!("model-{i}")), None)
        };
        tasks.push(tokio::spawn(async move { c.set(req).await }));
    }
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => {
                won += 1;
                assert_eq!(r.into_inner().resolution.unwrap().revision, 1);
            }
            Err(e) => {
                assert_error(&e, Code::Aborted, "REVISION_MISMATCH");
            }
        }
    }
    assert_eq!(won, 1, "exactly one create wins");

    // Eight racing updates from revision 1: one wins.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut c = c.clone();
        let req = SetRequest {
            expected_revision: Some(1),
            ..fields(&ws, None, Some(&format!("other-{i}")), None)
        };
        tasks.push(tokio::spawn(async move { c.set(req).await }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => winners.push(r.into_inner().resolution.unwrap()),
            Err(e) => {
                assert_error(&e, Code::Aborted, "REVISION_MISMATCH");
            }
        }
    }
    assert_eq!(winners.len(), 1, "exactly one update wins");
    let mut c = c.clone();
    let r = resolve(&mut c, &ws).await;
    assert_eq!(r, winners[0]);
    assert_eq!(r.revision, 2);
    assert_eq!(history_revisions(&mut c, &ws).await, vec![2, 1]);
    app.stop().await.unwrap();
}

// ---------------------------------------------------------------------------
// Many Resolves at once

backends!(
    many_resolves_at_once_each_answer_their_own_workspace,
    flavor = "multi_thread",
    worker_threads = 4
);
/// 330 Resolves at once over 30 workspaces with different modes and
/// revisions, and 3 that have no record: each answer is its own
/// workspace's. On Postgres, most of these reads go to the database
/// together with others (`store::pg_batch`), which must never hand one
/// workspace's decision to another's request (seen to fail with the rows
/// handed out in reverse order).
async fn many_resolves_at_once_each_answer_their_own_workspace(db: TestDb) {
    // One connection (on Postgres, one read at a time): every read that
    // comes while one runs waits, and goes with the others waiting.
    let app = TestApp::spawn_with(Config {
        db_max_connections: Some(1),
        ..config(&db)
    })
    .await;
    let modes = [Mode::PlatformManaged, Mode::Byok, Mode::Disabled];
    let mut expected = Vec::new();
    for i in 0..30 {
        let ws = new_workspace();
        app.register(&ws, "claude-code", "opus", &["CLAUDE_CODE_OAUTH_TOKEN"])
            .await;
        // Revisions 2 to 4, modes in turn.
        let mut last = None;
        for k in 0..=(i % 3) {
            let mode = modes[(i + k) % 3];
            last = Some(app.set_override(&ws, mode, &format!("step {k}")).await);
        }
        let last = last.expect("at least one override");
        expected.push((ws, Some((last.mode, last.revision))));
    }
    for _ in 0..3 {
        expected.push((new_workspace(), None));
    }
    let client = app.client().await;
    let calls: Vec<_> = (0..10)
        .flat_map(|_| expected.iter().cloned())
        .map(|(ws, want)| {
            let mut c = client.clone();
            tokio::spawn(async move {
                let got = try_resolve(&mut c, &ws).await;
                (ws, want, got)
            })
        })
        .collect();
    for call in calls {
        let (ws, want, got) = call.await.expect("call task");
        match (want, got) {
            (Some((mode, revision)), Ok(r)) => {
                assert_eq!(r.workspace_id, ws, "another workspace's answer");
                assert_eq!((r.mode, r.revision), (mode, revision), "{ws}");
            }
            (None, Err(e)) => {
                assert_error(&e, Code::NotFound, "WORKSPACE_NOT_FOUND");
            }
            (want, got) => panic!("{ws}: expected {want:?}, got {got:?}"),
        }
    }
    app.stop().await.unwrap();
}
