//! `billing-mode watch`: follows the change stream, one line per event (or
//! JSON lines with `--json`); on Ctrl-C or an error it prints the cursor to
//! resume from.

use std::process::ExitCode;

use crate::proto::{self, watch_response::Event};
use clap::Args;
use tonic_types::StatusExt;

use crate::client::{self, ClientArgs};

#[derive(Args, Debug)]
pub struct WatchArgs {
    /// Only these workspaces (UUIDs); none: every workspace.
    workspaces: Vec<String>,
    /// Resume after this cursor (printed on every line, and on exit).
    #[arg(long, conflicts_with = "snapshot")]
    cursor: Option<String>,
    /// Start with every workspace's current decision, then the changes.
    #[arg(long)]
    snapshot: bool,
    #[command(flatten)]
    client: ClientArgs,
}

fn line(m: &proto::WatchResponse, json_out: bool) -> String {
    if json_out {
        // One response message a line, as grpcurl prints the stream.
        return match client::message_json(m) {
            Ok(j) => j.to_string(),
            Err(e) => serde_json::json!({"error": {"message": format!("{e:#}")}}).to_string(),
        };
    }
    match &m.event {
        Some(Event::Resolution(r)) => format!(
            "{} {} revision {} mode {} source {}",
            m.cursor,
            r.workspace_id,
            r.revision,
            client::mode_name(r.mode),
            client::source_name(r.source),
        ),
        Some(Event::Progress(p)) => format!(
            "{} progress{} at {}",
            m.cursor,
            if p.snapshot_complete {
                " (snapshot complete)"
            } else {
                ""
            },
            client::timestamp_text(&p.time),
        ),
        None => format!("{} (empty message)", m.cursor),
    }
}

/// Says where to resume, on standard error (standard output stays events).
fn resume_hint(cursor: &str) {
    if cursor.is_empty() {
        eprintln!("no cursor yet: start again with --snapshot");
    } else {
        eprintln!("resume with: billing-mode watch --cursor {cursor}");
    }
}

pub async fn watch(a: WatchArgs) -> ExitCode {
    let mut c = match client::connect(&a.client).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let mut cursor = a.cursor.clone().unwrap_or_default();
    let request = proto::WatchRequest {
        cursor: cursor.clone(),
        include_snapshot: a.snapshot,
        workspace_ids: a.workspaces.clone(),
    };
    let interrupted = || async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let opened = tokio::select! {
        r = c.watch(request) => r,
        () = interrupted() => {
            resume_hint(&cursor);
            return ExitCode::SUCCESS;
        }
    };
    let result = match opened {
        Err(s) => Err(s),
        Ok(response) => {
            let mut stream = response.into_inner();
            loop {
                tokio::select! {
                    m = stream.message() => match m {
                        Ok(Some(m)) => {
                            outln!("{}", line(&m, a.client.json));
                            cursor = m.cursor;
                        }
                        Ok(None) => break Ok(()),
                        Err(s) => break Err(s),
                    },
                    () = interrupted() => {
                        resume_hint(&cursor);
                        return ExitCode::SUCCESS;
                    }
                }
            }
        }
    };
    match result {
        Ok(()) => {
            resume_hint(&cursor);
            ExitCode::SUCCESS
        }
        Err(s) => {
            let reason = s
                .get_details_error_info()
                .map(|i| i.reason)
                .unwrap_or_default();
            eprintln!("error: {:?} {reason}: {}", s.code(), s.message());
            resume_hint(&cursor);
            ExitCode::FAILURE
        }
    }
}
