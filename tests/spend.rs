//! Closing the loop, black-box over gRPC on both backends: ReportApplied and
//! ListDrift (applied state and drift).
mod common;

use std::collections::HashMap;

use billing_mode::{
    auth::Role,
    proto::{
        ClearRequest, CredentialKeys, Drift, HistoryRequest, ListDriftRequest, ListDriftResponse,
        Mode, ReportAppliedRequest, ReportAppliedResponse, SetRequest,
    },
};
use common::*;
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
async fn commit_time(c: &mut Client, ws: &str, revision: u64) -> prost_types::Timestamp {
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

#[tokio::test]
async fn report_applied_is_checked_against_the_decision_at_its_revision() {
    each_backend(|db| async move {
        let app = TestApp::spawn(&db).await;
        let mut c = app.client().await;
        let ws = new_workspace();
        let r1 = set_override(&mut c, &ws, Mode::Byok, "r1").await;
        let r2 = set_override(&mut c, &ws, Mode::PlatformManaged, "r2").await;
        let r3 = set_override(&mut c, &ws, Mode::Disabled, "r3").await;
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
        let d1 = set(
            &mut c,
            SetRequest {
                workspace_id: ws2.clone(),
                runtime: Some("claude-code".into()),
                model: Some("opus".into()),
                credential_keys: Some(CredentialKeys {
                    keys: vec!["CLAUDE_CODE_OAUTH_TOKEN".into()],
                }),
                ..SetRequest::default()
            },
        )
        .await;
        let d2 = set(
            &mut c,
            SetRequest {
                workspace_id: ws2.clone(),
                model: Some(String::new()),
                ..SetRequest::default()
            },
        )
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
    })
    .await;
}

#[tokio::test]
async fn report_applied_and_list_drift_follow_the_role_table() {
    each_backend(|db| async move {
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
        let app = TestApp::spawn_with(&db, config_with_tokens(&db, entries)).await;
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
    })
    .await;
}

// ---------------------------------------------------------------------------
// ListDrift

#[tokio::test]
async fn list_drift_pages_oldest_first_and_a_current_report_ends_drift() {
    each_backend(|db| async move {
        let app = TestApp::spawn(&db).await;
        let mut c = app.client().await;
        // Seven workspaces, each started platform_managed on two instances.
        let mut wss = Vec::new();
        for _ in 0..7 {
            let ws = new_workspace();
            set_override(&mut c, &ws, Mode::PlatformManaged, "start").await;
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
            let r = set_override(&mut c, ws, Mode::Byok, "flip").await;
            flipped_at.insert(ws.clone(), r.revision);
            if k == 1 {
                set_override(&mut c, ws, Mode::PlatformManaged, "flip back").await;
            }
        }
        set_override(&mut c, &wss[0], Mode::Disabled, "again").await;

        let mut expected: Vec<(prost_types::Timestamp, String)> = Vec::new();
        for (k, ws) in wss.iter().enumerate() {
            if k != 1 {
                expected.push((commit_time(&mut c, ws, flipped_at[ws]).await, ws.clone()));
            }
        }
        expected.sort_by_key(|(t, ws)| (t.seconds, t.nanos, ws.clone()));

        let check = |drift: &[Drift], expected: &[(prost_types::Timestamp, String)]| {
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
        let cur = resolve(&mut c, ws).await;
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
    })
    .await;
}
