//! Black-box tests of the `billing-mode` binary: the real executable, started
//! as a child process, driven through its own client subcommands.
//!
//! Every test gets a fresh temp directory (database, env files, server log)
//! and, when it needs one, its own server on loopback port 0 (the port it
//! bound read from its ready line, so parallel tests never race for one).
//! Servers are killed by a drop guard, so a failing assertion never leaves
//! one behind.

use std::{
    fs::File,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use crate::helpers::refusing_addr;
use serde_json::Value;
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_billing-mode");

/// claude-code + opus with the customer's subscription token: derives `byok`.
const WS: &str = "6f1c2b9e-1d2a-4b7c-9e2f-3a4b5c6d7e8f";
/// A workspace nobody registered.
const UNKNOWN_WS: &str = "11111111-1111-4111-8111-111111111111";

const CUSTOMER_SECRET: &str = "sk-customer-secret-7f3a9c";
const PLATFORM_SECRET: &str = "sk-platform-secret-0b1d2e";
const USAGE_TOKEN: &str = "usage-token-5e6f7a";

/// How long a server may take to start, or to stop after a signal.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(20);

/// The binary, with every setting it could pick up from the environment
/// removed, so the tests see only the flags they pass.
fn bin() -> Command {
    let mut cmd = Command::new(BIN);
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("BILLING_MODE_")
            || k.starts_with("OTEL_")
            || k == "DATABASE_URL"
            || k == "RUST_LOG"
        {
            cmd.env_remove(&key);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

fn run(mut cmd: Command) -> Output {
    cmd.output().expect("running billing-mode")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn describe(o: &Output) -> String {
    format!(
        "status: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status.code(),
        stdout(o),
        stderr(o)
    )
}

/// Asserts exit status 0 and returns stdout.
#[track_caller]
fn ok(o: &Output) -> String {
    assert!(o.status.success(), "expected success\n{}", describe(o));
    stdout(o)
}

/// Asserts a non-zero exit with `needle` (e.g. the ErrorInfo reason) on
/// stderr; returns stderr.
#[track_caller]
fn fails_with(o: &Output, needle: &str) -> String {
    assert!(
        !o.status.success(),
        "expected failure with {needle}\n{}",
        describe(o)
    );
    let err = stderr(o);
    assert!(
        err.contains(needle),
        "expected {needle:?} on stderr\n{}",
        describe(o)
    );
    err
}

#[track_caller]
fn json(o: &Output) -> Value {
    let text = ok(o);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{text}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().expect("a string").to_owned())
        .collect()
}

/// Waits for the child to exit, at most `timeout`.
fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// A running `billing-mode serve`, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// `serve --listen 127.0.0.1:0 --database-url sqlite:<tmp>/db.sqlite`
    /// plus `extra`.
    fn start(extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = format!("sqlite:{}", dir.path().join("db.sqlite").display());
        let mut args = vec!["--database-url", db.as_str()];
        args.extend_from_slice(extra);
        Server::start_in(dir, &args)
    }

    /// `serve --listen 127.0.0.1:0` plus `args`, run in `dir`.
    fn start_in(dir: tempfile::TempDir, args: &[&str]) -> Server {
        let log = dir.path().join("serve.log");
        let log_file = File::create(&log).expect("creating the server log");
        let mut cmd = bin();
        cmd.current_dir(dir.path())
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            // Tests run many servers at once: no admin listener on the
            // default port.
            .env("BILLING_MODE_ADMIN_LISTEN", "off")
            .args(args)
            .stdout(Stdio::from(log_file.try_clone().expect("log handle")))
            .stderr(Stdio::from(log_file));
        let child = cmd.spawn().expect("spawning billing-mode serve");
        let mut server = Server {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
            dir,
        };
        server.addr = server.wait_ready();
        server
    }

    /// Waits for the ready line, which names the bound address (the server
    /// listens before it says so).
    fn wait_ready(&mut self) -> SocketAddr {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let ready = self.log_text().lines().find_map(|line| {
                line.contains("ready:").then(|| {
                    line.split_whitespace()
                        .find_map(|w| w.strip_prefix("addr="))
                        .and_then(|a| a.parse().ok())
                })?
            });
            if let Some(addr) = ready {
                return addr;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "the server exited before listening ({status}):\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the server did not say it was ready within {STARTUP_TIMEOUT:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(POLL);
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A client subcommand pointed at this server.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = bin();
        cmd.args(args).arg("--server").arg(self.url());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        run(self.cmd(args))
    }

    /// Registers `WS` as claude-code + opus owning its subscription token.
    fn register_byok(&self) {
        ok(&self.run(&[
            "set",
            WS,
            "--runtime",
            "claude-code",
            "--model",
            "opus",
            "--credential-keys",
            "CLAUDE_CODE_OAUTH_TOKEN",
        ]));
    }
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).expect("writing a file");
    path.display().to_string()
}

/// The candidate env of seed case 4, as `ORIGIN KEY=VALUE` lines.
fn line_env() -> String {
    format!(
        "# the provisioner's candidate env\n\
         workspace CLAUDE_CODE_OAUTH_TOKEN={CUSTOMER_SECRET}\n\
         global CLAUDE_CODE_OAUTH_TOKEN={PLATFORM_SECRET}\n\
         \n\
         GLOBAL ANTHROPIC_API_KEY={PLATFORM_SECRET}\n\
         platform MOLECULE_LLM_ANTHROPIC_BASE_URL=http://proxy.internal/anthropic\n\
         platform MOLECULE_LLM_USAGE_TOKEN={USAGE_TOKEN}\n\
         workspace GREETING=a=b c\n"
    )
}

/// The same candidate env as a JSON array.
fn json_env() -> String {
    serde_json::json!([
        {"key": "CLAUDE_CODE_OAUTH_TOKEN", "value": CUSTOMER_SECRET, "origin": "workspace"},
        {"key": "CLAUDE_CODE_OAUTH_TOKEN", "value": PLATFORM_SECRET, "origin": "global"},
        {"key": "ANTHROPIC_API_KEY", "value": PLATFORM_SECRET, "origin": "GLOBAL"},
        {"key": "MOLECULE_LLM_ANTHROPIC_BASE_URL", "value": "http://proxy.internal/anthropic", "origin": "platform"},
        // The proto's names too, as grpcurl and `--json` write them.
        {"key": "MOLECULE_LLM_USAGE_TOKEN", "value": USAGE_TOKEN, "origin": "ORIGIN_PLATFORM"},
        {"key": "GREETING", "value": "a=b c", "origin": "ORIGIN_WORKSPACE"},
    ])
    .to_string()
}

/// `KEY=VALUE  (origin)` lines of build-env's text output, as (key, value, origin).
fn env_lines(text: &str) -> Vec<(String, String, String)> {
    let start = text.find("\nenv:\n").expect("an env: section") + "\nenv:\n".len();
    text[start..]
        .lines()
        .take_while(|l| l.starts_with("  "))
        .map(|l| {
            let (kv, origin) = l.trim().rsplit_once("  (").expect("`  (origin)`");
            let (k, v) = kv.split_once('=').expect("KEY=VALUE");
            (
                k.to_owned(),
                v.to_owned(),
                origin.trim_end_matches(')').to_owned(),
            )
        })
        .collect()
}

fn field<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no `{name}:` line in:\n{text}"))
        .trim()
}

// ---------------------------------------------------------------------------
// set / resolve / clear / history

#[test]
fn set_resolve_clear_and_history_round_trip() {
    let s = Server::start(&[]);

    // Unknown workspace: an error, never a default decision.
    let err = fails_with(&s.run(&["resolve", WS]), "WORKSPACE_NOT_FOUND");
    assert!(err.contains("NotFound"), "{err}");

    // Set creates the record and prints the new resolution.
    let out = ok(&s.run(&[
        "set",
        WS,
        "--runtime",
        "claude-code",
        "--model",
        "opus",
        "--credential-keys",
        "CLAUDE_CODE_OAUTH_TOKEN",
    ]));
    assert_eq!(field(&out, "workspace"), WS);
    assert_eq!(field(&out, "mode"), "byok");
    assert_eq!(field(&out, "source"), "DERIVED_PROVIDER");
    assert_eq!(field(&out, "provider"), "anthropic-oauth (customer)");
    assert_eq!(field(&out, "runtime"), "claude-code");
    assert_eq!(field(&out, "model"), "opus");
    assert_eq!(field(&out, "override"), "(none)");
    assert_eq!(field(&out, "revision"), "1");
    assert_eq!(field(&out, "credentials"), "CLAUDE_CODE_OAUTH_TOKEN");
    assert!(out.contains("trace:\n  - "), "{out}");
    assert!(!out.contains("forbidden secret keys"), "{out}");

    // Plain resolve says the same.
    let out = ok(&s.run(&["resolve", WS]));
    assert_eq!(field(&out, "mode"), "byok");
    assert_eq!(field(&out, "revision"), "1");

    // An override needs a reason (a blank one is none).
    fails_with(
        &s.run(&["set", WS, "--override", "platform_managed"]),
        "REASON_REQUIRED",
    );
    fails_with(
        &s.run(&[
            "set",
            WS,
            "--override",
            "platform_managed",
            "--reason",
            "  ",
        ]),
        "REASON_REQUIRED",
    );
    let out = ok(&s.run(&[
        "set",
        WS,
        "--override",
        "platform_managed",
        "--reason",
        "incident 42",
    ]));
    assert_eq!(field(&out, "mode"), "platform_managed");
    assert_eq!(field(&out, "source"), "OVERRIDE");
    assert_eq!(field(&out, "override"), "platform_managed");
    assert_eq!(field(&out, "revision"), "2");
    assert!(
        field(&out, "forbidden secret keys").contains("ANTHROPIC_API_KEY"),
        "{out}"
    );

    // Compare-and-set: a stale revision is refused, the current one accepted.
    fails_with(
        &s.run(&["set", WS, "--model", "sonnet", "--expected-revision", "1"]),
        "REVISION_MISMATCH",
    );
    // Nothing to set.
    fails_with(&s.run(&["set", WS, "--reason", "why"]), "NOTHING_TO_SET");
    // A mode the client does not know: refused locally, non-zero.
    fails_with(
        &s.run(&["set", WS, "--override", "free", "--reason", "x"]),
        "platform_managed, byok or disabled",
    );

    // Clear needs a reason; it removes the override.
    fails_with(&s.run(&["clear", WS]), "REASON_REQUIRED");
    fails_with(
        &s.run(&["clear", WS, "--reason", "x", "--expected-revision", "1"]),
        "REVISION_MISMATCH",
    );
    let out = ok(&s.run(&[
        "clear",
        WS,
        "--reason",
        "back to derived",
        "--expected-revision",
        "2",
    ]));
    assert_eq!(field(&out, "mode"), "byok");
    assert_eq!(field(&out, "source"), "DERIVED_PROVIDER");
    assert_eq!(field(&out, "override"), "(none)");
    assert_eq!(field(&out, "revision"), "3");
    // Clearing again changes nothing: no new revision.
    let out = ok(&s.run(&["clear", WS, "--reason", "again"]));
    assert_eq!(field(&out, "revision"), "3");
    fails_with(
        &s.run(&["clear", UNKNOWN_WS, "--reason", "x"]),
        "WORKSPACE_NOT_FOUND",
    );

    // History, newest first, with actor and reason.
    let out = ok(&s.run(&["history", WS]));
    let heads: Vec<&str> = out.lines().filter(|l| l.starts_with("revision ")).collect();
    assert_eq!(heads.len(), 3, "{out}");
    assert!(heads[0].starts_with("revision 3 at "), "{out}");
    assert!(
        heads[0].ends_with(" by anonymous (back to derived)"),
        "{out}"
    );
    assert!(heads[1].starts_with("revision 2 at "), "{out}");
    assert!(heads[1].ends_with(" by anonymous (incident 42)"), "{out}");
    assert!(heads[2].starts_with("revision 1 at "), "{out}");
    assert!(heads[2].ends_with(" by anonymous"), "{out}");
    assert!(out.contains("  before: (no record)\n"), "{out}");
    assert!(
        out.contains("  after:  runtime=claude-code model=opus credential_keys=[CLAUDE_CODE_OAUTH_TOKEN] override=platform_managed\n"),
        "{out}"
    );
    assert!(!out.contains("next page"), "{out}");

    // Paged history, as JSON, following next_page_token.
    let page = json(&s.run(&["history", WS, "--json", "--page-size", "2"]));
    let entries = page["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 2, "{page}");
    // Protobuf's JSON mapping, as grpcurl prints it: uint64 as a string,
    // lowerCamelCase names, a default (empty) value omitted.
    assert_eq!(entries[0]["revision"], "3");
    assert_eq!(entries[0]["actor"], "anonymous");
    assert_eq!(entries[0]["reason"], "back to derived");
    assert_eq!(entries[0]["before"]["overrideMode"], "platform_managed");
    assert_eq!(entries[0]["after"]["overrideMode"], Value::Null, "{page}");
    assert_eq!(entries[1]["revision"], "2");
    let token = page["nextPageToken"].as_str().expect("a token");
    assert!(!token.is_empty(), "{page}");
    let page2 = json(&s.run(&[
        "history",
        WS,
        "--json",
        "--page-size",
        "2",
        "--page-token",
        token,
    ]));
    let entries = page2["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 1, "{page2}");
    assert_eq!(entries[0]["revision"], "1");
    assert!(entries[0]["before"].is_null(), "{page2}");
    assert_eq!(entries[0]["after"]["model"], "opus");
    assert_eq!(
        page2["nextPageToken"],
        Value::Null,
        "the last page has none"
    );
    // The text form names the next page.
    let out = ok(&s.run(&["history", WS, "--page-size", "1"]));
    assert!(out.contains("next page: --page-token "), "{out}");

    fails_with(&s.run(&["history", UNKNOWN_WS]), "WORKSPACE_NOT_FOUND");
}

#[test]
fn dry_run_set_and_clear_print_the_decision_and_write_nothing() {
    let s = Server::start(&[]);
    // A dry-run Set on an unknown workspace: the decision it would create.
    let out = ok(&s.run(&[
        "set",
        WS,
        "--runtime",
        "claude-code",
        "--model",
        "opus",
        "--credential-keys",
        "CLAUDE_CODE_OAUTH_TOKEN",
        "--dry-run",
    ]));
    assert!(out.starts_with("dry run: nothing was written\n"), "{out}");
    assert_eq!(field(&out, "mode"), "byok");
    assert_eq!(field(&out, "revision"), "1");
    fails_with(&s.run(&["resolve", WS]), "WORKSPACE_NOT_FOUND");

    s.register_byok();
    let o = s.run(&[
        "set",
        WS,
        "--override",
        "disabled",
        "--reason",
        "try it",
        "--dry-run",
        "--json",
    ]);
    let v = json(&o);
    // Standard output is the SetResponse; the dry run is said on standard error.
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("dry run: nothing was written"), "{err}");
    assert_eq!(v["resolution"]["mode"], "MODE_DISABLED", "{v}");
    assert_eq!(v["resolution"]["revision"], "2", "{v}");
    // The same checks as the real write.
    fails_with(
        &s.run(&["set", WS, "--override", "disabled", "--dry-run"]),
        "REASON_REQUIRED",
    );
    fails_with(
        &s.run(&["clear", UNKNOWN_WS, "--reason", "r", "--dry-run"]),
        "WORKSPACE_NOT_FOUND",
    );
    let out = ok(&s.run(&["clear", WS, "--reason", "r", "--dry-run"]));
    assert_eq!(
        field(&out, "revision"),
        "1",
        "a no-op Clear keeps the revision"
    );
    // Nothing was written.
    let out = ok(&s.run(&["resolve", WS]));
    assert_eq!(field(&out, "mode"), "byok");
    assert_eq!(field(&out, "revision"), "1");
    let help = ok(&s.run(&["set", "--help"]));
    assert!(help.contains("--dry-run"), "{help}");
    let help = ok(&s.run(&["clear", "--help"]));
    assert!(help.contains("--dry-run"), "{help}");
}

/// Lines of a running child's standard output, as they come.
fn lines_of(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[test]
fn watch_prints_each_change_and_the_cursor_to_resume_from_on_ctrl_c() {
    let s = Server::start(&[]);
    s.register_byok();
    let mut watch = s.cmd(&["watch", "--snapshot", "--json"]);
    watch.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = watch.spawn().expect("spawning billing-mode watch");
    let lines = lines_of(&mut child);
    let next = || {
        let l = lines
            .recv_timeout(STARTUP_TIMEOUT)
            .expect("a line from billing-mode watch");
        serde_json::from_str::<Value>(&l).unwrap_or_else(|e| panic!("{e}: {l}"))
    };
    // The snapshot: the one workspace, then its end.
    let entry = next();
    assert_eq!(entry["resolution"]["workspaceId"], WS, "{entry}");
    assert_eq!(entry["resolution"]["revision"], "1", "{entry}");
    let done = next();
    assert_eq!(done["progress"]["snapshotComplete"], true, "{done}");
    // A change arrives as one line.
    ok(&s.run(&["set", WS, "--override", "disabled", "--reason", "watch it"]));
    let change = next();
    assert_eq!(change["resolution"]["mode"], "MODE_DISABLED", "{change}");
    assert_eq!(change["resolution"]["revision"], "2", "{change}");
    let cursor = change["cursor"].as_str().unwrap().to_owned();
    // Ctrl-C: the cursor to resume from, on standard error.
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = wait_exit(&mut child, EXIT_TIMEOUT).expect("watch exits on SIGINT");
    assert!(exit.success(), "{exit}");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        err.contains(&format!(
            "resume with: billing-mode watch --cursor {cursor}"
        )),
        "{err}"
    );
    // Resuming from it gives the next change and nothing before it.
    ok(&s.run(&["clear", WS, "--reason", "back"]));
    let mut resumed = s.cmd(&["watch", "--cursor", &cursor, WS]);
    resumed.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = resumed.spawn().unwrap();
    let lines = lines_of(&mut child);
    let l = lines
        .recv_timeout(STARTUP_TIMEOUT)
        .expect("the next change");
    let _ = child.kill();
    let _ = child.wait();
    assert!(l.contains(&format!("{WS} revision 3 mode byok")), "{l}");
    // A malformed cursor is refused with its reason.
    fails_with(&s.run(&["watch", "--cursor", "nope"]), "INVALID_CURSOR");
    let help = ok(&s.run(&["watch", "--help"]));
    for flag in ["--cursor", "--snapshot", "--json"] {
        assert!(help.contains(flag), "{help}");
    }
}

/// Sends `signal` (`INT`, `TERM`) to process `pid`.
fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// A running `billing-mode watch` with both outputs piped: its standard
/// output line by line, read only when asked (the rest waits in the pipe).
struct Watching {
    child: Child,
    out: Option<std::io::BufReader<std::process::ChildStdout>>,
}

impl Drop for Watching {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Watching {
    fn start(s: &Server, args: &[&str]) -> Watching {
        let mut cmd = s.cmd(args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning billing-mode watch");
        let out = std::io::BufReader::new(child.stdout.take().expect("piped stdout"));
        Watching {
            child,
            out: Some(out),
        }
    }

    /// The next line of standard output (it must come).
    fn next_line(&mut self) -> String {
        use std::io::BufRead;
        let mut line = String::new();
        let out = self.out.as_mut().expect("not finished yet");
        let n = out.read_line(&mut line).expect("reading watch's output");
        assert!(n > 0, "watch ended its output early");
        line
    }

    /// The rest of standard output and standard error, once the command
    /// ends (at most `EXIT_TIMEOUT`), and its exit status.
    fn finish(mut self) -> (ExitStatus, String, String) {
        let mut out = self.out.take().expect("not finished yet");
        let mut err = self.child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (mut o, mut e) = (String::new(), String::new());
            let _ = std::io::Read::read_to_string(&mut out, &mut o);
            let _ = std::io::Read::read_to_string(&mut err, &mut e);
            let _ = tx.send((o, e));
        });
        let (out, err) = rx
            .recv_timeout(EXIT_TIMEOUT)
            .expect("watch ends within EXIT_TIMEOUT");
        let status = wait_exit(&mut self.child, EXIT_TIMEOUT).expect("watch exits");
        (status, out, err)
    }
}

/// The `i`-th of a run of workspace ids.
fn numbered_workspace(i: usize) -> String {
    format!("00000000-0000-4000-8000-{i:012x}")
}

#[test]
fn watch_offers_no_cursor_to_resume_from_before_its_snapshot_is_complete() {
    let s = Server::start(&[]);
    // Far more snapshot than a pipe holds: the command is still inside the
    // snapshot when it is interrupted (it waits to write while the test
    // does not read).
    let file: String = (0..1500)
        .map(|i| {
            format!(
                "{{\"workspace_id\":\"{}\",\"runtime\":\"claude-code\",\"model\":\"opus\"}}\n",
                numbered_workspace(i)
            )
        })
        .collect();
    let path = write(&s.path("workspaces.jsonl"), &file);
    ok(&s.run(&["import", &path, "--reason", "adopt"]));
    let mut w = Watching::start(&s, &["watch", "--snapshot", "--json"]);
    let first: Value = serde_json::from_str(&w.next_line()).expect("a JSON line");
    assert!(first["resolution"]["workspaceId"].is_string(), "{first}");
    // Every entry carries the snapshot's position: resuming from one would
    // skip the rest of the snapshot, so no cursor is offered.
    signal(w.child.id(), "INT");
    let (status, out, err) = w.finish();
    assert!(status.success(), "{status}: {err}");
    assert!(
        !out.contains("snapshotComplete"),
        "the snapshot was meant to be interrupted before its end"
    );
    assert!(
        err.contains("start again with: billing-mode watch --snapshot"),
        "{err}"
    );
    assert!(!err.contains("--cursor"), "{err}");
}

/// The last line of `text`, as JSON.
#[track_caller]
fn last_json_line(text: &str) -> Value {
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("not a JSON line ({e}): {text}"))
}

/// The cursor of a stream opened from now (its opening progress message).
fn cursor_now(s: &Server) -> String {
    let mut w = Watching::start(s, &["watch", "--json"]);
    let first: Value = serde_json::from_str(&w.next_line()).expect("a JSON line");
    assert!(first["progress"].is_object(), "{first}");
    first["cursor"].as_str().expect("a cursor").to_owned()
}

#[test]
fn watch_says_to_start_over_after_an_expired_or_refused_cursor() {
    let s = Server::start(&["--change-retention-secs", "1"]);
    // A refused cursor: no cursor to resume from; start over.
    for json_out in [false, true] {
        let mut args = vec!["watch", "--cursor", "nope"];
        if json_out {
            args.push("--json");
        }
        let o = s.run(&args);
        let err = fails_with(&o, "INVALID_CURSOR");
        assert!(
            err.contains("start again with: billing-mode watch --snapshot"),
            "{}",
            describe(&o)
        );
        assert!(!err.contains("resume with"), "{}", describe(&o));
        if json_out {
            let e = last_json_line(&stdout(&o));
            assert_eq!(e["error"]["code"], "InvalidArgument", "{e}");
            assert_eq!(e["error"]["reason"], "INVALID_CURSOR", "{e}");
            assert!(e["error"]["message"].is_string(), "{e}");
            assert_eq!(e["error"]["start_over"], true, "{e}");
            assert!(e["error"].get("resume_cursor").is_none(), "{e}");
        }
    }
    // An expired cursor: older than the retained log (1 s here).
    let old = cursor_now(&s);
    s.register_byok();
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let o = loop {
        let mut w = Watching::start(&s, &["watch", "--cursor", &old, "--json"]);
        match wait_exit(&mut w.child, Duration::from_secs(2)) {
            Some(_) => break w.finish(),
            // Not pruned yet: the stream is open. Again, later.
            None => assert!(Instant::now() < deadline, "the change was never pruned"),
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let (status, out, err) = o;
    assert!(!status.success(), "{status}\n{out}\n{err}");
    assert!(err.contains("CURSOR_EXPIRED"), "{err}");
    assert!(
        err.contains("start again with: billing-mode watch --snapshot"),
        "{err}"
    );
    assert!(!err.contains("resume with"), "{err}");
    let e = last_json_line(&out);
    assert_eq!(e["error"]["code"], "OutOfRange", "{e}");
    assert_eq!(e["error"]["reason"], "CURSOR_EXPIRED", "{e}");
    assert_eq!(e["error"]["start_over"], true, "{e}");
}

#[test]
fn watch_says_not_to_resume_from_a_store_it_cannot_read() {
    let s = Server::start(&[]);
    s.register_byok();
    let cursor = cursor_now(&s);
    ok(&s.run(&["set", WS, "--override", "disabled", "--reason", "a"]));
    ok(&s.run(&["clear", WS, "--reason", "b"]));
    // A hole in the change log, behind the server's back: the change after
    // the cursor is gone, the one after it is not.
    let url = format!("sqlite:{}", s.path("db.sqlite").display());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            use sqlx::Connection;
            let mut c = sqlx::SqliteConnection::connect(&url).await.unwrap();
            let gone = sqlx::query(
                "DELETE FROM billing_changes WHERE position = \
                 (SELECT MIN(position) FROM billing_changes WHERE revision = 2)",
            )
            .execute(&mut c)
            .await
            .unwrap();
            assert_eq!(gone.rows_affected(), 1);
            c.close().await.unwrap();
        });
    for json_out in [false, true] {
        let mut args = vec!["watch", "--cursor", cursor.as_str()];
        if json_out {
            args.push("--json");
        }
        let o = s.run(&args);
        let err = fails_with(&o, "STORE_CORRUPT");
        assert!(err.contains("do not resume"), "{}", describe(&o));
        assert!(err.contains("operator"), "{}", describe(&o));
        assert!(!err.contains("resume with"), "{}", describe(&o));
        assert!(!err.contains("start again"), "{}", describe(&o));
        if json_out {
            let e = last_json_line(&stdout(&o));
            assert_eq!(e["error"]["code"], "DataLoss", "{e}");
            assert_eq!(e["error"]["reason"], "STORE_CORRUPT", "{e}");
            assert_eq!(e["error"]["do_not_resume"], true, "{e}");
            assert!(e["error"].get("resume_cursor").is_none(), "{e}");
            assert!(e["error"].get("start_over").is_none(), "{e}");
        }
    }
}

#[test]
fn watch_keeps_its_cursor_after_an_error_it_can_resume_from() {
    let mut s = Server::start(&[]);
    s.register_byok();
    let mut w = Watching::start(&s, &["watch", "--json", WS]);
    let first: Value = serde_json::from_str(&w.next_line()).expect("a JSON line");
    let cursor = first["cursor"].as_str().expect("a cursor").to_owned();
    // The server shuts down: SHUTTING_DOWN, resume from the cursor (on any
    // replica).
    signal(s.child.id(), "TERM");
    let (status, out, err) = w.finish();
    assert!(!status.success(), "{status}\n{out}\n{err}");
    assert!(err.contains("SHUTTING_DOWN"), "{err}");
    assert!(
        err.contains(&format!(
            "resume with: billing-mode watch --cursor {cursor} {WS}"
        )),
        "{err}"
    );
    let e = last_json_line(&out);
    assert_eq!(e["error"]["code"], "Unavailable", "{e}");
    assert_eq!(e["error"]["reason"], "SHUTTING_DOWN", "{e}");
    assert_eq!(e["error"]["resume_cursor"], cursor.as_str(), "{e}");
    assert!(e["error"].get("start_over").is_none(), "{e}");
    wait_exit(&mut s.child, EXIT_TIMEOUT).expect("serve stops on SIGTERM");
}

/// A reader that goes away (`billing-mode … | head`, a closed pager) ends a
/// command quietly: no panic, nothing on standard error, and the status of a
/// program `SIGPIPE` ended (141), as `cat` has.
#[test]
fn a_reader_that_goes_away_ends_a_command_quietly() {
    let s = Server::start(&[]);
    s.register_byok();
    let commands: [&[&str]; 4] = [
        &["history", WS],
        &["resolve", WS, "--json"],
        &["resolve", UNKNOWN_WS, "--json"],
        &["watch", "--snapshot"],
    ];
    for args in commands {
        let mut cmd = s.cmd(args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning billing-mode");
        // The reader is gone before the command writes its first line.
        drop(child.stdout.take());
        let exit = wait_exit(&mut child, EXIT_TIMEOUT)
            .unwrap_or_else(|| panic!("{args:?} did not end when its reader went away"));
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert!(err.is_empty(), "{args:?}: {err}");
        assert_eq!(exit.code(), Some(141), "{args:?}: {exit}: {err}");
    }
}

#[test]
fn resolve_json_carries_every_field() {
    let s = Server::start(&[]);
    // Upper case id, unsorted duplicate credential keys.
    let upper = WS.to_uppercase();
    ok(&s.run(&[
        "set",
        &upper,
        "--runtime",
        "claude-code",
        "--model",
        "opus",
        "--credential-keys",
        "CLAUDE_CODE_OAUTH_TOKEN, ANTHROPIC_API_KEY,CLAUDE_CODE_OAUTH_TOKEN",
    ]));

    // The ResolveResponse in protobuf's JSON mapping, as grpcurl prints it:
    // lowerCamelCase names, enums by name, uint64 as a string, defaults
    // (false, "", unspecified, empty lists) omitted.
    let r = &json(&s.run(&["resolve", WS, "--json"]))["resolution"];
    assert_eq!(r["workspaceId"], WS, "stored and echoed in lower case");
    assert_eq!(r["mode"], "MODE_BYOK");
    assert_eq!(r["source"], "SOURCE_DERIVED_PROVIDER");
    assert_eq!(r["provider"], "anthropic-oauth");
    assert_eq!(
        r["providerIsPlatform"],
        Value::Null,
        "false is omitted: {r}"
    );
    assert_eq!(r["runtime"], "claude-code");
    assert_eq!(r["model"], "opus");
    assert_eq!(
        r["overrideMode"],
        Value::Null,
        "unspecified is omitted: {r}"
    );
    assert_eq!(r["revision"], "1");
    assert_eq!(
        strings(&r["credentialKeys"]),
        ["ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN"]
    );
    assert!(r["forbiddenSecretKeys"].is_null(), "empty is omitted: {r}");
    let trace = strings(&r["trace"]);
    assert!(trace.len() >= 2, "{r}");
    assert!(trace[0].starts_with("override"), "{r}");
    assert!(trace.last().unwrap().contains("byok"), "{r}");

    // An override to platform_managed: forbidden keys appear, sorted.
    let r = &json(&s.run(&[
        "set",
        WS,
        "--override",
        "platform_managed",
        "--reason",
        "r",
        "--json",
    ]))["resolution"];
    assert_eq!(r["mode"], "MODE_PLATFORM_MANAGED");
    assert_eq!(r["source"], "SOURCE_OVERRIDE");
    assert_eq!(r["overrideMode"], "MODE_PLATFORM_MANAGED");
    assert_eq!(
        r["provider"], "anthropic-oauth",
        "provider filled under override"
    );
    assert_eq!(r["revision"], "2");
    let forbidden = strings(&r["forbiddenSecretKeys"]);
    for k in [
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_BASE_URL",
        "CLAUDE_CODE_OAUTH_TOKEN",
        "MOLECULE_LLM_USAGE_TOKEN",
    ] {
        assert!(forbidden.iter().any(|f| f == k), "{k} in {forbidden:?}");
    }
    let mut sorted = forbidden.clone();
    sorted.sort();
    assert_eq!(forbidden, sorted);

    // Clearing fields: "" clears runtime, model and credential keys.
    let r = &json(&s.run(&[
        "set",
        WS,
        "--runtime",
        "",
        "--model",
        "",
        "--credential-keys",
        "",
        "--json",
    ]))["resolution"];
    assert_eq!(r["runtime"], Value::Null, "empty is omitted: {r}");
    assert_eq!(r["model"], Value::Null, "empty is omitted: {r}");
    assert!(r["credentialKeys"].is_null(), "empty is omitted: {r}");
    assert_eq!(r["revision"], "3");

    // Errors under --json: a JSON error object on stdout, the reason on stderr.
    let o = s.run(&["resolve", UNKNOWN_WS, "--json"]);
    fails_with(&o, "WORKSPACE_NOT_FOUND");
    let e: Value = serde_json::from_str(&stdout(&o)).expect("a JSON error on stdout");
    assert_eq!(e["error"]["code"], "NotFound");
    assert_eq!(e["error"]["reason"], "WORKSPACE_NOT_FOUND");
    assert!(!e["error"]["message"].as_str().unwrap().is_empty());
}

#[test]
fn invalid_workspace_ids_are_refused() {
    let s = Server::start(&[]);
    for args in [
        vec!["resolve", "not-a-uuid"],
        vec!["set", "not-a-uuid", "--model", "opus"],
        vec!["clear", "6f1c2b9e1d2a4b7c9e2f3a4b5c6d7e8f", "--reason", "x"],
        vec!["history", "not-a-uuid"],
        vec!["build-env", "", "--env-file", "-"],
    ] {
        let err = fails_with(&s.run(&args), "INVALID_WORKSPACE_ID");
        assert!(err.contains("InvalidArgument"), "{args:?}: {err}");
    }
}

#[test]
fn a_server_that_never_answers_is_an_error_after_the_timeout_not_a_wait_without_end() {
    // Accepts connections and never answers on them (a hung process, a
    // stopped container, a proxy with nothing behind it).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming() {
            held.push(c);
        }
    });
    let ws = "6b66b3a4-2c8a-4a54-9e1d-9e6a1c3ad809";
    for json_out in [false, true] {
        let mut cmd = bin();
        cmd.args(["resolve", ws, "--server", &server, "--timeout", "1s"]);
        if json_out {
            cmd.arg("--json");
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let status = wait_exit(&mut child, Duration::from_secs(30));
        if status.is_none() {
            let _ = child.kill();
        }
        let out = child.wait_with_output().unwrap();
        assert!(status.is_some(), "still waiting: {}", describe(&out));
        let err = fails_with(&out, "DeadlineExceeded");
        assert!(err.contains("--timeout"), "{err}");
        if json_out {
            let v: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
            assert_eq!(v["error"]["code"], "DeadlineExceeded", "{v}");
        }
    }
    // Zero would never wait at all: refused.
    let out = run({
        let mut cmd = bin();
        cmd.args(["resolve", ws, "--server", &server, "--timeout", "0s"]);
        cmd
    });
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(stderr(&out).contains("above zero"), "{}", describe(&out));
}

#[test]
fn a_page_size_outside_the_documented_range_is_refused() {
    let ws = "6b66b3a4-2c8a-4a54-9e1d-9e6a1c3ad809";
    for size in ["0", "501"] {
        for args in [
            vec!["history", ws, "--page-size", size],
            vec!["list", "--page-size", size],
            vec!["drift", "--page-size", size],
        ] {
            let out = run({
                let mut cmd = bin();
                cmd.args(&args);
                cmd
            });
            assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
            assert!(
                stderr(&out).contains("1..=500"),
                "{args:?}: {}",
                describe(&out)
            );
        }
    }
}

// ---------------------------------------------------------------------------
// build-env

/// Checks build-env's answer for seed case 4 (`byok`: the customer's token
/// kept, the platform's dropped, no proxy) in text form.
#[track_caller]
fn check_byok_text(out: &str, show_values: bool) {
    assert_eq!(field(out, "mode"), "byok");
    assert_eq!(field(out, "revision"), "1");
    let env = env_lines(out);
    let keys: Vec<&str> = env.iter().map(|(k, _, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "CLAUDE_CODE_OAUTH_TOKEN",
            "GREETING",
            "MODEL_PROVIDER",
            "MOLECULE_LLM_BILLING_MODE",
            "MOLECULE_LLM_BILLING_MODE_RESOLVED",
        ],
        "{out}"
    );
    let get = |k: &str| env.iter().find(|(key, _, _)| key == k).unwrap();
    assert_eq!(get("CLAUDE_CODE_OAUTH_TOKEN").2, "workspace");
    assert_eq!(get("GREETING").2, "workspace");
    assert_eq!(get("MODEL_PROVIDER").2, "authority");
    assert_eq!(get("MOLECULE_LLM_BILLING_MODE").2, "authority");
    if show_values {
        assert_eq!(get("CLAUDE_CODE_OAUTH_TOKEN").1, CUSTOMER_SECRET);
        assert_eq!(get("GREETING").1, "a=b c");
        assert_eq!(get("MODEL_PROVIDER").1, "opus");
        assert_eq!(get("MOLECULE_LLM_BILLING_MODE").1, "byok");
        assert_eq!(get("MOLECULE_LLM_BILLING_MODE_RESOLVED").1, "byok");
    } else {
        for (k, v, _) in &env {
            assert_eq!(v, "<redacted>", "{k}: {out}");
        }
        assert!(!out.contains(CUSTOMER_SECRET), "{out}");
    }
    // The platform's credentials and the proxy inputs never reach stdout.
    assert!(!out.contains(PLATFORM_SECRET), "{out}");
    assert!(!out.contains(USAGE_TOKEN), "{out}");
    assert_eq!(
        field(out, "removed"),
        "ANTHROPIC_API_KEY, MOLECULE_LLM_ANTHROPIC_BASE_URL, MOLECULE_LLM_USAGE_TOKEN"
    );
    assert_eq!(
        field(out, "added"),
        "MODEL_PROVIDER, MOLECULE_LLM_BILLING_MODE, MOLECULE_LLM_BILLING_MODE_RESOLVED"
    );
}

#[test]
fn build_env_from_a_line_file_redacts_unless_asked() {
    let s = Server::start(&[]);
    s.register_byok();
    let file = write(&s.path("env.txt"), &line_env());

    let out = ok(&s.run(&["build-env", WS, "--env-file", &file]));
    check_byok_text(&out, false);

    let out = ok(&s.run(&["build-env", WS, "--env-file", &file, "--show-values"]));
    check_byok_text(&out, true);

    // The same from standard input.
    let mut cmd = s.cmd(&["build-env", WS, "--env-file", "-"]);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning build-env");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(line_env().as_bytes())
            .expect("writing stdin");
    }
    let o = child.wait_with_output().expect("build-env output");
    check_byok_text(&ok(&o), false);
}

#[test]
fn build_env_from_a_json_file_redacts_unless_asked() {
    let s = Server::start(&[]);
    s.register_byok();
    let file = write(&s.path("env.json"), &json_env());

    let out = ok(&s.run(&["build-env", WS, "--env-file", &file]));
    check_byok_text(&out, false);

    // --json output: redacted values too.
    let o = s.run(&["build-env", WS, "--env-file", &file, "--json"]);
    let text = stdout(&o);
    let j = json(&o);
    assert!(!text.contains(CUSTOMER_SECRET), "{text}");
    assert!(!text.contains(PLATFORM_SECRET), "{text}");
    assert_eq!(j["resolution"]["mode"], "MODE_BYOK");
    assert_eq!(j["resolution"]["revision"], "1");
    let env = j["env"].as_array().expect("env");
    assert!(!env.is_empty());
    for e in env {
        assert_eq!(e["value"], "<redacted>", "{j}");
    }

    // --json --show-values: the final env, as is.
    let j = json(&s.run(&[
        "build-env",
        WS,
        "--env-file",
        &file,
        "--json",
        "--show-values",
    ]));
    let value = |k: &str| {
        j["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["key"] == k)
            .map(|e| (e["value"].clone(), e["origin"].clone()))
    };
    assert_eq!(
        value("CLAUDE_CODE_OAUTH_TOKEN"),
        Some((CUSTOMER_SECRET.into(), "ORIGIN_WORKSPACE".into()))
    );
    assert_eq!(
        value("MOLECULE_LLM_BILLING_MODE"),
        Some(("byok".into(), "ORIGIN_AUTHORITY".into()))
    );
    assert_eq!(
        value("MODEL_PROVIDER"),
        Some(("opus".into(), "ORIGIN_AUTHORITY".into()))
    );
    assert_eq!(value("ANTHROPIC_API_KEY"), None);
    assert_eq!(value("ANTHROPIC_BASE_URL"), None);
    assert_eq!(value("MOLECULE_LLM_USAGE_TOKEN"), None);
    assert_eq!(
        strings(&j["removedKeys"]),
        [
            "ANTHROPIC_API_KEY",
            "MOLECULE_LLM_ANTHROPIC_BASE_URL",
            "MOLECULE_LLM_USAGE_TOKEN"
        ]
    );
    assert_eq!(
        strings(&j["addedKeys"]),
        [
            "MODEL_PROVIDER",
            "MOLECULE_LLM_BILLING_MODE",
            "MOLECULE_LLM_BILLING_MODE_RESOLVED"
        ]
    );
    // Resolve and BuildEnv agree at the same revision.
    let r = json(&s.run(&["resolve", WS, "--json"]));
    assert_eq!(j["resolution"], r["resolution"]);
}

#[test]
fn build_env_platform_managed_routes_through_the_proxy() {
    let s = Server::start(&[]);
    s.register_byok();
    ok(&s.run(&[
        "set",
        WS,
        "--override",
        "platform_managed",
        "--reason",
        "we pay",
    ]));
    let file = write(&s.path("env.txt"), &line_env());

    let out = ok(&s.run(&["build-env", WS, "--env-file", &file]));
    assert_eq!(field(&out, "mode"), "platform_managed");
    assert!(!out.contains(USAGE_TOKEN), "{out}");
    assert!(!out.contains(CUSTOMER_SECRET), "{out}");

    let j = json(&s.run(&[
        "build-env",
        WS,
        "--env-file",
        &file,
        "--json",
        "--show-values",
    ]));
    let get = |k: &str| {
        j["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["key"] == k)
            .map(|e| e["value"].as_str().unwrap().to_owned())
    };
    assert_eq!(
        get("MOLECULE_LLM_BILLING_MODE").as_deref(),
        Some("platform_managed")
    );
    assert_eq!(
        get("ANTHROPIC_BASE_URL").as_deref(),
        Some("http://proxy.internal/anthropic")
    );
    assert_eq!(get("ANTHROPIC_API_KEY").as_deref(), Some(USAGE_TOKEN));
    assert_eq!(get("CLAUDE_CODE_OAUTH_TOKEN"), None);
    let text = j.to_string();
    assert!(!text.contains(CUSTOMER_SECRET), "{text}");
    assert!(!text.contains(PLATFORM_SECRET), "{text}");
}

#[test]
fn build_env_errors_fail_closed() {
    let s = Server::start(&[]);
    s.register_byok();

    // byok without the customer's own token: refused, never the platform's.
    let file = write(
        &s.path("no-own-token.txt"),
        &format!(
            "global CLAUDE_CODE_OAUTH_TOKEN={PLATFORM_SECRET}\n\
             platform MOLECULE_LLM_ANTHROPIC_BASE_URL=http://proxy\n\
             platform MOLECULE_LLM_USAGE_TOKEN={USAGE_TOKEN}\n"
        ),
    );
    let o = s.run(&["build-env", WS, "--env-file", &file]);
    let err = fails_with(&o, "MISSING_BYOK_CREDENTIAL");
    assert!(err.contains("FailedPrecondition"), "{err}");
    assert!(
        stdout(&o).is_empty(),
        "no env on failure:\n{}",
        describe(&o)
    );
    assert!(!err.contains(PLATFORM_SECRET), "{err}");

    // A different model in the candidate env.
    let file = write(
        &s.path("mismatch.txt"),
        &format!(
            "workspace CLAUDE_CODE_OAUTH_TOKEN={CUSTOMER_SECRET}\n\
             workspace MODEL_PROVIDER=sonnet\n"
        ),
    );
    fails_with(
        &s.run(&["build-env", WS, "--env-file", &file]),
        "MODEL_MISMATCH",
    );

    // The same key twice under one origin.
    let file = write(
        &s.path("dup.json"),
        r#"[{"key":"A","value":"1","origin":"workspace"},{"key":"A","value":"2","origin":"workspace"}]"#,
    );
    fails_with(
        &s.run(&["build-env", WS, "--env-file", &file]),
        "DUPLICATE_ENV_KEY",
    );

    // Unknown workspace.
    let file = write(
        &s.path("ok.txt"),
        &format!("workspace CLAUDE_CODE_OAUTH_TOKEN={CUSTOMER_SECRET}\n"),
    );
    fails_with(
        &s.run(&["build-env", UNKNOWN_WS, "--env-file", &file]),
        "WORKSPACE_NOT_FOUND",
    );

    // Local errors: unreadable file, bad lines, bad origins, bad JSON.
    fails_with(
        &s.run(&["build-env", WS, "--env-file", "/nonexistent/env.txt"]),
        "/nonexistent/env.txt",
    );
    let file = write(&s.path("bad-line.txt"), "workspace NO_EQUALS_SIGN\n");
    fails_with(
        &s.run(&["build-env", WS, "--env-file", &file]),
        "line 1: expected `ORIGIN KEY=VALUE`",
    );
    let file = write(&s.path("bad-origin.txt"), "# c\nsomewhere A=1\n");
    fails_with(
        &s.run(&["build-env", WS, "--env-file", &file]),
        "line 2: the origin must be workspace, global or platform",
    );
    let file = write(
        &s.path("authority.json"),
        r#"[{"key":"A","origin":"authority"}]"#,
    );
    fails_with(
        &s.run(&["build-env", WS, "--env-file", &file]),
        "the origin must be workspace, global or platform",
    );
    let file = write(&s.path("bad.json"), r#"[{"key":"A"}]"#);
    fails_with(
        &s.run(&["build-env", WS, "--env-file", &file]),
        "reading the JSON env",
    );
}

/// An env file written dotenv-style by mistake (no origin column) must not
/// put a credential value on stderr: build-env otherwise never prints a value
/// unless `--show-values` is given.
#[test]
fn env_file_errors_do_not_echo_secret_values() {
    let dir = tempfile::tempdir().expect("temp dir");
    // No server needed: the file is refused before connecting.
    let file = write(
        &dir.path().join("dotenv.txt"),
        &format!("OPENAI_API_KEY={CUSTOMER_SECRET} OPENAI_BASE_URL=https://api.openai.com\n"),
    );
    let mut cmd = bin();
    cmd.args(["build-env", WS, "--env-file", &file]);
    let (_reserved, nobody) = refusing_addr();
    cmd.args(["--server", &format!("http://{nobody}")]);
    let o = run(cmd);
    let err = fails_with(&o, "line 1");
    assert!(
        !err.to_lowercase().contains(&CUSTOMER_SECRET.to_lowercase()),
        "the error echoes the secret value:\n{err}"
    );
}

/// A JSON env file of the wrong shape must not put a credential on stdout or
/// stderr, with or without `--json`, from a file or from standard input:
/// serde's own messages quote the value they refused (`invalid type: string
/// "ANTHROPIC_API_KEY=sk-…"`). The error still says where.
#[test]
fn malformed_json_env_files_do_not_echo_secret_values() {
    const CANARY: &str = "sk-ant-api03-canary-5d1e9f";
    // A number-shaped secret: serde quotes an unexpected number too.
    const NUMERIC_CANARY: &str = "4242424242424242";
    let dir = tempfile::tempdir().expect("temp dir");
    // No server needed: the file is refused before connecting.
    let (_reserved, nobody) = refusing_addr();
    let server = format!("http://{nobody}");
    // (the file, where the error must say it is)
    let cases = [
        // A dotenv line pasted as an array element: the leak reported.
        (
            format!(
                "[{{\"key\": \"A\", \"value\": \"x\", \"origin\": \"workspace\"}},\n  \"ANTHROPIC_API_KEY={CANARY}\"]"
            ),
            "line 2, column 48: expected an array of",
        ),
        (
            format!(r#"[{{"key": "CARD", "value": {NUMERIC_CANARY}, "origin": "workspace"}}]"#),
            "line 1, column 42: expected an array of",
        ),
        (
            format!(r#"[{{"key": "ANTHROPIC_API_KEY", "value": "{CANARY}""#),
            "line 1, column 67: the JSON ends too early",
        ),
        (
            format!(r#"[{{"key": "ANTHROPIC_API_KEY" "value": "{CANARY}"}}]"#),
            "line 1, column 30: not valid JSON",
        ),
        (
            format!(
                r#"[{{"key": "A", "origin": "workspace"}}, {{"key": "ANTHROPIC_API_KEY", "value": "x", "origin": "{CANARY}"}}]"#
            ),
            "entry 2: the origin must be workspace, global or platform",
        ),
    ];
    let no_canary = |o: &Output| {
        for secret in [CANARY, NUMERIC_CANARY] {
            assert!(
                !stdout(o).contains(secret) && !stderr(o).contains(secret),
                "the error echoes the secret value\n{}",
                describe(o)
            );
        }
    };
    for (i, (text, place)) in cases.iter().enumerate() {
        let file = write(&dir.path().join(format!("env-{i}.json")), text);
        let args = ["build-env", WS, "--env-file", &file, "--server", &server];

        let o = run({
            let mut cmd = bin();
            cmd.args(args);
            cmd
        });
        no_canary(&o);
        fails_with(&o, place);

        let o = run({
            let mut cmd = bin();
            cmd.args(args).arg("--json");
            cmd
        });
        no_canary(&o);
        fails_with(&o, place);
        let error: Value = serde_json::from_str(&stdout(&o))
            .unwrap_or_else(|e| panic!("--json prints the error as JSON ({e})\n{}", describe(&o)));
        let message = error["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(place), "{}", describe(&o));

        // The same from standard input.
        let mut child = bin()
            .args([
                "build-env",
                WS,
                "--env-file",
                "-",
                "--server",
                &server,
                "--json",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning billing-mode");
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(text.as_bytes()).expect("writing stdin");
        }
        let o = child.wait_with_output().expect("waiting for billing-mode");
        no_canary(&o);
        fails_with(&o, place);
    }
}

// ---------------------------------------------------------------------------
// migrate, tokens, start-up and shutdown

#[test]
fn migrate_creates_the_database() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("migrated.sqlite");
    let mut cmd = bin();
    cmd.args(["migrate", "--database-url"])
        .arg(format!("sqlite:{}", path.display()));
    let out = ok(&run(cmd));
    assert!(out.contains("migrations applied"), "{out}");
    assert!(path.is_file(), "{} was not created", path.display());
    // Idempotent.
    let mut cmd = bin();
    cmd.args(["migrate", "--database-url"])
        .arg(format!("sqlite:{}", path.display()));
    ok(&run(cmd));

    // An unusable URL: non-zero, with a message.
    let mut cmd = bin();
    cmd.args(["migrate", "--database-url", "mysql://nope"]);
    fails_with(&run(cmd), "error:");
}

/// `token create`: (token, line) from its stdout.
fn create_token(name: &str, roles: &str) -> (String, String) {
    let mut cmd = bin();
    cmd.args(["token", "create", "--name", name, "--roles", roles]);
    let out = ok(&run(cmd));
    let token = out
        .lines()
        .find_map(|l| l.strip_prefix("token:"))
        .unwrap_or_else(|| panic!("no token in:\n{out}"))
        .trim()
        .to_owned();
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("line:"))
        .unwrap_or_else(|| panic!("no line in:\n{out}"))
        .trim()
        .to_owned();
    (token, line)
}

#[test]
fn token_create_prints_a_token_and_its_hash_line() {
    let (token, line) = create_token("ci", "reader,provisioner");
    let hex_re = regex::Regex::new("^[0-9a-f]{64}$").unwrap();
    let secret = token.strip_prefix("bmt_").expect("tokens start with bmt_");
    assert!(hex_re.is_match(secret), "{token}");

    let parts: Vec<&str> = line.split(' ').collect();
    assert_eq!(parts.len(), 3, "`NAME sha256:HEX ROLES`: {line:?}");
    assert_eq!(parts[0], "ci");
    let hash = parts[1].strip_prefix("sha256:").expect("sha256: prefix");
    assert!(hex_re.is_match(hash), "{line}");
    assert_eq!(hash, hex::encode(Sha256::digest(token.as_bytes())));
    let mut roles: Vec<&str> = parts[2].split(',').collect();
    roles.sort();
    assert_eq!(roles, ["provisioner", "reader"], "{line}");
    assert!(!line.contains(&token), "the line never holds the token");

    // Two tokens differ.
    let (other, _) = create_token("ci", "reader");
    assert_ne!(token, other);

    // The metering proxy's role.
    let (_, meter_line) = create_token("proxy", "meter");
    assert!(meter_line.ends_with(" meter"), "{meter_line}");

    // Bad roles or names: non-zero with a message.
    let mut cmd = bin();
    cmd.args(["token", "create", "--name", "ci", "--roles", "reader,root"]);
    fails_with(&run(cmd), "unknown role");
    let mut cmd = bin();
    cmd.args([
        "token",
        "create",
        "--name",
        "has space",
        "--roles",
        "reader",
    ]);
    fails_with(&run(cmd), "name");
}

#[test]
fn a_server_with_tokens_requires_one() {
    let (ci_token, ci_line) = create_token("ci", "reader,provisioner");
    let (ops_token, ops_line) = create_token("ops", "admin");
    let tokens = format!("{ci_line};{ops_line}");
    let s = Server::start(&["--tokens", &tokens]);

    // No token, or a wrong one: UNAUTHENTICATED.
    let err = fails_with(&s.run(&["resolve", WS]), "UNAUTHENTICATED");
    assert!(err.contains("Unauthenticated"), "{err}");
    fails_with(
        &s.run(&["resolve", WS, "--token", "bmt_wrong"]),
        "UNAUTHENTICATED",
    );
    fails_with(&s.run(&["set", WS, "--model", "opus"]), "UNAUTHENTICATED");

    // The admin registers; the ci token reads.
    ok(&s.run(&[
        "set",
        WS,
        "--runtime",
        "claude-code",
        "--model",
        "opus",
        "--credential-keys",
        "CLAUDE_CODE_OAUTH_TOKEN",
        "--token",
        &ops_token,
    ]));
    let r = json(&s.run(&["resolve", WS, "--json", "--token", &ci_token]));
    assert_eq!(r["resolution"]["mode"], "MODE_BYOK");
    // Through the environment variable too.
    let mut cmd = s.cmd(&["resolve", WS]);
    cmd.env("BILLING_MODE_TOKEN", &ci_token);
    assert_eq!(field(&ok(&run(cmd)), "mode"), "byok");

    // The ci token may not write; the actor is recorded by name.
    fails_with(
        &s.run(&["set", WS, "--model", "sonnet", "--token", &ci_token]),
        "PERMISSION_DENIED",
    );
    let h = json(&s.run(&["history", WS, "--json", "--token", &ci_token]));
    assert_eq!(h["entries"][0]["actor"], "ops");
}

#[test]
fn non_loopback_without_tokens_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cmd = bin();
    cmd.args(["serve", "--listen"])
        .arg("0.0.0.0:0")
        .arg("--database-url")
        .arg(format!("sqlite:{}", dir.path().join("db.sqlite").display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning serve");
    let status = wait_exit(&mut child, EXIT_TIMEOUT);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("serve on 0.0.0.0 without tokens kept running");
    }
    let o = child.wait_with_output().expect("output");
    assert!(!o.status.success(), "{}", describe(&o));
    fails_with(&o, "--insecure-allow-unauthenticated");
}

#[test]
fn sigterm_stops_the_server_cleanly() {
    let mut s = Server::start(&[]);
    s.register_byok();
    let pid = s.child.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -TERM {pid} failed");
    let status = wait_exit(&mut s.child, EXIT_TIMEOUT)
        .unwrap_or_else(|| panic!("serve did not stop on SIGTERM:\n{}", s.log_text()));
    assert!(
        status.success(),
        "serve exited with {status} on SIGTERM:\n{}",
        s.log_text()
    );
    // It stopped listening.
    assert!(TcpStream::connect_timeout(&s.addr, Duration::from_millis(200)).is_err());
}

#[test]
fn the_default_database_is_a_file_in_the_working_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().to_path_buf();
    let s = Server::start_in(dir, &[]);
    assert!(
        root.join("billing-mode.db").is_file(),
        "no billing-mode.db in {}:\n{}",
        root.display(),
        s.log_text()
    );
    // And it is the store in use.
    s.register_byok();
    let r = json(&s.run(&["resolve", WS, "--json"]));
    assert_eq!(r["resolution"]["revision"], "1");
}

#[test]
fn an_unreachable_server_is_an_error() {
    let (_reserved, nobody) = refusing_addr();
    let mut cmd = bin();
    cmd.args(["resolve", WS, "--server"])
        .arg(format!("http://{nobody}"));
    fails_with(&run(cmd), "connecting to http://127.0.0.1:");
    // With --json, as an UNAVAILABLE answer would be.
    let mut cmd = bin();
    cmd.args(["resolve", WS, "--json", "--server"])
        .arg(format!("http://{nobody}"));
    let out = run(cmd);
    let v: Value = serde_json::from_str(stdout(&out).trim()).expect("a JSON error");
    assert_eq!(v["error"]["code"], "Unavailable", "{v}");
    let mut cmd = bin();
    cmd.args(["resolve", WS, "--server", "not a url"]);
    fails_with(&run(cmd), "--server");
}

/// Reports, over gRPC, that `instance` of `ws` runs `mode` at `revision`.
fn report_applied(s: &Server, ws: &str, revision: u64, mode: &str, instance: &str) {
    use billing_mode::proto::{billing_mode_client::BillingModeClient, Mode, ReportAppliedRequest};
    let mode = match mode {
        "byok" => Mode::Byok,
        "disabled" => Mode::Disabled,
        _ => Mode::PlatformManaged,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let mut c = BillingModeClient::connect(s.url()).await.expect("connect");
        c.report_applied(ReportAppliedRequest {
            workspace_id: ws.to_owned(),
            revision,
            mode: mode.into(),
            instance: instance.to_owned(),
        })
        .await
        .expect("ReportApplied");
    });
}

#[test]
fn drift_lists_instances_whose_applied_mode_is_no_longer_decided() {
    let s = Server::start(&[]);
    s.register_byok();
    let none = ok(&s.run(&["drift"]));
    assert!(none.starts_with("no drift"), "{none}");
    report_applied(&s, WS, 1, "byok", "pod-7");
    ok(&s.run(&[
        "set",
        WS,
        "--override",
        "platform_managed",
        "--reason",
        "move to platform billing",
    ]));
    let table = ok(&s.run(&["drift"]));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        ["WORKSPACE", "INSTANCE", "APPLIED", "CURRENT", "SINCE"]
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(&row[..4], [WS, "pod-7", "byok@1", "platform_managed@2"]);

    let j = json(&s.run(&["drift", "--json", "--page-size", "1"]));
    let d = &j["drift"][0];
    assert_eq!(d["instance"], "pod-7");
    assert_eq!(d["appliedMode"], "MODE_BYOK");
    assert_eq!(d["appliedRevision"], "1");
    assert_eq!(d["current"]["mode"], "MODE_PLATFORM_MANAGED");
    let h = json(&s.run(&["history", WS, "--json"]));
    assert_eq!(
        d["since"], h["entries"][0]["time"],
        "since: revision 2's commit time"
    );

    // Re-provisioned at the current revision: no drift.
    report_applied(&s, WS, 2, "platform_managed", "pod-7");
    assert!(ok(&s.run(&["drift"])).starts_with("no drift"));
    assert!(ok(&s.run(&["drift", "--help"])).contains("--page-size"));
}

#[test]
fn check_spend_prints_whether_the_platform_may_pay() {
    let s = Server::start(&[]);
    s.register_byok();
    let j = json(&s.run(&["check-spend", WS, "--json"]));
    assert_eq!(j["allowed"], Value::Null, "false is omitted: {j}");
    assert_eq!(j["mode"], "MODE_BYOK");
    assert_eq!(j["revision"], "1");
    assert!(!j["asOf"].as_str().unwrap().is_empty());
    ok(&s.run(&[
        "set",
        WS,
        "--override",
        "platform_managed",
        "--reason",
        "platform billing",
    ]));
    // The answer follows the change (generous bound; the benchmark measures it).
    let deadline = Instant::now() + Duration::from_secs(2);
    let text = loop {
        let text = ok(&s.run(&["check-spend", WS]));
        if field(&text, "revision") == "2" || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(POLL);
    };
    assert_eq!(field(&text, "allowed"), "yes", "{text}");
    assert_eq!(field(&text, "mode"), "platform_managed");
    fails_with(&s.run(&["check-spend", UNKNOWN_WS]), "WORKSPACE_NOT_FOUND");
    assert!(ok(&s.run(&["check-spend", "--help"])).contains("WORKSPACE"));
    assert!(ok(&s.run(&["serve", "--help"])).contains("--max-staleness"));
}
