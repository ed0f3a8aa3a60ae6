//! Property tests: the contract's invariants over arbitrary records and
//! candidate envs. Each case resolves a record, builds its env, and checks
//! the result against the contract stated independently of the builder:
//! which failure it must be, or what every output entry must be.

use std::collections::{BTreeMap, BTreeSet};

use proptest::{
    collection::vec,
    prelude::*,
    sample::{select, subsequence},
};

use super::{registry, workspace_id, StoredText, A, G, P, W};
use crate::domain::{
    build_env,
    registry::{BILLING_MODE_VARS, PROXY_PREFIX},
    resolve, CandidateEnv, EnvError, EnvInput, Mode, Origin, Record, Resolution, Source, Stored,
};

/// The usual PLATFORM proxy inputs (random PLATFORM entries may supply others).
/// Upper-case letters, so no randomly drawn value (lower-case only) can equal
/// one: outside platform_managed, a match in the output is a leak.
const TOKEN: &str = "Usage-Token-P";
const ANTHROPIC_URL: &str = "https://Proxy.test/anthropic";
const OPENAI_URL: &str = "https://Proxy.test/openai";

const KNOWN_MODELS: &[&str] = &[
    "opus",
    "sonnet",
    "haiku",
    "claude-opus-4-7",
    "claude-sonnet-4-6",
    "anthropic:claude-sonnet-4-6",
    "openai:gpt-4.1-mini",
    "openrouter:google/gemini-2.5-flash",
    "groq:llama-3.3-70b",
    "google_genai:gemini-2.5-pro",
    "ollama:llama3",
    "gpt-4o",
    "anthropic/claude-sonnet-4-5",
    "openai/gpt-4o",
    "openrouter/auto",
    "nousresearch/hermes-4-405b",
    "minimax/MiniMax-M2.7",
    "custom/my-model",
    "gemini/gemini-2.5-pro",
    "gemini-2.5-pro",
    "gpt-5",
    "o4-mini",
    "codex-MiniMax-M2.7",
];

fn sorted_unique(items: impl IntoIterator<Item = String>) -> Vec<String> {
    items
        .into_iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn known_runtimes() -> Vec<String> {
    sorted_unique(
        registry()
            .rules()
            .iter()
            .flat_map(|r| r.runtimes.iter().cloned()),
    )
}

fn credential_names() -> Vec<String> {
    sorted_unique(
        registry()
            .providers()
            .iter()
            .flat_map(|p| p.credentials.iter().map(|k| k.to_string())),
    )
}

/// A stored runtime or model: absent, empty, known, random, or garbled.
fn arb_name(known: Vec<String>) -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(String::new())),
        8 => select(known).prop_map(Some),
        2 => "[a-zA-Z0-9:/._-]{1,16}".prop_map(Some),
        1 => "[a-z]{1,4}[ \t\n][a-z]{1,4}".prop_map(Some),
    ]
}

fn arb_fields() -> impl Strategy<Value = StoredText> {
    let owned = (
        subsequence(credential_names(), 0..=4),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(mut keys, garble)| {
            if garble {
                keys.push("NOT-A-KEY".into());
            }
            keys
        });
    let override_mode = prop_oneof![
        4 => Just(None),
        4 => select(vec!["platform_managed", "byok", "disabled"]).prop_map(|s| Some(s.to_owned())),
        1 => select(vec!["BYOK", "none", "platform-managed", " byok"]).prop_map(|s| Some(s.to_owned())),
    ];
    (
        arb_name(known_runtimes()),
        arb_name(KNOWN_MODELS.iter().map(|m| (*m).to_owned()).collect()),
        owned,
        override_mode,
    )
        .prop_map(
            |(runtime, model, credential_keys, override_mode)| StoredText {
                runtime,
                model,
                credential_keys,
                override_mode,
            },
        )
}

fn arb_origin() -> impl Strategy<Value = Origin> {
    select(vec![W, G, P])
}

fn arb_key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(registry().forbidden_secret_keys().to_vec()),
        2 => select(vec![
            "MOLECULE_LLM_USAGE_TOKEN",
            "MOLECULE_LLM_ANTHROPIC_BASE_URL",
            "MOLECULE_LLM_OPENAI_BASE_URL",
            "MOLECULE_LLM_BILLING_MODE",
            "MOLECULE_LLM_BILLING_MODE_RESOLVED",
        ])
        .prop_map(str::to_owned),
        1 => "MOLECULE_LLM_[A-Z]{1,6}",
        2 => select(vec!["MODEL_PROVIDER", "HERMES_DEFAULT_MODEL"]).prop_map(str::to_owned),
        4 => "[A-Za-z_][A-Za-z0-9_]{0,10}",
    ]
}

/// Values: empty, a few fixed ones, the recorded model (so model variables
/// often agree with it), other models, or random lower-case text.
fn arb_value(model: Option<String>) -> impl Strategy<Value = String> {
    let mut pool: Vec<String> = vec![String::new(), String::new(), "v".into()];
    pool.extend(KNOWN_MODELS.iter().take(4).map(|m| (*m).to_owned()));
    pool.extend(std::iter::repeat_n(model.unwrap_or_default(), 4));
    prop_oneof![
        3 => select(pool),
        2 => "[a-z0-9:/.-]{0,12}",
    ]
}

fn entry(origin: Origin, key: &str, value: &str) -> EnvInput {
    EnvInput {
        key: key.to_owned(),
        value: value.to_owned(),
        origin,
    }
}

/// A candidate env for `fields`: usually the PLATFORM proxy inputs, often a
/// WORKSPACE credential of the provider the record derives, and random
/// entries; no key twice under one origin; in random order.
fn arb_env(fields: &StoredText) -> impl Strategy<Value = Vec<EnvInput>> {
    let rec = fields.clone().into_record(workspace_id(), 1);
    let wanted = match resolve(&rec, registry()).provider {
        Some(p) if !p.is_platform => p.credentials,
        _ => credential_names(),
    };
    (
        prop::bool::weighted(0.75),
        prop::bool::weighted(0.4),
        prop::bool::weighted(0.75),
        prop::option::weighted(0.7, select(wanted)),
        vec(
            (arb_origin(), arb_key(), arb_value(fields.model.clone())),
            0..14,
        ),
    )
        .prop_map(|(anthropic, openai, token, customer, random)| {
            let mut all = Vec::new();
            if anthropic {
                all.push(entry(P, "MOLECULE_LLM_ANTHROPIC_BASE_URL", ANTHROPIC_URL));
            }
            if openai {
                all.push(entry(P, "MOLECULE_LLM_OPENAI_BASE_URL", OPENAI_URL));
            }
            if token {
                all.push(entry(P, "MOLECULE_LLM_USAGE_TOKEN", TOKEN));
            }
            if let Some(key) = customer {
                all.push(entry(W, &key, "customer-secret"));
            }
            all.extend(random.into_iter().map(|(o, k, v)| entry(o, &k, &v)));
            let mut seen = BTreeSet::new();
            all.retain(|e| seen.insert((e.origin, e.key.clone())));
            all
        })
        .prop_shuffle()
}

fn arb_case() -> impl Strategy<Value = (StoredText, Vec<EnvInput>)> {
    arb_fields().prop_flat_map(|fields| {
        let env = arb_env(&fields);
        (Just(fields), env)
    })
}

/// The decision rules, checked on the resolution alone.
fn check_resolution(rec: &Record, res: &Resolution) -> Result<(), TestCaseError> {
    let reg = registry();
    let valid_override = rec.override_mode.valid().copied();
    match res.source {
        Source::Override => prop_assert_eq!(Some(res.mode), valid_override),
        Source::DerivedProvider => {
            prop_assert_eq!(valid_override, None);
            let Some(p) = &res.provider else {
                return Err(TestCaseError::fail("DERIVED_PROVIDER without a provider"));
            };
            let want = if p.is_platform {
                Mode::PlatformManaged
            } else {
                Mode::Byok
            };
            prop_assert_eq!(res.mode, want);
            prop_assert_eq!(p.is_platform, reg.provider(&p.id).unwrap().platform);
        }
        Source::Default => {
            prop_assert_eq!(valid_override, None);
            prop_assert_eq!(res.mode, Mode::PlatformManaged);
            prop_assert!(res.provider.is_none());
        }
    }
    // Default-closed: byok and disabled only from a valid override or a
    // recognized non-platform provider; disabled only from an override.
    if res.mode != Mode::PlatformManaged {
        let by_override = res.source == Source::Override && valid_override.is_some();
        let by_provider = res.source == Source::DerivedProvider
            && res.provider.as_ref().is_some_and(|p| !p.is_platform);
        prop_assert!(by_override || by_provider, "{:?}", res);
        if res.mode == Mode::Disabled {
            prop_assert!(by_override);
        }
    }
    prop_assert_eq!(res.override_mode, valid_override);
    if res.mode == Mode::PlatformManaged {
        prop_assert_eq!(&res.forbidden_secret_keys[..], reg.forbidden_secret_keys());
    } else {
        prop_assert!(res.forbidden_secret_keys.is_empty());
    }
    // Every garbled stored field is named in the trace.
    let garbled = [
        ("override", matches!(rec.override_mode, Stored::Invalid(_))),
        ("runtime", matches!(rec.runtime, Stored::Invalid(_))),
        ("model", matches!(rec.model, Stored::Invalid(_))),
        (
            "credential_keys",
            matches!(rec.credential_keys, Stored::Invalid(_)),
        ),
    ];
    for (field, is_garbled) in garbled {
        let named = res
            .trace
            .iter()
            .any(|l| l.starts_with(&format!("{field}: stored value")));
        prop_assert_eq!(named, is_garbled, "{} in {:?}", field, res.trace);
    }
    let decision = format!(
        "decision: {} (source {})",
        res.mode,
        crate::wire::convert::source_name(res.source)
    );
    let trace = crate::wire::convert::resolution_to_wire(res.clone()).trace;
    prop_assert_eq!(trace.last(), Some(&decision));
    Ok(())
}

/// BuildEnv, checked against the contract for one record and candidate env.
fn check_case(fields: &StoredText, entries: &[EnvInput]) -> Result<(), TestCaseError> {
    let reg = registry();
    let rec = fields.clone().into_record(workspace_id(), 1);
    let res = resolve(&rec, reg);
    check_resolution(&rec, &res)?;

    let candidate = CandidateEnv::parse(entries.to_vec()).expect("generated envs are valid");

    // The merged candidate, computed here: WORKSPACE beats GLOBAL beats PLATFORM.
    let mut winning: BTreeMap<&str, (&str, Origin)> = BTreeMap::new();
    for origin in [P, G, W] {
        for e in entries.iter().filter(|e| e.origin == origin) {
            winning.insert(&e.key, (&e.value, origin));
        }
    }
    let non_empty = |origin: Origin, key: &str| {
        entries
            .iter()
            .find(|e| e.origin == origin && e.key == key && !e.value.is_empty())
            .map(|e| e.value.as_str())
    };

    let recorded = res.model.as_ref().map(|m| m.as_str());
    let model_vars = reg.model_vars(res.runtime.as_ref());
    let mismatch = model_vars.iter().copied().find(|v| {
        winning
            .get(v)
            .is_some_and(|(value, _)| !value.is_empty() && Some(*value) != recorded)
    });
    let byok_ok = match &res.provider {
        Some(p) if !p.is_platform => p.credentials.iter().any(|k| non_empty(W, k).is_some()),
        _ => entries
            .iter()
            .any(|e| e.origin == W && !e.value.is_empty() && reg.is_vendor_credential(&e.key)),
    };
    let required = res
        .provider
        .as_ref()
        .and_then(|p| p.family.as_deref())
        .and_then(|f| reg.family(f))
        .unwrap_or_else(|| reg.default_family());
    let token = non_empty(P, reg.usage_token_var());
    let proxy_ok = token.is_some() && non_empty(P, &required.proxy_base_url).is_some();

    let result = build_env(&res, &rec, reg, candidate);

    // Which failure, if any, and in which order.
    if let Some(var) = mismatch {
        match &result {
            Err(EnvError::ModelMismatch { found_in, .. }) => prop_assert_eq!(found_in, var),
            other => prop_assert!(false, "expected ModelMismatch in {}, got {:?}", var, other),
        }
        return Ok(());
    }
    if res.mode == Mode::Byok && !byok_ok {
        prop_assert!(
            matches!(result, Err(EnvError::MissingByokCredential { .. })),
            "{:?}",
            result
        );
        return Ok(());
    }
    if res.mode == Mode::PlatformManaged && !proxy_ok {
        prop_assert!(
            matches!(result, Err(EnvError::MissingPlatformProxy { .. })),
            "{:?}",
            result
        );
        return Ok(());
    }
    let built = match result {
        Ok(built) => built,
        Err(e) => return Err(TestCaseError::fail(format!("unexpected {e:?}"))),
    };

    let mode = res.mode;
    let out: BTreeMap<&str, (&str, Origin)> = built
        .env
        .iter()
        .map(|e| (e.key.as_str(), (e.value.as_str(), e.origin)))
        .collect();
    prop_assert!(
        built.env.windows(2).all(|w| w[0].key < w[1].key),
        "sorted by key"
    );

    // What the authority may write, key by key.
    let routed: Vec<(&crate::domain::registry::Family, &str)> = reg
        .families()
        .iter()
        .filter_map(|f| non_empty(P, &f.proxy_base_url).map(|url| (f, url)))
        .collect();
    let authority_value = |key: &str| -> Option<&str> {
        if BILLING_MODE_VARS.contains(&key) {
            return Some(mode.as_str());
        }
        if model_vars.contains(&key) {
            return recorded;
        }
        if mode != Mode::PlatformManaged {
            return None;
        }
        if key == reg.usage_token_var() {
            return token;
        }
        for (f, url) in &routed {
            if f.proxy_base_url == key || f.endpoints.iter().any(|k| k == key) {
                return Some(url);
            }
            if f.credentials.iter().any(|k| k == key) {
                return token;
            }
        }
        None
    };

    for e in &built.env {
        let key = e.key.as_str();
        if e.origin == A {
            prop_assert_eq!(Some(e.value.as_str()), authority_value(key), "{}", key);
        } else {
            // Exactly the merged candidate value, with its origin.
            prop_assert_eq!(
                winning.get(key),
                Some(&(e.value.as_str(), e.origin)),
                "{}",
                key
            );
            if reg.is_llm_key(key) {
                prop_assert_eq!(mode, Mode::Byok, "{} kept outside byok", key);
                prop_assert_eq!(e.origin, W, "{} kept from {:?}", key, e.origin);
                prop_assert!(!key.starts_with(PROXY_PREFIX), "{} kept", key);
            }
        }
    }

    // Both billing-mode variables always say the mode.
    for var in BILLING_MODE_VARS {
        prop_assert_eq!(out.get(var), Some(&(mode.as_str(), A)));
    }
    // The model variables: the recorded model, or untouched when none is recorded.
    for var in &model_vars {
        match recorded {
            Some(m) => prop_assert_eq!(out.get(var), Some(&(m, A))),
            None => prop_assert_eq!(out.get(var), winning.get(var)),
        }
    }
    // Every non-LLM key other than a model variable passes through untouched.
    for (key, winner) in &winning {
        if !reg.is_llm_key(key) && !model_vars.contains(key) {
            prop_assert_eq!(out.get(key), Some(winner), "{}", key);
        }
    }
    let leaked = |v: &str| v == TOKEN || v == ANTHROPIC_URL || v == OPENAI_URL;
    match mode {
        Mode::PlatformManaged => {
            // The PLATFORM usage token (checked present above), whatever value it has.
            let token = token.expect("proxy_ok");
            // No vendor credential but the usage token; every LLM key is the authority's.
            for (key, (value, origin)) in &out {
                if reg.is_vendor_credential(key) {
                    prop_assert_eq!((*value, *origin), (token, A), "{}", key);
                }
                if reg.is_llm_key(key) {
                    prop_assert_eq!(*origin, A, "{}", key);
                }
            }
            // The proxy is wired for every family whose base URL PLATFORM gave.
            prop_assert!(routed.iter().any(|(f, _)| f.id == required.id));
            for (f, url) in &routed {
                prop_assert_eq!(out.get(f.proxy_base_url.as_str()), Some(&(*url, A)));
                for k in &f.endpoints {
                    prop_assert_eq!(out.get(k.as_str()), Some(&(*url, A)), "{}", k);
                }
                for k in &f.credentials {
                    prop_assert_eq!(out.get(k.as_str()), Some(&(token, A)), "{}", k);
                }
            }
            prop_assert_eq!(out.get(reg.usage_token_var()), Some(&(token, A)));
        }
        Mode::Byok => {
            for (key, (value, origin)) in &out {
                prop_assert!(!leaked(value), "{} leaks a proxy input", key);
                if reg.is_llm_key(key) && !BILLING_MODE_VARS.contains(key) {
                    prop_assert_eq!(*origin, W, "{}", key);
                    prop_assert!(!key.starts_with(PROXY_PREFIX), "{}", key);
                }
            }
            // The customer's own credentials and endpoints are all kept.
            for (key, winner) in &winning {
                if reg.is_llm_key(key) && !key.starts_with(PROXY_PREFIX) && winner.1 == W {
                    prop_assert_eq!(out.get(key), Some(winner), "{}", key);
                }
            }
        }
        Mode::Disabled => {
            for (key, (value, _)) in &out {
                prop_assert!(!leaked(value), "{} leaks a proxy input", key);
                prop_assert!(
                    !reg.is_llm_key(key) || BILLING_MODE_VARS.contains(key),
                    "{} in a disabled env",
                    key
                );
            }
        }
    }

    // removed: merged keys absent from the output; added: the authority's entries.
    let removed: Vec<&str> = winning
        .keys()
        .copied()
        .filter(|k| !out.contains_key(k))
        .collect();
    prop_assert_eq!(
        built
            .removed_keys
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        removed
    );
    let added: Vec<&str> = out
        .iter()
        .filter(|(_, (_, o))| *o == A)
        .map(|(k, _)| *k)
        .collect();
    prop_assert_eq!(
        built
            .added_keys
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        added
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn build_env_keeps_every_promise_of_the_contract((fields, entries) in arb_case()) {
        check_case(&fields, &entries)?;
    }

    #[test]
    fn the_order_of_the_candidate_entries_does_not_matter((fields, entries) in arb_case()) {
        let rec = fields.into_record(workspace_id(), 1);
        let res = resolve(&rec, registry());
        let forward = CandidateEnv::parse(entries.clone()).unwrap();
        let backward = CandidateEnv::parse(entries.into_iter().rev()).unwrap();
        prop_assert_eq!(
            build_env(&res, &rec, registry(), forward),
            build_env(&res, &rec, registry(), backward)
        );
    }

    #[test]
    fn candidate_env_parsing_accepts_exactly_the_valid_envs(
        raw in vec(
            (
                select(vec![W, G, P, A]),
                prop_oneof![3 => "[A-C_][A-C0-9_]{0,2}", 1 => "\\PC{0,4}"],
                "[a-z]{0,3}",
            ),
            0..10,
        )
    ) {
        let entries: Vec<EnvInput> = raw.iter().map(|(o, k, v)| entry(*o, k, v)).collect();
        // The first failing entry, in order, decides the error.
        let mut seen = BTreeSet::new();
        let mut want = Ok(entries.len());
        for (index, e) in entries.iter().enumerate() {
            let valid_key = crate::domain::EnvKey::parse(&e.key).is_ok();
            let failure = if !valid_key {
                Some(format!("invalid key at {index}"))
            } else if e.origin == A {
                Some(format!("invalid origin at {index}"))
            } else if !seen.insert((e.origin, e.key.clone())) {
                Some(format!("duplicate {} {:?}", e.key, e.origin))
            } else {
                None
            };
            if let Some(f) = failure {
                want = Err(f);
                break;
            }
        }
        let got = match CandidateEnv::parse(entries) {
            Ok(env) => Ok(env.len()),
            Err(EnvError::InvalidKey { index, .. }) => Err(format!("invalid key at {index}")),
            Err(EnvError::InvalidOrigin { index, .. }) => Err(format!("invalid origin at {index}")),
            Err(EnvError::DuplicateKey { key, origin }) => Err(format!("duplicate {key} {origin:?}")),
            Err(other) => Err(format!("unexpected {other:?}")),
        };
        prop_assert_eq!(got, want);
    }
}
