//! Authentication and roles, black-box over gRPC on both backends: each role
//! against each RPC, missing and unknown tokens, open health and reflection,
//! the actor in audit rows, History paging, and the safe default that refuses
//! a non-loopback listener without tokens.

use crate::helpers::*;
use billing_mode::{
    auth::Role,
    proto::{
        BuildEnvRequest, ClearRequest, HistoryRequest, HistoryResponse, Mode, Origin,
        ResolveRequest, SetRequest,
    },
    startup::Application,
};
use tonic::{Code, Status};

/// The RPCs (and the two kinds of Set) that roles are checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc {
    Resolve,
    SetFields,
    SetOverride,
    Clear,
    BuildEnv,
    History,
}

const ALL_RPCS: [Rpc; 6] = [
    Rpc::Resolve,
    Rpc::SetFields,
    Rpc::SetOverride,
    Rpc::Clear,
    Rpc::BuildEnv,
    Rpc::History,
];

/// What each role may call (the table).
fn allowed(role: Role, rpc: Rpc) -> bool {
    match role {
        Role::Admin => true,
        Role::Reader => matches!(rpc, Rpc::Resolve | Rpc::History),
        Role::Provisioner => matches!(rpc, Rpc::Resolve | Rpc::BuildEnv),
        Role::Writer => matches!(rpc, Rpc::SetFields),
        Role::Meter => false,
    }
}

/// A client that sends no authorization metadata, typed like a token client.
async fn anonymous_client(app: &TestApp) -> TokenClient {
    billing_mode::proto::billing_mode_client::BillingModeClient::with_interceptor(
        app.channel().await,
        billing_mode::client::Bearer::default(),
    )
}

/// A client sending `authorization: <header>` verbatim.
async fn raw_header_client(app: &TestApp, header: &str) -> TokenClient {
    let value: tonic::metadata::MetadataValue<_> = header.parse().unwrap();
    billing_mode::proto::billing_mode_client::BillingModeClient::with_interceptor(
        app.channel().await,
        billing_mode::client::Bearer::from(value),
    )
}

/// Makes one valid call of `rpc` on `ws` (a claude-code + opus workspace that
/// owns CLAUDE_CODE_OAUTH_TOKEN, so every call can succeed).
async fn call(c: &mut TokenClient, rpc: Rpc, ws: &str) -> Result<(), Status> {
    let ws = ws.to_owned();
    match rpc {
        Rpc::Resolve => c
            .resolve(ResolveRequest { workspace_id: ws })
            .await
            .map(drop),
        Rpc::SetFields => c
            .set(SetRequest {
                workspace_id: ws,
                model: Some("sonnet".into()),
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::SetOverride => c
            .set(SetRequest {
                workspace_id: ws,
                override_mode: Some(Mode::Byok.into()),
                reason: "customer pays, ticket 42".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::Clear => c
            .clear(ClearRequest {
                workspace_id: ws,
                expected_revision: None,
                reason: "back to derived".into(),
                dry_run: false,
            })
            .await
            .map(drop),
        Rpc::BuildEnv => c
            .build_env(BuildEnvRequest {
                workspace_id: ws,
                env: vec![env(
                    Origin::Workspace,
                    "CLAUDE_CODE_OAUTH_TOKEN",
                    "customer-token",
                )],
            })
            .await
            .map(drop),
        Rpc::History => c
            .history(HistoryRequest {
                workspace_id: ws,
                page_size: 0,
                page_token: String::new(),
            })
            .await
            .map(drop),
    }
}

struct Tokens {
    reader: String,
    provisioner: String,
    writer: String,
    admin: String,
    meter: String,
}

impl Tokens {
    fn of(&self, role: Role) -> &str {
        match role {
            Role::Reader => &self.reader,
            Role::Provisioner => &self.provisioner,
            Role::Writer => &self.writer,
            Role::Admin => &self.admin,
            Role::Meter => &self.meter,
        }
    }
}

/// A server with one token per role, named `<role>-bot`.
async fn spawn_with_roles(db: &TestDb) -> (TestApp, Tokens) {
    let (reader, e1) = make_token("reader-bot", &[Role::Reader]);
    let (provisioner, e2) = make_token("provisioner-bot", &[Role::Provisioner]);
    let (writer, e3) = make_token("writer-bot", &[Role::Writer]);
    let (admin, e4) = make_token("admin-bot", &[Role::Admin]);
    let (meter, e5) = make_token("meter-bot", &[Role::Meter]);
    let app = TestApp::spawn_with(config_with_tokens(db, vec![e1, e2, e3, e4, e5])).await;
    (
        app,
        Tokens {
            reader,
            provisioner,
            writer,
            admin,
            meter,
        },
    )
}

const ROLES: [Role; 5] = [
    Role::Reader,
    Role::Provisioner,
    Role::Writer,
    Role::Admin,
    Role::Meter,
];

backends!(each_role_may_call_exactly_its_rpcs);
async fn each_role_may_call_exactly_its_rpcs(db: TestDb) {
    let (app, tokens) = spawn_with_roles(&db).await;
    let mut admin = app.client_with_token(&tokens.admin).await;
    for role in ROLES {
        let mut c = app.client_with_token(tokens.of(role)).await;
        for rpc in ALL_RPCS {
            // A fresh workspace per call, so every allowed call is valid.
            let ws = register_byok(&mut admin).await;
            let result = call(&mut c, rpc, &ws).await;
            if allowed(role, rpc) {
                if let Err(s) = &result {
                    assert!(
                        !matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied),
                        "{:?}: {role:?} must be allowed {rpc:?}: {s:?}",
                        db.backend
                    );
                    panic!("{:?}: {role:?} {rpc:?} failed: {s:?}", db.backend);
                }
            } else {
                let s = result.expect_err(&format!("{role:?} must be denied {rpc:?}"));
                let msg = assert_error(&s, Code::PermissionDenied, "PERMISSION_DENIED");
                assert!(
                    msg.contains(&format!("{}-bot", role.as_str())),
                    "the message names the token: {msg}"
                );
                // A denied write changed nothing.
                let r = admin
                    .resolve(ResolveRequest {
                        workspace_id: ws.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .resolution
                    .unwrap();
                assert_eq!(r.revision, 1, "{role:?} {rpc:?} changed the record");
            }
        }
    }
    app.stop().await.unwrap();
}

backends!(a_token_with_several_roles_has_the_union_of_their_rights);
async fn a_token_with_several_roles_has_the_union_of_their_rights(db: TestDb) {
    let (both, e1) = make_token("reader-writer", &[Role::Reader, Role::Writer]);
    let (admin, e2) = make_token("root", &[Role::Admin]);
    let app = TestApp::spawn_with(config_with_tokens(&db, vec![e1, e2])).await;
    let mut admin = app.client_with_token(&admin).await;
    let mut c = app.client_with_token(&both).await;
    for rpc in ALL_RPCS {
        let ws = register_byok(&mut admin).await;
        let result = call(&mut c, rpc, &ws).await;
        let expect = allowed(Role::Reader, rpc) || allowed(Role::Writer, rpc);
        match result {
            Ok(()) => assert!(expect, "{rpc:?} must be denied"),
            Err(s) if !expect => {
                assert_error(&s, Code::PermissionDenied, "PERMISSION_DENIED");
            }
            Err(s) => panic!("{rpc:?} must be allowed: {s:?}"),
        }
    }
    app.stop().await.unwrap();
}

backends!(no_token_an_unknown_token_or_a_malformed_header_is_unauthenticated);
async fn no_token_an_unknown_token_or_a_malformed_header_is_unauthenticated(db: TestDb) {
    let (app, tokens) = spawn_with_roles(&db).await;
    let mut admin = app.client_with_token(&tokens.admin).await;
    let ws = register_byok(&mut admin).await;
    let unknown = format!("bmt_{}", "0".repeat(64));
    let mut clients = vec![
        ("no token", anonymous_client(&app).await),
        ("unknown token", app.client_with_token(&unknown).await),
        (
            "a configured token's prefix",
            app.client_with_token(&tokens.admin[..tokens.admin.len() - 1])
                .await,
        ),
        (
            "basic auth",
            raw_header_client(&app, &format!("Basic {}", tokens.admin)).await,
        ),
        ("empty bearer", raw_header_client(&app, "Bearer ").await),
        (
            "token without scheme",
            raw_header_client(&app, &tokens.admin).await,
        ),
    ];
    for (what, c) in &mut clients {
        for rpc in ALL_RPCS {
            let s = call(c, rpc, &ws)
                .await
                .expect_err(&format!("{what}: {rpc:?} must be refused"));
            assert_error(&s, Code::Unauthenticated, "UNAUTHENTICATED");
        }
    }
    // Nothing was written by the refused calls.
    let h = try_history(&mut admin, &ws, 0, "")
        .await
        .expect("History succeeds");
    assert_eq!(h.entries.len(), 1);
    app.stop().await.unwrap();
}

backends!(authentication_and_authorization_come_before_validation);
async fn authentication_and_authorization_come_before_validation(db: TestDb) {
    let (app, tokens) = spawn_with_roles(&db).await;
    let bad = "not-a-uuid";
    let mut anon = anonymous_client(&app).await;
    let mut reader = app.client_with_token(&tokens.reader).await;
    for rpc in ALL_RPCS {
        let s = call(&mut anon, rpc, bad).await.unwrap_err();
        assert_error(&s, Code::Unauthenticated, "UNAUTHENTICATED");
        let s = call(&mut reader, rpc, bad).await.unwrap_err();
        if allowed(Role::Reader, rpc) {
            assert_error(&s, Code::InvalidArgument, "INVALID_WORKSPACE_ID");
        } else {
            assert_error(&s, Code::PermissionDenied, "PERMISSION_DENIED");
        }
    }
    // A request invalid in several ways, with no token: still UNAUTHENTICATED.
    let s = anon
        .set(SetRequest {
            workspace_id: bad.into(),
            override_mode: Some(0),
            runtime: Some("has space".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_error(&s, Code::Unauthenticated, "UNAUTHENTICATED");
    app.stop().await.unwrap();
}

backends!(health_and_reflection_need_no_token);
async fn health_and_reflection_need_no_token(db: TestDb) {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    use tonic_reflection::pb::{v1, v1alpha};

    let (app, _tokens) = spawn_with_roles(&db).await;
    let channel = app.channel().await;

    let mut health = HealthClient::new(channel.clone());
    for service in ["", "molecule.billing.v1.BillingMode"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|s| panic!("health {service:?} without a token: {s:?}"))
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service:?}");
    }

    let mut refl = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection v1 without a token")
        .into_inner();
    let msg = stream.message().await.unwrap().expect("one response");
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        msg.message_response
    else {
        panic!("unexpected reflection response {msg:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.iter().any(|n| n == "molecule.billing.v1.BillingMode"),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n == "grpc.health.v1.Health"),
        "{names:?}"
    );

    let mut refl = v1alpha::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection v1alpha without a token")
        .into_inner();
    let msg = stream.message().await.unwrap().expect("one response");
    assert!(
        format!("{msg:?}").contains("molecule.billing.v1.BillingMode"),
        "{msg:?}"
    );

    // The BillingMode service itself is still closed on the same channel.
    let mut c = billing_mode::proto::billing_mode_client::BillingModeClient::new(channel);
    let s = c
        .resolve(ResolveRequest {
            workspace_id: new_workspace(),
        })
        .await
        .unwrap_err();
    assert_error(&s, Code::Unauthenticated, "UNAUTHENTICATED");
    app.stop().await.unwrap();
}

backends!(the_actor_of_every_change_is_the_token_name);
async fn the_actor_of_every_change_is_the_token_name(db: TestDb) {
    let (app, tokens) = spawn_with_roles(&db).await;
    let mut admin = app.client_with_token(&tokens.admin).await;
    let mut writer = app.client_with_token(&tokens.writer).await;
    let mut reader = app.client_with_token(&tokens.reader).await;
    let ws = register_byok(&mut admin).await; // rev 1, admin-bot
    call(&mut writer, Rpc::SetFields, &ws).await.unwrap(); // rev 2, writer-bot
    call(&mut admin, Rpc::SetOverride, &ws).await.unwrap(); // rev 3, admin-bot
    call(&mut admin, Rpc::Clear, &ws).await.unwrap(); // rev 4, admin-bot

    let h = try_history(&mut reader, &ws, 0, "")
        .await
        .expect("History succeeds");
    let got: Vec<(u64, &str, &str)> = h
        .entries
        .iter()
        .map(|e| (e.revision, e.actor.as_str(), e.reason.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            (4, "admin-bot", "back to derived"),
            (3, "admin-bot", "customer pays, ticket 42"),
            (2, "writer-bot", ""),
            (1, "admin-bot", ""),
        ]
    );
    assert!(h.next_page_token.is_empty());
    let first = h.entries.last().unwrap();
    assert!(first.before.is_none(), "the creating change has no before");
    assert_eq!(first.after.as_ref().unwrap().model, "opus");
    let second = &h.entries[2];
    assert_eq!(second.before.as_ref().unwrap().model, "opus");
    assert_eq!(second.after.as_ref().unwrap().model, "sonnet");
    assert_eq!(h.entries[1].after.as_ref().unwrap().override_mode, "byok");
    assert_eq!(h.entries[0].after.as_ref().unwrap().override_mode, "");
    assert!(h.entries.iter().all(|e| e.time.is_some()));

    // The same, read straight from the database.
    let rows: Vec<(String, String)> = raw_audit_rows(&db)
        .await
        .into_iter()
        .filter(|r| r.workspace_id == ws)
        .map(|r| (r.revision, r.actor))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("1".to_owned(), "admin-bot".to_owned()),
            ("2".to_owned(), "writer-bot".to_owned()),
            ("3".to_owned(), "admin-bot".to_owned()),
            ("4".to_owned(), "admin-bot".to_owned()),
        ]
    );
    app.stop().await.unwrap();
}

backends!(history_pages_newest_first);
async fn history_pages_newest_first(db: TestDb) {
    let (app, tokens) = spawn_with_roles(&db).await;
    let mut admin = app.client_with_token(&tokens.admin).await;
    let mut reader = app.client_with_token(&tokens.reader).await;

    // Five changes: revisions 1..=5.
    let ws = new_workspace();
    for i in 1..=5 {
        admin
            .set(SetRequest {
                workspace_id: ws.clone(),
                runtime: Some("langgraph".into()),
                model: Some(format!("anthropic:model-{i}")),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    let p1 = try_history(&mut reader, &ws, 2, "")
        .await
        .expect("History succeeds");
    let revs = |h: &HistoryResponse| h.entries.iter().map(|e| e.revision).collect::<Vec<_>>();
    assert_eq!(revs(&p1), vec![5, 4]);
    assert!(!p1.next_page_token.is_empty());
    let p2 = try_history(&mut reader, &ws, 2, &p1.next_page_token)
        .await
        .expect("History succeeds");
    assert_eq!(revs(&p2), vec![3, 2]);
    assert!(!p2.next_page_token.is_empty());
    let p3 = try_history(&mut reader, &ws, 2, &p2.next_page_token)
        .await
        .expect("History succeeds");
    assert_eq!(revs(&p3), vec![1]);
    assert!(p3.next_page_token.is_empty(), "the last page has no token");
    assert_eq!(
        p3.entries[0].after.as_ref().unwrap().model,
        "anthropic:model-1"
    );

    // An exact multiple of the page size: the second page is the last.
    let p = try_history(&mut reader, &ws, 5, "")
        .await
        .expect("History succeeds");
    assert_eq!(revs(&p), vec![5, 4, 3, 2, 1]);
    assert!(p.next_page_token.is_empty());

    // page_size 0 means 50.
    let all = try_history(&mut reader, &ws, 0, "")
        .await
        .expect("History succeeds");
    assert_eq!(revs(&all), vec![5, 4, 3, 2, 1]);
    assert!(all.next_page_token.is_empty());
    let big = new_workspace();
    for i in 1..=52 {
        admin
            .set(SetRequest {
                workspace_id: big.clone(),
                model: Some(format!("m{i}")),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let d1 = try_history(&mut reader, &big, 0, "")
        .await
        .expect("History succeeds");
    assert_eq!(d1.entries.len(), 50, "page_size 0 gives 50 entries");
    assert_eq!(d1.entries[0].revision, 52);
    assert_eq!(d1.entries[49].revision, 3);
    assert!(!d1.next_page_token.is_empty());
    let d2 = try_history(&mut reader, &big, 0, &d1.next_page_token)
        .await
        .expect("History succeeds");
    assert_eq!(revs(&d2), vec![2, 1]);
    assert!(d2.next_page_token.is_empty());

    // A garbled page token is INVALID_ARGUMENT; an unknown workspace NOT_FOUND.
    let s = reader
        .history(HistoryRequest {
            workspace_id: ws.clone(),
            page_size: 2,
            page_token: "not-a-token".into(),
        })
        .await
        .unwrap_err();
    assert_error(&s, Code::InvalidArgument, "INVALID_FIELD");
    let s = reader
        .history(HistoryRequest {
            workspace_id: new_workspace(),
            page_size: 2,
            page_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_error(&s, Code::NotFound, "WORKSPACE_NOT_FOUND");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_token_made_by_the_cli_authenticates_as_its_name() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_billing-mode"))
        .args([
            "token",
            "create",
            "--name",
            "ci-reader",
            "--roles",
            "reader",
        ])
        .output()
        .expect("run billing-mode token create");
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let token = stdout
        .lines()
        .find_map(|l| l.strip_prefix("token:"))
        .expect("a token line")
        .trim()
        .to_owned();
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("line:"))
        .expect("a config line")
        .trim()
        .to_owned();
    assert!(line.starts_with("ci-reader sha256:"), "{line}");
    assert!(
        !line.contains(&token),
        "the config line holds the hash only"
    );
    let entries = billing_mode::auth::parse_token_lines(&line, "cli").unwrap();

    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let (admin, e) = make_token("root", &[Role::Admin]);
    let mut tokens = entries;
    tokens.push(e);
    let app = TestApp::spawn_with(config_with_tokens(&db, tokens)).await;
    let mut admin = app.client_with_token(&admin).await;
    let ws = register_byok(&mut admin).await;
    let mut c = app.client_with_token(&token).await;
    call(&mut c, Rpc::Resolve, &ws).await.unwrap();
    let s = call(&mut c, Rpc::SetFields, &ws).await.unwrap_err();
    let msg = assert_error(&s, Code::PermissionDenied, "PERMISSION_DENIED");
    assert!(msg.contains("ci-reader"), "{msg}");
    app.stop().await.unwrap();
}

backends!(a_non_loopback_listener_without_tokens_is_refused);
async fn a_non_loopback_listener_without_tokens_is_refused(db: TestDb) {
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let cfg = billing_mode::config::Config {
            listen: listen.parse().unwrap(),
            ..config(&db)
        };
        let err = match Application::build(cfg).await {
            Ok(_) => panic!("{listen} without tokens must be refused"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains("token"),
            "the message says to configure tokens: {err}"
        );
        assert!(
            err.contains("--insecure-allow-unauthenticated"),
            "the message names the escape hatch: {err}"
        );
    }

    // Explicitly insecure: it builds.
    let cfg = billing_mode::config::Config {
        listen: "0.0.0.0:0".parse().unwrap(),
        insecure_allow_unauthenticated: true,
        ..config(&db)
    };
    let app = Application::build(cfg)
        .await
        .expect("--insecure-allow-unauthenticated builds");
    assert!(app.local_addr().ip().is_unspecified());
    drop(app);

    // With tokens: it builds, and serves authenticated callers.
    let (admin, e) = make_token("root", &[Role::Admin]);
    let cfg = billing_mode::config::Config {
        listen: "0.0.0.0:0".parse().unwrap(),
        ..config_with_tokens(&db, vec![e])
    };
    let app = Application::build(cfg)
        .await
        .expect("with tokens it builds");
    let port = app.local_addr().port();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until(async {
        let _ = rx.await;
    }));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer = billing_mode::client::Bearer::new(Some(&admin)).unwrap();
    let mut c = billing_mode::proto::billing_mode_client::BillingModeClient::with_interceptor(
        channel.clone(),
        bearer,
    );
    register_byok(&mut c).await;
    let mut anon = billing_mode::proto::billing_mode_client::BillingModeClient::new(channel);
    let s = anon
        .resolve(ResolveRequest {
            workspace_id: new_workspace(),
        })
        .await
        .unwrap_err();
    assert_error(&s, Code::Unauthenticated, "UNAUTHENTICATED");
    let _ = tx.send(());
    handle.await.unwrap().unwrap();

    // Loopback without tokens stays allowed (the harness default).
    let app = Application::build(config(&db))
        .await
        .expect("loopback builds");
    assert!(app.local_addr().ip().is_loopback());
}
