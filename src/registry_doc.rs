//! `docs/registry.md` against the built-in registry: the tables of its
//! "The built-in registry" section are rendered here from the registry as
//! compiled in, and the document must hold exactly them; its minimal example
//! must load. Change `src/domain/default_registry.toml`, run `cargo test
//! --lib registry_doc`, and copy the rows the failure prints into the
//! document.
//!
//! The rules table's last column ("resulting mode") is prose about the
//! tie-break, checked for its presence only; every other cell is rendered.

use crate::domain::Registry;

const DOC: &str = include_str!("../docs/registry.md");

fn registry() -> Registry {
    Registry::builtin().expect("the built-in registry loads")
}

/// `a`, `b` (each in backticks), or nothing.
fn code_list(items: &[impl std::fmt::Display]) -> String {
    items
        .iter()
        .map(|i| format!("`{i}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A table row from its cells, spaces collapsed (an empty cell is `| |`).
fn row(cells: &[String]) -> String {
    collapse(&format!("| {} |", cells.join(" | ")))
}

fn collapse(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The section of the document from `heading` to the next heading of the
/// same or a higher level.
fn section(heading: &str) -> &'static str {
    let level = heading.split(' ').next().unwrap();
    let start = DOC
        .lines()
        .position(|l| l == heading)
        .unwrap_or_else(|| panic!("docs/registry.md has no heading {heading:?}"));
    let offset: usize = DOC.lines().take(start).map(|l| l.len() + 1).sum();
    let text = &DOC[offset + heading.len()..];
    // Where the next such heading starts; a `#` line in a code block is none.
    let mut at = 0;
    let mut in_code = false;
    let mut end = text.len();
    for l in text.lines() {
        if l.starts_with("```") {
            in_code = !in_code;
        }
        let hashes = l.split(' ').next().unwrap_or("");
        if !in_code
            && !hashes.is_empty()
            && hashes.chars().all(|c| c == '#')
            && hashes.len() <= level.len()
        {
            end = at;
            break;
        }
        at += l.len() + 1;
    }
    &text[..end]
}

/// The rows of the first table in `text` (after its header and rule), spaces
/// collapsed.
fn table_rows(text: &str) -> Vec<String> {
    text.lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(collapse)
        .collect()
}

/// Compares rendered rows with the document's, printing both in full.
fn assert_rows(what: &str, documented: &[String], rendered: &[String]) {
    assert!(
        documented == rendered,
        "docs/registry.md's {what} differ from the built-in registry.\n\
         documented:\n{}\n\nfrom the registry:\n{}\n",
        documented.join("\n"),
        rendered.join("\n")
    );
}

#[test]
fn the_families_table_is_the_built_in_registry_s() {
    let r = registry();
    let default = r.default_family().id.clone();
    let rendered: Vec<String> = r
        .families()
        .iter()
        .map(|f| {
            let id = if f.id == default {
                format!("`{}` (the `default_family`)", f.id)
            } else {
                format!("`{}`", f.id)
            };
            row(&[
                id,
                format!("`{}`", f.proxy_base_url),
                code_list(&f.endpoints),
                code_list(&f.credentials),
            ])
        })
        .collect();
    let text = section("### Families");
    assert_rows("families", &table_rows(text), &rendered);

    // The sentence on the usage token and the model variables.
    let mut extra = Vec::new();
    for (runtime, vars) in r.runtime_model_vars() {
        extra.push(format!("{} for {runtime}", code_list(vars)));
    }
    let sentence =
        format!(
        "The usage token variable is `{}`; the model goes in {} for every runtime, and also in {}.",
        r.usage_token_var(),
        code_list(&r.model_vars(None).iter().map(|v| v.to_string()).collect::<Vec<_>>()),
        extra.join(", and ")
    );
    assert!(
        collapse(text).contains(&sentence),
        "docs/registry.md's families section should say:\n{sentence}"
    );
}

#[test]
fn the_providers_table_is_the_built_in_registry_s() {
    let r = registry();
    let named = |id: &str| {
        r.rules()
            .iter()
            .any(|rule| rule.candidate_ids().any(|c| c == id))
    };
    let rendered: Vec<String> = r
        .providers()
        .iter()
        .filter(|p| named(&p.id))
        .map(|p| {
            row(&[
                format!("`{}`", p.id),
                if p.platform { "yes" } else { "no" }.to_owned(),
                p.family.clone().unwrap_or_default(),
                code_list(&p.credentials),
                code_list(&p.endpoints),
            ])
        })
        .collect();
    let text = section("### Providers named by the rules");
    assert_rows("providers named by the rules", &table_rows(text), &rendered);

    // The others, in one sentence: their id and credentials (nothing else
    // to say about them, which this checks).
    let others: Vec<String> = r
        .providers()
        .iter()
        .filter(|p| !named(&p.id))
        .map(|p| {
            assert!(
                !p.platform && p.family.is_none() && p.endpoints.is_empty(),
                "provider {} is more than its keys: give it a row in docs/registry.md \
                 and here",
                p.id
            );
            format!("`{}` ({})", p.id, code_list(&p.credentials))
        })
        .collect();
    let sentence = format!(
        "Declared for their keys only (no rule names them): {}.",
        others.join(", ")
    );
    assert!(
        collapse(text).contains(&sentence),
        "docs/registry.md should say:\n{sentence}"
    );
}

#[test]
fn the_rules_table_is_the_built_in_registry_s() {
    let r = registry();
    // The runtimes the document calls "langgraph family".
    let langgraph = r
        .rules()
        .iter()
        .find(|rule| rule.runtimes.len() > 1 && rule.runtimes.iter().any(|x| x == "langgraph"))
        .map(|rule| rule.runtimes.clone())
        .expect("a rule for the langgraph family");
    let text = section("### Rules, in order");
    let definition = format!("\"langgraph family\" is {}.", code_list(&langgraph));
    assert!(
        collapse(text).contains(&definition),
        "docs/registry.md should say:\n{definition}"
    );
    let rendered: Vec<String> = r
        .rules()
        .iter()
        .map(|rule| {
            let runtimes = if rule.runtimes == langgraph {
                "langgraph family".to_owned()
            } else {
                rule.runtimes.join(", ")
            };
            row(&[
                rule.number.to_string(),
                runtimes,
                format!("`{}`", rule.pattern.replace('|', "\\|")),
                rule.candidate_ids().collect::<Vec<_>>().join(", "),
            ])
        })
        .collect();
    // The documented rows without their last cell (the prose), which must
    // not be empty.
    let documented: Vec<String> = table_rows(text)
        .iter()
        .map(|line| {
            let body = line.trim_end_matches('|').trim_end();
            let last = body
                .rfind(" | ")
                .unwrap_or_else(|| panic!("a rule row without a mode: {line}"));
            assert!(
                !body[last + 3..].trim().is_empty(),
                "a rule row without a mode: {line}"
            );
            format!("{} |", &body[..last])
        })
        .collect();
    assert_rows("rules (all but the resulting mode)", &documented, &rendered);
}

#[test]
fn the_forbidden_secret_keys_are_the_built_in_registry_s() {
    let r = registry();
    let keys = r.forbidden_secret_keys();
    let text = collapse(section("## What counts as an \"LLM key\""));
    let intro = format!("For the built-in registry that is {} names: ", keys.len());
    let at = text
        .find(&intro)
        .unwrap_or_else(|| panic!("docs/registry.md should say {intro:?}"));
    let listed = &text[at + intro.len()..];
    let expected = keys.join(" ");
    assert!(
        listed.starts_with(&expected),
        "docs/registry.md's list of forbidden secret keys should be:\n{expected}\nit is:\n{listed}"
    );
}

#[test]
fn the_minimal_example_is_a_valid_registry() {
    let text = section("## A complete minimal registry");
    let example = text
        .split("```toml\n")
        .nth(1)
        .and_then(|t| t.split("```").next())
        .expect("a TOML example");
    let r = Registry::from_toml(example, "docs/registry.md").expect("the example loads");
    assert_eq!(r.rules().len(), 1);
}
