//! `billing-mode watch`: follows the change stream, one line per event (or
//! JSON lines with `--json`); on Ctrl-C or an error it says where to resume:
//! the last cursor that is safe to resume from, or, when there is none (a
//! snapshot not yet complete, an expired or refused cursor), to start again
//! with `--snapshot`, or, when the store holds data the service cannot read,
//! not to resume until an operator has looked.

use std::process::ExitCode;

use crate::proto::{self, watch_response::Event};
use clap::Args;
use tonic::{Code, Status};

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
            Err(e) => {
                serde_json::json!({"error": {"message": crate::service::error::anyhow_text(&e)}})
                    .to_string()
            }
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

/// Where a consumer may pick the stream up again.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Resume {
    /// Right after this cursor: `--cursor`.
    From(String),
    /// No cursor is safe to resume from (none yet, the snapshot was not
    /// complete, or the cursor expired or was refused): a new `--snapshot`.
    /// Says why.
    StartOver(&'static str),
    /// The store holds something the service cannot read: resuming, from a
    /// cursor or a snapshot, waits for an operator to look.
    Stop,
}

impl Resume {
    /// The advice, on standard error (standard output stays events).
    fn hint(&self, workspaces: &[String]) -> String {
        let only: String = workspaces.iter().map(|w| format!(" {w}")).collect();
        match self {
            Resume::From(cursor) => {
                format!("resume with: billing-mode watch --cursor {cursor}{only}")
            }
            Resume::StartOver(why) => {
                format!("{why}: start again with: billing-mode watch --snapshot{only}")
            }
            Resume::Stop => "do not resume: the store holds data the service cannot \
                 read; an operator must look at it first"
                .to_owned(),
        }
    }

    /// The same, for a program reading `--json`: added to the `error`
    /// object, so a supervisor can tell resuming from starting over.
    fn json_fields(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut fields = serde_json::Map::new();
        match self {
            Resume::From(cursor) => {
                fields.insert("resume_cursor".into(), cursor.clone().into());
            }
            Resume::StartOver(_) => {
                fields.insert("start_over".into(), true.into());
            }
            Resume::Stop => {
                fields.insert("do_not_resume".into(), true.into());
            }
        }
        fields
    }
}

/// How far the stream got, as far as it is safe to resume from. A snapshot's
/// entries carry the snapshot's position, so resuming from one of them
/// would skip the rest of the snapshot: only `snapshot_complete` and the
/// messages after it are places to resume.
#[derive(Debug)]
struct Position {
    /// The last cursor safe to resume from.
    safe: Option<String>,
    /// Inside a snapshot, before its `snapshot_complete`.
    in_snapshot: bool,
}

impl Position {
    fn new(cursor: Option<&str>, snapshot: bool) -> Self {
        Position {
            safe: cursor.filter(|c| !c.is_empty()).map(str::to_owned),
            in_snapshot: snapshot,
        }
    }

    fn saw(&mut self, m: &proto::WatchResponse) {
        if self.in_snapshot {
            match &m.event {
                Some(Event::Progress(p)) if p.snapshot_complete => self.in_snapshot = false,
                _ => return,
            }
        }
        if !m.cursor.is_empty() {
            self.safe = Some(m.cursor.clone());
        }
    }

    /// Where to resume after an interruption or a transport failure.
    fn resume(&self) -> Resume {
        match (&self.safe, self.in_snapshot) {
            (Some(cursor), _) => Resume::From(cursor.clone()),
            (None, true) => Resume::StartOver("the snapshot was not complete"),
            (None, false) => Resume::StartOver("no cursor yet"),
        }
    }

    /// Where to resume after the stream ended with `s`: the refusals of a
    /// cursor mean starting over, a store the service cannot read means
    /// stopping; anything else (CONSUMER_TOO_SLOW, SHUTTING_DOWN,
    /// STORE_UNAVAILABLE, a lost connection) resumes.
    fn after(&self, s: &Status) -> Resume {
        match (client::status_reason(s).as_str(), s.code()) {
            // OUT_OF_RANGE alone is not enough: a message over the size
            // limit is OUT_OF_RANGE too, and its cursor is still good.
            ("CURSOR_EXPIRED", _) => Resume::StartOver("the cursor is older than the retained log"),
            ("INVALID_CURSOR", _) => Resume::StartOver("the cursor was refused"),
            ("STORE_CORRUPT", _) | (_, Code::DataLoss) => Resume::Stop,
            _ => self.resume(),
        }
    }
}

/// Resolves on Ctrl-C; never when the signal cannot be listened for.
async fn interrupted() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

pub async fn watch(a: WatchArgs) -> ExitCode {
    let json_out = a.client.json;
    let mut position = Position::new(a.cursor.as_deref(), a.snapshot);
    let mut c = match client::connect(&a.client).await {
        Ok(c) => c,
        Err(e) => {
            let resume = position.resume();
            client::print_error(json_out, &e, resume.json_fields());
            eprintln!("{}", resume.hint(&a.workspaces));
            return ExitCode::FAILURE;
        }
    };
    let request = proto::WatchRequest {
        cursor: a.cursor.clone().unwrap_or_default(),
        include_snapshot: a.snapshot,
        workspace_ids: a.workspaces.clone(),
    };
    // One listener for the whole command, so a Ctrl-C that comes while a
    // line is being written is not lost; it wins over a message ready at the
    // same time.
    let interrupt = interrupted();
    tokio::pin!(interrupt);
    let opened = tokio::select! {
        biased;
        () = &mut interrupt => {
            eprintln!("{}", position.resume().hint(&a.workspaces));
            return ExitCode::SUCCESS;
        }
        r = c.watch(request) => r,
    };
    let result = match opened {
        Err(s) => Err(s),
        Ok(response) => {
            let mut stream = response.into_inner();
            loop {
                tokio::select! {
                    biased;
                    () = &mut interrupt => {
                        eprintln!("{}", position.resume().hint(&a.workspaces));
                        return ExitCode::SUCCESS;
                    }
                    m = stream.message() => match m {
                        Ok(Some(m)) => {
                            outln!("{}", line(&m, json_out));
                            position.saw(&m);
                        }
                        Ok(None) => break Ok(()),
                        Err(s) => break Err(s),
                    },
                }
            }
        }
    };
    match result {
        Ok(()) => {
            eprintln!("{}", position.resume().hint(&a.workspaces));
            ExitCode::SUCCESS
        }
        Err(s) => {
            let resume = position.after(&s);
            client::print_error(json_out, &anyhow::Error::from(s), resume.json_fields());
            eprintln!("{}", resume.hint(&a.workspaces));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::StatusExt;

    fn message(cursor: &str, event: Event) -> proto::WatchResponse {
        proto::WatchResponse {
            cursor: cursor.to_owned(),
            event: Some(event),
        }
    }

    fn entry(cursor: &str) -> proto::WatchResponse {
        message(cursor, Event::Resolution(proto::Resolution::default()))
    }

    fn progress(cursor: &str, snapshot_complete: bool) -> proto::WatchResponse {
        message(
            cursor,
            Event::Progress(proto::WatchProgress {
                snapshot_complete,
                time: None,
            }),
        )
    }

    #[test]
    fn a_snapshot_entry_is_no_place_to_resume() {
        let mut p = Position::new(None, true);
        p.saw(&entry("c5"));
        p.saw(&entry("c5"));
        assert!(matches!(p.resume(), Resume::StartOver(_)), "{p:?}");
        p.saw(&progress("c5", true));
        assert_eq!(p.resume(), Resume::From("c5".into()));
        p.saw(&entry("c6"));
        assert_eq!(p.resume(), Resume::From("c6".into()));
    }

    #[test]
    fn without_a_snapshot_every_message_is_a_place_to_resume() {
        let mut p = Position::new(Some("c1"), false);
        assert_eq!(p.resume(), Resume::From("c1".into()));
        p.saw(&progress("c2", false));
        assert_eq!(p.resume(), Resume::From("c2".into()));
        assert!(matches!(
            Position::new(None, false).resume(),
            Resume::StartOver(_)
        ));
    }

    #[test]
    fn only_errors_a_cursor_survives_keep_it() {
        let p = Position::new(Some("c1"), false);
        let refused = |code, reason: &str| {
            Status::with_error_details(
                code,
                "m",
                tonic_types::ErrorDetails::with_error_info(reason, "billing-mode.molecule", []),
            )
        };
        for (code, reason) in [
            (Code::OutOfRange, "CURSOR_EXPIRED"),
            (Code::InvalidArgument, "INVALID_CURSOR"),
        ] {
            assert!(
                matches!(p.after(&refused(code, reason)), Resume::StartOver(_)),
                "{reason}"
            );
        }
        assert_eq!(
            p.after(&refused(Code::DataLoss, "STORE_CORRUPT")),
            Resume::Stop
        );
        for (code, reason) in [
            (Code::ResourceExhausted, "CONSUMER_TOO_SLOW"),
            (Code::Unavailable, "SHUTTING_DOWN"),
            (Code::Unavailable, "STORE_UNAVAILABLE"),
            // OUT_OF_RANGE, but not the cursor's fault.
            (Code::OutOfRange, "MESSAGE_TOO_LARGE"),
        ] {
            assert_eq!(
                p.after(&refused(code, reason)),
                Resume::From("c1".into()),
                "{reason}"
            );
        }
        assert_eq!(
            p.after(&Status::unavailable("connection reset")),
            Resume::From("c1".into())
        );
    }
}
