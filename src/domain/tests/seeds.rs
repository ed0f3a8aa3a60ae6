//! The seeds' cases, at the level of the decision core: the same record and
//! candidate envs the end-to-end tests send over gRPC.

use super::StoredText;
use super::{
    anthropic_proxy_inputs, build, build_err, build_ok, get, record, registry, strings, triples,
    workspace_id, A, ANTHROPIC_PROXY, G, USAGE_TOKEN, W,
};
use crate::domain::{resolve, Change, EnvError, Mode, Origin, Patch, Record, Source, Stored};

const CUSTOMER_OAUTH: &str = "customer-oauth-token";
const PLATFORM_OAUTH: &str = "platform-oauth-token";
const PLATFORM_API_KEY: &str = "platform-anthropic-api-key";

#[test]
fn seed1_a_byok_override_wins_until_cleared_and_a_garbled_one_is_ignored() {
    let before = StoredText {
        runtime: Some("claude-code".into()),
        model: Some("claude-opus-4-7".into()),
        ..StoredText::default()
    }
    .into_record(workspace_id(), 1);
    let r = resolve(&before, registry());
    assert_eq!(
        (r.mode, r.source),
        (Mode::PlatformManaged, Source::DerivedProvider)
    );

    let overridden = Record {
        revision: 2,
        ..Change::Set(Patch {
            override_mode: Some(Mode::Byok),
            ..Patch::default()
        })
        .apply(&before)
    };
    let r = resolve(&overridden, registry());
    assert_eq!((r.mode, r.source), (Mode::Byok, Source::Override));
    assert_eq!(r.override_mode, Some(Mode::Byok));
    assert_eq!(r.revision, 2);

    let cleared = Record {
        revision: 3,
        ..Change::ClearOverride.apply(&overridden)
    };
    let r = resolve(&cleared, registry());
    assert_eq!(
        (r.mode, r.source),
        (Mode::PlatformManaged, Source::DerivedProvider)
    );
    assert_eq!(r.override_mode, None);

    let garbled = Record {
        override_mode: Stored::Invalid("byok; DROP TABLE".into()),
        revision: 4,
        ..before
    };
    let r = resolve(&garbled, registry());
    assert_eq!(
        (r.mode, r.source),
        (Mode::PlatformManaged, Source::DerivedProvider)
    );
    assert_eq!(r.override_mode, None);
    assert_eq!(
        r.trace[0],
        "override: stored value \"byok; DROP TABLE\" is not a valid mode; ignored"
    );
}

#[test]
fn seed2_byok_keeps_the_workspace_token_and_gets_no_proxy() {
    let rec = record(
        Some("claude-code"),
        Some("opus"),
        &["CLAUDE_CODE_OAUTH_TOKEN"],
        None,
    );
    let mut entries = anthropic_proxy_inputs();
    entries.extend([
        (W, "CLAUDE_CODE_OAUTH_TOKEN", CUSTOMER_OAUTH),
        (G, "ANTHROPIC_API_KEY", PLATFORM_API_KEY),
        (G, "ANTHROPIC_BASE_URL", ANTHROPIC_PROXY),
    ]);
    let built = build_ok(&rec, &entries);
    assert_eq!(
        get(&built, "CLAUDE_CODE_OAUTH_TOKEN"),
        Some((CUSTOMER_OAUTH, W))
    );
    for key in [
        "ANTHROPIC_BASE_URL",
        "ANTHROPIC_API_KEY",
        "MOLECULE_LLM_USAGE_TOKEN",
        "MOLECULE_LLM_ANTHROPIC_BASE_URL",
    ] {
        assert_eq!(get(&built, key), None, "{key}");
    }
    assert_eq!(get(&built, "MOLECULE_LLM_BILLING_MODE"), Some(("byok", A)));
}

#[test]
fn seed2_platform_managed_strips_every_vendor_key_and_forces_the_proxy() {
    let rec = record(Some("claude-code"), Some("claude-sonnet-4-6"), &[], None);
    let mut entries = anthropic_proxy_inputs();
    entries.extend([
        (W, "CLAUDE_CODE_OAUTH_TOKEN", CUSTOMER_OAUTH),
        (W, "GROQ_API_KEY", "customer-groq"),
        (W, "ANTHROPIC_BASE_URL", "https://api.anthropic.com"),
        (G, "ANTHROPIC_API_KEY", PLATFORM_API_KEY),
        (G, "OPENAI_API_KEY", "platform-openai"),
        (G, "ANTHROPIC_AUTH_TOKEN", "platform-auth"),
        (W, "HOME", "/home/agent"),
    ]);
    let built = build_ok(&rec, &entries);
    assert_eq!(
        triples(&built),
        vec![
            ("ANTHROPIC_API_KEY", USAGE_TOKEN, A),
            ("ANTHROPIC_BASE_URL", ANTHROPIC_PROXY, A),
            ("HOME", "/home/agent", W),
            ("MODEL_PROVIDER", "claude-sonnet-4-6", A),
            ("MOLECULE_LLM_ANTHROPIC_BASE_URL", ANTHROPIC_PROXY, A),
            ("MOLECULE_LLM_BILLING_MODE", "platform_managed", A),
            ("MOLECULE_LLM_BILLING_MODE_RESOLVED", "platform_managed", A),
            ("MOLECULE_LLM_USAGE_TOKEN", USAGE_TOKEN, A),
        ]
    );
    assert_eq!(
        built.removed_keys,
        strings(&[
            "ANTHROPIC_AUTH_TOKEN",
            "CLAUDE_CODE_OAUTH_TOKEN",
            "GROQ_API_KEY",
            "OPENAI_API_KEY",
        ])
    );
}

#[test]
fn seed3_provider_selection_decides_and_nothing_selected_is_platform_managed_by_default() {
    let cases = [
        (
            "a non-platform provider selection",
            record(
                Some("hermes"),
                Some("minimax/MiniMax-M2.7"),
                &["MINIMAX_API_KEY"],
                None,
            ),
            Mode::Byok,
            Source::DerivedProvider,
        ),
        (
            "a platform provider selection",
            record(
                Some("hermes"),
                Some("anthropic/claude-sonnet-4-5"),
                &[],
                None,
            ),
            Mode::PlatformManaged,
            Source::DerivedProvider,
        ),
        (
            "nothing selected",
            record(None, None, &[], None),
            Mode::PlatformManaged,
            Source::Default,
        ),
    ];
    for (description, rec, mode, source) in cases {
        let r = resolve(&rec, registry());
        assert_eq!((r.mode, r.source), (mode, source), "{description}");
    }
}

/// Seed 4's candidate env: the customer's token from WORKSPACE, the platform's
/// from GLOBAL, and the proxy inputs from PLATFORM.
fn seed4_env(
    with_customer_token: bool,
    with_model: bool,
) -> Vec<(Origin, &'static str, &'static str)> {
    let mut entries = anthropic_proxy_inputs();
    entries.extend([
        (G, "CLAUDE_CODE_OAUTH_TOKEN", PLATFORM_OAUTH),
        (G, "ANTHROPIC_API_KEY", PLATFORM_API_KEY),
        (W, "GIT_AUTHOR_NAME", "customer"),
    ]);
    if with_customer_token {
        entries.push((W, "CLAUDE_CODE_OAUTH_TOKEN", CUSTOMER_OAUTH));
    }
    if with_model {
        entries.push((W, "MODEL_PROVIDER", "opus"));
    }
    entries
}

#[test]
fn seed4_claude_code_opus_is_byok_with_the_customers_token_not_the_platforms() {
    for owned in [&["CLAUDE_CODE_OAUTH_TOKEN"][..], &[][..]] {
        let rec = record(Some("claude-code"), Some("opus"), owned, None);
        let resolved = resolve(&rec, registry());
        assert_eq!(resolved.mode, Mode::Byok, "owning {owned:?}");
        assert_eq!(resolved.source, Source::DerivedProvider);
        assert_eq!(
            resolved.provider.as_ref().map(|p| p.id.as_str()),
            Some("anthropic-oauth")
        );

        let (at_build, built) = build(&rec, &seed4_env(true, true));
        assert_eq!(at_build, resolved, "BuildEnv decides exactly as Resolve");
        let built = built.expect("byok with the customer's token");
        assert_eq!(
            triples(&built),
            vec![
                ("CLAUDE_CODE_OAUTH_TOKEN", CUSTOMER_OAUTH, W),
                ("GIT_AUTHOR_NAME", "customer", W),
                ("MODEL_PROVIDER", "opus", A),
                ("MOLECULE_LLM_BILLING_MODE", "byok", A),
                ("MOLECULE_LLM_BILLING_MODE_RESOLVED", "byok", A),
            ]
        );
        assert!(built.env.iter().all(|e| e.value != PLATFORM_OAUTH
            && e.value != PLATFORM_API_KEY
            && e.value != USAGE_TOKEN
            && e.value != ANTHROPIC_PROXY));
        assert_eq!(
            built.removed_keys,
            strings(&[
                "ANTHROPIC_API_KEY",
                "MOLECULE_LLM_ANTHROPIC_BASE_URL",
                "MOLECULE_LLM_USAGE_TOKEN",
            ])
        );
        assert_eq!(
            built.added_keys,
            strings(&[
                "MODEL_PROVIDER",
                "MOLECULE_LLM_BILLING_MODE",
                "MOLECULE_LLM_BILLING_MODE_RESOLVED",
            ])
        );
        // Parity: the env the container gets says what Resolve says.
        assert_eq!(
            get(&built, "MOLECULE_LLM_BILLING_MODE").map(|(v, _)| v),
            Some(resolved.mode.as_str())
        );

        // A re-provision: the candidate env carries no model variable. Same answer.
        let (again, reprovisioned) = build(&rec, &seed4_env(true, false));
        assert_eq!(again, resolved);
        assert_eq!(
            reprovisioned.as_ref(),
            Ok(&built),
            "re-provision gives the same env"
        );
    }
}

#[test]
fn seed4_without_the_customers_own_token_build_env_refuses_rather_than_bill_the_platform() {
    let rec = record(
        Some("claude-code"),
        Some("opus"),
        &["CLAUDE_CODE_OAUTH_TOKEN"],
        None,
    );
    let want = EnvError::MissingByokCredential {
        provider: "anthropic-oauth".into(),
        wanted: "CLAUDE_CODE_OAUTH_TOKEN".into(),
    };
    assert_eq!(build_err(&rec, &seed4_env(false, true)), want);
    assert_eq!(
        build_err(&rec, &seed4_env(false, false)),
        want,
        "re-provision"
    );
    // An empty WORKSPACE token is no token.
    let mut entries = seed4_env(false, false);
    entries.push((W, "CLAUDE_CODE_OAUTH_TOKEN", ""));
    assert_eq!(build_err(&rec, &entries), want, "an empty token");
    // The decision itself does not move.
    assert_eq!(build(&rec, &seed4_env(false, false)).0.mode, Mode::Byok);
}
