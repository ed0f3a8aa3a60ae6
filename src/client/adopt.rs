//! The adoption commands: `list` (every workspace's decision) and `import`
//! (register a platform's existing workspaces from JSON Lines; the logic is
//! in `crate::import`).

use std::{
    io::{BufReader, IsTerminal},
    path::PathBuf,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use crate::{
    domain::{Reason, ValidationError},
    import::{self, Connection, Options},
    proto,
};
use anyhow::Context;
use clap::Args;
use serde_json::json;

use crate::client::{self, ClientArgs};

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only workspaces decided with this mode: platform_managed, byok or disabled.
    #[arg(long)]
    mode: Option<String>,
    /// Only workspaces decided by this source: override, derived_provider or default.
    #[arg(long)]
    source: Option<String>,
    /// Entries per request (1-500); the command pages through all of them.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=500))]
    page_size: u32,
    #[command(flatten)]
    client: ClientArgs,
}

fn mode_filter(s: &str) -> anyhow::Result<proto::Mode> {
    crate::wire::names::parse_mode(s)
        .with_context(|| format!("--mode {s:?}: use platform_managed, byok or disabled"))
}

fn source_filter(s: &str) -> anyhow::Result<proto::Source> {
    crate::wire::names::parse_source(s)
        .with_context(|| format!("--source {s:?}: use override, derived_provider or default"))
}

pub async fn list(a: ListArgs) -> ExitCode {
    client::run(a.client.json, async {
        let mode = a.mode.as_deref().map(mode_filter).transpose()?;
        let source = a.source.as_deref().map(source_filter).transpose()?;
        let mut c = client::connect(&a.client).await?;
        let mut all = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = c
                .list_workspaces(proto::ListWorkspacesRequest {
                    page_size: a.page_size,
                    page_token: page_token.clone(),
                    mode: mode.map_or(0, Into::into),
                    source: source.map_or(0, Into::into),
                })
                .await?
                .into_inner();
            all.extend(page.resolutions);
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        let mut text = String::new();
        let or_dash = |s: &str| {
            if s.is_empty() {
                "-".to_owned()
            } else {
                s.to_owned()
            }
        };
        // The model column as wide as its widest entry, so the revisions
        // line up.
        let model_width = all
            .iter()
            .map(|r| or_dash(&r.model).chars().count())
            .max()
            .unwrap_or(0);
        for r in &all {
            text += &format!(
                "{}  {:<16}  {:<16}  {:<22}  {:<12}  {:<model_width$}  rev {}\n",
                r.workspace_id,
                import::mode_name(r.mode),
                import::source_name(r.source),
                or_dash(&r.provider),
                or_dash(&r.runtime),
                or_dash(&r.model),
                r.revision
            );
        }
        text += &format!("{} workspaces\n", all.len());
        // Every page as one response: the shape of one ListWorkspaces answer.
        let j = client::message_json(&proto::ListWorkspacesResponse {
            resolutions: all,
            next_page_token: String::new(),
        })?;
        Ok((j, text))
    })
    .await
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// JSON Lines, one workspace a line: workspace_id, and optionally runtime,
    /// model, credential_keys (names), override_mode, legacy_mode; `-` reads
    /// standard input.
    file: PathBuf,
    /// Decide every line with the server's dry run and report; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Update workspaces that already exist (compare-and-set on the revision
    /// read: a concurrent change is reported, not overwritten). Without it
    /// they are counted and left alone. Never removes an override.
    #[arg(long)]
    update: bool,
    /// Import the valid lines even if some are invalid (each is reported).
    /// Without it, one invalid line means nothing is written.
    #[arg(long)]
    skip_invalid: bool,
    /// Why (recorded in every audit row written; at most 1024 bytes, no
    /// control characters but newlines and tabs); required unless --dry-run.
    #[arg(long, required_unless_present = "dry_run", default_value = "")]
    reason: String,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    concurrency: u16,
    /// Workspaces created per call (BatchCreateWorkspaces, one transaction
    /// each; 1-1000). Not used by --dry-run, which sends one Set per line.
    #[arg(long, default_value_t = import::DEFAULT_BATCH_SIZE as u16,
          value_parser = clap::value_parser!(u16).range(1..=crate::store::MAX_BATCH_CREATE as i64))]
    batch_size: u16,
    #[command(flatten)]
    client: ClientArgs,
}

fn read_file(path: &PathBuf) -> anyhow::Result<import::Parsed> {
    if path.as_os_str() == "-" {
        import::parse(std::io::stdin().lock()).context("reading standard input")
    } else {
        let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        import::parse(BufReader::new(f)).with_context(|| format!("reading {}", path.display()))
    }
}

/// Checks `--reason` with the domain's own parser, the one the server
/// applies to every call: a reason it would refuse is said once, before
/// anything is read or sent, not as every batch's failure. A dry run needs
/// none.
fn check_reason(reason: &str, dry_run: bool) -> anyhow::Result<()> {
    match Reason::parse(reason) {
        Ok(Some(_)) => Ok(()),
        Ok(None) if dry_run => Ok(()),
        Ok(None) => {
            anyhow::bail!("--reason must say why (it is recorded in every audit row written)")
        }
        Err(ValidationError::TooLong { max, .. }) => anyhow::bail!(
            "--reason must be at most {max} bytes; this one has {}",
            reason.trim().len()
        ),
        Err(ValidationError::ControlCharacters { .. }) => anyhow::bail!(
            "--reason must not contain control characters (newlines and tabs are allowed)"
        ),
        Err(e) => anyhow::bail!("--reason: {e}"),
    }
}

pub async fn import(a: ImportArgs) -> ExitCode {
    // Before the run: said as every command says an error (JSON on
    // standard output too, with --json).
    let refuse = |e: anyhow::Error| {
        client::print_error(a.client.json, &e, serde_json::Map::new());
        ExitCode::FAILURE
    };
    if let Err(e) = check_reason(&a.reason, a.dry_run) {
        return refuse(e);
    }
    let parsed = match read_file(&a.file) {
        Ok(p) => p,
        Err(e) => return refuse(e),
    };
    if !parsed.errors.is_empty() && !a.skip_invalid {
        if a.client.json {
            outln!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "lines": parsed.lines,
                    "invalid": parsed.errors,
                    "written": false,
                }))
                .unwrap_or_default()
            );
        }
        for e in &parsed.errors {
            eprintln!("{e}");
        }
        eprintln!(
            "error: {} invalid line(s) of {}; nothing was written (fix them, or pass --skip-invalid to import the rest)",
            parsed.errors.len(),
            parsed.lines
        );
        return ExitCode::FAILURE;
    }
    let (channel, bearer) = match client::channel(&a.client).await {
        Ok(c) => c,
        Err(e) => return refuse(e),
    };
    let conn = Connection::new(channel, Some(bearer));
    let opts = Options {
        dry_run: a.dry_run,
        update: a.update,
        concurrency: usize::from(a.concurrency),
        batch_size: usize::from(a.batch_size),
        reason: a.reason.clone(),
    };
    let cancel = Arc::new(AtomicBool::new(false));
    // The exit status of the signal that stopped the run (130 for SIGINT,
    // 143 for SIGTERM); 0 while none has.
    let signalled = Arc::new(std::sync::atomic::AtomicU8::new(0));
    let on_interrupt = {
        let (cancel, signalled) = (cancel.clone(), signalled.clone());
        tokio::spawn(async move {
            let Some(status) = interrupt_or_terminate().await else {
                return;
            };
            eprintln!("interrupted: finishing the calls in flight (again to stop at once)");
            signalled.store(status, Ordering::SeqCst);
            cancel.store(true, Ordering::SeqCst);
            // A second signal a second or more later: the calls in flight
            // are not waited for.
            let first = std::time::Instant::now();
            while let Some(status) = interrupt_or_terminate().await {
                if first.elapsed() >= std::time::Duration::from_secs(1) {
                    eprintln!(
                        "interrupted again: stopping without waiting for the calls in flight"
                    );
                    std::process::exit(i32::from(status));
                }
            }
        })
    };
    let total = parsed.entries.len();
    // A bar only for a person watching a terminal; logs get the summary.
    let bar = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} workspaces ({per_sec}, {eta} left)",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let report = import::run(&conn, parsed.entries, &opts, cancel, |done| {
        bar.set_position(done as u64)
    })
    .await;
    bar.finish_and_clear();
    on_interrupt.abort();
    if a.client.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&import::report_json(
                &report,
                &parsed.errors,
                parsed.lines
            ))
            .unwrap_or_default()
        );
    } else {
        out!(
            "{}",
            import::report_text(&report, &parsed.errors, parsed.lines)
        );
    }
    if !report.failures.is_empty() || !report.conflicts.is_empty() {
        ExitCode::FAILURE
    } else if report.interrupted {
        match signalled.load(Ordering::SeqCst) {
            0 => ExitCode::FAILURE,
            status => ExitCode::from(status),
        }
    } else {
        ExitCode::SUCCESS
    }
}

/// Completes on Ctrl-C (SIGINT) or, on Unix, SIGTERM (`timeout`, a
/// Kubernetes Job, systemd stopping the run), with the exit status that
/// signal's stop gives (130, 143): either way the run finishes the calls in
/// flight and reports what it did. `None` if no handler could be installed.
async fn interrupt_or_terminate() -> Option<u8> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            return tokio::signal::ctrl_c().await.ok().map(|()| 130);
        };
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.ok().map(|()| 130),
            r = term.recv() => r.map(|()| 143),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.ok().map(|()| 130)
    }
}
