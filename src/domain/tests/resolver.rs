//! The resolver's decision table: every rung, default-closed, garbled stored
//! values, the tie-break among candidates, and the runtimes' model conventions.

use super::{record, registry, strings, workspace_id, REVISION};
use crate::domain::{
    registry::BUILTIN_TOML, resolve, resolver::DerivedProvider, CredentialKeys, Mode, Model,
    Registry, Runtime, Source,
};
use crate::wire::convert;

use Mode::{Byok, Disabled, PlatformManaged as Pm};
use Source::{Default as Dflt, DerivedProvider as Derived, Override};

/// One row of the decision table.
struct Case {
    description: &'static str,
    runtime: Option<&'static str>,
    model: Option<&'static str>,
    owned: &'static [&'static str],
    override_mode: Option<&'static str>,
    mode: Mode,
    source: Source,
    provider: Option<&'static str>,
    /// Fragments the trace must contain, each in a later line than the one before.
    trace: &'static [&'static str],
}

fn check(cases: &[Case]) {
    for c in cases {
        let description = c.description;
        let rec = record(c.runtime, c.model, c.owned, c.override_mode);
        let r = resolve(&rec, registry());
        assert_eq!(r.mode, c.mode, "mode: {description}");
        assert_eq!(r.source, c.source, "source: {description}");
        assert_eq!(
            r.provider.as_ref().map(|p| p.id.as_str()),
            c.provider,
            "provider: {description}"
        );
        assert_eq!(
            r.provider.as_ref().map(|p| p.is_platform),
            c.provider
                .map(|id| registry().provider(id).expect("a known provider").platform),
            "provider_is_platform: {description}"
        );
        // The trace as the API shows it, the decision line included.
        let trace = convert::resolution_to_wire(r.clone()).trace;
        let mut from = 0;
        for fragment in c.trace {
            let found = trace[from..].iter().position(|l| l.contains(fragment));
            let Some(at) = found else {
                panic!(
                    "{description}: trace lacks {fragment:?} at or after line {from}: {trace:#?}"
                );
            };
            from += at + 1;
        }
        let decision = format!(
            "decision: {} (source {})",
            c.mode,
            convert::source_name(c.source)
        );
        assert_eq!(
            trace.last(),
            Some(&decision),
            "the trace ends with the decision: {description}"
        );
        if c.mode == Pm {
            assert_eq!(
                r.forbidden_secret_keys,
                registry().forbidden_secret_keys(),
                "forbidden keys: {description}"
            );
        } else {
            assert!(
                r.forbidden_secret_keys.is_empty(),
                "no forbidden keys: {description}"
            );
        }
    }
}

#[test]
fn each_rung_decides_as_the_contract_says_and_the_trace_says_why() {
    check(&[
        Case {
            description: "a valid byok override decides over a platform provider",
            runtime: Some("claude-code"),
            model: Some("claude-opus-4-7"),
            owned: &[],
            override_mode: Some("byok"),
            mode: Byok,
            source: Override,
            provider: Some("platform-anthropic"),
            trace: &[
                "override: byok",
                "derive: rule 2 (runtime claude-code, pattern \"claude-(sonnet|opus|haiku)-.*\") matches model claude-opus-4-7; candidates anthropic, platform-anthropic",
                "derive: workspace owns no candidate's credential; platform candidate platform-anthropic",
                "derive: provider platform-anthropic is the platform's -> platform_managed",
            ],
        },
        Case {
            description: "a valid platform_managed override decides over a byok provider",
            runtime: Some("claude-code"),
            model: Some("opus"),
            owned: &["CLAUDE_CODE_OAUTH_TOKEN"],
            override_mode: Some("platform_managed"),
            mode: Pm,
            source: Override,
            provider: Some("anthropic-oauth"),
            trace: &[
                "override: platform_managed",
                "derive: rule 1 (runtime claude-code, pattern \"opus|sonnet|haiku\") matches model opus; candidates anthropic-oauth",
                "derive: provider anthropic-oauth is not the platform's -> byok",
            ],
        },
        Case {
            description: "a valid disabled override decides over a byok provider",
            runtime: Some("claude-code"),
            model: Some("sonnet"),
            owned: &[],
            override_mode: Some("disabled"),
            mode: Disabled,
            source: Override,
            provider: Some("anthropic-oauth"),
            trace: &["override: disabled", "derive: provider anthropic-oauth"],
        },
        Case {
            description: "a valid disabled override decides over a platform provider",
            runtime: Some("codex"),
            model: Some("gpt-5"),
            owned: &[],
            override_mode: Some("disabled"),
            mode: Disabled,
            source: Override,
            provider: Some("platform-openai"),
            trace: &["override: disabled", "platform candidate platform-openai"],
        },
        Case {
            description: "a valid byok override decides with nothing selected",
            runtime: None,
            model: None,
            owned: &[],
            override_mode: Some("byok"),
            mode: Byok,
            source: Override,
            provider: None,
            trace: &["override: byok", "derive: no runtime and no model recorded"],
        },
        Case {
            description: "a valid disabled override decides for an unknown runtime",
            runtime: Some("my-runtime"),
            model: Some("opus"),
            owned: &[],
            override_mode: Some("disabled"),
            mode: Disabled,
            source: Override,
            provider: None,
            trace: &[
                "override: disabled",
                "derive: no rule for runtime my-runtime matches model opus",
            ],
        },
        Case {
            description: "a derived non-platform provider gives byok",
            runtime: Some("claude-code"),
            model: Some("haiku"),
            owned: &[],
            override_mode: None,
            mode: Byok,
            source: Derived,
            provider: Some("anthropic-oauth"),
            trace: &[
                "override: none",
                "derive: rule 1",
                "derive: provider anthropic-oauth is not the platform's -> byok",
            ],
        },
        Case {
            description: "a derived platform provider gives platform_managed",
            runtime: Some("claude-code"),
            model: Some("claude-sonnet-4-6"),
            owned: &[],
            override_mode: None,
            mode: Pm,
            source: Derived,
            provider: Some("platform-anthropic"),
            trace: &[
                "override: none",
                "derive: rule 2",
                "derive: provider platform-anthropic is the platform's -> platform_managed",
            ],
        },
        Case {
            description: "nothing selected gives platform_managed by default",
            runtime: None,
            model: None,
            owned: &[],
            override_mode: None,
            mode: Pm,
            source: Dflt,
            provider: None,
            trace: &["override: none", "derive: no runtime and no model recorded"],
        },
    ]);
}

#[test]
fn only_a_valid_override_or_a_non_platform_provider_leaves_platform_managed() {
    check(&[
        Case {
            description: "garbled BYOK override over a platform provider is ignored",
            runtime: Some("claude-code"),
            model: Some("claude-opus-4-7"),
            owned: &[],
            override_mode: Some("BYOK"),
            mode: Pm,
            source: Derived,
            provider: Some("platform-anthropic"),
            trace: &["override: stored value \"BYOK\" is not a valid mode; ignored"],
        },
        Case {
            description: "garbled disabled override over a byok provider is ignored",
            runtime: Some("claude-code"),
            model: Some("opus"),
            owned: &[],
            override_mode: Some("Disabled"),
            mode: Byok,
            source: Derived,
            provider: Some("anthropic-oauth"),
            trace: &["override: stored value \"Disabled\" is not a valid mode; ignored"],
        },
        Case {
            description: "garbled override with nothing selected falls to the default",
            runtime: None,
            model: None,
            owned: &[],
            override_mode: Some("none"),
            mode: Pm,
            source: Dflt,
            provider: None,
            trace: &[
                "override: stored value \"none\" is not a valid mode; ignored",
                "derive: no runtime and no model recorded",
            ],
        },
        Case {
            description: "garbled override with an unknown runtime falls to the default",
            runtime: Some("my-runtime"),
            model: Some("opus"),
            owned: &[],
            override_mode: Some("platform-managed"),
            mode: Pm,
            source: Dflt,
            provider: None,
            trace: &[
                "not a valid mode; ignored",
                "derive: no rule for runtime my-runtime",
            ],
        },
        Case {
            description: "a runtime with no model falls to the default",
            runtime: Some("claude-code"),
            model: None,
            owned: &["CLAUDE_CODE_OAUTH_TOKEN"],
            override_mode: None,
            mode: Pm,
            source: Dflt,
            provider: None,
            trace: &["derive: no model recorded"],
        },
        Case {
            description: "a model with no runtime falls to the default",
            runtime: None,
            model: Some("opus"),
            owned: &["CLAUDE_CODE_OAUTH_TOKEN"],
            override_mode: None,
            mode: Pm,
            source: Dflt,
            provider: None,
            trace: &["derive: no runtime recorded"],
        },
        Case {
            description:
                "an unknown runtime falls to the default, even with a subscription token owned",
            runtime: Some("my-runtime"),
            model: Some("opus"),
            owned: &["CLAUDE_CODE_OAUTH_TOKEN"],
            override_mode: None,
            mode: Pm,
            source: Dflt,
            provider: None,
            trace: &["derive: no rule for runtime my-runtime matches model opus"],
        },
        Case {
            description: "an unknown model falls to the default, even with an API key owned",
            runtime: Some("claude-code"),
            model: Some("gpt-4o"),
            owned: &["ANTHROPIC_API_KEY", "OPENAI_API_KEY"],
            override_mode: None,
            mode: Pm,
            source: Dflt,
            provider: None,
            trace: &["derive: no rule for runtime claude-code matches model gpt-4o"],
        },
        Case {
            description: "matching is case-sensitive: Opus is not opus",
            runtime: Some("claude-code"),
            model: Some("Opus"),
            owned: &[],
            override_mode: None,
            mode: Pm,
            source: Dflt,
            provider: None,
            trace: &["no rule for runtime claude-code matches model Opus"],
        },
        Case {
            description: "runtimes are case-sensitive too",
            runtime: Some("Claude-Code"),
            model: Some("opus"),
            owned: &[],
            override_mode: None,
            mode: Pm,
            source: Dflt,
            provider: None,
            trace: &["no rule for runtime Claude-Code matches model opus"],
        },
        Case {
            description: "a pattern matches the whole model, not a prefix",
            runtime: Some("claude-code"),
            model: Some("opus-latest"),
            owned: &[],
            override_mode: None,
            mode: Pm,
            source: Dflt,
            provider: None,
            trace: &["no rule for runtime claude-code matches model opus-latest"],
        },
        Case {
            description: "a langgraph provider prefix with no rule falls to the default",
            runtime: Some("langgraph"),
            model: Some("ollama:llama3"),
            owned: &[],
            override_mode: None,
            mode: Pm,
            source: Dflt,
            provider: None,
            trace: &["no rule for runtime langgraph matches model ollama:llama3"],
        },
        Case {
            description: "a hermes vendor prefix with no rule falls to the default",
            runtime: Some("hermes"),
            model: Some("auto/whatever"),
            owned: &["OPENROUTER_API_KEY"],
            override_mode: None,
            mode: Pm,
            source: Dflt,
            provider: None,
            trace: &["no rule for runtime hermes matches model auto/whatever"],
        },
    ]);
}

#[test]
fn garbled_stored_fields_are_ignored_and_named_in_the_trace() {
    check(&[
        Case {
            description: "a garbled runtime is ignored, so nothing can be derived",
            runtime: Some("claude code"),
            model: Some("opus"),
            owned: &[],
            override_mode: None,
            mode: Pm,
            source: Dflt,
            provider: None,
            trace: &[
                "runtime: stored value \"claude code\" is invalid; ignored",
                "derive: no runtime recorded",
            ],
        },
        Case {
            description: "a garbled model is ignored, so nothing can be derived",
            runtime: Some("claude-code"),
            model: Some("op us"),
            owned: &[],
            override_mode: None,
            mode: Pm,
            source: Dflt,
            provider: None,
            trace: &[
                "model: stored value \"op us\" is invalid; ignored",
                "derive: no model recorded",
            ],
        },
        Case {
            description:
                "garbled credential keys are ignored as a whole: the platform candidate wins",
            runtime: Some("claude-code"),
            model: Some("claude-opus-4-7"),
            owned: &["ANTHROPIC_API_KEY", "NOT-A-KEY"],
            override_mode: None,
            mode: Pm,
            source: Derived,
            provider: Some("platform-anthropic"),
            trace: &[
                "credential_keys: stored value \"ANTHROPIC_API_KEY,NOT-A-KEY\" is invalid; ignored",
                "platform candidate platform-anthropic",
            ],
        },
        Case {
            description: "a garbled runtime does not stop a valid override",
            runtime: Some("hermes\t"),
            model: Some("openai/gpt-4o"),
            owned: &["OPENROUTER_API_KEY"],
            override_mode: Some("byok"),
            mode: Byok,
            source: Override,
            provider: None,
            trace: &[
                "override: byok",
                "runtime: stored value \"hermes\\t\" is invalid; ignored",
            ],
        },
        Case {
            description: "every garbled field is named, in field order",
            runtime: Some("a b"),
            model: Some("c d"),
            owned: &["e-f"],
            override_mode: Some("g"),
            mode: Pm,
            source: Dflt,
            provider: None,
            trace: &[
                "override: stored value \"g\" is not a valid mode",
                "runtime: stored value \"a b\" is invalid",
                "model: stored value \"c d\" is invalid",
                "credential_keys: stored value \"e-f\" is invalid",
                "derive: no runtime and no model recorded",
            ],
        },
    ]);
}

#[test]
fn several_candidates_are_broken_by_the_credentials_the_workspace_owns() {
    check(&[
        Case {
            description: "claude-code versioned id with ANTHROPIC_API_KEY owned: the customer's key",
            runtime: Some("claude-code"),
            model: Some("claude-opus-4-7"),
            owned: &["ANTHROPIC_API_KEY"],
            override_mode: None,
            mode: Byok,
            source: Derived,
            provider: Some("anthropic"),
            trace: &["derive: workspace owns ANTHROPIC_API_KEY, a credential of anthropic"],
        },
        Case {
            description: "claude-code versioned id with the second credential of the provider owned",
            runtime: Some("claude-code"),
            model: Some("claude-haiku-4-5"),
            owned: &["ANTHROPIC_AUTH_TOKEN"],
            override_mode: None,
            mode: Byok,
            source: Derived,
            provider: Some("anthropic"),
            trace: &["derive: workspace owns ANTHROPIC_AUTH_TOKEN, a credential of anthropic"],
        },
        Case {
            description: "claude-code versioned id without an Anthropic key: the platform's",
            runtime: Some("claude-code"),
            model: Some("claude-opus-4-7"),
            owned: &["CLAUDE_CODE_OAUTH_TOKEN", "OPENAI_API_KEY"],
            override_mode: None,
            mode: Pm,
            source: Derived,
            provider: Some("platform-anthropic"),
            trace: &["derive: workspace owns no candidate's credential; platform candidate platform-anthropic"],
        },
        Case {
            description: "hermes openai/* with OPENROUTER_API_KEY runs on openrouter",
            runtime: Some("hermes"),
            model: Some("openai/gpt-4o"),
            owned: &["OPENROUTER_API_KEY"],
            override_mode: None,
            mode: Byok,
            source: Derived,
            provider: Some("openrouter"),
            trace: &["derive: workspace owns OPENROUTER_API_KEY, a credential of openrouter"],
        },
        Case {
            description: "hermes openai/* owning two candidates' keys: the first candidate owned wins",
            runtime: Some("hermes"),
            model: Some("openai/gpt-4o"),
            owned: &["OPENAI_API_KEY", "OPENROUTER_API_KEY"],
            override_mode: None,
            mode: Byok,
            source: Derived,
            provider: Some("openrouter"),
            trace: &["a credential of openrouter"],
        },
        Case {
            description: "hermes openai/* owning only OPENAI_API_KEY runs on the customer's OpenAI key",
            runtime: Some("hermes"),
            model: Some("openai/gpt-4o"),
            owned: &["OPENAI_API_KEY"],
            override_mode: None,
            mode: Byok,
            source: Derived,
            provider: Some("openai"),
            trace: &["derive: workspace owns OPENAI_API_KEY, a credential of openai"],
        },
        Case {
            description: "hermes openai/* owning no candidate's key: the platform candidate",
            runtime: Some("hermes"),
            model: Some("openai/gpt-4o"),
            owned: &["GROQ_API_KEY"],
            override_mode: None,
            mode: Pm,
            source: Derived,
            provider: Some("platform-openai"),
            trace: &["platform candidate platform-openai"],
        },
        Case {
            description: "hermes nousresearch/* owning nothing and with no platform candidate: the first",
            runtime: Some("hermes"),
            model: Some("nousresearch/hermes-4-405b"),
            owned: &[],
            override_mode: None,
            mode: Byok,
            source: Derived,
            provider: Some("nous"),
            trace: &["derive: workspace owns no candidate's credential; first candidate nous"],
        },
        Case {
            description: "hermes nousresearch/* owning only the second candidate's key: the second",
            runtime: Some("hermes"),
            model: Some("nousresearch/hermes-4-405b"),
            owned: &["OPENROUTER_API_KEY"],
            override_mode: None,
            mode: Byok,
            source: Derived,
            provider: Some("openrouter"),
            trace: &["derive: workspace owns OPENROUTER_API_KEY, a credential of openrouter"],
        },
        Case {
            description: "hermes nousresearch/* owning NOUS_API_KEY: nous",
            runtime: Some("hermes"),
            model: Some("nousresearch/hermes-4-405b"),
            owned: &["NOUS_API_KEY", "OPENROUTER_API_KEY"],
            override_mode: None,
            mode: Byok,
            source: Derived,
            provider: Some("nous"),
            trace: &["derive: workspace owns NOUS_API_KEY, a credential of nous"],
        },
        Case {
            description: "the provider is filled when the override decides after a tie-break",
            runtime: Some("claude-code"),
            model: Some("claude-opus-4-7"),
            owned: &["ANTHROPIC_API_KEY"],
            override_mode: Some("platform_managed"),
            mode: Pm,
            source: Override,
            provider: Some("anthropic"),
            trace: &["override: platform_managed", "a credential of anthropic"],
        },
    ]);
}

#[test]
fn claude_code_aliases_are_the_customers_subscription_whatever_is_owned() {
    for model in ["opus", "sonnet", "haiku"] {
        for owned in [
            &[][..],
            &["CLAUDE_CODE_OAUTH_TOKEN"][..],
            &["ANTHROPIC_API_KEY"][..],
            &[
                "ANTHROPIC_API_KEY",
                "ANTHROPIC_AUTH_TOKEN",
                "OPENAI_API_KEY",
            ][..],
        ] {
            let description = format!("claude-code + {model}, owning {owned:?}");
            let r = resolve(
                &record(Some("claude-code"), Some(model), owned, None),
                registry(),
            );
            assert_eq!(r.mode, Byok, "{description}");
            assert_eq!(r.source, Derived, "{description}");
            assert_eq!(
                r.provider,
                Some(DerivedProvider {
                    id: "anthropic-oauth".into(),
                    is_platform: false,
                    family: Some("anthropic".into()),
                    credentials: strings(&["CLAUDE_CODE_OAUTH_TOKEN"]),
                }),
                "{description}"
            );
        }
    }
}

#[test]
fn each_runtimes_model_convention_derives_the_right_provider() {
    check(&[
        Case {
            description: "langgraph anthropic:* with the customer's key",
            runtime: Some("langgraph"),
            model: Some("anthropic:claude-sonnet-4-6"),
            owned: &["ANTHROPIC_API_KEY"],
            override_mode: None,
            mode: Byok,
            source: Derived,
            provider: Some("anthropic"),
            trace: &["pattern \"anthropic:.+\") matches model anthropic:claude-sonnet-4-6"],
        },
        Case {
            description: "langgraph anthropic:* without a key",
            runtime: Some("langgraph"),
            model: Some("anthropic:claude-sonnet-4-6"),
            owned: &[],
            override_mode: None,
            mode: Pm,
            source: Derived,
            provider: Some("platform-anthropic"),
            trace: &["platform candidate platform-anthropic"],
        },
        Case {
            description: "langgraph openai:* with the customer's key",
            runtime: Some("langgraph"),
            model: Some("openai:gpt-4.1-mini"),
            owned: &["OPENAI_API_KEY"],
            override_mode: None,
            mode: Byok,
            source: Derived,
            provider: Some("openai"),
            trace: &["pattern \"openai:.+\")", "a credential of openai"],
        },
        Case {
            description: "langgraph openai:* without a key",
            runtime: Some("langgraph"),
            model: Some("openai:gpt-4.1-mini"),
            owned: &[],
            override_mode: None,
            mode: Pm,
            source: Derived,
            provider: Some("platform-openai"),
            trace: &["platform candidate platform-openai"],
        },
        Case {
            description: "langgraph bare model name is Anthropic, the platform's without a key",
            runtime: Some("langgraph"),
            model: Some("claude-sonnet-4-6"),
            owned: &[],
            override_mode: None,
            mode: Pm,
            source: Derived,
            provider: Some("platform-anthropic"),
            trace: &["pattern \"[^:]+\") matches model claude-sonnet-4-6"],
        },
        Case {
            description: "langgraph bare model name with the customer's Anthropic key",
            runtime: Some("deepagents"),
            model: Some("claude-sonnet-4-6"),
            owned: &["ANTHROPIC_API_KEY"],
            override_mode: None,
            mode: Byok,
            source: Derived,
            provider: Some("anthropic"),
            trace: &["a credential of anthropic"],
        },
        Case {
            description: "langgraph openrouter:* owning no key is openrouter, the first candidate",
            runtime: Some("langgraph"),
            model: Some("openrouter:google/gemini-2.5-flash"),
            owned: &[],
            override_mode: None,
            mode: Byok,
            source: Derived,
            provider: Some("openrouter"),
            trace: &[
                "pattern \"openrouter:.+\") matches model openrouter:google/gemini-2.5-flash; candidates openrouter, openrouter-openai-key",
                "derive: workspace owns no candidate's credential; first candidate openrouter",
                "derive: provider openrouter is not the platform's -> byok",
            ],
        },
        Case {
            description: "langgraph openrouter:* owning OPENROUTER_API_KEY is openrouter",
            runtime: Some("langgraph"),
            model: Some("openrouter:google/gemini-2.5-flash"),
            owned: &["OPENROUTER_API_KEY", "OPENAI_API_KEY"],
            override_mode: None,
            mode: Byok,
            source: Derived,
            provider: Some("openrouter"),
            trace: &["derive: workspace owns OPENROUTER_API_KEY, a credential of openrouter"],
        },
        Case {
            description: "crewai openrouter:* owning only OPENAI_API_KEY falls back to it",
            runtime: Some("crewai"),
            model: Some("openrouter:google/gemini-2.5-flash"),
            owned: &["OPENAI_API_KEY"],
            override_mode: None,
            mode: Byok,
            source: Derived,
            provider: Some("openrouter-openai-key"),
            trace: &["derive: workspace owns OPENAI_API_KEY, a credential of openrouter-openai-key"],
        },
        Case {
            description: "langgraph groq:* is groq",
            runtime: Some("langgraph"),
            model: Some("groq:llama-3.3-70b"),
            owned: &["GROQ_API_KEY"],
            override_mode: None,
            mode: Byok,
            source: Derived,
            provider: Some("groq"),
            trace: &["candidates groq"],
        },
        Case {
            description: "langgraph google_genai:* is google",
            runtime: Some("langgraph"),
            model: Some("google_genai:gemini-2.5-pro"),
            owned: &[],
            override_mode: None,
            mode: Byok,
            source: Derived,
            provider: Some("google"),
            trace: &["candidates google"],
        },
        Case {
            description: "hermes anthropic/* with the customer's key",
            runtime: Some("hermes"),
            model: Some("anthropic/claude-sonnet-4-5"),
            owned: &["ANTHROPIC_API_KEY"],
            override_mode: None,
            mode: Byok,
            source: Derived,
            provider: Some("anthropic"),
            trace: &["pattern \"anthropic/.+\")"],
        },
        Case {
            description: "hermes anthropic/* without a key",
            runtime: Some("hermes"),
            model: Some("anthropic/claude-sonnet-4-5"),
            owned: &[],
            override_mode: None,
            mode: Pm,
            source: Derived,
            provider: Some("platform-anthropic"),
            trace: &["platform candidate platform-anthropic"],
        },
        Case {
            description: "hermes minimax/* is minimax",
            runtime: Some("hermes"),
            model: Some("minimax/MiniMax-M2.7"),
            owned: &["MINIMAX_API_KEY"],
            override_mode: None,
            mode: Byok,
            source: Derived,
            provider: Some("minimax"),
            trace: &["candidates minimax"],
        },
        Case {
            description: "hermes openrouter/* is openrouter",
            runtime: Some("hermes"),
            model: Some("openrouter/auto"),
            owned: &[],
            override_mode: None,
            mode: Byok,
            source: Derived,
            provider: Some("openrouter"),
            trace: &["candidates openrouter"],
        },
        Case {
            description: "gemini-cli gemini-* is google",
            runtime: Some("gemini-cli"),
            model: Some("gemini-2.5-pro"),
            owned: &["GEMINI_API_KEY"],
            override_mode: None,
            mode: Byok,
            source: Derived,
            provider: Some("google"),
            trace: &["pattern \"gemini-.+\") matches model gemini-2.5-pro; candidates google"],
        },
        Case {
            description: "gemini-cli with a model that is not gemini-* falls to the default",
            runtime: Some("gemini-cli"),
            model: Some("gpt-4o"),
            owned: &["GEMINI_API_KEY"],
            override_mode: None,
            mode: Pm,
            source: Dflt,
            provider: None,
            trace: &["no rule for runtime gemini-cli matches model gpt-4o"],
        },
        Case {
            description: "codex gpt-* without a key is the platform's OpenAI",
            runtime: Some("codex"),
            model: Some("gpt-5"),
            owned: &[],
            override_mode: None,
            mode: Pm,
            source: Derived,
            provider: Some("platform-openai"),
            trace: &["platform candidate platform-openai"],
        },
        Case {
            description: "codex o-series with the customer's OpenAI key",
            runtime: Some("codex"),
            model: Some("o4-mini"),
            owned: &["OPENAI_API_KEY"],
            override_mode: None,
            mode: Byok,
            source: Derived,
            provider: Some("openai"),
            trace: &["a credential of openai"],
        },
        Case {
            description: "codex MiniMax models are minimax",
            runtime: Some("codex"),
            model: Some("codex-MiniMax-M2.7"),
            owned: &[],
            override_mode: None,
            mode: Byok,
            source: Derived,
            provider: Some("minimax"),
            trace: &["candidates minimax"],
        },
    ]);
}

#[test]
fn the_trace_lists_every_rung_evaluated_in_order() {
    let r = resolve(
        &record(
            Some("claude-code"),
            Some("claude-opus-4-7"),
            &["ANTHROPIC_API_KEY"],
            None,
        ),
        registry(),
    );
    assert_eq!(
        convert::resolution_to_wire(r.clone()).trace,
        strings(&[
            "override: none",
            "derive: rule 2 (runtime claude-code, pattern \"claude-(sonnet|opus|haiku)-.*\") matches model claude-opus-4-7; candidates anthropic, platform-anthropic",
            "derive: workspace owns ANTHROPIC_API_KEY, a credential of anthropic",
            "derive: provider anthropic is not the platform's -> byok",
            "decision: byok (source DERIVED_PROVIDER)",
        ])
    );

    let r = resolve(&record(None, None, &[], Some("byok ")), registry());
    assert_eq!(
        convert::resolution_to_wire(r.clone()).trace,
        strings(&[
            "override: stored value \"byok \" is not a valid mode; ignored",
            "derive: no runtime and no model recorded",
            "decision: platform_managed (source DEFAULT)",
        ])
    );
}

#[test]
fn a_very_long_garbled_value_is_shortened_in_the_trace() {
    let long = format!("x{}", "y".repeat(500));
    let r = resolve(&record(None, None, &[], Some(&long)), registry());
    let line = &r.trace[0];
    assert!(line.len() < 200, "{line}");
    assert!(line.starts_with("override: stored value \"xyyy"), "{line}");
    assert!(line.contains('…'), "{line}");
}

#[test]
fn the_resolution_echoes_the_record_it_was_made_on() {
    let r = resolve(
        &record(
            Some("hermes"),
            Some("openai/gpt-4o"),
            &["OPENROUTER_API_KEY", "GROQ_API_KEY", "OPENROUTER_API_KEY"],
            Some("disabled"),
        ),
        registry(),
    );
    assert_eq!(r.workspace_id, workspace_id());
    assert_eq!(r.revision, REVISION);
    assert_eq!(r.runtime, Some(Runtime::parse("hermes").unwrap()));
    assert_eq!(r.model, Some(Model::parse("openai/gpt-4o").unwrap()));
    assert_eq!(r.override_mode, Some(Disabled));
    assert_eq!(
        r.credential_keys,
        strings(&["GROQ_API_KEY", "OPENROUTER_API_KEY"])
    );
    assert_eq!(
        r.provider,
        Some(DerivedProvider {
            id: "openrouter".into(),
            is_platform: false,
            family: None,
            credentials: strings(&["OPENROUTER_API_KEY"]),
        })
    );

    let garbled = resolve(
        &record(Some("a b"), Some("c d"), &["e-f"], Some("BYOK")),
        registry(),
    );
    assert_eq!(
        garbled.override_mode, None,
        "a garbled override is reported unset"
    );
    assert_eq!(garbled.runtime, None);
    assert_eq!(garbled.model, None);
    assert!(garbled.credential_keys.is_empty());
}

#[test]
fn forbidden_secret_keys_are_every_llm_key_sorted_only_for_platform_managed() {
    let cases = [
        (
            "derived platform_managed",
            record(Some("codex"), Some("gpt-5"), &[], None),
            Pm,
        ),
        (
            "default platform_managed",
            record(None, None, &[], None),
            Pm,
        ),
        (
            "override platform_managed over byok",
            record(
                Some("claude-code"),
                Some("opus"),
                &[],
                Some("platform_managed"),
            ),
            Pm,
        ),
        (
            "derived byok",
            record(Some("claude-code"), Some("opus"), &[], None),
            Byok,
        ),
        ("override byok", record(None, None, &[], Some("byok")), Byok),
        (
            "override disabled",
            record(None, None, &[], Some("disabled")),
            Disabled,
        ),
    ];
    for (description, rec, mode) in cases {
        let r = resolve(&rec, registry());
        assert_eq!(r.mode, mode, "{description}");
        if mode != Pm {
            assert_eq!(
                r.forbidden_secret_keys,
                Vec::<String>::new(),
                "{description}"
            );
            continue;
        }
        let f = &r.forbidden_secret_keys;
        assert!(
            f.windows(2).all(|w| w[0] < w[1]),
            "sorted and unique: {description}: {f:?}"
        );
        for key in [
            "ANTHROPIC_API_KEY",
            "ANTHROPIC_AUTH_TOKEN",
            "ANTHROPIC_BASE_URL",
            "CLAUDE_CODE_OAUTH_TOKEN",
            "OPENAI_API_KEY",
            "OPENAI_BASE_URL",
            "OPENROUTER_API_KEY",
            "GEMINI_API_KEY",
            "HERMES_CUSTOM_BASE_URL",
            "LITELLM_MASTER_KEY",
            "MOLECULE_LLM_USAGE_TOKEN",
            "MOLECULE_LLM_ANTHROPIC_BASE_URL",
            "MOLECULE_LLM_OPENAI_BASE_URL",
        ] {
            assert!(f.iter().any(|k| k == key), "{description}: lacks {key}");
        }
        for key in ["MODEL_PROVIDER", "PATH", "HERMES_DEFAULT_MODEL"] {
            assert!(!f.iter().any(|k| k == key), "{description}: has {key}");
        }
        // Every credential and endpoint the registry names, nothing else but proxy inputs.
        let reg = registry();
        for p in reg.providers() {
            for k in p.credentials.iter().chain(&p.endpoints) {
                assert!(
                    f.iter().any(|x| k == x.as_str()),
                    "{description}: lacks {k} of {}",
                    p.id
                );
            }
        }
        for k in f {
            assert!(reg.is_llm_key(k), "{description}: {k} is not an LLM key");
        }
    }
}

#[test]
fn an_unchanged_record_resolves_identically_every_time() {
    let rec = record(
        Some("hermes"),
        Some("openai/gpt-4o"),
        &["OPENAI_API_KEY"],
        None,
    );
    assert_eq!(resolve(&rec, registry()), resolve(&rec, registry()));
}

/// The built-in registry with `rule` inserted before its first rule.
fn builtin_with_rule_first(rule: &str) -> Registry {
    let at = BUILTIN_TOML
        .find("\n[[rules]]\n")
        .expect("the built-in registry has rules");
    let text = format!("{}\n{rule}\n{}", &BUILTIN_TOML[..at], &BUILTIN_TOML[at..]);
    Registry::from_toml(&text, "test").expect("the edited registry loads")
}

#[test]
fn a_model_can_be_made_platform_billed_explicitly() {
    let reg = builtin_with_rule_first(
        "[[rules]]\nruntimes = [\"claude-code\"]\npattern = \"claude-opus-4-7|opus\"\ncandidates = [\"platform-anthropic\"]\n",
    );
    for (description, model, owned) in [
        (
            "the versioned id with the customer's API key",
            "claude-opus-4-7",
            &["ANTHROPIC_API_KEY"][..],
        ),
        (
            "the alias with the customer's subscription",
            "opus",
            &["CLAUDE_CODE_OAUTH_TOKEN"][..],
        ),
    ] {
        let r = resolve(&record(Some("claude-code"), Some(model), owned, None), &reg);
        assert_eq!(r.mode, Pm, "{description}");
        assert_eq!(r.source, Derived, "{description}");
        assert_eq!(
            r.provider.map(|p| p.id),
            Some("platform-anthropic".into()),
            "{description}"
        );
    }
    // Models the explicit rule does not name keep their built-in rule.
    let r = resolve(
        &record(Some("claude-code"), Some("sonnet"), &[], None),
        &reg,
    );
    assert_eq!(
        (r.mode, r.provider.map(|p| p.id)),
        (Byok, Some("anthropic-oauth".into()))
    );
}

#[test]
fn the_first_matching_rule_in_registry_order_is_used() {
    let text = r#"
usage_token = "MOLECULE_LLM_USAGE_TOKEN"
default_family = "anthropic"
model_vars = ["MODEL_PROVIDER"]

[[families]]
id = "anthropic"
proxy_base_url = "MOLECULE_LLM_ANTHROPIC_BASE_URL"
endpoints = ["ANTHROPIC_BASE_URL"]
credentials = ["ANTHROPIC_API_KEY"]

[[providers]]
id = "platform-anthropic"
platform = true
family = "anthropic"
credentials = ["ANTHROPIC_API_KEY"]

[[providers]]
id = "a"
platform = false
credentials = ["A_KEY"]

[[providers]]
id = "b"
platform = false
credentials = ["B_KEY"]

[[rules]]
runtimes = ["rt"]
pattern = "m-.*"
candidates = ["a", "platform-anthropic", "b"]

[[rules]]
runtimes = ["rt"]
pattern = "m-1"
candidates = ["b"]

[[rules]]
runtimes = ["rt"]
pattern = "n"
candidates = ["a", "b"]
"#;
    let reg = Registry::from_toml(text, "test").expect("loads");
    let cases: &[(&str, &str, &[&str], Mode, &str)] = &[
        (
            "the earlier, broader rule wins over a later exact one",
            "m-1",
            &[],
            Pm,
            "platform-anthropic",
        ),
        (
            "the first owned candidate wins even after a platform candidate",
            "m-1",
            &["B_KEY"],
            Byok,
            "b",
        ),
        (
            "the first owned candidate wins over a later owned one",
            "m-1",
            &["B_KEY", "A_KEY"],
            Byok,
            "a",
        ),
        (
            "owning the platform candidate's credential picks it",
            "m-2",
            &["ANTHROPIC_API_KEY"],
            Pm,
            "platform-anthropic",
        ),
        (
            "no candidate owned and no platform candidate: the first",
            "n",
            &[],
            Byok,
            "a",
        ),
        (
            "the second candidate owned: the second",
            "n",
            &["B_KEY"],
            Byok,
            "b",
        ),
    ];
    for (description, model, owned, mode, provider) in cases {
        let owned_keys = CredentialKeys::parse(owned.iter().copied()).unwrap();
        let mut rec = record(Some("rt"), Some(model), &[], None);
        rec.credential_keys = crate::domain::Stored::from_option(Some(owned_keys));
        let r = resolve(&rec, &reg);
        assert_eq!(r.mode, *mode, "{description}");
        assert_eq!(
            r.provider.map(|p| p.id).as_deref(),
            Some(*provider),
            "{description}"
        );
    }
}
