//! Abuse resistance, black-box: undecodable protobuf bytes and oversized
//! messages sent over raw gRPC get an error status (never a panic, a hang or
//! a dropped connection for other callers); requests that decode but are
//! invalid get INVALID_ARGUMENT with a reason. Property tests feed arbitrary
//! bytes and arbitrary env maps into the decoders, the edge conversions and
//! the env builder.

use std::time::Duration;

use tokio::sync::oneshot;

use crate::helpers::*;
use billing_mode::{
    domain::{build_env, resolve, Model, Record, Registry, Runtime, Stored, WorkspaceId},
    proto::{
        self, billing_mode_client::BillingModeClient, BuildEnvRequest, ClearRequest,
        CredentialKeys, EnvVar, HistoryRequest, Origin, ResolveRequest, SetRequest,
    },
    service::error::{ApiError, ErrorReason},
    wire::convert,
};
use proptest::prelude::*;
use prost::{
    bytes::{Buf, BufMut},
    Message,
};
use tonic::{
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    transport::{Channel, Endpoint},
    Code, Request, Status,
};

// --- A codec that sends and receives raw bytes --------------------------------

#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut v = vec![0u8; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

const METHODS: [&str; 5] = [
    "/molecule.billing.v1.BillingMode/Resolve",
    "/molecule.billing.v1.BillingMode/Set",
    "/molecule.billing.v1.BillingMode/Clear",
    "/molecule.billing.v1.BillingMode/BuildEnv",
    "/molecule.billing.v1.BillingMode/History",
];

/// One unary call of `path` carrying `body` as the message bytes.
async fn raw_call(channel: Channel, path: &'static str, body: Vec<u8>) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("not ready: {e}")))?;
    let call = grpc.unary(
        Request::new(body),
        PathAndQuery::from_static(path),
        RawCodec,
    );
    tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .map_err(|_| Status::deadline_exceeded("the test's own timeout: the server hung"))?
        .map(|r| r.into_inner())
}

async fn connect(app: &TestApp) -> Channel {
    Endpoint::from_shared(app.endpoint())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap()
}

/// A valid Resolve, as a probe that a connection still serves.
async fn probe(channel: Channel, ws: &str) -> Result<(), Status> {
    let mut c = BillingModeClient::new(channel);
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        c.resolve(ResolveRequest {
            workspace_id: ws.to_owned(),
        }),
    )
    .await
    .map_err(|_| Status::deadline_exceeded("probe timed out"))??;
    assert_eq!(r.into_inner().resolution.unwrap().workspace_id, ws);
    Ok(())
}

/// Bytes no request type decodes.
fn undecodable() -> Vec<(&'static str, Vec<u8>)> {
    let mut rng_bytes = Vec::new();
    let mut x: u32 = 0x9e37_79b9;
    for _ in 0..4096 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        rng_bytes.push((x >> 24) as u8);
    }
    // Make sure it fails: end with a truncated length-delimited field 1.
    rng_bytes.extend_from_slice(&[0x0a, 0x7f]);
    vec![
        ("varint overflow", vec![0xff; 32]),
        ("wire type 7", vec![0x0f]),
        ("truncated string", vec![0x0a, 0x05, b'a']),
        ("string not UTF-8", vec![0x0a, 0x02, 0xff, 0xfe]),
        (
            "length past the end",
            vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f],
        ),
        ("truncated nested message", vec![0x12, 0x03, 0x0a, 0x01]),
        ("group end without start", vec![0x0c]),
        ("field number 0", vec![0x00, 0x01]),
        ("pseudo-random", rng_bytes),
    ]
}

backends!(undecodable_bytes_are_invalid_argument_and_the_server_keeps_serving);
async fn undecodable_bytes_are_invalid_argument_and_the_server_keeps_serving(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut admin = app.client().await;
    let ws = register_byok(&mut admin).await;
    let attacker = connect(&app).await;
    let bystander = connect(&app).await;

    // Another caller on another connection, concurrently.
    let other = {
        let ch = bystander.clone();
        let ws = ws.clone();
        tokio::spawn(async move {
            for _ in 0..30 {
                probe(ch.clone(), &ws).await?;
            }
            Ok::<_, Status>(())
        })
    };
    for (what, bytes) in undecodable() {
        for path in METHODS {
            let status = raw_call(attacker.clone(), path, bytes.clone())
                .await
                .expect_err(&format!("{what} to {path} must fail"));
            // Undecodable bytes are the caller's error, never INTERNAL.
            assert_error(&status, Code::InvalidArgument, "INVALID_FIELD");
            assert!(
                status.message().contains("not valid protobuf"),
                "{:?}: {what} to {path}: {status:?}",
                db.backend
            );
        }
    }
    other
        .await
        .unwrap()
        .expect("the other caller was served throughout");
    // The attacker's own connection still works, and so does a new one.
    probe(attacker, &ws)
        .await
        .expect("the same connection still serves");
    probe(connect(&app).await, &ws)
        .await
        .expect("a new connection is served");
    app.stop().await.unwrap();
}

backends!(unknown_fields_and_the_empty_message_decode);
async fn unknown_fields_and_the_empty_message_decode(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut admin = app.client().await;
    let ws = register_byok(&mut admin).await;
    let ch = connect(&app).await;

    // A valid ResolveRequest followed by unknown fields 15 (varint) and
    // 99 (bytes): accepted, as protobuf requires.
    let mut bytes = ResolveRequest {
        workspace_id: ws.clone(),
    }
    .encode_to_vec();
    bytes.extend_from_slice(&[0x78, 0x01]);
    bytes.extend_from_slice(&[0x9a, 0x06, 0x02, b'h', b'i']);
    let out = raw_call(ch.clone(), METHODS[0], bytes).await.unwrap();
    let resp = proto::ResolveResponse::decode(&out[..]).unwrap();
    assert_eq!(resp.resolution.unwrap().workspace_id, ws);

    // The empty message decodes to all defaults: invalid, not INTERNAL.
    for path in METHODS {
        let status = raw_call(ch.clone(), path, Vec::new()).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{path} with an empty message: {status:?}"
        );
        assert_error(&status, Code::InvalidArgument, "INVALID_WORKSPACE_ID");
    }
    app.stop().await.unwrap();
}

const MIB: usize = 1024 * 1024;

backends!(oversized_messages_are_refused_and_other_callers_are_served);
async fn oversized_messages_are_refused_and_other_callers_are_served(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut admin = app.client().await;
    let ws = register_byok(&mut admin).await;
    let attacker = connect(&app).await;
    let bystander = connect(&app).await;

    let other = {
        let ch = bystander.clone();
        let ws = ws.clone();
        tokio::spawn(async move {
            for _ in 0..20 {
                probe(ch.clone(), &ws).await?;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok::<_, Status>(())
        })
    };

    // Raw bytes, just over the 4 MiB limit.
    let status = raw_call(attacker.clone(), METHODS[3], vec![0u8; 4 * MIB + 1])
        .await
        .expect_err("over 4 MiB must be refused");
    assert!(
        matches!(status.code(), Code::ResourceExhausted | Code::OutOfRange),
        "{:?}: 4 MiB + 1 raw bytes: {status:?}",
        db.backend
    );
    assert_reason(&status, "MESSAGE_TOO_LARGE");
    // Far over the limit.
    let status = raw_call(attacker.clone(), METHODS[3], vec![0x41u8; 16 * MIB])
        .await
        .expect_err("16 MiB must be refused");
    assert!(
        matches!(status.code(), Code::ResourceExhausted | Code::OutOfRange),
        "16 MiB raw bytes: {status:?}"
    );
    assert_reason(&status, "MESSAGE_TOO_LARGE");

    // A well-formed BuildEnvRequest over 4 MiB (every value within its
    // own 64 KiB limit), through the generated client.
    let env: Vec<EnvVar> = (0..80)
        .map(|i| env(Origin::Workspace, &format!("K{i}"), &"v".repeat(60 * 1024)))
        .collect();
    let req = BuildEnvRequest {
        workspace_id: ws.clone(),
        env,
    };
    assert!(req.encoded_len() > 4 * MIB);
    let mut big = BillingModeClient::new(attacker.clone());
    let status = tokio::time::timeout(Duration::from_secs(20), big.build_env(req))
        .await
        .expect("no hang")
        .expect_err("a 4.7 MiB request must be refused");
    assert!(
        matches!(status.code(), Code::ResourceExhausted | Code::OutOfRange),
        "a 4.7 MiB BuildEnvRequest: {status:?}"
    );
    assert_reason(&status, "MESSAGE_TOO_LARGE");

    other
        .await
        .unwrap()
        .expect("the other caller was served throughout");
    probe(bystander, &ws)
        .await
        .expect("the bystander still served");
    probe(attacker, &ws)
        .await
        .expect("the attacker's connection still serves a valid call");
    app.stop().await.unwrap();
}

backends!(a_method_or_service_the_server_does_not_have_is_unimplemented_with_its_reason);
async fn a_method_or_service_the_server_does_not_have_is_unimplemented_with_its_reason(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    for path in [
        // A method a newer client knows and this server does not.
        "/molecule.billing.v1.BillingMode/NoSuchMethod",
        // A service this server does not serve.
        "/molecule.billing.v2.BillingMode/Resolve",
    ] {
        let status = raw_call(connect(&app).await, path, Vec::new())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented, "{path}: {status:?}");
        assert_reason(&status, "UNIMPLEMENTED");
        assert!(
            status.message().contains("no such method"),
            "{path}: a message saying what to check: {status:?}"
        );
    }
    // The connection that asked still serves.
    let mut c = app.client().await;
    let ws = register_byok(&mut c).await;
    probe(connect(&app).await, &ws).await.unwrap();
    app.stop().await.unwrap();
}

/// The status's ErrorInfo has `reason`, in the service's domain.
fn assert_reason(status: &Status, reason: &str) {
    let info = tonic_types::StatusExt::get_details_error_info(status)
        .unwrap_or_else(|| panic!("no ErrorInfo: {status:?}"));
    assert_eq!(info.reason, reason, "{status:?}");
    assert_eq!(info.domain, "billing-mode.molecule", "{status:?}");
}

/// Holds the write lock on `ws`'s record (Postgres: its row; SQLite: the
/// database) for `hold`, so that a write of it waits that long.
async fn hold_write_lock(db: &TestDb, ws: &str, hold: Duration, locked: oneshot::Sender<()>) {
    use sqlx::Connection;
    match db.backend {
        Backend::Sqlite => {
            let mut c = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::query("BEGIN IMMEDIATE")
                .execute(&mut c)
                .await
                .unwrap();
            let _ = locked.send(());
            tokio::time::sleep(hold).await;
            sqlx::query("ROLLBACK").execute(&mut c).await.unwrap();
        }
        Backend::Postgres => {
            let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
            let mut tx = c.begin().await.unwrap();
            sqlx::query("SELECT 1 FROM billing_records WHERE workspace_id = $1::uuid FOR UPDATE")
                .bind(ws)
                .execute(&mut *tx)
                .await
                .unwrap();
            let _ = locked.send(());
            tokio::time::sleep(hold).await;
            tx.rollback().await.unwrap();
        }
    }
}

fn new_model(ws: &str, model: &str) -> SetRequest {
    SetRequest {
        workspace_id: ws.to_owned(),
        model: Some(model.into()),
        ..Default::default()
    }
}

backends!(
    a_call_past_its_deadline_carries_error_info,
    flavor = "multi_thread",
    worker_threads = 4
);
async fn a_call_past_its_deadline_carries_error_info(db: TestDb) {
    let mut config = config(&db);
    config.request_timeout = Duration::from_millis(300);
    let app = TestApp::spawn_with(config).await;
    let mut c = app.client().await;
    let ws = register_byok(&mut c).await;

    // The server's deadline (--request-timeout).
    let (locked, is_locked) = oneshot::channel();
    let holder = {
        let (db, ws) = (TestDb::at(db.backend, db.url.clone()), ws.clone());
        tokio::spawn(async move { hold_write_lock(&db, &ws, Duration::from_secs(2), locked).await })
    };
    is_locked.await.unwrap();
    let status = c.set(new_model(&ws, "sonnet")).await.unwrap_err();
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
    assert_eq!(status.message(), "Timeout expired");
    assert_reason(&status, "DEADLINE_EXCEEDED");
    holder.await.unwrap();

    // A call within its deadline is answered as always.
    c.set(new_model(&ws, "opus-2")).await.unwrap();
    app.stop().await.unwrap();
}

backends!(a_request_that_decodes_but_is_invalid_is_invalid_argument_with_its_reason);
async fn a_request_that_decodes_but_is_invalid_is_invalid_argument_with_its_reason(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut c = app.client().await;
    let ws = register_byok(&mut c).await;
    let w = || ws.clone();
    let long = "m".repeat(257);

    let sets: Vec<(&str, SetRequest, &str)> = vec![
        (
            "bad workspace id",
            SetRequest {
                workspace_id: "6b66de8d93374fb4be8d6d49dca0d809".into(),
                model: Some("opus".into()),
                ..Default::default()
            },
            "INVALID_WORKSPACE_ID",
        ),
        (
            "override 0",
            SetRequest {
                workspace_id: w(),
                override_mode: Some(0),
                reason: "r".into(),
                ..Default::default()
            },
            "INVALID_MODE",
        ),
        (
            "override 99",
            SetRequest {
                workspace_id: w(),
                override_mode: Some(99),
                reason: "r".into(),
                ..Default::default()
            },
            "INVALID_MODE",
        ),
        (
            "negative override",
            SetRequest {
                workspace_id: w(),
                override_mode: Some(-1),
                reason: "r".into(),
                ..Default::default()
            },
            "INVALID_MODE",
        ),
        (
            "runtime with a space",
            SetRequest {
                workspace_id: w(),
                runtime: Some("claude code".into()),
                ..Default::default()
            },
            "INVALID_FIELD",
        ),
        (
            "model with a control character",
            SetRequest {
                workspace_id: w(),
                model: Some("op\u{7}us".into()),
                ..Default::default()
            },
            "INVALID_FIELD",
        ),
        (
            "model too long",
            SetRequest {
                workspace_id: w(),
                model: Some(long.clone()),
                ..Default::default()
            },
            "INVALID_FIELD",
        ),
        (
            "bad credential key",
            SetRequest {
                workspace_id: w(),
                credential_keys: Some(CredentialKeys {
                    keys: vec!["NOT-A-KEY".into()],
                }),
                ..Default::default()
            },
            "INVALID_ENV_KEY",
        ),
        (
            "65 credential keys",
            SetRequest {
                workspace_id: w(),
                credential_keys: Some(CredentialKeys {
                    keys: (0..65).map(|i| format!("K{i}")).collect(),
                }),
                ..Default::default()
            },
            "LIMIT_EXCEEDED",
        ),
        (
            "100000 credential keys",
            SetRequest {
                workspace_id: w(),
                credential_keys: Some(CredentialKeys {
                    keys: (0..100_000).map(|i| format!("K{i}")).collect(),
                }),
                ..Default::default()
            },
            "LIMIT_EXCEEDED",
        ),
        (
            "nothing to set",
            SetRequest {
                workspace_id: w(),
                expected_revision: Some(1),
                reason: "r".into(),
                ..Default::default()
            },
            "NOTHING_TO_SET",
        ),
        (
            "override without a reason",
            SetRequest {
                workspace_id: w(),
                override_mode: Some(2),
                reason: " \t\n".into(),
                ..Default::default()
            },
            "REASON_REQUIRED",
        ),
    ];
    for (what, req, reason) in sets {
        let s = c.set(req).await.expect_err(what);
        assert_error(&s, Code::InvalidArgument, reason);
    }

    let s = c
        .clear(ClearRequest {
            workspace_id: w(),
            expected_revision: None,
            reason: String::new(),
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_error(&s, Code::InvalidArgument, "REASON_REQUIRED");
    let s = c
        .clear(ClearRequest {
            workspace_id: "x".into(),
            expected_revision: None,
            reason: "r".into(),
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_error(&s, Code::InvalidArgument, "INVALID_WORKSPACE_ID");

    let e = |o: Origin, k: &str, v: &str| env(o, k, v);
    let builds: Vec<(&str, Vec<EnvVar>, &str)> = vec![
        (
            "bad key",
            vec![e(Origin::Workspace, "A-B", "v")],
            "INVALID_ENV_KEY",
        ),
        (
            "empty key",
            vec![e(Origin::Workspace, "", "v")],
            "INVALID_ENV_KEY",
        ),
        (
            "key too long",
            vec![e(Origin::Workspace, &"K".repeat(257), "v")],
            "INVALID_ENV_KEY",
        ),
        (
            "duplicate",
            vec![e(Origin::Global, "A", "1"), e(Origin::Global, "A", "2")],
            "DUPLICATE_ENV_KEY",
        ),
        (
            "value too long",
            vec![e(Origin::Workspace, "A", &"v".repeat(64 * 1024 + 1))],
            "LIMIT_EXCEEDED",
        ),
        (
            "1025 entries",
            (0..1025)
                .map(|i| e(Origin::Workspace, &format!("K{i}"), ""))
                .collect(),
            "LIMIT_EXCEEDED",
        ),
        (
            "100000 entries",
            (0..100_000)
                .map(|i| e(Origin::Workspace, &format!("K{i}"), ""))
                .collect(),
            "LIMIT_EXCEEDED",
        ),
        (
            "origin unspecified",
            vec![e(Origin::Unspecified, "A", "v")],
            "INVALID_FIELD",
        ),
        (
            "origin authority",
            vec![e(Origin::Authority, "A", "v")],
            "INVALID_FIELD",
        ),
        (
            "origin 42",
            vec![EnvVar {
                key: "A".into(),
                value: "v".into(),
                origin: 42,
            }],
            "INVALID_FIELD",
        ),
    ];
    for (what, env, reason) in builds {
        let s = c
            .build_env(BuildEnvRequest {
                workspace_id: w(),
                env,
            })
            .await
            .expect_err(what);
        assert_error(&s, Code::InvalidArgument, reason);
    }
    // Validation comes before I/O: an unknown workspace with a bad env
    // is INVALID_ARGUMENT, not NOT_FOUND.
    let s = c
        .build_env(BuildEnvRequest {
            workspace_id: new_workspace(),
            env: vec![e(Origin::Workspace, "A-B", "v")],
        })
        .await
        .unwrap_err();
    assert_error(&s, Code::InvalidArgument, "INVALID_ENV_KEY");

    for (token, reason) in [("abc", "INVALID_FIELD"), ("0", "INVALID_FIELD")] {
        let s = c
            .history(HistoryRequest {
                workspace_id: w(),
                page_size: 1,
                page_token: token.into(),
            })
            .await
            .unwrap_err();
        assert_error(&s, Code::InvalidArgument, reason);
    }
    // A huge page size is capped, not an error.
    c.history(HistoryRequest {
        workspace_id: w(),
        page_size: u32::MAX,
        page_token: String::new(),
    })
    .await
    .unwrap();
    let s = c
        .resolve(ResolveRequest {
            workspace_id: format!("{ws} "),
        })
        .await
        .unwrap_err();
    assert_error(&s, Code::InvalidArgument, "INVALID_WORKSPACE_ID");
    app.stop().await.unwrap();
}

// --- Property tests: decoders, conversions and the env builder ------------------

fn registry() -> &'static Registry {
    static R: std::sync::OnceLock<Registry> = std::sync::OnceLock::new();
    R.get_or_init(|| Registry::builtin().expect("the built-in registry loads"))
}

fn assert_invalid_argument(what: &str, e: &ApiError) {
    assert_eq!(
        e.reason.code(),
        Code::InvalidArgument,
        "{what}: a request that decodes but is invalid must be INVALID_ARGUMENT: {e:?}"
    );
}

/// Records to build envs for: every mode, source and runtime shape,
/// including garbled stored text (loaded as the store loads it).
fn records(id: WorkspaceId) -> Vec<Record> {
    let f = |rt: Option<&str>, m: Option<&str>, keys: &[&str], o: Option<&str>| Record {
        workspace_id: id,
        runtime: Stored::from_text(rt, Runtime::parse),
        model: Stored::from_text(m, Model::parse),
        credential_keys: Stored::from_names(keys),
        override_mode: Stored::from_text(o, |s| s.parse()),
        revision: 3,
    };
    vec![
        f(
            Some("claude-code"),
            Some("opus"),
            &["CLAUDE_CODE_OAUTH_TOKEN"],
            None,
        ),
        f(Some("claude-code"), Some("claude-sonnet-4-6"), &[], None),
        f(
            Some("claude-code"),
            Some("claude-sonnet-4-6"),
            &["ANTHROPIC_API_KEY"],
            None,
        ),
        f(
            Some("langgraph"),
            Some("anthropic:claude-sonnet-4-6"),
            &[],
            None,
        ),
        f(
            Some("langgraph"),
            Some("openai:gpt-4o"),
            &["OPENAI_API_KEY"],
            None,
        ),
        f(Some("hermes"), Some("openai/gpt-4o"), &[], None),
        f(Some("hermes"), Some("gemini/x"), &["GEMINI_API_KEY"], None),
        f(None, None, &[], None),
        f(Some("unknown-runtime"), Some("whatever"), &[], Some("byok")),
        f(
            Some("claude-code"),
            Some("opus"),
            &[],
            Some("platform_managed"),
        ),
        f(
            Some("langgraph"),
            Some("openai:gpt-4o"),
            &[],
            Some("disabled"),
        ),
        f(
            Some("claude code"),
            Some("opus"),
            &["NOT-A-KEY"],
            Some("BYOK"),
        ),
    ]
}

fn origin() -> impl Strategy<Value = i32> {
    prop_oneof![4 => 1..=3i32, 1 => any::<i32>(), 1 => 0..=4i32]
}

fn key() -> impl Strategy<Value = String> {
    let known: Vec<String> = [
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_AUTH_TOKEN",
        "ANTHROPIC_BASE_URL",
        "CLAUDE_CODE_OAUTH_TOKEN",
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "OPENROUTER_API_KEY",
        "GEMINI_API_KEY",
        "MOLECULE_LLM_ANTHROPIC_BASE_URL",
        "MOLECULE_LLM_OPENAI_BASE_URL",
        "MOLECULE_LLM_USAGE_TOKEN",
        "MOLECULE_LLM_BILLING_MODE",
        "MOLECULE_LLM_BILLING_MODE_RESOLVED",
        "MOLECULE_LLM_SOMETHING",
        "MODEL_PROVIDER",
        "HERMES_DEFAULT_MODEL",
        "PATH",
        "APP_SECRET",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    prop_oneof![
        6 => proptest::sample::select(known),
        2 => "[A-Za-z_][A-Za-z0-9_]{0,10}",
        1 => ".{0,12}",
    ]
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => Just(String::new()),
        3 => "[a-z0-9:/._-]{1,16}",
        2 => proptest::sample::select(vec![
            "opus".to_string(),
            "sonnet".to_string(),
            "claude-sonnet-4-6".to_string(),
            "anthropic:claude-sonnet-4-6".to_string(),
            "openai:gpt-4o".to_string(),
            "openai/gpt-4o".to_string(),
            "gemini/x".to_string(),
            "https://proxy.test".to_string(),
        ]),
        1 => ".{0,24}",
    ]
}

fn env_vars() -> impl Strategy<Value = Vec<EnvVar>> {
    proptest::collection::vec(
        (key(), value(), origin()).prop_map(|(key, value, origin)| EnvVar { key, value, origin }),
        0..24,
    )
}

/// Converts a decoded BuildEnvRequest and builds the env for each record:
/// never a panic; INVALID_ARGUMENT at the edge, FAILED_PRECONDITION from the
/// builder, and a well-formed env on success.
fn check_build_env(req: &BuildEnvRequest) {
    let _ = convert::workspace_id(&req.workspace_id).map_err(|e| {
        assert_invalid_argument("workspace_id", &e);
    });
    let candidate = match convert::candidate_env(req.env.clone()) {
        Ok(c) => c,
        Err(e) => return assert_invalid_argument("candidate_env", &e),
    };
    let id = WorkspaceId::parse("6b66de8d-9337-4fb4-be8d-6d49dca0d809").unwrap();
    for record in records(id) {
        let resolution = resolve(&record, registry());
        match build_env(&resolution, &record, registry(), candidate.clone()) {
            Ok(built) => {
                let keys: Vec<&str> = built.env.iter().map(|e| e.key.as_str()).collect();
                let mut sorted = keys.clone();
                sorted.sort_unstable();
                sorted.dedup();
                assert_eq!(keys, sorted, "the env is sorted by key, each key once");
                let mode = built
                    .env
                    .iter()
                    .find(|e| e.key == "MOLECULE_LLM_BILLING_MODE")
                    .map(|e| e.value.as_str());
                assert_eq!(mode, Some(resolution.mode.as_str()));
                for entry in &built.env {
                    if registry().is_llm_key(&entry.key) {
                        assert!(
                            resolution.mode == billing_mode::domain::Mode::Byok
                                && entry.origin == billing_mode::domain::Origin::Workspace
                                || entry.origin == billing_mode::domain::Origin::Authority,
                            "{:?}: LLM key {} kept with origin {:?}",
                            resolution.mode,
                            entry.key,
                            entry.origin
                        );
                    }
                }
            }
            Err(e) => {
                let api = ApiError::from(e);
                assert!(
                    matches!(
                        api.reason,
                        ErrorReason::ModelMismatch
                            | ErrorReason::MissingByokCredential
                            | ErrorReason::MissingPlatformProxy
                    ),
                    "the builder fails only with a precondition: {api:?}"
                );
                assert_eq!(api.reason.code(), Code::FailedPrecondition);
            }
        }
    }
}

fn check_set(req: &SetRequest) {
    if let Err(e) = convert::set_request(req) {
        assert_invalid_argument("set_request", &e);
    }
}

fn check_clear(req: &ClearRequest) {
    if let Err(e) = convert::clear_request(req) {
        assert_invalid_argument("clear_request", &e);
    }
}

fn check_history(req: &HistoryRequest) {
    if let Err(e) = convert::workspace_id(&req.workspace_id) {
        assert_invalid_argument("history workspace_id", &e);
    }
    if let Err(e) = convert::page_token(&req.page_token) {
        assert_invalid_argument("page_token", &e);
    }
    let size = convert::page_size(req.page_size);
    assert!((1..=500).contains(&size));
}

fn workspace_id_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just("6b66de8d-9337-4fb4-be8d-6d49dca0d809".to_string()),
        1 => Just("6B66DE8D-9337-4FB4-BE8D-6D49DCA0D809".to_string()),
        2 => "[0-9a-fA-F-]{30,40}",
        1 => ".{0,40}",
    ]
}

fn name_text() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(prop_oneof![
        3 => "[a-z0-9:/._-]{0,20}",
        1 => ".{0,20}",
        1 => "[a-z]{250,260}",
    ])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic_the_decoders_or_conversions(
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        if let Ok(r) = proto::ResolveRequest::decode(&bytes[..]) {
            if let Err(e) = convert::workspace_id(&r.workspace_id) {
                assert_invalid_argument("resolve workspace_id", &e);
            }
        }
        if let Ok(r) = proto::SetRequest::decode(&bytes[..]) {
            check_set(&r);
        }
        if let Ok(r) = proto::ClearRequest::decode(&bytes[..]) {
            check_clear(&r);
        }
        if let Ok(r) = proto::HistoryRequest::decode(&bytes[..]) {
            check_history(&r);
        }
        if let Ok(r) = proto::BuildEnvRequest::decode(&bytes[..]) {
            check_build_env(&r);
        }
    }

    #[test]
    fn arbitrary_build_env_requests_never_panic_and_fail_with_a_reason(
        workspace_id in workspace_id_text(),
        env in env_vars(),
    ) {
        let req = BuildEnvRequest { workspace_id, env };
        // Through the wire form, as the server sees it.
        let decoded = BuildEnvRequest::decode(&req.encode_to_vec()[..]).unwrap();
        prop_assert_eq!(&decoded, &req);
        check_build_env(&decoded);
    }

    #[test]
    fn arbitrary_set_and_clear_requests_are_ok_or_invalid_argument(
        workspace_id in workspace_id_text(),
        override_mode in proptest::option::of(prop_oneof![0..=3i32, any::<i32>()]),
        runtime in name_text(),
        model in name_text(),
        keys in proptest::option::of(proptest::collection::vec(key(), 0..70)),
        expected_revision in proptest::option::of(any::<u64>()),
        reason in prop_oneof![Just(String::new()), Just("  ".to_string()), ".{0,30}", "[a-z]{1020,1030}"],
        page_token in prop_oneof![Just(String::new()), "[0-9]{1,22}", ".{0,8}"],
        page_size in any::<u32>(),
    ) {
        let set = SetRequest {
            workspace_id: workspace_id.clone(),
            override_mode,
            runtime,
            model,
            credential_keys: keys.map(|keys| CredentialKeys { keys }),
            expected_revision,
            reason: reason.clone(),
         dry_run: false, };
        check_set(&SetRequest::decode(&set.encode_to_vec()[..]).unwrap());
        check_clear(&ClearRequest { workspace_id: workspace_id.clone(), expected_revision, reason, dry_run: false });
        check_history(&HistoryRequest { workspace_id, page_size, page_token });
    }
}
