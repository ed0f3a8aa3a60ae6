//! The env builder: what each mode does to each kind of key from each
//! origin, the proxy wiring, the byok credential check, the model variables,
//! precedence, candidate validation and the removed/added key lists.

use super::{
    anthropic_proxy_inputs, build, build_err, build_ok, candidate, get, inputs, record, registry,
    strings, triples, A, ANTHROPIC_PROXY, G, OPENAI_PROXY, P, USAGE_TOKEN, W,
};
use crate::domain::{
    env::{MAX_ENV_ENTRIES, MAX_ENV_VALUE_BYTES},
    BuiltEnv, CandidateEnv, EnvError, EnvInput, Mode, Origin, Record, ValidationError,
};

const VALUE: &str = "value-under-test";

/// Candidate entries as (origin, key, value) triples.
type Entries<'a> = Vec<(Origin, &'a str, &'a str)>;

/// What the builder must do with one candidate entry.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// In the output with its own value and origin.
    Kept,
    /// Absent from the output, and listed in `removed_keys`.
    Removed,
    /// Written by the authority with this value, and listed in `added_keys`.
    Set(&'static str),
}

/// One row: a key and what must happen to it under WORKSPACE, GLOBAL and
/// PLATFORM origin (`None` where that origin already carries the key in the
/// mode's base env).
type Row<'a> = (&'a str, &'a str, [Option<Want>; 3]);

fn check_rows(mode: Mode, rec: &Record, base: &[(Origin, &str, &str)], rows: &[Row<'_>]) {
    for (what, key, wants) in rows {
        for (origin, want) in [W, G, P].into_iter().zip(wants) {
            let Some(want) = want else { continue };
            let description = format!("{mode}: {what} ({key}) from {origin:?}");
            let mut entries = base.to_vec();
            entries.push((origin, key, VALUE));
            let (resolution, built) = build(rec, &entries);
            assert_eq!(resolution.mode, mode, "{description}");
            let built = built.unwrap_or_else(|e| panic!("{description}: {e:?}"));
            let in_removed = built.removed_keys.iter().any(|k| k == key);
            let in_added = built.added_keys.iter().any(|k| k == key);
            match *want {
                Want::Kept => {
                    assert_eq!(get(&built, key), Some((VALUE, origin)), "{description}");
                    assert!(!in_removed && !in_added, "{description}");
                }
                Want::Removed => {
                    assert_eq!(get(&built, key), None, "{description}");
                    assert!(in_removed && !in_added, "{description}");
                }
                Want::Set(value) => {
                    assert_eq!(get(&built, key), Some((value, A)), "{description}");
                    assert!(!in_removed && in_added, "{description}");
                }
            }
            assert_billing_mode(&built, mode, &description);
        }
    }
}

fn assert_billing_mode(built: &BuiltEnv, mode: Mode, description: &str) {
    for var in [
        "MOLECULE_LLM_BILLING_MODE",
        "MOLECULE_LLM_BILLING_MODE_RESOLVED",
    ] {
        assert_eq!(
            get(built, var),
            Some((mode.as_str(), A)),
            "{var}: {description}"
        );
        assert!(built.added_keys.iter().any(|k| k == var), "{description}");
    }
}

fn byok_record() -> Record {
    record(
        Some("claude-code"),
        Some("opus"),
        &["CLAUDE_CODE_OAUTH_TOKEN"],
        None,
    )
}

fn platform_record() -> Record {
    record(Some("claude-code"), Some("claude-opus-4-7"), &[], None)
}

fn disabled_record() -> Record {
    record(Some("claude-code"), Some("opus"), &[], Some("disabled"))
}

use Want::{Kept, Removed, Set};

#[test]
fn byok_keeps_only_the_workspaces_own_llm_keys_and_no_proxy_input() {
    let rows: &[Row] = &[
        (
            "a credential of another provider",
            "ANTHROPIC_API_KEY",
            [Some(Kept), Some(Removed), Some(Removed)],
        ),
        (
            "a second credential",
            "ANTHROPIC_AUTH_TOKEN",
            [Some(Kept), Some(Removed), Some(Removed)],
        ),
        (
            "a credential of a provider with no family",
            "OPENROUTER_API_KEY",
            [Some(Kept), Some(Removed), Some(Removed)],
        ),
        (
            "an endpoint",
            "ANTHROPIC_BASE_URL",
            [Some(Kept), Some(Removed), Some(Removed)],
        ),
        (
            "an endpoint of a provider with no family",
            "HERMES_CUSTOM_BASE_URL",
            [Some(Kept), Some(Removed), Some(Removed)],
        ),
        (
            "the usage token",
            "MOLECULE_LLM_USAGE_TOKEN",
            [Some(Removed), Some(Removed), Some(Removed)],
        ),
        (
            "a proxy base URL",
            "MOLECULE_LLM_ANTHROPIC_BASE_URL",
            [Some(Removed), Some(Removed), Some(Removed)],
        ),
        (
            "another proxy base URL",
            "MOLECULE_LLM_OPENAI_BASE_URL",
            [Some(Removed), Some(Removed), Some(Removed)],
        ),
        (
            "an unknown MOLECULE_LLM_ key",
            "MOLECULE_LLM_SOMETHING_ELSE",
            [Some(Removed), Some(Removed), Some(Removed)],
        ),
        (
            "a billing-mode variable",
            "MOLECULE_LLM_BILLING_MODE",
            [Some(Set("byok")); 3],
        ),
        (
            "the resolved billing-mode variable",
            "MOLECULE_LLM_BILLING_MODE_RESOLVED",
            [Some(Set("byok")); 3],
        ),
        ("a non-LLM key", "GIT_AUTHOR_NAME", [Some(Kept); 3]),
        (
            "another runtime's model variable",
            "HERMES_DEFAULT_MODEL",
            [Some(Kept); 3],
        ),
    ];
    let rec = byok_record();
    let base = [(W, "CLAUDE_CODE_OAUTH_TOKEN", "customer-oauth")];
    check_rows(Mode::Byok, &rec, &base, rows);
    // The model variable, carrying the recorded model from any origin, is rewritten.
    for origin in [W, G, P] {
        let mut entries = base.to_vec();
        entries.push((origin, "MODEL_PROVIDER", "opus"));
        let built = build_ok(&rec, &entries);
        assert_eq!(
            get(&built, "MODEL_PROVIDER"),
            Some(("opus", A)),
            "{origin:?}"
        );
        assert!(built.added_keys.iter().any(|k| k == "MODEL_PROVIDER"));
        assert!(built.removed_keys.is_empty(), "{origin:?}");
    }
}

#[test]
fn platform_managed_strips_every_llm_key_and_forces_the_proxy() {
    let rows: &[Row] = &[
        (
            "the family's credential",
            "ANTHROPIC_API_KEY",
            [Some(Set(USAGE_TOKEN)); 3],
        ),
        (
            "another credential of the provider",
            "ANTHROPIC_AUTH_TOKEN",
            [Some(Removed); 3],
        ),
        (
            "the subscription token",
            "CLAUDE_CODE_OAUTH_TOKEN",
            [Some(Removed); 3],
        ),
        (
            "another vendor's credential",
            "OPENROUTER_API_KEY",
            [Some(Removed); 3],
        ),
        (
            "an unrouted family's credential",
            "OPENAI_API_KEY",
            [Some(Removed); 3],
        ),
        (
            "the family's endpoint",
            "ANTHROPIC_BASE_URL",
            [Some(Set(ANTHROPIC_PROXY)); 3],
        ),
        (
            "an unrouted family's endpoint",
            "OPENAI_BASE_URL",
            [Some(Removed); 3],
        ),
        (
            "an endpoint with no family",
            "HERMES_CUSTOM_BASE_URL",
            [Some(Removed); 3],
        ),
        (
            "the usage token",
            "MOLECULE_LLM_USAGE_TOKEN",
            [Some(Set(USAGE_TOKEN)), Some(Set(USAGE_TOKEN)), None],
        ),
        (
            "the proxy base URL",
            "MOLECULE_LLM_ANTHROPIC_BASE_URL",
            [Some(Set(ANTHROPIC_PROXY)), Some(Set(ANTHROPIC_PROXY)), None],
        ),
        (
            "another family's proxy base URL",
            "MOLECULE_LLM_OPENAI_BASE_URL",
            [Some(Removed), Some(Removed), Some(Set(VALUE))],
        ),
        (
            "an unknown MOLECULE_LLM_ key",
            "MOLECULE_LLM_SOMETHING_ELSE",
            [Some(Removed); 3],
        ),
        (
            "a billing-mode variable",
            "MOLECULE_LLM_BILLING_MODE",
            [Some(Set("platform_managed")); 3],
        ),
        ("a non-LLM key", "GIT_AUTHOR_NAME", [Some(Kept); 3]),
    ];
    check_rows(
        Mode::PlatformManaged,
        &platform_record(),
        &anthropic_proxy_inputs(),
        rows,
    );
}

#[test]
fn disabled_removes_every_llm_key_whatever_its_origin() {
    let mut rows: Vec<Row<'_>> = registry()
        .forbidden_secret_keys()
        .iter()
        .map(|k| ("a registry LLM key", k.as_str(), [Some(Removed); 3]))
        .collect();
    rows.extend_from_slice(&[
        (
            "an unknown MOLECULE_LLM_ key",
            "MOLECULE_LLM_SOMETHING_ELSE",
            [Some(Removed); 3],
        ),
        (
            "a billing-mode variable",
            "MOLECULE_LLM_BILLING_MODE_RESOLVED",
            [Some(Set("disabled")); 3],
        ),
        ("a non-LLM key", "GIT_AUTHOR_NAME", [Some(Kept); 3]),
    ]);
    check_rows(Mode::Disabled, &disabled_record(), &[], &rows);
}

#[test]
fn disabled_needs_no_credential_and_no_proxy() {
    let built = build_ok(&disabled_record(), &[(W, "PATH", "/usr/bin")]);
    assert_eq!(
        triples(&built),
        vec![
            ("MODEL_PROVIDER", "opus", A),
            ("MOLECULE_LLM_BILLING_MODE", "disabled", A),
            ("MOLECULE_LLM_BILLING_MODE_RESOLVED", "disabled", A),
            ("PATH", "/usr/bin", W),
        ]
    );
    assert!(built.removed_keys.is_empty());
}

#[test]
fn platform_managed_writes_exactly_the_proxy_wiring() {
    let mut entries = anthropic_proxy_inputs();
    entries.extend([
        (W, "CLAUDE_CODE_OAUTH_TOKEN", "customer-oauth"),
        (W, "ANTHROPIC_BASE_URL", "https://api.anthropic.com"),
        (G, "ANTHROPIC_API_KEY", "platform-api-key"),
        (G, "GIT_AUTHOR_NAME", "ci"),
        (P, "OTEL_ENDPOINT", "http://otel:4317"),
    ]);
    let built = build_ok(&platform_record(), &entries);
    assert_eq!(
        triples(&built),
        vec![
            ("ANTHROPIC_API_KEY", USAGE_TOKEN, A),
            ("ANTHROPIC_BASE_URL", ANTHROPIC_PROXY, A),
            ("GIT_AUTHOR_NAME", "ci", G),
            ("MODEL_PROVIDER", "claude-opus-4-7", A),
            ("MOLECULE_LLM_ANTHROPIC_BASE_URL", ANTHROPIC_PROXY, A),
            ("MOLECULE_LLM_BILLING_MODE", "platform_managed", A),
            ("MOLECULE_LLM_BILLING_MODE_RESOLVED", "platform_managed", A),
            ("MOLECULE_LLM_USAGE_TOKEN", USAGE_TOKEN, A),
            ("OTEL_ENDPOINT", "http://otel:4317", P),
        ]
    );
    assert_eq!(built.removed_keys, strings(&["CLAUDE_CODE_OAUTH_TOKEN"]));
    assert_eq!(
        built.added_keys,
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
}

#[test]
fn platform_managed_routes_the_openai_family_too_when_its_proxy_is_given() {
    let mut entries = anthropic_proxy_inputs();
    entries.extend([
        (P, "MOLECULE_LLM_OPENAI_BASE_URL", OPENAI_PROXY),
        (W, "OPENAI_API_KEY", "customer-openai-key"),
        (G, "OPENAI_BASE_URL", "http://litellm:4000"),
    ]);
    let built = build_ok(&platform_record(), &entries);
    assert_eq!(get(&built, "OPENAI_API_KEY"), Some((USAGE_TOKEN, A)));
    assert_eq!(get(&built, "OPENAI_BASE_URL"), Some((OPENAI_PROXY, A)));
    assert_eq!(
        get(&built, "MOLECULE_LLM_OPENAI_BASE_URL"),
        Some((OPENAI_PROXY, A))
    );
    assert_eq!(get(&built, "ANTHROPIC_API_KEY"), Some((USAGE_TOKEN, A)));
    assert_eq!(
        get(&built, "ANTHROPIC_BASE_URL"),
        Some((ANTHROPIC_PROXY, A))
    );
    for key in [
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "MOLECULE_LLM_OPENAI_BASE_URL",
    ] {
        assert!(built.added_keys.iter().any(|k| k == key), "{key}");
        assert!(!built.removed_keys.iter().any(|k| k == key), "{key}");
    }
}

#[test]
fn platform_managed_requires_the_derived_familys_proxy() {
    // codex gpt-5 with no key derives platform-openai: the OpenAI family.
    let rec = record(Some("codex"), Some("gpt-5"), &[], None);
    let err = build_err(&rec, &anthropic_proxy_inputs());
    assert_eq!(
        err,
        EnvError::MissingPlatformProxy {
            missing: "MOLECULE_LLM_OPENAI_BASE_URL".into()
        }
    );

    let built = build_ok(
        &rec,
        &[
            (P, "MOLECULE_LLM_OPENAI_BASE_URL", OPENAI_PROXY),
            (P, "MOLECULE_LLM_USAGE_TOKEN", USAGE_TOKEN),
            (G, "ANTHROPIC_API_KEY", "platform-api-key"),
        ],
    );
    assert_eq!(
        triples(&built),
        vec![
            ("MODEL_PROVIDER", "gpt-5", A),
            ("MOLECULE_LLM_BILLING_MODE", "platform_managed", A),
            ("MOLECULE_LLM_BILLING_MODE_RESOLVED", "platform_managed", A),
            ("MOLECULE_LLM_OPENAI_BASE_URL", OPENAI_PROXY, A),
            ("MOLECULE_LLM_USAGE_TOKEN", USAGE_TOKEN, A),
            ("OPENAI_API_KEY", USAGE_TOKEN, A),
            ("OPENAI_BASE_URL", OPENAI_PROXY, A),
        ]
    );
    assert_eq!(built.removed_keys, strings(&["ANTHROPIC_API_KEY"]));
}

#[test]
fn platform_managed_with_no_derived_family_routes_anthropic() {
    let cases = [
        ("nothing recorded (DEFAULT)", record(None, None, &[], None)),
        (
            "an override over a provider with no family",
            record(
                Some("hermes"),
                Some("openrouter/auto"),
                &[],
                Some("platform_managed"),
            ),
        ),
    ];
    for (description, rec) in cases {
        let err = build_err(
            &rec,
            &[
                (P, "MOLECULE_LLM_OPENAI_BASE_URL", OPENAI_PROXY),
                (P, "MOLECULE_LLM_USAGE_TOKEN", USAGE_TOKEN),
            ],
        );
        assert_eq!(
            err,
            EnvError::MissingPlatformProxy {
                missing: "MOLECULE_LLM_ANTHROPIC_BASE_URL".into()
            },
            "{description}"
        );
        let built = build_ok(&rec, &anthropic_proxy_inputs());
        assert_eq!(
            get(&built, "ANTHROPIC_BASE_URL"),
            Some((ANTHROPIC_PROXY, A)),
            "{description}"
        );
        assert_eq!(
            get(&built, "ANTHROPIC_API_KEY"),
            Some((USAGE_TOKEN, A)),
            "{description}"
        );
        assert_eq!(get(&built, "OPENAI_API_KEY"), None, "{description}");
    }
}

#[test]
fn platform_managed_fails_closed_without_the_proxy_inputs_from_platform() {
    let rec = platform_record();
    let both = "MOLECULE_LLM_ANTHROPIC_BASE_URL, MOLECULE_LLM_USAGE_TOKEN";
    let cases: &[(&str, Entries<'_>, &str)] = &[
        ("nothing given", vec![], both),
        (
            "no usage token",
            vec![(P, "MOLECULE_LLM_ANTHROPIC_BASE_URL", ANTHROPIC_PROXY)],
            "MOLECULE_LLM_USAGE_TOKEN",
        ),
        (
            "no base URL",
            vec![(P, "MOLECULE_LLM_USAGE_TOKEN", USAGE_TOKEN)],
            "MOLECULE_LLM_ANTHROPIC_BASE_URL",
        ),
        (
            "an empty usage token counts as absent",
            vec![
                (P, "MOLECULE_LLM_ANTHROPIC_BASE_URL", ANTHROPIC_PROXY),
                (P, "MOLECULE_LLM_USAGE_TOKEN", ""),
            ],
            "MOLECULE_LLM_USAGE_TOKEN",
        ),
        (
            "an empty base URL counts as absent",
            vec![
                (P, "MOLECULE_LLM_ANTHROPIC_BASE_URL", ""),
                (P, "MOLECULE_LLM_USAGE_TOKEN", USAGE_TOKEN),
            ],
            "MOLECULE_LLM_ANTHROPIC_BASE_URL",
        ),
        (
            "proxy inputs from WORKSPACE are never used",
            vec![
                (W, "MOLECULE_LLM_ANTHROPIC_BASE_URL", ANTHROPIC_PROXY),
                (W, "MOLECULE_LLM_USAGE_TOKEN", USAGE_TOKEN),
            ],
            both,
        ),
        (
            "proxy inputs from GLOBAL are never used",
            vec![
                (G, "MOLECULE_LLM_ANTHROPIC_BASE_URL", ANTHROPIC_PROXY),
                (G, "MOLECULE_LLM_USAGE_TOKEN", USAGE_TOKEN),
            ],
            both,
        ),
        (
            "a vendor key does not replace the proxy",
            vec![
                (G, "ANTHROPIC_API_KEY", "platform-api-key"),
                (G, "ANTHROPIC_BASE_URL", "https://api.anthropic.com"),
            ],
            both,
        ),
    ];
    for (description, entries, missing) in cases {
        assert_eq!(
            build_err(&rec, entries),
            EnvError::MissingPlatformProxy {
                missing: (*missing).into()
            },
            "{description}"
        );
    }
}

#[test]
fn a_workspace_usage_token_is_never_the_token_and_is_removed_in_every_mode() {
    let forged = "forged-usage-token";
    // platform_managed: the PLATFORM token is used, though WORKSPACE outranks PLATFORM.
    let mut entries = anthropic_proxy_inputs();
    entries.push((W, "MOLECULE_LLM_USAGE_TOKEN", forged));
    entries.push((G, "MOLECULE_LLM_ANTHROPIC_BASE_URL", "https://evil.test"));
    let built = build_ok(&platform_record(), &entries);
    assert_eq!(
        get(&built, "MOLECULE_LLM_USAGE_TOKEN"),
        Some((USAGE_TOKEN, A))
    );
    assert_eq!(get(&built, "ANTHROPIC_API_KEY"), Some((USAGE_TOKEN, A)));
    assert_eq!(
        get(&built, "ANTHROPIC_BASE_URL"),
        Some((ANTHROPIC_PROXY, A))
    );
    assert!(built
        .env
        .iter()
        .all(|e| e.value != forged && e.value != "https://evil.test"));

    for (description, rec, extra) in [
        (
            "byok",
            byok_record(),
            vec![(W, "CLAUDE_CODE_OAUTH_TOKEN", "customer-oauth")],
        ),
        ("disabled", disabled_record(), vec![]),
    ] {
        let mut entries = extra.clone();
        entries.push((W, "MOLECULE_LLM_USAGE_TOKEN", forged));
        let built = build_ok(&rec, &entries);
        assert_eq!(
            get(&built, "MOLECULE_LLM_USAGE_TOKEN"),
            None,
            "{description}"
        );
        assert_eq!(
            built.removed_keys,
            strings(&["MOLECULE_LLM_USAGE_TOKEN"]),
            "{description}"
        );
    }
}

#[test]
fn byok_keeps_the_workspaces_own_api_key_and_endpoint() {
    // Case 2's "no ANTHROPIC_API_KEY" means none injected: the customer's own is kept.
    let rec = record(
        Some("langgraph"),
        Some("anthropic:claude-sonnet-4-6"),
        &["ANTHROPIC_API_KEY"],
        None,
    );
    let mut entries = anthropic_proxy_inputs();
    entries.extend([
        (W, "ANTHROPIC_API_KEY", "customer-api-key"),
        (W, "ANTHROPIC_BASE_URL", "https://anthropic.customer.test"),
        (G, "ANTHROPIC_API_KEY", "platform-api-key"),
        (G, "ANTHROPIC_AUTH_TOKEN", "platform-auth-token"),
    ]);
    let built = build_ok(&rec, &entries);
    assert_eq!(
        triples(&built),
        vec![
            ("ANTHROPIC_API_KEY", "customer-api-key", W),
            ("ANTHROPIC_BASE_URL", "https://anthropic.customer.test", W),
            ("MODEL_PROVIDER", "anthropic:claude-sonnet-4-6", A),
            ("MOLECULE_LLM_BILLING_MODE", "byok", A),
            ("MOLECULE_LLM_BILLING_MODE_RESOLVED", "byok", A),
        ]
    );
    assert_eq!(
        built.removed_keys,
        strings(&[
            "ANTHROPIC_AUTH_TOKEN",
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
}

#[test]
fn byok_needs_a_workspace_credential_of_the_derived_provider() {
    let rec = record(
        Some("langgraph"),
        Some("anthropic:claude-sonnet-4-6"),
        &["ANTHROPIC_API_KEY"],
        None,
    );
    let missing = EnvError::MissingByokCredential {
        provider: "anthropic".into(),
        wanted: "ANTHROPIC_API_KEY, ANTHROPIC_AUTH_TOKEN".into(),
    };
    let cases: &[(&str, Entries<'_>, Option<&EnvError>)] = &[
        ("no credential at all", vec![], Some(&missing)),
        (
            "only the platform's key, from GLOBAL",
            vec![(G, "ANTHROPIC_API_KEY", "platform-api-key")],
            Some(&missing),
        ),
        (
            "only the platform's key, from PLATFORM",
            vec![(P, "ANTHROPIC_API_KEY", "platform-api-key")],
            Some(&missing),
        ),
        (
            "only the proxy inputs",
            anthropic_proxy_inputs(),
            Some(&missing),
        ),
        (
            "an empty workspace key counts as absent",
            vec![
                (W, "ANTHROPIC_API_KEY", ""),
                (G, "ANTHROPIC_API_KEY", "platform-api-key"),
            ],
            Some(&missing),
        ),
        (
            "another provider's workspace credential does not do",
            vec![(W, "CLAUDE_CODE_OAUTH_TOKEN", "customer-oauth")],
            Some(&missing),
        ),
        (
            "only a workspace endpoint is not a credential",
            vec![(W, "ANTHROPIC_BASE_URL", "https://anthropic.customer.test")],
            Some(&missing),
        ),
        (
            "the workspace's API key",
            vec![(W, "ANTHROPIC_API_KEY", "customer-api-key")],
            None,
        ),
        (
            "the provider's other credential, from the workspace",
            vec![(W, "ANTHROPIC_AUTH_TOKEN", "customer-auth-token")],
            None,
        ),
    ];
    for (description, entries, want) in cases {
        let (resolution, built) = build(&rec, entries);
        assert_eq!(
            resolution.mode,
            Mode::Byok,
            "never changes the mode: {description}"
        );
        match want {
            Some(e) => assert_eq!(built.as_ref().err(), Some(*e), "{description}"),
            None => assert!(built.is_ok(), "{description}: {built:?}"),
        }
    }
}

#[test]
fn byok_by_override_over_a_platform_provider_takes_any_workspace_vendor_credential() {
    let rec = record(
        Some("claude-code"),
        Some("claude-opus-4-7"),
        &[],
        Some("byok"),
    );
    let missing = EnvError::MissingByokCredential {
        provider: "platform-anthropic".into(),
        wanted: "any vendor credential".into(),
    };
    let cases: &[(&str, Entries<'_>, Option<&EnvError>)] = &[
        ("nothing", vec![], Some(&missing)),
        ("a workspace Groq key", vec![(W, "GROQ_API_KEY", "k")], None),
        (
            "a workspace Anthropic key",
            vec![(W, "ANTHROPIC_API_KEY", "k")],
            None,
        ),
        (
            "a workspace subscription token",
            vec![(W, "CLAUDE_CODE_OAUTH_TOKEN", "k")],
            None,
        ),
        (
            "a GLOBAL key is the platform's, not the customer's",
            vec![(G, "ANTHROPIC_API_KEY", "k")],
            Some(&missing),
        ),
        (
            "a workspace endpoint is not a credential",
            vec![(W, "ANTHROPIC_BASE_URL", "https://x.test")],
            Some(&missing),
        ),
        (
            "a workspace usage token is not a vendor credential",
            vec![(W, "MOLECULE_LLM_USAGE_TOKEN", "k")],
            Some(&missing),
        ),
        (
            "an empty workspace key",
            vec![(W, "GROQ_API_KEY", "")],
            Some(&missing),
        ),
        (
            "a non-LLM workspace key",
            vec![(W, "GITHUB_TOKEN", "k")],
            Some(&missing),
        ),
    ];
    for (description, entries, want) in cases {
        let (resolution, built) = build(&rec, entries);
        assert_eq!(resolution.mode, Mode::Byok, "{description}");
        match want {
            Some(e) => assert_eq!(built.as_ref().err(), Some(*e), "{description}"),
            None => {
                let built = built.unwrap_or_else(|e| panic!("{description}: {e:?}"));
                assert_billing_mode(&built, Mode::Byok, description);
            }
        }
    }

    // With no provider derived at all, the same rule holds.
    let rec = record(None, None, &[], Some("byok"));
    assert_eq!(
        build_err(&rec, &[(G, "OPENAI_API_KEY", "k")]),
        EnvError::MissingByokCredential {
            provider: "any provider".into(),
            wanted: "any vendor credential".into(),
        }
    );
    assert!(build(&rec, &[(W, "OPENAI_API_KEY", "k")]).1.is_ok());
}

#[test]
fn byok_by_override_over_a_non_platform_provider_needs_that_providers_credential() {
    // langgraph openrouter:* owning nothing derives openrouter (the first candidate).
    let rec = record(
        Some("langgraph"),
        Some("openrouter:google/gemini-2.5-flash"),
        &[],
        Some("byok"),
    );
    let missing = EnvError::MissingByokCredential {
        provider: "openrouter".into(),
        wanted: "OPENROUTER_API_KEY".into(),
    };
    assert_eq!(build_err(&rec, &[(W, "GROQ_API_KEY", "k")]), missing);
    // The record does not say the workspace owns OPENAI_API_KEY: the env
    // disagrees with the decision, so BuildEnv fails closed.
    assert_eq!(build_err(&rec, &[(W, "OPENAI_API_KEY", "k")]), missing);
    let built = build_ok(
        &rec,
        &[(W, "OPENROUTER_API_KEY", "or"), (W, "GROQ_API_KEY", "g")],
    );
    assert_eq!(get(&built, "OPENROUTER_API_KEY"), Some(("or", W)));
    assert_eq!(get(&built, "GROQ_API_KEY"), Some(("g", W)));

    // Recorded as owning OPENAI_API_KEY, it derives the OpenAI-key fallback.
    let rec = record(
        Some("langgraph"),
        Some("openrouter:google/gemini-2.5-flash"),
        &["OPENAI_API_KEY"],
        None,
    );
    let built = build_ok(&rec, &[(W, "OPENAI_API_KEY", "k")]);
    assert_eq!(get(&built, "OPENAI_API_KEY"), Some(("k", W)));
    assert_eq!(
        build_err(&rec, &[(W, "OPENROUTER_API_KEY", "or")]),
        EnvError::MissingByokCredential {
            provider: "openrouter-openai-key".into(),
            wanted: "OPENAI_API_KEY".into(),
        }
    );
}

#[test]
fn a_record_and_env_that_disagree_fail_closed_without_changing_the_mode() {
    // The record says the customer owns an Anthropic key (byok), the env has none.
    let rec = record(
        Some("claude-code"),
        Some("claude-opus-4-7"),
        &["ANTHROPIC_API_KEY"],
        None,
    );
    let (resolution, built) = build(&rec, &anthropic_proxy_inputs());
    assert_eq!(resolution.mode, Mode::Byok);
    assert!(
        matches!(built, Err(EnvError::MissingByokCredential { .. })),
        "{built:?}"
    );

    // The record owns nothing (platform_managed), the env carries the customer's key:
    // the key is replaced by the usage token, the mode stays.
    let mut entries = anthropic_proxy_inputs();
    entries.push((W, "ANTHROPIC_API_KEY", "customer-api-key"));
    let (resolution, built) = build(&platform_record(), &entries);
    assert_eq!(resolution.mode, Mode::PlatformManaged);
    let built = built.unwrap();
    assert_eq!(get(&built, "ANTHROPIC_API_KEY"), Some((USAGE_TOKEN, A)));
    assert_billing_mode(&built, Mode::PlatformManaged, "platform_managed");
}

#[test]
fn the_recorded_model_is_written_to_the_runtimes_model_variables() {
    let built = build_ok(&byok_record(), &[(W, "CLAUDE_CODE_OAUTH_TOKEN", "t")]);
    assert_eq!(get(&built, "MODEL_PROVIDER"), Some(("opus", A)));
    assert_eq!(get(&built, "HERMES_DEFAULT_MODEL"), None);
    assert!(built.added_keys.contains(&"MODEL_PROVIDER".to_owned()));

    let hermes = record(
        Some("hermes"),
        Some("openai/gpt-4o"),
        &["OPENROUTER_API_KEY"],
        None,
    );
    let built = build_ok(
        &hermes,
        &[
            (W, "OPENROUTER_API_KEY", "or-key"),
            (W, "MODEL_PROVIDER", "openai/gpt-4o"),
        ],
    );
    assert_eq!(
        triples(&built),
        vec![
            ("HERMES_DEFAULT_MODEL", "openai/gpt-4o", A),
            ("MODEL_PROVIDER", "openai/gpt-4o", A),
            ("MOLECULE_LLM_BILLING_MODE", "byok", A),
            ("MOLECULE_LLM_BILLING_MODE_RESOLVED", "byok", A),
            ("OPENROUTER_API_KEY", "or-key", W),
        ]
    );
    assert!(built.removed_keys.is_empty());
    assert_eq!(
        built.added_keys,
        strings(&[
            "HERMES_DEFAULT_MODEL",
            "MODEL_PROVIDER",
            "MOLECULE_LLM_BILLING_MODE",
            "MOLECULE_LLM_BILLING_MODE_RESOLVED",
        ])
    );
}

#[test]
fn a_candidate_model_that_differs_from_the_recorded_one_is_a_mismatch() {
    let oauth = (W, "CLAUDE_CODE_OAUTH_TOKEN", "t");
    let hermes = record(
        Some("hermes"),
        Some("openai/gpt-4o"),
        &["OPENROUTER_API_KEY"],
        None,
    );
    let or_key = (W, "OPENROUTER_API_KEY", "k");
    let cases: &[(&str, Record, Entries<'_>, Option<EnvError>)] = &[
        (
            "a different model from the workspace",
            byok_record(),
            vec![oauth, (W, "MODEL_PROVIDER", "sonnet")],
            Some(EnvError::ModelMismatch {
                found_in: "MODEL_PROVIDER".into(),
                recorded: "\"opus\"".into(),
            }),
        ),
        (
            "a different model from the platform",
            byok_record(),
            vec![oauth, (P, "MODEL_PROVIDER", "claude-opus-4-7")],
            Some(EnvError::ModelMismatch {
                found_in: "MODEL_PROVIDER".into(),
                recorded: "\"opus\"".into(),
            }),
        ),
        (
            "the winning value differs though a losing one matches",
            byok_record(),
            vec![
                oauth,
                (W, "MODEL_PROVIDER", "haiku"),
                (G, "MODEL_PROVIDER", "opus"),
            ],
            Some(EnvError::ModelMismatch {
                found_in: "MODEL_PROVIDER".into(),
                recorded: "\"opus\"".into(),
            }),
        ),
        (
            "the winning value matches though a losing one differs",
            byok_record(),
            vec![
                oauth,
                (W, "MODEL_PROVIDER", "opus"),
                (G, "MODEL_PROVIDER", "haiku"),
            ],
            None,
        ),
        (
            "matching is exact",
            byok_record(),
            vec![oauth, (W, "MODEL_PROVIDER", "Opus")],
            Some(EnvError::ModelMismatch {
                found_in: "MODEL_PROVIDER".into(),
                recorded: "\"opus\"".into(),
            }),
        ),
        (
            "an empty model variable counts as absent",
            byok_record(),
            vec![oauth, (W, "MODEL_PROVIDER", "")],
            None,
        ),
        (
            "hermes' second model variable is checked too",
            hermes.clone(),
            vec![
                or_key,
                (G, "HERMES_DEFAULT_MODEL", "anthropic/claude-sonnet-4-5"),
            ],
            Some(EnvError::ModelMismatch {
                found_in: "HERMES_DEFAULT_MODEL".into(),
                recorded: "\"openai/gpt-4o\"".into(),
            }),
        ),
        (
            "another runtime's model variable is not a model variable here",
            byok_record(),
            vec![oauth, (W, "HERMES_DEFAULT_MODEL", "something-else")],
            None,
        ),
        (
            "no model recorded and a candidate naming one",
            record(Some("claude-code"), None, &[], None),
            [
                anthropic_proxy_inputs(),
                vec![(W, "MODEL_PROVIDER", "opus")],
            ]
            .concat(),
            Some(EnvError::ModelMismatch {
                found_in: "MODEL_PROVIDER".into(),
                recorded: "none".into(),
            }),
        ),
        (
            "a garbled recorded model is no model",
            record(Some("claude-code"), Some("op us"), &[], None),
            [
                anthropic_proxy_inputs(),
                vec![(G, "MODEL_PROVIDER", "op us")],
            ]
            .concat(),
            Some(EnvError::ModelMismatch {
                found_in: "MODEL_PROVIDER".into(),
                recorded: "none".into(),
            }),
        ),
    ];
    for (description, rec, entries, want) in cases {
        let built = build(rec, entries).1;
        match want {
            Some(e) => assert_eq!(built.as_ref().err(), Some(e), "{description}"),
            None => {
                let built = built.unwrap_or_else(|e| panic!("{description}: {e:?}"));
                assert_eq!(
                    get(&built, "MODEL_PROVIDER"),
                    Some(("opus", A)),
                    "{description}"
                );
            }
        }
    }
}

#[test]
fn with_no_model_recorded_nothing_is_written_to_the_model_variables() {
    let rec = record(Some("hermes"), None, &[], None);
    let mut entries = anthropic_proxy_inputs();
    entries.push((W, "MODEL_PROVIDER", ""));
    let built = build_ok(&rec, &entries);
    assert_eq!(
        get(&built, "MODEL_PROVIDER"),
        Some(("", W)),
        "an empty entry passes untouched"
    );
    assert_eq!(get(&built, "HERMES_DEFAULT_MODEL"), None);
    assert!(!built
        .added_keys
        .iter()
        .any(|k| k == "MODEL_PROVIDER" || k == "HERMES_DEFAULT_MODEL"));
}

#[test]
fn a_model_mismatch_is_reported_before_a_missing_credential_or_proxy() {
    let mismatch = |recorded: &str| EnvError::ModelMismatch {
        found_in: "MODEL_PROVIDER".into(),
        recorded: format!("{recorded:?}"),
    };
    // byok with no customer credential.
    assert_eq!(
        build_err(&byok_record(), &[(W, "MODEL_PROVIDER", "gpt-5")]),
        mismatch("opus")
    );
    // platform_managed with no proxy inputs.
    assert_eq!(
        build_err(&platform_record(), &[(W, "MODEL_PROVIDER", "gpt-5")]),
        mismatch("claude-opus-4-7")
    );
}

#[test]
fn workspace_beats_global_beats_platform_for_every_key() {
    let rec = disabled_record();
    let built = build_ok(
        &rec,
        &[
            (P, "GIT_AUTHOR_NAME", "platform"),
            (G, "GIT_AUTHOR_NAME", "global"),
            (W, "GIT_AUTHOR_NAME", "workspace"),
            (P, "REGION", "platform"),
            (G, "REGION", "global"),
            (P, "LOG_LEVEL", "platform"),
            (W, "EMPTY_WINS", ""),
            (G, "EMPTY_WINS", "global"),
        ],
    );
    assert_eq!(get(&built, "GIT_AUTHOR_NAME"), Some(("workspace", W)));
    assert_eq!(get(&built, "REGION"), Some(("global", G)));
    assert_eq!(get(&built, "LOG_LEVEL"), Some(("platform", P)));
    assert_eq!(get(&built, "EMPTY_WINS"), Some(("", W)));
    assert!(built.removed_keys.is_empty(), "{:?}", built.removed_keys);

    // An LLM key under WORKSPACE and GLOBAL: byok keeps the workspace's value.
    let built = build_ok(
        &byok_record(),
        &[
            (G, "CLAUDE_CODE_OAUTH_TOKEN", "platform-oauth"),
            (W, "CLAUDE_CODE_OAUTH_TOKEN", "customer-oauth"),
        ],
    );
    assert_eq!(
        get(&built, "CLAUDE_CODE_OAUTH_TOKEN"),
        Some(("customer-oauth", W))
    );
}

#[test]
fn the_same_key_twice_under_one_origin_is_an_error() {
    for origin in [W, G, P] {
        let err = CandidateEnv::parse(inputs(&[
            (origin, "A_KEY", "1"),
            (W, "B_KEY", "x"),
            (origin, "A_KEY", "1"),
        ]));
        assert_eq!(
            err,
            Err(EnvError::DuplicateKey {
                key: "A_KEY".into(),
                origin
            }),
            "{origin:?}"
        );
    }
    // The same key under different origins is not a duplicate.
    let env = candidate(&[(W, "A_KEY", "1"), (G, "A_KEY", "2"), (P, "A_KEY", "3")]);
    assert_eq!(env.len(), 3);
    assert_eq!(env.merged(), vec![("A_KEY", "1", W)]);
}

#[test]
fn candidate_env_validation_names_the_failing_entry() {
    let long_value = "v".repeat(MAX_ENV_VALUE_BYTES + 1);
    let cases: Vec<(&str, Vec<EnvInput>, EnvError)> = vec![
        (
            "a key with a hyphen",
            inputs(&[(W, "OK", "1"), (W, "NOT-OK", "2")]),
            EnvError::InvalidKey {
                index: 1,
                source: ValidationError::EnvKey,
            },
        ),
        (
            "an empty key",
            inputs(&[(G, "", "1")]),
            EnvError::InvalidKey {
                index: 0,
                source: ValidationError::EnvKey,
            },
        ),
        (
            "a key starting with a digit",
            inputs(&[(P, "1KEY", "1")]),
            EnvError::InvalidKey {
                index: 0,
                source: ValidationError::EnvKey,
            },
        ),
        (
            "an AUTHORITY-origin entry",
            inputs(&[(W, "OK", "1"), (A, "MOLECULE_LLM_BILLING_MODE", "byok")]),
            EnvError::InvalidOrigin {
                index: 1,
                key: "MOLECULE_LLM_BILLING_MODE".into(),
            },
        ),
        (
            "a value over 64 KiB",
            vec![EnvInput {
                key: "BIG".into(),
                value: long_value,
                origin: W,
            }],
            EnvError::ValueTooLong {
                key: "BIG".into(),
                len: MAX_ENV_VALUE_BYTES + 1,
            },
        ),
        (
            "more than 1024 entries",
            (0..=MAX_ENV_ENTRIES)
                .map(|i| EnvInput {
                    key: format!("K{i}"),
                    value: String::new(),
                    origin: W,
                })
                .collect(),
            EnvError::TooManyEntries {
                count: MAX_ENV_ENTRIES + 1,
            },
        ),
        (
            // B is twice at its second occurrence (index 2) before A is (index
            // 3), though A sorts first.
            "two keys twice: the earlier second occurrence",
            inputs(&[(W, "A", "1"), (W, "B", "1"), (W, "B", "2"), (W, "A", "2")]),
            EnvError::DuplicateKey {
                key: "B".into(),
                origin: W,
            },
        ),
        (
            "a duplicate before an invalid key",
            inputs(&[(G, "A", "1"), (G, "A", "2"), (G, "NOT-OK", "3")]),
            EnvError::DuplicateKey {
                key: "A".into(),
                origin: G,
            },
        ),
        (
            "an invalid key before a duplicate",
            inputs(&[(P, "A", "1"), (P, "NOT-OK", "2"), (P, "A", "3")]),
            EnvError::InvalidKey {
                index: 1,
                source: ValidationError::EnvKey,
            },
        ),
        (
            "a duplicate before too many entries",
            (0..=MAX_ENV_ENTRIES)
                .map(|i| EnvInput {
                    key: format!("K{}", i.min(1)),
                    value: String::new(),
                    origin: W,
                })
                .collect(),
            EnvError::DuplicateKey {
                key: "K1".into(),
                origin: W,
            },
        ),
    ];
    for (description, entries, want) in cases {
        assert_eq!(CandidateEnv::parse(entries), Err(want), "{description}");
    }
}

#[test]
fn candidate_env_limits_are_inclusive() {
    let exactly_max: Vec<EnvInput> = (0..MAX_ENV_ENTRIES)
        .map(|i| EnvInput {
            key: format!("K{i}"),
            value: String::new(),
            origin: [W, G, P][i % 3],
        })
        .collect();
    assert_eq!(
        CandidateEnv::parse(exactly_max).map(|e| e.len()),
        Ok(MAX_ENV_ENTRIES)
    );
    let big = CandidateEnv::parse([EnvInput {
        key: "BIG".into(),
        value: "v".repeat(MAX_ENV_VALUE_BYTES),
        origin: P,
    }]);
    assert_eq!(big.map(|e| e.len()), Ok(1));
    let long_key = "K".repeat(256);
    assert!(CandidateEnv::parse(inputs(&[(W, &long_key, "")])).is_ok());
    let too_long_key = "K".repeat(257);
    assert!(matches!(
        CandidateEnv::parse(inputs(&[(W, &too_long_key, "")])),
        Err(EnvError::InvalidKey { index: 0, .. })
    ));
}

#[test]
fn errors_name_keys_and_never_values() {
    let secret = "sk-ant-very-secret-value";
    let errors = [
        build_err(&byok_record(), &[(G, "CLAUDE_CODE_OAUTH_TOKEN", secret)]),
        build_err(
            &platform_record(),
            &[(W, "MOLECULE_LLM_USAGE_TOKEN", secret)],
        ),
        CandidateEnv::parse(inputs(&[(W, "K", secret), (W, "K", secret)])).unwrap_err(),
        CandidateEnv::parse([EnvInput {
            key: "K".into(),
            value: format!("{secret}{}", "x".repeat(MAX_ENV_VALUE_BYTES)),
            origin: W,
        }])
        .unwrap_err(),
    ];
    for e in errors {
        let shown = e.to_string();
        assert!(!shown.contains(secret), "{shown}");
    }
}

#[test]
fn output_and_key_lists_are_sorted_and_removed_and_added_are_exact() {
    let mut entries = anthropic_proxy_inputs();
    entries.extend([
        (W, "ZZZ_LAST", "z"),
        (G, "AAA_FIRST", "a"),
        (W, "OPENROUTER_API_KEY", "or"),
        (G, "GROQ_API_KEY", "groq"),
        (P, "MOLECULE_LLM_EXTRA", "x"),
        (W, "MODEL_PROVIDER", "claude-opus-4-7"),
        (G, "ANTHROPIC_BASE_URL", "https://api.anthropic.com"),
    ]);
    let built = build_ok(&platform_record(), &entries);
    let keys: Vec<&str> = built.env.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        vec![
            "AAA_FIRST",
            "ANTHROPIC_API_KEY",
            "ANTHROPIC_BASE_URL",
            "MODEL_PROVIDER",
            "MOLECULE_LLM_ANTHROPIC_BASE_URL",
            "MOLECULE_LLM_BILLING_MODE",
            "MOLECULE_LLM_BILLING_MODE_RESOLVED",
            "MOLECULE_LLM_USAGE_TOKEN",
            "ZZZ_LAST",
        ]
    );
    // Removed: in the merged candidate, not in the output. Overwritten keys are added, not removed.
    assert_eq!(
        built.removed_keys,
        strings(&["GROQ_API_KEY", "MOLECULE_LLM_EXTRA", "OPENROUTER_API_KEY"])
    );
    // Added: exactly the entries carrying ORIGIN_AUTHORITY.
    let authority: Vec<String> = built
        .env
        .iter()
        .filter(|e| e.origin == A)
        .map(|e| e.key.clone())
        .collect();
    assert_eq!(built.added_keys, authority);
    assert_eq!(
        built.added_keys,
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
}

#[test]
fn the_billing_mode_variables_always_equal_the_mode() {
    let cases = [
        (
            "byok",
            byok_record(),
            vec![(W, "CLAUDE_CODE_OAUTH_TOKEN", "t")],
            Mode::Byok,
        ),
        (
            "platform_managed",
            platform_record(),
            anthropic_proxy_inputs(),
            Mode::PlatformManaged,
        ),
        ("disabled", disabled_record(), vec![], Mode::Disabled),
    ];
    for (description, rec, mut entries, mode) in cases {
        // Forged values for the mode variables, from every origin, are overwritten.
        entries.extend([
            (W, "MOLECULE_LLM_BILLING_MODE", "byok"),
            (G, "MOLECULE_LLM_BILLING_MODE_RESOLVED", "disabled"),
            (P, "MOLECULE_LLM_BILLING_MODE", "platform_managed"),
        ]);
        let built = build_ok(&rec, &entries);
        assert_billing_mode(&built, mode, description);
    }
}
