//! The change stream and dry runs, black-box over gRPC on both backends.
//!
//! Dry runs: every check of the real write, the answer it would give, nothing
//! written. Watch: exactly-once delivery from any cursor (also when
//! transactions commit in the opposite order of their start), across replicas
//! of one Postgres store, through a dropped store connection, with snapshots,
//! every error reason, and the roles.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use crate::helpers::*;
use billing_mode::{
    auth::Role,
    config::Config,
    proto::{
        watch_response::Event, BatchCreateWorkspacesRequest, ClearRequest, HistoryRequest, Mode,
        NewWorkspace, Resolution, SetRequest, WatchRequest, WatchResponse,
    },
};
use rand::{Rng, SeedableRng};
use tonic::{Code, Status, Streaming};

fn set_override_req(
    ws: &str,
    mode: Mode,
    expected_revision: Option<u64>,
    dry_run: bool,
) -> SetRequest {
    SetRequest {
        workspace_id: ws.to_owned(),
        override_mode: Some(mode.into()),
        expected_revision,
        reason: "test".to_owned(),
        dry_run,
        ..SetRequest::default()
    }
}

fn set_model_req(ws: &str, model: &str, dry_run: bool) -> SetRequest {
    SetRequest {
        workspace_id: ws.to_owned(),
        runtime: Some("claude-code".to_owned()),
        model: Some(model.to_owned()),
        reason: "test".to_owned(),
        dry_run,
        ..SetRequest::default()
    }
}

fn clear_req(ws: &str, expected_revision: Option<u64>, dry_run: bool) -> ClearRequest {
    ClearRequest {
        workspace_id: ws.to_owned(),
        expected_revision,
        reason: "test".to_owned(),
        dry_run,
    }
}

async fn history_len(c: &mut Client, ws: &str) -> usize {
    c.history(HistoryRequest {
        workspace_id: ws.to_owned(),
        page_size: 500,
        page_token: String::new(),
    })
    .await
    .expect("History succeeds")
    .into_inner()
    .entries
    .len()
}

/// Everything a write could touch, read by raw SQL: records and audit rows.
async fn stored_state(db: &TestDb) -> (Vec<String>, Vec<RawAuditRow>) {
    (raw_record_rows(db).await, raw_audit_rows(db).await)
}

// ---------------------------------------------------------------------------
// Dry run
// ---------------------------------------------------------------------------

backends!(a_dry_run_answers_as_the_write_would_and_writes_nothing);
async fn a_dry_run_answers_as_the_write_would_and_writes_nothing(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let ws = new_workspace();

    // On a workspace nobody registered: a Set would create revision 1.
    let would = c
        .set(set_override_req(&ws, Mode::Byok, Some(0), true))
        .await
        .expect("dry Set on a new workspace")
        .into_inner()
        .resolution
        .unwrap();
    assert_eq!(would.revision, 1);
    assert_eq!(would.mode(), Mode::Byok);
    assert_eq!(stored_state(&db).await, (vec![], vec![]), "a dry run wrote");
    assert_error(
        &app.try_resolve(&ws).await.unwrap_err(),
        Code::NotFound,
        "WORKSPACE_NOT_FOUND",
    );
    // Clear on it is NOT_FOUND, as the real Clear.
    let err = c.clear(clear_req(&ws, None, true)).await.unwrap_err();
    assert_error(&err, Code::NotFound, "WORKSPACE_NOT_FOUND");

    // Registered: the answer carries the revision the write would get.
    let created = app.set(set_model_req(&ws, "opus", false)).await;
    assert_eq!(created.revision, 1);
    let before = stored_state(&db).await;
    let would = c
        .set(set_override_req(&ws, Mode::Disabled, Some(1), true))
        .await
        .expect("dry Set")
        .into_inner()
        .resolution
        .unwrap();
    assert_eq!((would.revision, would.mode()), (2, Mode::Disabled));

    // Every check of the real write: compare-and-set, validation.
    let err = c
        .set(set_override_req(&ws, Mode::Disabled, Some(7), true))
        .await
        .unwrap_err();
    assert_error(&err, Code::Aborted, "REVISION_MISMATCH");
    let mut no_reason = set_override_req(&ws, Mode::Disabled, None, true);
    no_reason.reason.clear();
    let err = c.set(no_reason).await.unwrap_err();
    assert_error(&err, Code::InvalidArgument, "REASON_REQUIRED");
    let err = c
        .set(set_model_req("not-a-uuid", "opus", true))
        .await
        .unwrap_err();
    assert_error(&err, Code::InvalidArgument, "INVALID_WORKSPACE_ID");
    let err = c.clear(clear_req(&ws, Some(3), true)).await.unwrap_err();
    assert_error(&err, Code::Aborted, "REVISION_MISMATCH");
    let mut clear_no_reason = clear_req(&ws, None, true);
    clear_no_reason.reason.clear();
    let err = c.clear(clear_no_reason).await.unwrap_err();
    assert_error(&err, Code::InvalidArgument, "REASON_REQUIRED");

    // A no-op dry run answers the record as it is.
    let same = c
        .clear(clear_req(&ws, Some(1), true))
        .await
        .expect("dry Clear")
        .into_inner()
        .resolution
        .unwrap();
    assert_eq!(same, created);

    // Nothing of it was written: record, audit rows, History, revision.
    assert_eq!(stored_state(&db).await, before, "a dry run wrote");
    assert_eq!(history_len(&mut c, &ws).await, 1);
    assert_eq!(app.resolve(&ws).await, created);

    // The dry run's answer is the real write's.
    let real = app
        .set(set_override_req(&ws, Mode::Disabled, Some(1), false))
        .await;
    assert_eq!(real, would);
    let would_clear = c
        .clear(clear_req(&ws, Some(2), true))
        .await
        .expect("dry Clear")
        .into_inner()
        .resolution
        .unwrap();
    assert_eq!(would_clear.revision, 3);
    assert_eq!(app.resolve(&ws).await.revision, 2);
    let real_clear = c
        .clear(clear_req(&ws, Some(2), false))
        .await
        .unwrap()
        .into_inner()
        .resolution
        .unwrap();
    assert_eq!(real_clear, would_clear);
}

backends!(a_dry_run_needs_the_role_of_the_real_write);
async fn a_dry_run_needs_the_role_of_the_real_write(db: TestDb) {
    let roles = [
        Role::Admin,
        Role::Writer,
        Role::Reader,
        Role::Provisioner,
        Role::Meter,
    ];
    let tokens: Vec<_> = roles
        .iter()
        .map(|r| make_token(&format!("{r:?}").to_lowercase(), &[*r]))
        .collect();
    let app = TestApp::spawn_with(config_with_tokens(
        &db,
        tokens.iter().map(|(_, e)| e.clone()).collect(),
    ))
    .await;
    let ws = new_workspace();
    let mut admin = app.client_with_token(&tokens[0].0).await;
    admin
        .set(set_model_req(&ws, "opus", false))
        .await
        .expect("admin registers");
    let before = stored_state(&db).await;
    for (role, (token, _)) in roles.iter().zip(&tokens) {
        let mut c = app.client_with_token(token).await;
        let fields = c.set(set_model_req(&ws, "sonnet", true)).await;
        let over = c.set(set_override_req(&ws, Mode::Byok, None, true)).await;
        let clear = c.clear(clear_req(&ws, None, true)).await;
        let may_fields = matches!(role, Role::Admin | Role::Writer);
        let may_override = matches!(role, Role::Admin);
        for (what, result, may) in [
            ("Set fields", fields.map(drop), may_fields),
            ("Set override", over.map(drop), may_override),
            ("Clear", clear.map(drop), may_override),
        ] {
            match result {
                Ok(()) => assert!(may, "{role:?} may not dry-run {what}"),
                Err(e) => {
                    assert!(!may, "{role:?} may dry-run {what}: {e:?}");
                    assert_error(&e, Code::PermissionDenied, "PERMISSION_DENIED");
                }
            }
        }
    }
    assert_eq!(stored_state(&db).await, before, "a dry run wrote");
}

// ---------------------------------------------------------------------------
// Watch helpers
// ---------------------------------------------------------------------------

/// How long a test waits for something that should happen promptly before
/// calling it a failure (a bound, not a measurement).
const PATIENCE: Duration = Duration::from_secs(30);

async fn open(c: &mut Client, req: WatchRequest) -> Result<Streaming<WatchResponse>, Status> {
    tokio::time::timeout(PATIENCE, c.watch(req))
        .await
        .expect("Watch answers within the test's patience")
        .map(|r| r.into_inner())
}

fn from_cursor(cursor: &str) -> WatchRequest {
    WatchRequest {
        cursor: cursor.to_owned(),
        ..WatchRequest::default()
    }
}

/// The next message, the status that ended the stream, or `None` at a clean end.
async fn next(s: &mut Streaming<WatchResponse>) -> Result<Option<WatchResponse>, Status> {
    tokio::time::timeout(PATIENCE, s.message())
        .await
        .expect("a Watch message within the test's patience")
}

async fn next_ok(s: &mut Streaming<WatchResponse>) -> WatchResponse {
    next(s)
        .await
        .expect("the stream goes on")
        .expect("the stream does not end")
}

/// The next Resolution event, skipping progress messages.
async fn next_change(s: &mut Streaming<WatchResponse>) -> (String, Resolution) {
    loop {
        let m = next_ok(s).await;
        if let Some(Event::Resolution(r)) = m.event {
            return (m.cursor, r);
        }
    }
}

/// Opens a stream from now: the opening progress message's cursor.
/// The status that ends `s`, which carries nothing but progress meanwhile.
async fn end_status(s: &mut Streaming<WatchResponse>) -> Status {
    loop {
        match next(s).await {
            Ok(Some(m)) => assert!(matches!(m.event, Some(Event::Progress(_))), "{m:?}"),
            Ok(None) => panic!("the stream ended without a status"),
            Err(e) => return e,
        }
    }
}

async fn watch_from_now(
    c: &mut Client,
    workspace_ids: &[&str],
) -> (Streaming<WatchResponse>, String) {
    let mut s = open(
        c,
        WatchRequest {
            workspace_ids: workspace_ids.iter().map(|w| w.to_string()).collect(),
            ..WatchRequest::default()
        },
    )
    .await
    .expect("Watch from now");
    let first = next_ok(&mut s).await;
    match first.event {
        Some(Event::Progress(p)) => assert!(!p.snapshot_complete, "{first:?}"),
        other => panic!("a stream from now opens with progress, got {other:?}"),
    }
    assert!(!first.cursor.is_empty());
    (s, first.cursor)
}

/// A client whose HTTP/2 window is tiny: what its streams do not read stays
/// queued on the server, so a stream it stops reading stalls there.
async fn tiny_window_client(
    app: &TestApp,
) -> billing_mode::proto::billing_mode_client::BillingModeClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(app.endpoint())
        .unwrap()
        .initial_stream_window_size(Some(1024))
        .connect()
        .await
        .unwrap();
    billing_mode::proto::billing_mode_client::BillingModeClient::new(channel)
}

/// A Set that changes the record: flips the override through the three modes.
fn flip(ws: &str, i: usize) -> SetRequest {
    let mode = [Mode::Byok, Mode::Disabled, Mode::PlatformManaged][i % 3];
    set_override_req(ws, mode, None, false)
}

/// Adds to `got` the changes after `cursor` until `want` (workspace → final
/// revision) is reached; resumes after any error. Returns every change
/// received, in order, and the last cursor.
async fn collect_until(
    c: &mut Client,
    mut cursor: String,
    want: &BTreeMap<String, u64>,
    mut got: Vec<Resolution>,
) -> (Vec<Resolution>, String) {
    let mut latest: HashMap<String, u64> = got
        .iter()
        .map(|r| (r.workspace_id.clone(), r.revision))
        .collect();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let done = |latest: &HashMap<String, u64>| {
        want.iter()
            .all(|(ws, rev)| latest.get(ws).copied().unwrap_or(0) >= *rev)
    };
    while !done(&latest) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "changes missing: got {latest:?}, want {want:?}"
        );
        let Ok(mut s) = open(c, from_cursor(&cursor)).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        while !done(&latest) {
            match tokio::time::timeout(PATIENCE, s.message())
                .await
                .expect("a message")
            {
                Ok(Some(m)) => {
                    cursor = m.cursor.clone();
                    if let Some(Event::Resolution(r)) = m.event {
                        latest.insert(r.workspace_id.clone(), r.revision);
                        got.push(r);
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
    }
    (got, cursor)
}

/// Asserts that `got` holds every revision 1..=final of each workspace in
/// `want` exactly once, in revision order per workspace, and nothing else.
fn assert_exactly_once(
    got: &[Resolution],
    want: &BTreeMap<String, u64>,
    from: &BTreeMap<String, u64>,
) {
    let mut per_ws: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in got {
        per_ws
            .entry(r.workspace_id.clone())
            .or_default()
            .push(r.revision);
    }
    for (ws, last) in want {
        let first = from.get(ws).copied().unwrap_or(0) + 1;
        let expected: Vec<u64> = (first..=*last).collect();
        assert_eq!(
            per_ws.remove(ws).unwrap_or_default(),
            expected,
            "workspace {ws}: every revision once, in order"
        );
    }
    assert!(
        per_ws.is_empty(),
        "changes of unknown workspaces: {per_ws:?}"
    );
}

async fn final_revisions(c: &mut Client, workspaces: &[String]) -> BTreeMap<String, u64> {
    let mut want = BTreeMap::new();
    for ws in workspaces {
        want.insert(ws.clone(), resolve(c, ws).await.revision);
    }
    want
}

/// Runs raw SQL against the test database (outside the service).
async fn raw_sql(db: &TestDb, sql: &str) {
    use sqlx::Connection;
    match db.backend {
        Backend::Sqlite => {
            let mut c = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::query(sql).execute(&mut c).await.unwrap();
        }
        Backend::Postgres => {
            let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::query(sql).execute(&mut c).await.unwrap();
        }
    }
}

// ---------------------------------------------------------------------------
// Exactly once
// ---------------------------------------------------------------------------

/// Holds the row lock of `ws`'s record for `hold` in a transaction of its
/// own, so a Set on `ws` started meanwhile waits inside its transaction while
/// later Sets on other workspaces commit first.
async fn hold_record(url: String, ws: String, hold: Duration) {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
    let mut tx = c.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM billing_records WHERE workspace_id = $1::uuid FOR UPDATE")
        .bind(&ws)
        .execute(&mut *tx)
        .await
        .unwrap();
    tokio::time::sleep(hold).await;
    tx.commit().await.unwrap();
}

backends!(
    every_committed_revision_arrives_exactly_once_in_order_across_held_transactions_and_reconnects,
    flavor = "multi_thread",
    worker_threads = 4
);
async fn every_committed_revision_arrives_exactly_once_in_order_across_held_transactions_and_reconnects(
    db: TestDb,
) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let workspaces: Vec<String> = (0..6).map(|_| new_workspace()).collect();
    for ws in &workspaces {
        set(&mut c, set_model_req(ws, "opus", false)).await;
    }
    let (_, start) = watch_from_now(&mut c, &[]).await;
    let from = final_revisions(&mut c, &workspaces).await;

    // Writers: many Sets on many workspaces, concurrently.
    let mut writers = Vec::new();
    for w in 0..4 {
        let mut c = app.client().await;
        let workspaces = workspaces.clone();
        writers.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for i in 0..30 {
                let ws = &workspaces[(w * 7 + i * 5) % workspaces.len()];
                // A new model each time (always a change), and now and
                // then an override flip (a change of mode, or a no-op).
                let req = if i % 3 == 0 {
                    flip(ws, i + w)
                } else {
                    set_model_req(ws, &format!("opus-{w}-{i}"), false)
                };
                answers.push(set(&mut c, req).await);
            }
            answers
        }));
    }
    // On Postgres, a holder keeps one workspace's row locked at a time, so
    // a Set that started earlier commits after Sets that started later.
    let holder = (db.backend == Backend::Postgres).then(|| {
        let url = db.url.clone();
        let workspaces = workspaces.clone();
        tokio::spawn(async move {
            for i in 0..8 {
                hold_record(
                    url.clone(),
                    workspaces[i % workspaces.len()].clone(),
                    Duration::from_millis(150),
                )
                .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    });

    // A watcher that disconnects at random points and resumes from its
    // last cursor, meanwhile.
    let watcher = {
        let mut c = app.client().await;
        let mut cursor = start.clone();
        tokio::spawn(async move {
            let mut got: Vec<(String, Resolution)> = Vec::new();
            let mut rng = rand::rngs::StdRng::from_entropy();
            for _ in 0..40 {
                let mut s = open(&mut c, from_cursor(&cursor)).await.expect("resume");
                let take = rng.gen_range(1..6);
                for _ in 0..take {
                    match tokio::time::timeout(Duration::from_millis(300), s.message()).await {
                        Ok(Ok(Some(m))) => {
                            cursor = m.cursor.clone();
                            if let Some(Event::Resolution(r)) = m.event {
                                got.push((m.cursor, r));
                            }
                        }
                        Ok(other) => panic!("the stream ended: {other:?}"),
                        Err(_) => break,
                    }
                }
                // Disconnect (drop the stream) and resume.
            }
            (got, cursor)
        })
    };

    let mut answers: HashMap<(String, u64), Resolution> = HashMap::new();
    for w in writers {
        for r in w.await.unwrap() {
            answers.insert((r.workspace_id.clone(), r.revision), r);
        }
    }
    if let Some(h) = holder {
        h.await.unwrap();
    }
    let (pairs, cursor) = watcher.await.unwrap();
    let got = pairs.into_iter().map(|(_, r)| r).collect();
    let want = final_revisions(&mut c, &workspaces).await;
    let (got, _) = collect_until(&mut c, cursor, &want, got).await;
    assert_exactly_once(&got, &want, &from);
    // Each event is the Resolution at its revision: what Set answered.
    for r in &got {
        if let Some(answer) = answers.get(&(r.workspace_id.clone(), r.revision)) {
            assert_eq!(r, answer, "the event is the Resolution at its revision");
        }
    }
    // Every model Set changed a record: 4 writers × 20.
    assert!(
        answers.len() >= 80,
        "the writers changed the records {} times",
        answers.len()
    );
}

// ---------------------------------------------------------------------------
// Replicas and the store connection
// ---------------------------------------------------------------------------

backends!(postgres: a_write_through_one_replica_reaches_watch_on_another_and_cursors_move_between_them, flavor = "multi_thread", worker_threads = 4);
async fn a_write_through_one_replica_reaches_watch_on_another_and_cursors_move_between_them(
    db: TestDb,
) {
    let one = TestApp::spawn(&db).await;
    let two = TestApp::spawn(&db).await;
    let mut writer = one.client().await;
    let mut reader = two.client().await;
    let workspaces: Vec<String> = (0..3).map(|_| new_workspace()).collect();
    let (mut stream, start) = watch_from_now(&mut reader, &[]).await;
    for (i, ws) in workspaces.iter().enumerate() {
        set(&mut writer, set_model_req(ws, "opus", false)).await;
        set(&mut writer, flip(ws, i)).await;
    }
    // Every event arrives on the other replica, in order.
    let mut got = Vec::new();
    let mut middle = String::new();
    while got.len() < 6 {
        let (cursor, r) = next_change(&mut stream).await;
        got.push(r);
        if got.len() == 3 {
            middle = cursor;
        }
    }
    let want = final_revisions(&mut writer, &workspaces).await;
    assert_exactly_once(&got, &want, &BTreeMap::new());
    // A cursor from replica two resumes on replica one: exactly the rest.
    let mut one_client = one.client().await;
    let (rest, _) = collect_until(&mut one_client, middle, &want, got[..3].to_vec()).await;
    assert_exactly_once(&rest, &want, &BTreeMap::new());
    // And the start cursor from two replays everything on one.
    let (all, _) = collect_until(&mut one_client, start, &want, Vec::new()).await;
    assert_eq!(all, got);
}

backends!(postgres: a_killed_store_connection_under_a_live_stream_loses_and_repeats_nothing, flavor = "multi_thread", worker_threads = 4);
async fn a_killed_store_connection_under_a_live_stream_loses_and_repeats_nothing(db: TestDb) {
    // Name this server's connections, to cut exactly them.
    let app_name = format!("watch_{}", uuid::Uuid::new_v4().simple());
    let app = TestApp::spawn_with(db.config_named(&app_name)).await;
    let mut c = app.client().await;
    let workspaces: Vec<String> = (0..3).map(|_| new_workspace()).collect();
    let (_, start) = watch_from_now(&mut c, &[]).await;
    let kill = || async {
        let killed = db.cut_connections(&app_name).await;
        assert!(killed > 0, "the server's connections were found");
    };
    let mut got = Vec::new();
    let mut cursor = start;
    for round in 0..3 {
        for (i, ws) in workspaces.iter().enumerate() {
            // A write may meet a connection being cut: retry it.
            let req = set_model_req(ws, &format!("opus-{round}-{i}"), false);
            let mut tries = 0;
            while c.set(req.clone()).await.is_err() {
                tries += 1;
                assert!(tries < 50, "the store came back");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let want = final_revisions(&mut c, &workspaces).await;
        let (all, last) = collect_until(&mut c, cursor, &want, got).await;
        got = all;
        cursor = last;
        kill().await;
    }
    let want = final_revisions(&mut c, &workspaces).await;
    assert!(
        want.values().all(|r| *r == 3),
        "each of the three rounds changed every workspace once: {want:?}"
    );
    assert_exactly_once(&got, &want, &BTreeMap::new());
}

/// A server whose store connections go through a [`StallingProxy`], named
/// `app_name`, that reads the change log without a wake-up only every two
/// minutes, with a Watch stream open on it from now; a second server on the
/// same store writes. The first change written is checked to arrive: the
/// watched server is notified.
struct Watched {
    proxy: StallingProxy,
    app_name: String,
    _watched: TestApp,
    _writer: TestApp,
    writer: Client,
    stream: Streaming<WatchResponse>,
    ws: String,
}

/// Far under the watched server's poll interval: an event this soon is one
/// the server was notified of, or read after it listened again.
const PROMPT: Duration = Duration::from_secs(10);

impl Watched {
    async fn start(db: &TestDb, name: &str) -> Watched {
        let proxy = StallingProxy::start(db).await;
        let app_name = format!("{name}_{}", uuid::Uuid::new_v4().simple());
        let watched = TestApp::spawn_with(Config {
            database_url: format!("{}&application_name={app_name}", proxy.url).into(),
            feed_poll_interval: Duration::from_secs(120),
            max_staleness: Duration::from_secs(240),
            ..config(db)
        })
        .await;
        let writer_app = TestApp::spawn(db).await;
        let mut writer = writer_app.client().await;
        let mut r = watched.client().await;
        let (stream, _) = watch_from_now(&mut r, &[]).await;
        let mut w = Watched {
            proxy,
            app_name,
            _watched: watched,
            _writer: writer_app,
            writer: writer.clone(),
            stream,
            ws: new_workspace(),
        };
        set(&mut writer, set_model_req(&w.ws, "opus", false)).await;
        assert_eq!(
            w.change_within_prompt("a change on the other replica is notified")
                .await,
            1
        );
        w
    }

    /// Writes the workspace's model through the writer.
    async fn write(&mut self, model: &str) {
        set(&mut self.writer, set_model_req(&self.ws, model, false)).await;
    }

    /// The revision of the next change on the stream, within [`PROMPT`].
    async fn change_within_prompt(&mut self, what: &str) -> u64 {
        let (_, r) = tokio::time::timeout(PROMPT, next_change(&mut self.stream))
            .await
            .unwrap_or_else(|_| panic!("{what}: nothing within {PROMPT:?}"));
        r.revision
    }
}

backends!(postgres: a_change_committed_while_the_listening_connection_is_lost_arrives_without_waiting_for_a_poll, flavor = "multi_thread", worker_threads = 4);
async fn a_change_committed_while_the_listening_connection_is_lost_arrives_without_waiting_for_a_poll(
    db: TestDb,
) {
    let mut w = Watched::start(&db, "listen").await;
    // The connection that listens is lost while the network between the
    // watched server and Postgres stalls: the server cannot know yet, and a
    // change committed meanwhile is notified to nobody.
    w.proxy.hold();
    let mut admin = {
        use sqlx::Connection;
        sqlx::PgConnection::connect(&db.url).await.unwrap()
    };
    let (cut,): (i64,) = sqlx::query_as(
        "SELECT count(pg_terminate_backend(pid, 10000)) FROM pg_stat_activity \
         WHERE application_name = $1 AND query ILIKE 'LISTEN%'",
    )
    .bind(&w.app_name)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(
        cut, 1,
        "the watched server's listening connection was found"
    );
    w.write("sonnet").await;
    w.proxy.release();
    assert_eq!(
        w.change_within_prompt(
            "the change committed while nobody listened arrives without waiting for a poll"
        )
        .await,
        2
    );
}

backends!(postgres: a_listening_connection_the_network_silently_dropped_is_found_and_replaced, flavor = "multi_thread", worker_threads = 4);
/// A NAT or a load balancer forgets an idle connection without closing it:
/// the `LISTEN` connection then carries nothing, and is never seen to end.
/// The server must find out and listen on a new connection, or every change
/// would reach this replica (its Watch streams, its CheckSpend answers) only
/// at its next poll, for as long as the server runs, with nothing said.
async fn a_listening_connection_the_network_silently_dropped_is_found_and_replaced(db: TestDb) {
    let mut w = Watched::start(&db, "stall").await;
    let mut admin = {
        use sqlx::Connection;
        sqlx::PgConnection::connect(&db.url).await.unwrap()
    };
    let (port,): (i32,) = sqlx::query_as(
        "SELECT client_port FROM pg_stat_activity \
         WHERE application_name = $1 AND query ILIKE 'LISTEN%'",
    )
    .bind(&w.app_name)
    .fetch_one(&mut admin)
    .await
    .expect("the watched server's listening connection");
    let port = u16::try_from(port).unwrap();
    w.proxy.hold_connection(port);
    w.write("sonnet").await;
    assert_eq!(
        w.change_within_prompt(
            "the change arrives though the listening connection carries nothing"
        )
        .await,
        2
    );
    // Listening again, on another connection: notified, not polled.
    w.write("haiku").await;
    assert_eq!(
        w.change_within_prompt("the next change is notified again")
            .await,
        3
    );
    let (listening,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE application_name = $1 AND query ILIKE 'LISTEN%' AND client_port <> $2",
    )
    .bind(&w.app_name)
    .bind(i32::from(port))
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(listening, 1, "the server listens on a new connection");
    w.proxy.release_connection(port);
}

/// How many connections of `app_name` listen.
async fn listening(admin: &mut sqlx::PgConnection, app_name: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE application_name = $1 AND query ILIKE 'LISTEN%'",
    )
    .bind(app_name)
    .fetch_one(admin)
    .await
    .unwrap();
    n
}

backends!(postgres: a_database_that_refuses_new_connections_is_not_asked_for_a_listener_again_and_again, flavor = "multi_thread", worker_threads = 4);
/// The listening connection is lost while the database takes no new
/// connection (at its connection limit, or failing over): the server reads
/// the log often meanwhile, but asks for a new listener with growing waits,
/// not 20 times a second for as long as it lasts; and listens again after.
async fn a_database_that_refuses_new_connections_is_not_asked_for_a_listener_again_and_again(
    db: TestDb,
) {
    let proxy = StallingProxy::start(&db).await;
    let app_name = format!("refused_{}", uuid::Uuid::new_v4().simple());
    let _watched = TestApp::spawn_with(Config {
        database_url: format!("{}&application_name={app_name}", proxy.url).into(),
        ..config(&db)
    })
    .await;
    let mut admin = {
        use sqlx::Connection;
        sqlx::PgConnection::connect(&db.url).await.unwrap()
    };
    assert_eq!(listening(&mut admin, &app_name).await, 1);
    proxy.refuse_new(true);
    let before = proxy.accepted();
    let (cut,): (i64,) = sqlx::query_as(
        "SELECT count(pg_terminate_backend(pid, 10000)) FROM pg_stat_activity \
         WHERE application_name = $1 AND query ILIKE 'LISTEN%'",
    )
    .bind(&app_name)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(cut, 1);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let asked = proxy.accepted() - before;
    // Growing waits from 100 ms: about five attempts in three seconds;
    // every 50 ms would be about sixty.
    assert!(
        (1..=12).contains(&asked),
        "{asked} connections asked for in 3 s"
    );
    proxy.refuse_new(false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while listening(&mut admin, &app_name).await != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server listens again once it can"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// Snapshot, filter, progress
// ---------------------------------------------------------------------------

backends!(
    a_snapshot_gives_every_workspace_once_then_every_change_after_it,
    flavor = "multi_thread",
    worker_threads = 4
);
async fn a_snapshot_gives_every_workspace_once_then_every_change_after_it(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let workspaces: Vec<String> = (0..5).map(|_| new_workspace()).collect();
    for ws in &workspaces {
        set(&mut c, set_model_req(ws, "opus", false)).await;
    }
    // A writer keeps changing them while the snapshot is taken.
    let writer = {
        let mut c = app.client().await;
        let workspaces = workspaces.clone();
        tokio::spawn(async move {
            for i in 0..40 {
                let ws = &workspaces[i % workspaces.len()];
                set(&mut c, set_model_req(ws, &format!("opus-{i}"), false)).await;
            }
        })
    };
    let mut s = open(
        &mut c,
        WatchRequest {
            include_snapshot: true,
            ..WatchRequest::default()
        },
    )
    .await
    .expect("Watch with a snapshot");
    let mut snapshot: BTreeMap<String, u64> = BTreeMap::new();
    let mut snapshot_cursor = None;
    let complete_cursor = loop {
        let m = next_ok(&mut s).await;
        match m.event {
            Some(Event::Resolution(r)) => {
                assert!(
                    snapshot
                        .insert(r.workspace_id.clone(), r.revision)
                        .is_none(),
                    "{r:?} twice"
                );
                // Every entry carries the snapshot's position.
                assert_eq!(snapshot_cursor.get_or_insert(m.cursor.clone()), &m.cursor);
            }
            Some(Event::Progress(p)) => {
                assert!(p.snapshot_complete, "the first progress ends the snapshot");
                assert!(p.time.is_some());
                break m.cursor;
            }
            None => panic!("an empty message"),
        }
    };
    assert_eq!(snapshot.keys().cloned().collect::<Vec<_>>(), {
        let mut w = workspaces.clone();
        w.sort();
        w
    });
    assert_eq!(snapshot_cursor.unwrap(), complete_cursor);
    writer.await.unwrap();
    // Then every change after the snapshot, none before, none lost.
    let want = final_revisions(&mut c, &workspaces).await;
    let mut got = Vec::new();
    let mut latest = snapshot.clone();
    while latest != want {
        let (_, r) = next_change(&mut s).await;
        latest.insert(r.workspace_id.clone(), r.revision);
        got.push(r);
    }
    assert_exactly_once(&got, &want, &snapshot);

    // A filtered snapshot: only the named workspaces, before and after.
    let mut s = open(
        &mut c,
        WatchRequest {
            include_snapshot: true,
            workspace_ids: vec![workspaces[1].to_uppercase()],
            ..WatchRequest::default()
        },
    )
    .await
    .unwrap();
    let m = next_ok(&mut s).await;
    match m.event {
        Some(Event::Resolution(r)) => assert_eq!(r.workspace_id, workspaces[1]),
        other => panic!("{other:?}"),
    }
    assert!(matches!(next_ok(&mut s).await.event, Some(Event::Progress(p)) if p.snapshot_complete));
    set(&mut c, set_model_req(&workspaces[0], "sonnet", false)).await;
    set(&mut c, set_model_req(&workspaces[1], "sonnet", false)).await;
    let (_, r) = next_change(&mut s).await;
    assert_eq!(
        (r.workspace_id.as_str(), r.revision),
        (workspaces[1].as_str(), want[&workspaces[1]] + 1)
    );
}

backends!(an_idle_stream_sends_progress_with_its_cursor);
async fn an_idle_stream_sends_progress_with_its_cursor(db: TestDb) {
    let app = TestApp::spawn_with(Config {
        watch_progress_interval: Duration::from_millis(200),
        ..config(&db)
    })
    .await;
    let mut c = app.client().await;
    let (mut s, cursor) = watch_from_now(&mut c, &[]).await;
    for _ in 0..2 {
        let m = next_ok(&mut s).await;
        assert_eq!(m.cursor, cursor);
        assert!(
            matches!(m.event, Some(Event::Progress(p)) if !p.snapshot_complete && p.time.is_some())
        );
    }
    // After a change, progress carries the change's cursor.
    let ws = new_workspace();
    app.set(set_model_req(&ws, "opus", false)).await;
    let (after, r) = next_change(&mut s).await;
    assert_eq!(r.workspace_id, ws);
    let m = next_ok(&mut s).await;
    assert!(matches!(m.event, Some(Event::Progress(_))));
    assert_eq!(m.cursor, after);
}

// ---------------------------------------------------------------------------
// What yields no event
// ---------------------------------------------------------------------------

backends!(no_op_refused_and_dry_run_writes_yield_no_event);
async fn no_op_refused_and_dry_run_writes_yield_no_event(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let ws = new_workspace();
    app.set(set_model_req(&ws, "opus", false)).await;
    let (mut s, _) = watch_from_now(&mut c, &[]).await;
    // A no-op, refused writes, dry runs.
    app.set(set_model_req(&ws, "opus", false)).await;
    assert!(c
        .set(set_override_req(&ws, Mode::Byok, Some(9), false))
        .await
        .is_err());
    assert!(c
        .clear(clear_req(&new_workspace(), None, false))
        .await
        .is_err());
    c.set(set_override_req(&ws, Mode::Byok, None, true))
        .await
        .unwrap();
    c.set(set_model_req(&new_workspace(), "opus", true))
        .await
        .unwrap();
    c.clear(clear_req(&ws, None, true)).await.unwrap();
    // Then one real change: the first event is it.
    let marker = new_workspace();
    app.set(set_model_req(&marker, "opus", false)).await;
    let (_, r) = next_change(&mut s).await;
    assert_eq!((r.workspace_id.as_str(), r.revision), (marker.as_str(), 1));
}

// ---------------------------------------------------------------------------
// Errors and roles
// ---------------------------------------------------------------------------

backends!(malformed_foreign_and_unknown_cursors_are_invalid);
async fn malformed_foreign_and_unknown_cursors_are_invalid(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let (_, cursor) = watch_from_now(&mut c, &[]).await;
    // A position this store never handed out.
    let mut bytes = hex::decode(&cursor).unwrap();
    let n = bytes.len();
    bytes[n - 8..].copy_from_slice(&1_000_000u64.to_be_bytes());
    let beyond = hex::encode(bytes);
    // A cursor of another store.
    let other_db = TestDb::new(db.backend).await.unwrap();
    let other = TestApp::spawn(&other_db).await;
    let (_, foreign) = watch_from_now(&mut other.client().await, &[]).await;
    for bad in [
        "not-a-cursor",
        "00",
        &cursor[..cursor.len() - 1],
        &beyond,
        &foreign,
    ] {
        let err = open(&mut c, from_cursor(bad)).await.unwrap_err();
        assert_error(&err, Code::InvalidArgument, "INVALID_CURSOR");
    }
    let err = open(
        &mut c,
        WatchRequest {
            cursor,
            include_snapshot: true,
            ..WatchRequest::default()
        },
    )
    .await
    .unwrap_err();
    assert_error(&err, Code::InvalidArgument, "INVALID_FIELD");
    let err = open(
        &mut c,
        WatchRequest {
            workspace_ids: vec!["nope".into()],
            ..WatchRequest::default()
        },
    )
    .await
    .unwrap_err();
    assert_error(&err, Code::InvalidArgument, "INVALID_WORKSPACE_ID");
}

backends!(before_the_change_log_exists_a_malformed_cursor_is_still_invalid);
/// A server started with `--no-migrate` on a store without its migrations
/// cannot know its store's id yet. A malformed cursor is refused as such all
/// the same (INVALID_ARGUMENT comes before UNAVAILABLE); a well-formed one,
/// which only the store can judge, waits for it (UNAVAILABLE).
async fn before_the_change_log_exists_a_malformed_cursor_is_still_invalid(db: TestDb) {
    let app = TestApp::spawn_with(Config {
        migrate: false,
        ..config(&db)
    })
    .await;
    let mut c = app.client().await;
    for bad in ["not-a-cursor", "00", "01abcd"] {
        let err = open(&mut c, from_cursor(bad)).await.unwrap_err();
        assert_error(&err, Code::InvalidArgument, "INVALID_CURSOR");
    }
    let well_formed = format!("01{}{}", "ab".repeat(16), "00".repeat(8));
    let err = open(&mut c, from_cursor(&well_formed)).await.unwrap_err();
    assert_error(&err, Code::Unavailable, "STORE_UNAVAILABLE");
    app.stop().await.unwrap();
}

backends!(a_cursor_older_than_the_retained_log_has_expired);
async fn a_cursor_older_than_the_retained_log_has_expired(db: TestDb) {
    let app = TestApp::spawn_with(Config {
        change_retention: Duration::from_secs(1),
        ..config(&db)
    })
    .await;
    let mut c = app.client().await;
    let (_, old) = watch_from_now(&mut c, &[]).await;
    let ws = new_workspace();
    app.set(set_model_req(&ws, "opus", false)).await;
    // The pruning job runs on its own; wait for it (bounded).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let err = loop {
        match open(&mut c, from_cursor(&old)).await {
            Err(e) => break e,
            Ok(_) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the change was never pruned"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_error(&err, Code::OutOfRange, "CURSOR_EXPIRED");
    // A fresh snapshot and its cursor still work.
    let mut s = open(
        &mut c,
        WatchRequest {
            include_snapshot: true,
            ..WatchRequest::default()
        },
    )
    .await
    .unwrap();
    let (_, r) = {
        let m = next_ok(&mut s).await;
        match m.event {
            Some(Event::Resolution(r)) => (m.cursor, r),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(r.workspace_id, ws);
}

backends!(shutdown_ends_streams_with_shutting_down);
async fn shutdown_ends_streams_with_shutting_down(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let (mut s, _) = watch_from_now(&mut c, &[]).await;
    let stopping = tokio::spawn(app.stop());
    let err = next(&mut s)
        .await
        .expect_err("the stream ends with an error");
    assert_error(&err, Code::Unavailable, "SHUTTING_DOWN");
    stopping.await.unwrap().expect("the server stops cleanly");
}

backends!(a_lost_change_log_ends_streams_with_store_unavailable);
async fn a_lost_change_log_ends_streams_with_store_unavailable(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let (mut s, _) = watch_from_now(&mut c, &[]).await;
    // The log becomes unreadable (as when the store is gone).
    raw_sql(
        &db,
        "ALTER TABLE billing_changes RENAME TO billing_changes_away",
    )
    .await;
    let err = end_status(&mut s).await;
    assert_error(&err, Code::Unavailable, "STORE_UNAVAILABLE");
}

backends!(a_gap_in_the_change_log_ends_streams_with_store_corrupt_and_resuming_does_not_help);
async fn a_gap_in_the_change_log_ends_streams_with_store_corrupt_and_resuming_does_not_help(
    db: TestDb,
) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let ws = new_workspace();
    app.set(set_model_req(&ws, "opus", false)).await;
    let (mut s, cursor) = watch_from_now(&mut c, &[]).await;
    // A position handed out that no change has (as after a hand edit):
    // the next change lands one past a hole.
    raw_sql(
        &db,
        "UPDATE billing_change_log SET last_position = last_position + 1",
    )
    .await;
    app.set(set_model_req(&ws, "sonnet", false)).await;
    let err = end_status(&mut s).await;
    assert_error(&err, Code::DataLoss, "STORE_CORRUPT");
    // Resuming from the cursor before the hole meets the same hole.
    let mut resumed = open(&mut c, from_cursor(&cursor)).await.expect("resume");
    let err = end_status(&mut resumed).await;
    assert_error(&err, Code::DataLoss, "STORE_CORRUPT");
}

backends!(
    a_slow_consumer_is_cut_off_while_writers_and_other_streams_keep_going,
    flavor = "multi_thread",
    worker_threads = 4
);
async fn a_slow_consumer_is_cut_off_while_writers_and_other_streams_keep_going(db: TestDb) {
    let app = TestApp::spawn_with(Config {
        watch_buffer: 100,
        ..config(&db)
    })
    .await;
    // The slow consumer: opens, then reads nothing for a while; its
    // HTTP/2 window is tiny, so what it does not read stays queued on
    // the server.
    let mut slow_client = tiny_window_client(&app).await;
    let (mut slow, _) = watch_from_now(&mut slow_client, &[]).await;
    let (mut brisk, _) = watch_from_now(&mut app.client().await, &[]).await;
    let ws = new_workspace();
    let reader = tokio::spawn(async move {
        let mut revisions = Vec::new();
        while revisions.len() < 300 {
            revisions.push(next_change(&mut brisk).await.1.revision);
        }
        revisions
    });
    for i in 0..300 {
        app.set(set_model_req(&ws, &format!("opus-{i}"), false))
            .await;
    }
    // Writers kept going, the brisk stream got everything.
    assert_eq!(reader.await.unwrap(), (1..=300).collect::<Vec<u64>>());
    // The slow one gets what was queued, then CONSUMER_TOO_SLOW.
    let err = loop {
        match next(&mut slow).await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the slow stream ended without a status"),
            Err(e) => break e,
        }
    };
    assert_error(&err, Code::ResourceExhausted, "CONSUMER_TOO_SLOW");
}

backends!(
    a_stream_catching_up_while_more_changes_commit_than_the_feed_holds_misses_nothing,
    flavor = "multi_thread",
    worker_threads = 4
);
/// A provisioner resumes from an old cursor and reads its backlog at its own
/// pace while the platform keeps writing: more changes commit meanwhile than
/// the feed keeps for a subscriber (here 16). The stream reads what it
/// missed from the store and goes on: every revision once, in order, and no
/// CONSUMER_TOO_SLOW, which is for a consumer whose own buffer fills.
async fn a_stream_catching_up_while_more_changes_commit_than_the_feed_holds_misses_nothing(
    db: TestDb,
) {
    let app = TestApp::spawn_with(Config {
        feed_capacity: 16,
        ..config(&db)
    })
    .await;
    let (mut opening, cursor) = watch_from_now(&mut app.client().await, &[]).await;
    // A backlog far larger than what the server queues for a stream (its
    // `--watch-buffer`, the encoder's buffer and the HTTP/2 window), so that
    // the resumed stream is still catching up, waiting on its consumer, when
    // the next changes commit. Read to its end by a stream open meanwhile.
    let mut created = create(&app, 3000).await;
    for id in &created {
        assert_eq!(&next_change(&mut opening).await.1.workspace_id, id);
    }
    drop(opening);
    // The resumed consumer: a tiny HTTP/2 window, and it reads one change,
    // then nothing while the writes go on.
    let mut slow_client = tiny_window_client(&app).await;
    let mut slow = open(&mut slow_client, from_cursor(&cursor)).await.unwrap();
    let mut got = vec![next_change(&mut slow).await.1.workspace_id];
    // A brisk stream from now: once it has every new change, the feed has
    // broadcast them all, far more than the slow stream's share holds.
    let (mut brisk, _) = watch_from_now(&mut app.client().await, &[]).await;
    let later = create(&app, 500).await;
    for id in &later {
        assert_eq!(&next_change(&mut brisk).await.1.workspace_id, id);
    }
    created.extend(later);
    // The slow stream now reads on: all of it, in order, nothing twice, no
    // error.
    while got.len() < created.len() {
        match next(&mut slow).await {
            Ok(Some(m)) => {
                if let Some(Event::Resolution(r)) = m.event {
                    got.push(r.workspace_id);
                }
            }
            Ok(None) => panic!("the stream ended without a status after {}", got.len()),
            Err(e) => panic!("the stream ended with {e:?} after {} changes", got.len()),
        }
    }
    assert_eq!(got, created);
}

/// Creates `n` workspaces, 250 a call; their ids in the order their
/// changes are logged (a call's items in request order).
async fn create(app: &TestApp, n: usize) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|_| new_workspace()).collect();
    let mut c = app.client().await;
    for chunk in ids.chunks(250) {
        c.batch_create_workspaces(BatchCreateWorkspacesRequest {
            workspaces: chunk
                .iter()
                .map(|id| NewWorkspace {
                    workspace_id: id.clone(),
                    runtime: "claude-code".into(),
                    model: "opus".into(),
                    ..NewWorkspace::default()
                })
                .collect(),
            reason: "backlog".into(),
        })
        .await
        .expect("BatchCreateWorkspaces");
    }
    ids
}

backends!(watch_is_for_whoever_may_resolve);
async fn watch_is_for_whoever_may_resolve(db: TestDb) {
    let roles = [
        Role::Admin,
        Role::Writer,
        Role::Reader,
        Role::Provisioner,
        Role::Meter,
    ];
    let tokens: Vec<_> = roles
        .iter()
        .map(|r| make_token(&format!("{r:?}").to_lowercase(), &[*r]))
        .collect();
    let app = TestApp::spawn_with(config_with_tokens(
        &db,
        tokens.iter().map(|(_, e)| e.clone()).collect(),
    ))
    .await;
    for (role, (token, _)) in roles.iter().zip(&tokens) {
        let mut c = app.client_with_token(token).await;
        let result = c.watch(WatchRequest::default()).await;
        let may = matches!(role, Role::Admin | Role::Reader | Role::Provisioner);
        match result {
            Ok(r) => {
                assert!(may, "{role:?} may not Watch");
                let first = r.into_inner().message().await.unwrap().unwrap();
                assert!(matches!(first.event, Some(Event::Progress(_))));
            }
            Err(e) => {
                assert!(!may, "{role:?} may Watch: {e:?}");
                assert_error(&e, Code::PermissionDenied, "PERMISSION_DENIED");
            }
        }
    }
    let err = app
        .client()
        .await
        .watch(WatchRequest::default())
        .await
        .unwrap_err();
    assert_error(&err, Code::Unauthenticated, "UNAUTHENTICATED");
}
