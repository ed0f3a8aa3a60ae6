//! The change stream and dry runs, black-box over gRPC on both backends.
//!
//! Dry runs: every check of the real write, the answer it would give, nothing
//! written. Watch: exactly-once delivery from any cursor (also when
//! transactions commit in the opposite order of their start), across replicas
//! of one Postgres store, through a dropped store connection, with snapshots,
//! every error reason, and the roles.
mod common;

use billing_mode::{
    auth::Role,
    proto::{ClearRequest, HistoryRequest, Mode, SetRequest},
};
use common::*;
use tonic::Code;

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

#[tokio::test]
async fn a_dry_run_answers_as_the_write_would_and_writes_nothing() {
    each_backend(|db| async move {
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
            &try_resolve(&mut c, &ws).await.unwrap_err(),
            Code::NotFound,
            "WORKSPACE_NOT_FOUND",
        );
        // Clear on it is NOT_FOUND, as the real Clear.
        let err = c.clear(clear_req(&ws, None, true)).await.unwrap_err();
        assert_error(&err, Code::NotFound, "WORKSPACE_NOT_FOUND");

        // Registered: the answer carries the revision the write would get.
        let created = set(&mut c, set_model_req(&ws, "opus", false)).await;
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
        assert_eq!(resolve(&mut c, &ws).await, created);

        // The dry run's answer is the real write's.
        let real = set(
            &mut c,
            set_override_req(&ws, Mode::Disabled, Some(1), false),
        )
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
        assert_eq!(resolve(&mut c, &ws).await.revision, 2);
        let real_clear = c
            .clear(clear_req(&ws, Some(2), false))
            .await
            .unwrap()
            .into_inner()
            .resolution
            .unwrap();
        assert_eq!(real_clear, would_clear);
    })
    .await;
}

#[tokio::test]
async fn a_dry_run_needs_the_role_of_the_real_write() {
    each_backend(|db| async move {
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
        let app = TestApp::spawn_with(
            &db,
            config_with_tokens(&db, tokens.iter().map(|(_, e)| e.clone()).collect()),
        )
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
    })
    .await;
}
