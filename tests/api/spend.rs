//! Closing the loop, black-box over gRPC on both backends: CheckSpend from
//! each replica's live snapshot (flips seen on another replica, no allowed
//! answer for a revision that was not platform_managed, a replica started
//! during writes, fail-closed while the store is down), ReportApplied and
//! ListDrift (applied state and drift).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{helpers::*, private_postgres::PrivatePostgres};
use billing_mode::{
    auth::Role,
    proto::{
        CheckSpendRequest, CheckSpendResponse, ClearRequest, CredentialKeys, Drift, HistoryRequest,
        ListDriftRequest, ListDriftResponse, Mode, ReportAppliedRequest, ReportAppliedResponse,
        SetRequest,
    },
};
use tonic::{Code, Status};

// ---------------------------------------------------------------------------
// Helpers

async fn report(
    c: &mut Client,
    ws: &str,
    revision: u64,
    mode: Mode,
    instance: &str,
) -> Result<ReportAppliedResponse, Status> {
    c.report_applied(ReportAppliedRequest {
        workspace_id: ws.to_owned(),
        revision,
        mode: mode.into(),
        instance: instance.to_owned(),
    })
    .await
    .map(|r| r.into_inner())
}

async fn drift_page(c: &mut Client, size: u32, token: &str) -> Result<ListDriftResponse, Status> {
    c.list_drift(ListDriftRequest {
        page_size: size,
        page_token: token.to_owned(),
    })
    .await
    .map(|r| r.into_inner())
}

/// Every drifted instance, following next_page_token with pages of `size`.
async fn all_drift(c: &mut Client, size: u32) -> Vec<Drift> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = drift_page(c, size, &token).await.expect("ListDrift");
        let effective = match size {
            0 => 50,
            n => n.min(500),
        };
        assert!(page.drift.len() <= effective as usize);
        out.extend(page.drift);
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

/// The commit time of `revision`, from History.
async fn commit_time(c: &mut Client, ws: &str, revision: u64) -> billing_mode::wire::Timestamp {
    let h = c
        .history(HistoryRequest {
            workspace_id: ws.to_owned(),
            page_size: 500,
            page_token: String::new(),
        })
        .await
        .expect("History")
        .into_inner();
    h.entries
        .into_iter()
        .find(|e| e.revision == revision)
        .and_then(|e| e.time)
        .expect("the revision is in History")
}

async fn clear(c: &mut Client, ws: &str) -> billing_mode::proto::Resolution {
    c.clear(ClearRequest {
        workspace_id: ws.to_owned(),
        reason: "back to derived".into(),
        ..ClearRequest::default()
    })
    .await
    .expect("Clear")
    .into_inner()
    .resolution
    .unwrap()
}

fn key(d: &Drift) -> (String, String) {
    (d.workspace_id.clone(), d.instance.clone())
}

// ---------------------------------------------------------------------------
// ReportApplied

backends!(report_applied_is_checked_against_the_decision_at_its_revision);
async fn report_applied_is_checked_against_the_decision_at_its_revision(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let ws = new_workspace();
    let r1 = app.set_override(&ws, Mode::Byok, "r1").await;
    let r2 = app.set_override(&ws, Mode::PlatformManaged, "r2").await;
    let r3 = app.set_override(&ws, Mode::Disabled, "r3").await;
    assert_eq!((r1.revision, r2.revision, r3.revision), (1, 2, 3));

    // Current and stale reports.
    let now = report(&mut c, &ws, 3, Mode::Disabled, "pod-a")
        .await
        .unwrap();
    assert!(now.current, "{:?}: revision 3 is current", db.backend);
    assert_eq!(now.resolution.as_ref().unwrap().revision, 3);
    assert_eq!(now.resolution.unwrap().mode(), Mode::Disabled);
    let old = report(&mut c, &ws, 1, Mode::Byok, "pod-b").await.unwrap();
    assert!(!old.current, "revision 1 is stale");
    assert_eq!(old.resolution.unwrap().revision, 3);

    // A revision the record never had, or another mode than was decided.
    for (rev, mode, what) in [
        (4, Mode::Disabled, "a future revision"),
        (0, Mode::Byok, "revision 0"),
        (2, Mode::Byok, "byok at a platform_managed revision"),
        (
            1,
            Mode::PlatformManaged,
            "platform_managed at a byok revision",
        ),
        (3, Mode::Byok, "byok at the current disabled revision"),
    ] {
        let e = report(&mut c, &ws, rev, mode, "pod-c").await.unwrap_err();
        assert_error(&e, Code::InvalidArgument, "INVALID_FIELD");
        assert!(!e.message().is_empty(), "{what}");
    }

    // A decision derived from the record's fields (not an override) is
    // decided again from the audit log: claude-code + opus with the
    // customer's token, then the model removed.
    let ws2 = new_workspace();
    let d1 = app
        .set(SetRequest {
            workspace_id: ws2.clone(),
            runtime: Some("claude-code".into()),
            model: Some("opus".into()),
            credential_keys: Some(CredentialKeys {
                keys: vec!["CLAUDE_CODE_OAUTH_TOKEN".into()],
            }),
            ..SetRequest::default()
        })
        .await;
    let d2 = app
        .set(SetRequest {
            workspace_id: ws2.clone(),
            model: Some(String::new()),
            ..SetRequest::default()
        })
        .await;
    assert_ne!(d1.mode, d2.mode, "the test needs two different decisions");
    assert!(
        !report(&mut c, &ws2, 1, d1.mode(), "vm-1")
            .await
            .unwrap()
            .current
    );
    let e = report(&mut c, &ws2, 1, d2.mode(), "vm-1")
        .await
        .unwrap_err();
    assert_error(&e, Code::InvalidArgument, "INVALID_FIELD");
    assert!(
        report(&mut c, &ws2, 2, d2.mode(), "vm-2")
            .await
            .unwrap()
            .current
    );

    // Validation before any I/O; NOT_FOUND before the revision checks.
    let e = report(&mut c, "not-a-uuid", 1, Mode::Byok, "pod")
        .await
        .unwrap_err();
    assert_error(&e, Code::InvalidArgument, "INVALID_WORKSPACE_ID");
    let e = report(&mut c, &ws, 1, Mode::Unspecified, "pod")
        .await
        .unwrap_err();
    assert_error(&e, Code::InvalidArgument, "INVALID_MODE");
    for bad in ["", "pod a", "pod\n", &"x".repeat(257)] {
        let e = report(&mut c, &ws, 1, Mode::Byok, bad).await.unwrap_err();
        assert_error(&e, Code::InvalidArgument, "INVALID_FIELD");
    }
    let unknown = new_workspace();
    for rev in [0, 1, 7] {
        let e = report(&mut c, &unknown, rev, Mode::Byok, "pod")
            .await
            .unwrap_err();
        assert_error(&e, Code::NotFound, "WORKSPACE_NOT_FOUND");
    }

    // Only the accepted reports were kept: pod-b (byok, stale) drifts
    // from the current disabled decision since revision 2 left byok, and
    // vm-1 since ws2's revision 2 (later).
    let drift = all_drift(&mut c, 0).await;
    let keys: Vec<_> = drift.iter().map(key).collect();
    assert_eq!(
        keys,
        vec![
            (ws.clone(), "pod-b".to_owned()),
            (ws2.clone(), "vm-1".to_owned())
        ],
        "{:?}",
        db.backend
    );
    assert_eq!(drift[1].since, Some(commit_time(&mut c, &ws2, 2).await));
    assert_eq!(drift[0].applied_revision, 1);
    assert_eq!(drift[0].applied_mode(), Mode::Byok);
    assert_eq!(drift[0].current.as_ref().unwrap().revision, 3);
    assert_eq!(drift[0].since, Some(commit_time(&mut c, &ws, 2).await));
}

backends!(report_applied_and_list_drift_follow_the_role_table);
async fn report_applied_and_list_drift_follow_the_role_table(db: TestDb) {
    let roles = [
        Role::Reader,
        Role::Provisioner,
        Role::Writer,
        Role::Admin,
        Role::Meter,
    ];
    let mut tokens = Vec::new();
    let mut entries = Vec::new();
    for role in roles {
        let (token, entry) = make_token(&format!("{role:?}").to_lowercase(), &[role]);
        tokens.push((role, token));
        entries.push(entry);
    }
    let app = TestApp::spawn_with(config_with_tokens(&db, entries)).await;
    let admin = &tokens.iter().find(|(r, _)| *r == Role::Admin).unwrap().1;
    let mut a = app.client_with_token(admin).await;
    let ws = new_workspace();
    a.set(SetRequest {
        workspace_id: ws.clone(),
        override_mode: Some(Mode::Byok.into()),
        reason: "setup".into(),
        ..SetRequest::default()
    })
    .await
    .unwrap();
    for (role, token) in &tokens {
        let mut c = app.client_with_token(token).await;
        let reported = c
            .report_applied(ReportAppliedRequest {
                workspace_id: ws.clone(),
                revision: 1,
                mode: Mode::Byok.into(),
                instance: "pod-1".into(),
            })
            .await;
        let listed = c.list_drift(ListDriftRequest::default()).await;
        let checked = c
            .check_spend(CheckSpendRequest {
                workspace_id: ws.clone(),
            })
            .await;
        let may_check = matches!(role, Role::Meter | Role::Admin);
        match checked {
            Ok(r) => assert!(
                may_check && !r.into_inner().allowed,
                "{role:?} checked spend"
            ),
            Err(e) => {
                assert!(!may_check, "{role:?} may check spend: {e:?}");
                assert_error(&e, Code::PermissionDenied, "PERMISSION_DENIED");
            }
        }
        let may_report = matches!(role, Role::Provisioner | Role::Admin);
        let may_list = matches!(role, Role::Reader | Role::Admin);
        match reported {
            Ok(r) => assert!(may_report && r.into_inner().current, "{role:?} reported"),
            Err(e) => {
                assert!(!may_report, "{role:?} may report: {e:?}");
                assert_error(&e, Code::PermissionDenied, "PERMISSION_DENIED");
            }
        }
        match listed {
            Ok(_) => assert!(may_list, "{role:?} listed"),
            Err(e) => {
                assert!(!may_list, "{role:?} may list: {e:?}");
                assert_error(&e, Code::PermissionDenied, "PERMISSION_DENIED");
            }
        }
    }
    // No token at all.
    let mut anon = app.client().await;
    let e = anon
        .list_drift(ListDriftRequest::default())
        .await
        .unwrap_err();
    assert_error(&e, Code::Unauthenticated, "UNAUTHENTICATED");
}

// ---------------------------------------------------------------------------
// ListDrift

backends!(list_drift_pages_oldest_first_and_a_current_report_ends_drift);
async fn list_drift_pages_oldest_first_and_a_current_report_ends_drift(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    // Seven workspaces, each started platform_managed on two instances.
    let mut wss = Vec::new();
    for _ in 0..7 {
        let ws = new_workspace();
        app.set_override(&ws, Mode::PlatformManaged, "start").await;
        for i in ["a", "b"] {
            report(&mut c, &ws, 1, Mode::PlatformManaged, i)
                .await
                .unwrap();
        }
        wss.push(ws);
    }
    assert!(
        all_drift(&mut c, 0).await.is_empty(),
        "nothing has drifted yet"
    );

    // Flip them in reverse order, so oldest-first is not insertion order.
    // wss[0] goes to byok and then disabled: still drift, since its first
    // flip. wss[1] flips to byok and back: no drift.
    let mut flipped_at = HashMap::new();
    for (k, ws) in wss.iter().enumerate().rev() {
        let r = app.set_override(ws, Mode::Byok, "flip").await;
        flipped_at.insert(ws.clone(), r.revision);
        if k == 1 {
            app.set_override(ws, Mode::PlatformManaged, "flip back")
                .await;
        }
    }
    app.set_override(&wss[0], Mode::Disabled, "again").await;

    let mut expected: Vec<(billing_mode::wire::Timestamp, String)> = Vec::new();
    for (k, ws) in wss.iter().enumerate() {
        if k != 1 {
            expected.push((commit_time(&mut c, ws, flipped_at[ws]).await, ws.clone()));
        }
    }
    expected.sort_by_key(|(t, ws)| (t.seconds, t.nanos, ws.clone()));

    let check = |drift: &[Drift], expected: &[(billing_mode::wire::Timestamp, String)]| {
        let got: Vec<_> = drift
            .iter()
            .map(|d| (d.since.unwrap(), d.workspace_id.clone(), d.instance.clone()))
            .collect();
        let want: Vec<_> = expected
            .iter()
            .flat_map(|(t, ws)| ["a", "b"].map(|i| (*t, ws.clone(), i.to_owned())))
            .collect();
        assert_eq!(got, want);
    };
    for size in [0, 1, 3, 500, 10_000] {
        check(&all_drift(&mut c, size).await, &expected);
    }
    let first = drift_page(&mut c, 3, "").await.unwrap();
    assert_eq!(first.drift.len(), 3);
    assert!(!first.next_page_token.is_empty());
    for d in &first.drift {
        assert_eq!(d.applied_mode(), Mode::PlatformManaged);
        assert_eq!(d.applied_revision, 1);
        assert_ne!(d.current.as_ref().unwrap().mode(), Mode::PlatformManaged);
    }

    // Tokens the service did not hand out.
    let t = &first.next_page_token;
    let mut flipped = t.clone().into_bytes();
    flipped[0] = if flipped[0] == b'3' { b'4' } else { b'3' };
    let flipped = String::from_utf8(flipped).unwrap();
    for bad in ["x", "not hex", "00", &t[2..], &t[..t.len() - 2], &flipped] {
        let e = drift_page(&mut c, 3, bad).await.unwrap_err();
        assert_error(&e, Code::InvalidArgument, "INVALID_FIELD");
    }

    // A current report for one instance ends its drift; the other
    // instance of that workspace still drifts.
    let ws = &expected[0].1;
    let cur = app.resolve(ws).await;
    assert!(
        report(&mut c, ws, cur.revision, cur.mode(), "a")
            .await
            .unwrap()
            .current
    );
    let after: Vec<_> = all_drift(&mut c, 2).await.iter().map(key).collect();
    assert!(!after.contains(&(ws.clone(), "a".to_owned())));
    assert!(after.contains(&(ws.clone(), "b".to_owned())));
    assert_eq!(after.len(), 2 * expected.len() - 1);

    // Clearing the override of a flipped workspace derives
    // platform_managed again (no model): its drift disappears too.
    let ws = &expected[1].1;
    assert_eq!(clear(&mut c, ws).await.mode(), Mode::PlatformManaged);
    let after: Vec<_> = all_drift(&mut c, 0).await.iter().map(key).collect();
    assert!(after.iter().all(|(w, _)| w != ws));
    assert_eq!(after.len(), 2 * expected.len() - 3);
}

// ---------------------------------------------------------------------------
// CheckSpend

/// The generous bound within which a committed change must be answered by
/// every replica (the contract's figure is 100 ms; the benchmark measures it).
const BOUND: Duration = Duration::from_secs(2);

async fn check(c: &mut Client, ws: &str) -> Result<CheckSpendResponse, Status> {
    c.check_spend(CheckSpendRequest {
        workspace_id: ws.to_owned(),
    })
    .await
    .map(|r| r.into_inner())
}

/// Polls CheckSpend on `c` until it answers `ws` at `revision` (or later);
/// the answer, or a panic naming what was last seen after `bound`.
async fn answered_at(
    c: &mut Client,
    ws: &str,
    revision: u64,
    bound: Duration,
) -> CheckSpendResponse {
    let start = Instant::now();
    loop {
        let last = check(c, ws).await;
        if let Ok(a) = &last {
            if a.revision >= revision {
                return *a;
            }
        }
        assert!(
            start.elapsed() < bound,
            "revision {revision} of {ws} not answered within {bound:?}; last: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn health(app: &TestApp) -> i32 {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    HealthClient::new(app.channel().await)
        .check(HealthCheckRequest {
            service: "molecule.billing.v1.BillingMode".into(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status
}

const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

backends!(
    a_flip_through_one_replica_is_answered_by_another,
    flavor = "multi_thread",
    worker_threads = 4
);
async fn a_flip_through_one_replica_is_answered_by_another(db: TestDb) {
    let a = TestApp::spawn(&db).await;
    let b = TestApp::spawn(&db).await;
    let mut ca = a.client().await;
    let mut cb = b.client().await;
    assert_eq!(health(&b).await, SERVING);
    let ws = new_workspace();
    let r1 = set_override(&mut ca, &ws, Mode::PlatformManaged, "start").await;
    let answer = answered_at(&mut cb, &ws, r1.revision, BOUND).await;
    assert!(answer.allowed, "{:?}", db.backend);
    assert_eq!((answer.mode(), answer.revision), (Mode::PlatformManaged, 1));
    let as_of = answer.as_of.expect("as_of");
    let age = chrono::Utc::now().timestamp() - as_of.seconds;
    assert!((0..=5).contains(&age), "as_of is recent: {as_of:?}");

    // platform_managed → byok on A: B denies within the bound.
    let r2 = set_override(&mut ca, &ws, Mode::Byok, "customer's own key").await;
    let answer = answered_at(&mut cb, &ws, r2.revision, BOUND).await;
    assert!(!answer.allowed);
    assert_eq!((answer.mode(), answer.revision), (Mode::Byok, 2));
    // Back: allowed again. Then disabled: denied.
    let r3 = set_override(&mut ca, &ws, Mode::PlatformManaged, "back").await;
    let answer = answered_at(&mut cb, &ws, r3.revision, BOUND).await;
    assert!(answer.allowed && answer.revision == 3);
    let r4 = set_override(&mut ca, &ws, Mode::Disabled, "suspended").await;
    assert!(!answered_at(&mut cb, &ws, r4.revision, BOUND).await.allowed);
    // A dry run changes nothing.
    ca.set(SetRequest {
        workspace_id: ws.clone(),
        override_mode: Some(Mode::PlatformManaged.into()),
        reason: "dry".into(),
        dry_run: true,
        ..SetRequest::default()
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answer = check(&mut cb, &ws).await.unwrap();
    assert!(!answer.allowed && answer.revision == 4);

    let e = check(&mut cb, &new_workspace()).await.unwrap_err();
    assert_error(&e, Code::NotFound, "WORKSPACE_NOT_FOUND");
    let e = check(&mut cb, "not-a-workspace").await.unwrap_err();
    assert_error(&e, Code::InvalidArgument, "INVALID_WORKSPACE_ID");
}

/// One CheckSpend answer, as received.
#[derive(Debug, Clone)]
struct Seen {
    ws: String,
    allowed: bool,
    mode: Mode,
    revision: u64,
}

backends!(
    no_answer_allows_spend_at_a_revision_that_was_not_platform_managed,
    flavor = "multi_thread",
    worker_threads = 4
);
async fn no_answer_allows_spend_at_a_revision_that_was_not_platform_managed(db: TestDb) {
    let a = TestApp::spawn(&db).await;
    let b = TestApp::spawn(&db).await;
    let mut ca = a.client().await;
    let wss: Vec<String> = (0..12).map(|_| new_workspace()).collect();
    for ws in &wss {
        set_override(&mut ca, ws, Mode::PlatformManaged, "start").await;
    }
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));

    // Checkers on both replicas, until the writers are done.
    let mut checkers = Vec::new();
    for k in 0..4 {
        let mut c = if k % 2 == 0 {
            b.client().await
        } else {
            a.client().await
        };
        let (wss, done, seen) = (wss.clone(), done.clone(), seen.clone());
        checkers.push(tokio::spawn(async move {
            let mut i = k;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let ws = &wss[i % wss.len()];
                i += 7;
                if let Ok(r) = check(&mut c, ws).await {
                    seen.lock().unwrap().push(Seen {
                        ws: ws.clone(),
                        allowed: r.allowed,
                        mode: r.mode(),
                        revision: r.revision,
                    });
                }
            }
        }));
    }
    // Writers on A: many flips, among all three modes.
    let mut writers = Vec::new();
    for w in 0..3 {
        let mut c = a.client().await;
        let wss = wss.clone();
        writers.push(tokio::spawn(async move {
            let modes = [Mode::Byok, Mode::PlatformManaged, Mode::Disabled];
            for i in 0..40 {
                let ws = &wss[(i * 5 + w * 3) % wss.len()];
                set_override(&mut c, ws, modes[(i + w) % 3], "flip").await;
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in checkers {
        c.await.unwrap();
    }

    // Every answer against the workspace's History: the decision at the
    // answered revision (every write here is an override, so the
    // override recorded at that revision is the decision).
    let mut decided: HashMap<(String, u64), String> = HashMap::new();
    for ws in &wss {
        let h = ca
            .history(HistoryRequest {
                workspace_id: ws.clone(),
                page_size: 500,
                page_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        for e in h.entries {
            let after = e.after.unwrap();
            assert!(after.runtime.is_empty() && after.model.is_empty());
            decided.insert((ws.clone(), e.revision), after.override_mode);
        }
    }
    let seen = seen.lock().unwrap().clone();
    let (mut allowed, mut denied) = (0, 0);
    for s in &seen {
        let at = decided
            .get(&(s.ws.clone(), s.revision))
            .unwrap_or_else(|| panic!("{s:?}: a revision the workspace never had"));
        let want = match at.as_str() {
            "platform_managed" => Mode::PlatformManaged,
            "byok" => Mode::Byok,
            "disabled" => Mode::Disabled,
            other => panic!("unexpected override {other:?}"),
        };
        assert_eq!(s.mode, want, "{s:?}: the mode decided at that revision");
        assert_eq!(s.allowed, want == Mode::PlatformManaged, "{s:?}");
        if s.allowed {
            allowed += 1;
        } else {
            denied += 1;
        }
    }
    assert!(
        allowed > 20 && denied > 20,
        "{:?}: the run saw both answers ({allowed} allowed, {denied} denied)",
        db.backend
    );
}

backends!(
    a_replica_started_during_writes_misses_no_change,
    flavor = "multi_thread",
    worker_threads = 4
);
async fn a_replica_started_during_writes_misses_no_change(db: TestDb) {
    let a = TestApp::spawn(&db).await;
    let mut ca = a.client().await;
    let wss: Vec<String> = (0..60).map(|_| new_workspace()).collect();
    for ws in &wss {
        set_override(&mut ca, ws, Mode::PlatformManaged, "start").await;
    }
    // Each workspace changes exactly once, while replicas start: a change
    // committed between a replica's load and its subscription would be
    // lost for good, and show below.
    let writer = {
        let mut c = a.client().await;
        let wss = wss.clone();
        tokio::spawn(async move {
            for ws in &wss {
                set_override(&mut c, ws, Mode::Byok, "flip").await;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(TestApp::spawn(&db).await);
    }
    writer.await.unwrap();
    for (k, r) in replicas.iter().enumerate() {
        let mut c = r.client().await;
        for ws in &wss {
            let answer = answered_at(&mut c, ws, 2, BOUND).await;
            assert_eq!(
                (answer.mode(), answer.revision, answer.allowed),
                (Mode::Byok, 2, false),
                "{:?} replica {k}, {ws}",
                db.backend
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spend_checks_fail_closed_while_the_store_is_down_and_recover_without_restart() {
    if postgres_url("the store-outage test needs Postgres").is_none() {
        return;
    }
    let Some(pg) = PrivatePostgres::start("spend checks while the store is down") else {
        return;
    };
    let db = TestDb::at(Backend::Postgres, pg.url());
    let max_staleness = billing_mode::config::DEFAULT_MAX_STALENESS;
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let ws = new_workspace();
    app.set_override(&ws, Mode::PlatformManaged, "start").await;
    assert!(answered_at(&mut c, &ws, 1, BOUND).await.allowed);
    assert_eq!(health(&app).await, SERVING);

    // The store goes away. Every answer given later than the staleness bound
    // after that is UNAVAILABLE; health turns NOT_SERVING.
    pg.down();
    let stopped = chrono::Utc::now();
    let deadline = Instant::now() + max_staleness + Duration::from_secs(10);
    loop {
        // The last confirmation is from a read that began before the store
        // stopped, so a call sent later than the bound after that must be
        // refused, however long its answer then takes to arrive (judged by
        // when it was sent: no slack for the machine's delays).
        let sent = chrono::Utc::now();
        let answer = check(&mut c, &ws).await;
        let late = sent - stopped > chrono::Duration::from_std(max_staleness).unwrap();
        match &answer {
            Ok(a) => assert!(!late, "fail open: answered {a:?} with the store down"),
            Err(e) => {
                assert_error(e, Code::Unavailable, "STORE_UNAVAILABLE");
            }
        }
        if late && answer.is_err() && health(&app).await == NOT_SERVING {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not UNAVAILABLE and NOT_SERVING in time: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Still closed a while later (not a blip).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let e = check(&mut c, &ws).await.unwrap_err();
    assert_error(&e, Code::Unavailable, "STORE_UNAVAILABLE");
    assert_eq!(health(&app).await, NOT_SERVING);

    // The store comes back: both recover, with no restart of the server.
    pg.up();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if check(&mut c, &ws).await.is_ok() && health(&app).await == SERVING {
            break;
        }
        assert!(Instant::now() < deadline, "did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(check(&mut c, &ws).await.unwrap().allowed);
    // And it follows changes again.
    let r = app.set_override(&ws, Mode::Byok, "after the outage").await;
    assert!(!answered_at(&mut c, &ws, r.revision, BOUND).await.allowed);
    app.stop().await.unwrap();
}

/// Runs one statement on the test's database, behind the server's back.
async fn execute(db: &TestDb, sql: &str) {
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

backends!(
    a_change_log_that_stays_unreadable_does_not_make_the_snapshot_read_every_record_again_and_again,
    flavor = "multi_thread",
    worker_threads = 2
);
async fn a_change_log_that_stays_unreadable_does_not_make_the_snapshot_read_every_record_again_and_again(
    db: TestDb,
) {
    let server = crate::server_process::ServerProcess::start(&db.url, &[], &[]);
    let loads = |log: &str| log.matches("spend snapshot loaded").count();
    execute(
        &db,
        "ALTER TABLE billing_changes RENAME TO billing_changes_away",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server.log().contains("the change log is lost") {
        assert!(Instant::now() < deadline, "never lost:\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Loading again cannot help while the feed cannot read the log (the
    // subscription would end at once); each load reads every record.
    let before = loads(&server.log());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = loads(&server.log()) - before;
    assert!(during <= 1, "{during} loads in 2 s while the log was lost");
    // Readable again: it loads again, by itself.
    execute(
        &db,
        "ALTER TABLE billing_changes_away RENAME TO billing_changes",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while loads(&server.log()) == before + during {
        assert!(
            Instant::now() < deadline,
            "never loaded again:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

backends!(
    a_stuck_change_feed_fails_closed_though_the_store_answers,
    flavor = "multi_thread",
    worker_threads = 4
);
async fn a_stuck_change_feed_fails_closed_though_the_store_answers(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let ws = new_workspace();
    app.set_override(&ws, Mode::PlatformManaged, "start").await;
    assert!(answered_at(&mut c, &ws, 1, BOUND).await.allowed);
    assert_eq!(health(&app).await, SERVING);

    // The change log cannot be read; the store itself still answers
    // (Resolve works), so only the spend snapshot knows it is stuck.
    execute(
        &db,
        "ALTER TABLE billing_changes RENAME TO billing_changes_away",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let answer = check(&mut c, &ws).await;
        if let Err(e) = &answer {
            if health(&app).await == NOT_SERVING {
                assert_error(e, Code::Unavailable, "STORE_UNAVAILABLE");
                break;
            }
        }
        assert!(Instant::now() < deadline, "still answering: {answer:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(app.resolve(&ws).await.revision, 1, "{:?}", db.backend);

    // Readable again: both recover without a restart.
    execute(
        &db,
        "ALTER TABLE billing_changes_away RENAME TO billing_changes",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(check(&mut c, &ws).await.is_ok() && health(&app).await == SERVING) {
        assert!(Instant::now() < deadline, "did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = app.set_override(&ws, Mode::Byok, "after").await;
    assert!(!answered_at(&mut c, &ws, r.revision, BOUND).await.allowed);
}
