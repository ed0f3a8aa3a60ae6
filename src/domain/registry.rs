//! The provider registry: which provider a (runtime, model) pair runs on,
//! which variables carry its credentials and endpoints, and how the platform's
//! metering proxy is wired in.
//!
//! Data, not code: a TOML file (format documented in `docs/registry.md`),
//! with a built-in default compiled into the binary that an operator can
//! replace. Everything is validated at load; a bad registry stops start-up
//! with a message naming the file and the entry. The file is read at the
//! edge ([`crate::config::load_registry`]); the domain parses its text.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use regex::Regex;
use serde::Deserialize;

use super::types::{EnvKey, Runtime, ValidationError};

/// The registry compiled into the binary.
pub const BUILTIN_TOML: &str = include_str!("default_registry.toml");
/// Every key with this prefix is a platform proxy input and an LLM key.
pub const PROXY_PREFIX: &str = "MOLECULE_LLM_";
/// The variables every resolved environment carries.
pub const BILLING_MODE_VARS: [&str; 2] = [
    "MOLECULE_LLM_BILLING_MODE",
    "MOLECULE_LLM_BILLING_MODE_RESOLVED",
];

/// A registry that failed to load: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("provider registry {source_name}: {entry}: {problem}")]
pub struct RegistryError {
    pub source_name: String,
    /// The place: `syntax`, `usage_token`, `rules[3] (pattern "...")`, ...
    pub entry: String,
    pub problem: RegistryProblem,
}

/// What is wrong with a registry entry (docs/registry.md lists each).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryProblem {
    /// The file could not be read (the I/O error's text).
    #[error("cannot read: {0}")]
    CannotRead(String),
    /// Not valid TOML, or not the registry's shape (the parser's message).
    #[error("{0}")]
    Syntax(String),
    #[error("must start with {PROXY_PREFIX}")]
    UsageTokenPrefix,
    #[error("{field}: {key:?} is not a valid env key")]
    InvalidEnvKey { field: String, key: String },
    #[error("must name at least one variable")]
    NoModelVar,
    #[error("runtime: {0}")]
    InvalidRuntime(ValidationError),
    #[error("id must not be empty")]
    EmptyId,
    #[error("duplicate family id")]
    DuplicateFamily,
    #[error("proxy_base_url must start with {PROXY_PREFIX}")]
    ProxyBaseUrlPrefix,
    #[error("endpoints and credentials must each name a variable")]
    FamilyWithoutVariables,
    #[error("{0:?} is not a declared family")]
    UndeclaredDefaultFamily(String),
    #[error("duplicate provider id")]
    DuplicateProvider,
    #[error("a provider needs at least one credential variable")]
    ProviderWithoutCredential,
    #[error("family {0:?} is not a declared family")]
    UndeclaredFamily(String),
    #[error("a platform provider needs a proxy mapping: set family to a declared family")]
    PlatformWithoutFamily,
    #[error("pattern must not be empty")]
    EmptyPattern,
    #[error("runtimes must name at least one runtime")]
    RuleWithoutRuntime,
    #[error("runtime {runtime:?}: {error}")]
    InvalidRuleRuntime {
        runtime: String,
        error: ValidationError,
    },
    #[error("duplicate rule: runtime {0:?} with this pattern appears earlier")]
    DuplicateRule(String),
    #[error("candidates must name at least one provider")]
    RuleWithoutCandidate,
    #[error("unknown provider id {0:?}")]
    UnknownProvider(String),
    /// The pattern is not a regular expression (the regex parser's message).
    #[error("invalid pattern: {0}")]
    InvalidPattern(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    usage_token: String,
    default_family: String,
    model_vars: Vec<String>,
    #[serde(default)]
    runtime_model_vars: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    families: Vec<RawFamily>,
    #[serde(default)]
    providers: Vec<RawProvider>,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFamily {
    id: String,
    proxy_base_url: String,
    endpoints: Vec<String>,
    credentials: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    id: String,
    platform: bool,
    #[serde(default)]
    family: Option<String>,
    credentials: Vec<String>,
    #[serde(default)]
    endpoints: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    runtimes: Vec<String>,
    pattern: String,
    candidates: Vec<String>,
}

/// A provider family the metering proxy can serve (Anthropic, OpenAI, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    pub id: String,
    /// The PLATFORM-origin variable holding the proxy's base URL for this family.
    pub proxy_base_url: EnvKey,
    /// Variables set to the proxy's base URL in `platform_managed`.
    pub endpoints: Vec<EnvKey>,
    /// Variables set to the usage token in `platform_managed`.
    pub credentials: Vec<EnvKey>,
}

/// A way of paying for LLM calls: a vendor account, the customer's
/// subscription, or the platform's own account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    pub id: String,
    pub platform: bool,
    pub family: Option<String>,
    /// Any one of these authenticates the provider.
    pub credentials: Vec<EnvKey>,
    /// Variables that point a client at an endpoint.
    pub endpoints: Vec<EnvKey>,
}

/// Runtime + model pattern → candidate providers, in order.
#[derive(Debug, Clone)]
pub struct Rule {
    /// 1-based position in the file, for traces and messages.
    pub number: usize,
    pub runtimes: Vec<String>,
    pub pattern: String,
    regex: Regex,
    /// The providers the rule names, resolved at load: never an unknown id.
    pub candidates: Vec<Provider>,
}

impl Rule {
    /// The candidates' ids, in order, as the file names them.
    pub fn candidate_ids(&self) -> impl Iterator<Item = &str> {
        self.candidates.iter().map(|p| p.id.as_str())
    }

    pub fn matches(&self, runtime: &str, model: &str) -> bool {
        self.runtimes.iter().any(|r| r == runtime) && self.regex.is_match(model)
    }
}

/// A validated provider registry.
#[derive(Debug, Clone)]
pub struct Registry {
    source_name: String,
    usage_token: EnvKey,
    default_family: Family,
    model_vars: Vec<EnvKey>,
    runtime_model_vars: BTreeMap<String, Vec<EnvKey>>,
    families: Vec<Family>,
    providers: Vec<Provider>,
    rules: Vec<Rule>,
    llm_keys: BTreeSet<String>,
    vendor_credentials: BTreeSet<String>,
    forbidden_secret_keys: Vec<String>,
}

struct Checker<'a> {
    source_name: &'a str,
}

impl Checker<'_> {
    fn err(&self, entry: impl Into<String>, problem: RegistryProblem) -> RegistryError {
        RegistryError {
            source_name: self.source_name.to_owned(),
            entry: entry.into(),
            problem,
        }
    }

    /// Each of `keys` as an [`EnvKey`], or the error naming the bad one.
    fn keys(
        &self,
        entry: &str,
        field: &str,
        keys: &[String],
    ) -> Result<Vec<EnvKey>, RegistryError> {
        keys.iter()
            .map(|k| {
                EnvKey::parse(k).map_err(|_| {
                    self.err(
                        entry,
                        RegistryProblem::InvalidEnvKey {
                            field: field.to_owned(),
                            key: k.clone(),
                        },
                    )
                })
            })
            .collect()
    }

    fn key(&self, entry: &str, field: &str, key: &str) -> Result<EnvKey, RegistryError> {
        EnvKey::parse(key).map_err(|_| {
            self.err(
                entry,
                RegistryProblem::InvalidEnvKey {
                    field: field.to_owned(),
                    key: key.to_owned(),
                },
            )
        })
    }
}

impl Registry {
    /// The registry compiled into the binary.
    pub fn builtin() -> Result<Self, RegistryError> {
        Self::from_toml(BUILTIN_TOML, "(built-in)")
    }

    /// Parses and validates a registry; `source_name` names it in errors.
    pub fn from_toml(text: &str, source_name: &str) -> Result<Self, RegistryError> {
        let c = Checker { source_name };
        let raw: RawRegistry = toml::from_str(text).map_err(|e| {
            c.err(
                "syntax",
                RegistryProblem::Syntax(e.to_string().trim().to_owned()),
            )
        })?;

        if !raw.usage_token.starts_with(PROXY_PREFIX) {
            return Err(c.err("usage_token", RegistryProblem::UsageTokenPrefix));
        }
        let usage_token = c.key("usage_token", "usage_token", &raw.usage_token)?;
        if raw.model_vars.is_empty() {
            return Err(c.err("model_vars", RegistryProblem::NoModelVar));
        }
        let model_vars = c.keys("model_vars", "model_vars", &raw.model_vars)?;
        let mut runtime_model_vars = BTreeMap::new();
        for (rt, vars) in &raw.runtime_model_vars {
            let entry = format!("runtime_model_vars.{rt}");
            Runtime::parse(rt).map_err(|e| c.err(&entry, RegistryProblem::InvalidRuntime(e)))?;
            runtime_model_vars.insert(rt.clone(), c.keys(&entry, "variables", vars)?);
        }

        let mut families = Vec::new();
        let mut family_ids = HashSet::new();
        for (i, f) in raw.families.into_iter().enumerate() {
            let entry = format!("families[{i}] (id {:?})", f.id);
            if f.id.is_empty() {
                return Err(c.err(entry, RegistryProblem::EmptyId));
            }
            if !family_ids.insert(f.id.clone()) {
                return Err(c.err(entry, RegistryProblem::DuplicateFamily));
            }
            if !f.proxy_base_url.starts_with(PROXY_PREFIX) {
                return Err(c.err(entry, RegistryProblem::ProxyBaseUrlPrefix));
            }
            let proxy_base_url = c.key(&entry, "proxy_base_url", &f.proxy_base_url)?;
            if f.endpoints.is_empty() || f.credentials.is_empty() {
                return Err(c.err(entry, RegistryProblem::FamilyWithoutVariables));
            }
            let endpoints = c.keys(&entry, "endpoints", &f.endpoints)?;
            let credentials = c.keys(&entry, "credentials", &f.credentials)?;
            families.push(Family {
                id: f.id,
                proxy_base_url,
                endpoints,
                credentials,
            });
        }
        let Some(default_family) = families
            .iter()
            .find(|f| f.id == raw.default_family)
            .cloned()
        else {
            return Err(c.err(
                "default_family",
                RegistryProblem::UndeclaredDefaultFamily(raw.default_family),
            ));
        };

        let mut providers: Vec<Provider> = Vec::new();
        // Provider id → its index in `providers`.
        let mut provider_ids = HashMap::new();
        for (i, p) in raw.providers.into_iter().enumerate() {
            let entry = format!("providers[{i}] (id {:?})", p.id);
            if p.id.is_empty() {
                return Err(c.err(entry, RegistryProblem::EmptyId));
            }
            if provider_ids.insert(p.id.clone(), providers.len()).is_some() {
                return Err(c.err(entry, RegistryProblem::DuplicateProvider));
            }
            if p.credentials.is_empty() {
                return Err(c.err(entry, RegistryProblem::ProviderWithoutCredential));
            }
            let credentials = c.keys(&entry, "credentials", &p.credentials)?;
            let endpoints = c.keys(&entry, "endpoints", &p.endpoints)?;
            match &p.family {
                Some(f) if !family_ids.contains(f) => {
                    return Err(c.err(entry, RegistryProblem::UndeclaredFamily(f.clone())));
                }
                None if p.platform => {
                    return Err(c.err(entry, RegistryProblem::PlatformWithoutFamily));
                }
                _ => {}
            }
            providers.push(Provider {
                id: p.id,
                platform: p.platform,
                family: p.family,
                credentials,
                endpoints,
            });
        }

        let mut rules = Vec::new();
        let mut seen = HashSet::new();
        for (i, r) in raw.rules.into_iter().enumerate() {
            let entry = format!("rules[{i}] (pattern {:?})", r.pattern);
            if r.pattern.is_empty() {
                return Err(c.err(entry, RegistryProblem::EmptyPattern));
            }
            if r.runtimes.is_empty() {
                return Err(c.err(entry, RegistryProblem::RuleWithoutRuntime));
            }
            for rt in &r.runtimes {
                Runtime::parse(rt).map_err(|error| {
                    c.err(
                        &entry,
                        RegistryProblem::InvalidRuleRuntime {
                            runtime: rt.clone(),
                            error,
                        },
                    )
                })?;
                if !seen.insert((rt.clone(), r.pattern.clone())) {
                    return Err(c.err(entry, RegistryProblem::DuplicateRule(rt.clone())));
                }
            }
            if r.candidates.is_empty() {
                return Err(c.err(entry, RegistryProblem::RuleWithoutCandidate));
            }
            let mut candidates = Vec::with_capacity(r.candidates.len());
            for cand in &r.candidates {
                match provider_ids.get(cand).and_then(|&i| providers.get(i)) {
                    Some(p) => candidates.push(p.clone()),
                    None => {
                        return Err(c.err(entry, RegistryProblem::UnknownProvider(cand.clone())))
                    }
                }
            }
            let regex = Regex::new(&format!("^(?:{})$", r.pattern))
                .map_err(|e| c.err(&entry, RegistryProblem::InvalidPattern(e.to_string())))?;
            rules.push(Rule {
                number: i + 1,
                runtimes: r.runtimes,
                pattern: r.pattern,
                regex,
                candidates,
            });
        }

        let name = |k: &EnvKey| k.as_str().to_owned();
        let vendor_credentials: BTreeSet<String> = providers
            .iter()
            .flat_map(|p| p.credentials.iter().map(name))
            .collect();
        let mut llm_keys = vendor_credentials.clone();
        llm_keys.extend(providers.iter().flat_map(|p| p.endpoints.iter().map(name)));
        for f in &families {
            llm_keys.extend(f.endpoints.iter().map(name));
            llm_keys.extend(f.credentials.iter().map(name));
            llm_keys.insert(name(&f.proxy_base_url));
        }
        llm_keys.insert(name(&usage_token));
        let forbidden_secret_keys = llm_keys.iter().cloned().collect();

        Ok(Registry {
            source_name: source_name.to_owned(),
            usage_token,
            default_family,
            model_vars,
            runtime_model_vars,
            families,
            providers,
            rules,
            llm_keys,
            vendor_credentials,
            forbidden_secret_keys,
        })
    }

    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    pub fn provider(&self, id: &str) -> Option<&Provider> {
        self.providers.iter().find(|p| p.id == id)
    }

    pub fn providers(&self) -> &[Provider] {
        &self.providers
    }

    pub fn family(&self, id: &str) -> Option<&Family> {
        self.families.iter().find(|f| f.id == id)
    }

    pub fn families(&self) -> &[Family] {
        &self.families
    }

    pub fn default_family(&self) -> &Family {
        &self.default_family
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The first rule, in registry order, whose runtime and pattern match.
    pub fn match_rule(&self, runtime: &str, model: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.matches(runtime, model))
    }

    /// The variable that carries the per-workspace usage token.
    pub fn usage_token_var(&self) -> &str {
        &self.usage_token
    }

    /// Every credential and endpoint variable the registry names, plus every
    /// `MOLECULE_LLM_*` key.
    pub fn is_llm_key(&self, key: &str) -> bool {
        key.starts_with(PROXY_PREFIX) || self.llm_keys.contains(key)
    }

    /// Every provider credential variable.
    pub fn is_vendor_credential(&self, key: &str) -> bool {
        self.vendor_credentials.contains(key)
    }

    /// Every LLM credential and endpoint variable plus the proxy inputs, sorted.
    pub fn forbidden_secret_keys(&self) -> &[String] {
        &self.forbidden_secret_keys
    }

    /// The extra model variables of particular runtimes, by runtime.
    #[cfg(test)]
    pub(crate) fn runtime_model_vars(&self) -> &BTreeMap<String, Vec<EnvKey>> {
        &self.runtime_model_vars
    }

    /// The variables that carry the model to a container of this runtime.
    pub fn model_vars(&self, runtime: Option<&Runtime>) -> Vec<&str> {
        let mut vars: Vec<&str> = self.model_vars.iter().map(EnvKey::as_str).collect();
        if let Some(extra) = runtime.and_then(|r| self.runtime_model_vars.get(r.as_str())) {
            for v in extra {
                if !vars.contains(&v.as_str()) {
                    vars.push(v);
                }
            }
        }
        vars
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
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
id = "anthropic"
platform = false
credentials = ["ANTHROPIC_API_KEY"]

[[rules]]
runtimes = ["langgraph"]
pattern = "anthropic:.*"
candidates = ["anthropic", "platform-anthropic"]
"#;

    fn load_err(text: &str) -> RegistryError {
        Registry::from_toml(text, "test.toml").expect_err("registry should be refused")
    }

    #[test]
    fn the_builtin_registry_loads() {
        let r = Registry::builtin().expect("built-in registry is valid");
        assert!(!r.rules().is_empty());
        assert!(r.providers().iter().any(|p| p.platform));
    }

    #[test]
    fn a_minimal_registry_loads() {
        let r = Registry::from_toml(MINIMAL, "test.toml").unwrap();
        assert_eq!(r.rules().len(), 1);
        assert_eq!(r.default_family().id, "anthropic");
    }

    #[test]
    fn each_invalid_registry_is_refused_naming_file_and_entry() {
        type Problem = fn(&RegistryProblem) -> bool;
        let cases: &[(&str, String, &str, Problem)] = &[
            (
                "a rule naming an unknown provider",
                MINIMAL.replace(r#"candidates = ["anthropic", "platform-anthropic"]"#, r#"candidates = ["nope"]"#),
                "rules[0]",
                |p| matches!(p, RegistryProblem::UnknownProvider(id) if id == "nope"),
            ),
            (
                "two rules with the same runtime and pattern",
                format!("{MINIMAL}\n[[rules]]\nruntimes = [\"hermes\", \"langgraph\"]\npattern = \"anthropic:.*\"\ncandidates = [\"anthropic\"]\n"),
                "rules[1]",
                |p| matches!(p, RegistryProblem::DuplicateRule(rt) if rt == "langgraph"),
            ),
            (
                "an empty pattern",
                MINIMAL.replace(r#"pattern = "anthropic:.*""#, r#"pattern = """#),
                "rules[0]",
                |p| matches!(p, RegistryProblem::EmptyPattern),
            ),
            (
                "a pattern that is not a regular expression",
                MINIMAL.replace(r#"pattern = "anthropic:.*""#, r#"pattern = "anthropic:(""#),
                "rules[0]",
                |p| matches!(p, RegistryProblem::InvalidPattern(_)),
            ),
            (
                "a provider with no credential variable",
                MINIMAL.replace("id = \"anthropic\"\nplatform = false\ncredentials = [\"ANTHROPIC_API_KEY\"]", "id = \"anthropic\"\nplatform = false\ncredentials = []"),
                "providers[1]",
                |p| matches!(p, RegistryProblem::ProviderWithoutCredential),
            ),
            (
                "a platform provider with no proxy mapping",
                MINIMAL.replace("platform = true\nfamily = \"anthropic\"\n", "platform = true\n"),
                "providers[0]",
                |p| matches!(p, RegistryProblem::PlatformWithoutFamily),
            ),
            (
                "a provider naming an undeclared family",
                MINIMAL.replace("platform = true\nfamily = \"anthropic\"\n", "platform = true\nfamily = \"openai\"\n"),
                "providers[0]",
                |p| matches!(p, RegistryProblem::UndeclaredFamily(f) if f == "openai"),
            ),
            (
                "a duplicate provider id",
                format!("{MINIMAL}\n[[providers]]\nid = \"anthropic\"\nplatform = false\ncredentials = [\"X_KEY\"]\n"),
                "providers[2]",
                |p| matches!(p, RegistryProblem::DuplicateProvider),
            ),
            (
                "an invalid credential variable name",
                MINIMAL.replace("credentials = [\"ANTHROPIC_API_KEY\"]\n\n[[rules]]", "credentials = [\"ANTHROPIC-API-KEY\"]\n\n[[rules]]"),
                "providers[1]",
                |p| {
                    matches!(p, RegistryProblem::InvalidEnvKey { field, key }
                        if field == "credentials" && key == "ANTHROPIC-API-KEY")
                },
            ),
            (
                "an unknown default family",
                MINIMAL.replace(r#"default_family = "anthropic""#, r#"default_family = "openai""#),
                "default_family",
                |p| matches!(p, RegistryProblem::UndeclaredDefaultFamily(f) if f == "openai"),
            ),
            (
                "a proxy base URL outside MOLECULE_LLM_",
                MINIMAL.replace(r#"proxy_base_url = "MOLECULE_LLM_ANTHROPIC_BASE_URL""#, r#"proxy_base_url = "PROXY_URL""#),
                "families[0]",
                |p| matches!(p, RegistryProblem::ProxyBaseUrlPrefix),
            ),
            (
                "an unknown field (a typo)",
                MINIMAL.replace("platform = false", "platfrom = false"),
                "syntax",
                |p| matches!(p, RegistryProblem::Syntax(m) if m.contains("unknown field")),
            ),
        ];
        for (what, text, entry, problem) in cases {
            let e = load_err(text);
            assert_eq!(e.source_name, "test.toml", "{what}");
            assert!(
                e.entry.starts_with(entry),
                "{what}: entry {:?}, wanted {entry:?}",
                e.entry
            );
            assert!(problem(&e.problem), "{what}: problem {:?}", e.problem);
            let shown = e.to_string();
            assert!(
                shown.contains("test.toml") && shown.contains(entry),
                "{what}: {shown}"
            );
        }
    }

    #[test]
    fn rules_match_whole_models_case_sensitively() {
        let r = Registry::from_toml(MINIMAL, "t").unwrap();
        assert!(r
            .match_rule("langgraph", "anthropic:claude-sonnet-4-6")
            .is_some());
        assert!(r.match_rule("langgraph", "Anthropic:claude").is_none());
        assert!(r.match_rule("langgraph", "xanthropic:claude").is_none());
        assert!(r.match_rule("hermes", "anthropic:claude").is_none());
    }

    #[test]
    fn llm_keys_include_every_credential_endpoint_and_proxy_input() {
        let r = Registry::builtin().unwrap();
        for k in [
            "ANTHROPIC_API_KEY",
            "ANTHROPIC_AUTH_TOKEN",
            "ANTHROPIC_BASE_URL",
            "CLAUDE_CODE_OAUTH_TOKEN",
            "OPENAI_API_KEY",
            "OPENAI_BASE_URL",
            "OPENROUTER_API_KEY",
            "GROQ_API_KEY",
            "CEREBRAS_API_KEY",
            "QIANFAN_API_KEY",
            "AISTUDIO_API_KEY",
            "GOOGLE_API_KEY",
            "GEMINI_API_KEY",
            "XAI_API_KEY",
            "QWEN_API_KEY",
            "DASHSCOPE_API_KEY",
            "GLM_API_KEY",
            "KIMI_API_KEY",
            "KIMI_CN_API_KEY",
            "MINIMAX_API_KEY",
            "MINIMAX_CN_API_KEY",
            "DEEPSEEK_API_KEY",
            "MISTRAL_API_KEY",
            "TOGETHER_API_KEY",
            "FIREWORKS_API_KEY",
            "HERMES_API_KEY",
            "NOUS_API_KEY",
            "HERMES_CUSTOM_BASE_URL",
            "HERMES_CUSTOM_API_KEY",
            "NVIDIA_API_KEY",
            "XIAOMI_API_KEY",
            "HF_TOKEN",
            "LITELLM_MASTER_KEY",
            "MOLECULE_LLM_USAGE_TOKEN",
            "MOLECULE_LLM_ANTHROPIC_BASE_URL",
            "MOLECULE_LLM_OPENAI_BASE_URL",
            "MOLECULE_LLM_ANYTHING",
        ] {
            assert!(r.is_llm_key(k), "{k} should be an LLM key");
        }
        for k in ["PATH", "MODEL_PROVIDER", "GIT_AUTHOR_NAME", "WORKSPACE_ID"] {
            assert!(!r.is_llm_key(k), "{k} should not be an LLM key");
        }
        let f = r.forbidden_secret_keys();
        assert!(f.windows(2).all(|w| w[0] < w[1]), "sorted and unique");
    }

    #[test]
    fn hermes_carries_the_model_in_two_variables() {
        let r = Registry::builtin().unwrap();
        let hermes = Runtime::parse("hermes").unwrap();
        let cc = Runtime::parse("claude-code").unwrap();
        assert_eq!(
            r.model_vars(Some(&hermes)),
            vec!["MODEL_PROVIDER", "HERMES_DEFAULT_MODEL"]
        );
        assert_eq!(r.model_vars(Some(&cc)), vec!["MODEL_PROVIDER"]);
        assert_eq!(r.model_vars(None), vec!["MODEL_PROVIDER"]);
    }
}
