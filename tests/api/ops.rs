//! Operating the server: the admin port (/healthz, /readyz, /metrics), gRPC
//! health that follows the store, `promtool check metrics` on the real
//! output, migrations left to a separate step, token rotation on SIGHUP, and
//! giving up on an unreachable store at start-up.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{helpers::*, private_postgres::PrivatePostgres, server_process::ServerProcess};
use billing_mode::{
    config::Config,
    proto::{billing_mode_client::BillingModeClient, Mode, Origin},
    startup::Application,
};
use tonic::Code;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

const SERVICE: &str = "molecule.billing.v1.BillingMode";

// ---------------------------------------------------------------------------
// Helpers

/// One plain HTTP/1.1 GET: (status code, body).
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read the admin answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    (status, body.to_owned())
}

async fn get(addr: SocketAddr, path: &'static str) -> (u16, String) {
    tokio::task::spawn_blocking(move || http_get(addr, path))
        .await
        .unwrap()
}

async fn health(addr: SocketAddr, service: &str) -> ServingStatus {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect for health");
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .expect("health answers");
    resp.into_inner().status()
}

/// Polls until both the overall and the service's health are `want`
/// (bounded generously: the store is probed every few seconds).
async fn wait_for_health(addr: SocketAddr, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let overall = health(addr, "").await;
        let service = health(addr, SERVICE).await;
        if overall == want && service == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "health stayed {overall:?}/{service:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The value of the sample `name{labels}` (labels exactly as printed).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Runs `promtool check metrics` on `text`. `None` (after saying so loudly)
/// when promtool is missing outside CI; under CI that is a failure.
fn promtool_check(text: &str) -> Option<()> {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run promtool: install the Debian package `prometheus` (.ci/run does)"
            );
            loud("SKIPPED: promtool check metrics: promtool is not installed (apt-get install prometheus)");
            return None;
        }
        Err(e) => panic!("running promtool: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- the output checked:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(())
}

// ---------------------------------------------------------------------------
// The decision log of the server process

backends!(each_decision_line_is_out_while_the_server_runs_and_none_is_lost_at_exit);
async fn each_decision_line_is_out_while_the_server_runs_and_none_is_lost_at_exit(db: TestDb) {
    // The binary's own runtime, whose workers hold their lines and write
    // them out many at a time (src/telemetry/lines.rs).
    let app = ServerProcess::start(&db.url, &[], &[]);
    let mut c = BillingModeClient::connect(format!("http://{}", app.addr))
        .await
        .expect("connect to the server");
    let ws = new_workspace();
    set_override(&mut c, &ws, Mode::Disabled, "decision lines").await;
    let lines = |log: &str| {
        log.lines()
            .filter(|l| l.contains(r#"rpc="Resolve""#) && l.contains(&ws))
            .count()
    };

    // One call at a time: each line is out while the server runs, with no
    // other call or shutdown to push it out.
    for made in 1..=3 {
        resolve(&mut c, &ws).await;
        let start = Instant::now();
        while lines(&app.log()) < made {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "decision {made} is not in the log of the running server:\n{}",
                app.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    // Many at once, and the server stopped as soon as they are answered:
    // every line is in the log when it has exited.
    let calls: Vec<_> = (0..300)
        .map(|_| {
            let (mut c, ws) = (c.clone(), ws.clone());
            tokio::spawn(async move { resolve(&mut c, &ws).await })
        })
        .collect();
    for call in calls {
        call.await.expect("a Resolve task");
    }
    // The server finishes its open connections before it exits: the
    // client's is closed by this runtime while the wait blocks elsewhere.
    drop(c);
    // Stopped, with its log read to the end.
    let (status, app) = app.stop().await;
    assert!(status.success(), "{status:?}");
    assert_eq!(lines(&app.log()), 303, "{}", app.log());
}

backends!(the_log_level_decides_which_lines_the_server_writes);
async fn the_log_level_decides_which_lines_the_server_writes(db: TestDb) {
    // The harness needs the start-up module's ready line. Then: no decision
    // line; decision lines by their target; everything at DEBUG.
    let startup = "billing_mode::startup=info";
    for (level, decisions, debug) in [
        (format!("{startup},warn"), false, false),
        (
            format!("{startup},billing_mode::decision=info,warn"),
            true,
            false,
        ),
        ("debug".to_owned(), true, true),
    ] {
        let app = ServerProcess::start(&db.url, &[], &[("BILLING_MODE_LOG", &level)]);
        let mut c = BillingModeClient::connect(format!("http://{}", app.addr))
            .await
            .expect("connect to the server");
        let ws = new_workspace();
        set_override(&mut c, &ws, Mode::Disabled, "log level").await;
        resolve(&mut c, &ws).await;
        drop(c);
        let (status, app) = app.stop().await;
        assert!(status.success(), "{status:?}");
        let log = app.log();
        assert!(log.contains("WARN"), "{level}: no warning:\n{log}");
        // INFO of another module: written only at DEBUG here.
        assert_eq!(
            log.contains(" INFO billing_mode::health"),
            debug,
            "{level}: INFO lines of health:\n{log}"
        );
        let decision = log.contains(r#"rpc="Resolve""#) && log.contains(&ws);
        assert_eq!(decision, decisions, "{level}: decision line:\n{log}");
        assert_eq!(
            log.contains(" DEBUG "),
            debug,
            "{level}: DEBUG lines:\n{log}"
        );
    }
}

/// Runs `billing-mode ARGS` with `envs` (and no `RUST_LOG` but those) and
/// waits for it to exit, killing it (a failure) if it still runs after
/// `bound`: (exit status, stderr, how long it ran).
fn run_to_exit(
    args: &[&str],
    envs: &[(&str, &str)],
    bound: Duration,
) -> (std::process::ExitStatus, String, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut child = Command::new(binary())
        .current_dir(dir.path())
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("BILLING_MODE_LOG")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run billing-mode");
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > bound {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "billing-mode {args:?} {envs:?} still ran after {bound:?}:\n{}",
                reader.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let ran = started.elapsed();
    (status, reader.join().unwrap(), ran)
}

backends!(sqlite: a_log_filter_that_is_not_a_level_is_refused_at_start_up);
/// `warning` is no level: `EnvFilter` would take it for a target and turn
/// every line off, the decision log's included. The server refuses it,
/// saying which setting and what it accepts; valid forms start as always.
async fn a_log_filter_that_is_not_a_level_is_refused_at_start_up(db: TestDb) {
    let serve = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "off",
        "--database-url",
        &db.url,
    ];
    let flag = |value: &'static str| {
        let mut args = vec!["--log-level", value];
        args.extend(serve);
        args
    };
    for (args, envs, named) in [
        (flag("warning"), vec![], "`warning`"),
        (flag("info,billing_mode"), vec![], "`billing_mode`"),
        (
            serve.to_vec(),
            vec![("BILLING_MODE_LOG", "warning")],
            "`warning`",
        ),
    ] {
        let (status, stderr, _) = run_to_exit(&args, &envs, Duration::from_secs(30));
        assert!(
            !status.success(),
            "{args:?} {envs:?} must exit non-zero:\n{stderr}"
        );
        for part in [
            named,
            "--log-level or BILLING_MODE_LOG",
            "error|warn|info|debug|trace|off",
            "target=level",
            "comma-separated",
        ] {
            assert!(
                stderr.contains(part),
                "{args:?} {envs:?}: no {part}:\n{stderr}"
            );
        }
    }

    // Valid forms start: a level and target=level directives by the flag;
    // a RUST_LOG that is no filter is ignored, as before, and said so.
    for (args, envs, said) in [
        (
            vec!["--log-level", "billing_mode::startup=info,WARN"],
            vec![],
            None,
        ),
        (
            vec![],
            vec![("RUST_LOG", "warning")],
            Some("RUST_LOG ignored"),
        ),
    ] {
        let app = ServerProcess::start(&db.url, &args, &envs);
        let (status, app) = app.stop().await;
        let log = app.log();
        assert!(status.success(), "{args:?} {envs:?}: {status:?}\n{log}");
        if let Some(said) = said {
            assert!(
                log.lines()
                    .any(|l| l.contains(" WARN ") && l.contains(said)),
                "{envs:?}: {said}:\n{log}"
            );
        }
    }
}

backends!(postgres: more_reads_in_flight_than_read_connections_are_capped_and_said_so);
/// `--db-reads-in-flight` above `--db-max-connections` cannot run: the
/// server runs as many as it has connections and says so at start-up; a
/// setting that fits is used without a word.
async fn more_reads_in_flight_than_read_connections_are_capped_and_said_so(db: TestDb) {
    let warning = "reads in flight capped at the read connections";
    for (reads_in_flight, warned) in [("5", true), ("2", false)] {
        let app = ServerProcess::start(
            &db.url,
            &[
                "--db-max-connections",
                "2",
                "--db-reads-in-flight",
                reads_in_flight,
            ],
            &[],
        );
        let (status, app) = app.stop().await;
        assert!(status.success(), "{status:?}");
        let log = app.log();
        let line = log.lines().find(|l| l.contains(warning));
        assert_eq!(line.is_some(), warned, "{reads_in_flight}:\n{log}");
        if let Some(line) = line {
            assert!(
                line.contains(" WARN ")
                    && line.contains("db_reads_in_flight=5")
                    && line.contains("db_max_connections=2"),
                "{line}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Admin port and metrics

backends!(the_admin_port_answers_probes_and_serves_metrics_promtool_accepts);
async fn the_admin_port_answers_probes_and_serves_metrics_promtool_accepts(db: TestDb) {
    // A server process of its own: the metrics registry is the
    // process's, and the other tests of this binary make decisions too.
    let app = ServerProcess::start(&db.url, &[], &[]);
    let admin = app.admin_addr.expect("the harness turns the admin port on");
    let addr: SocketAddr = app.addr.parse().unwrap();
    let mut c = BillingModeClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to the server");

    assert_eq!(get(admin, "/healthz").await, (200, "ok\n".to_owned()));
    let (code, body) = get(admin, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    for condition in ["store reachable", "migrations applied", "accepting calls"] {
        assert!(
            body.contains(&format!("ok:     {condition}")),
            "{condition}: {body}"
        );
    }
    assert_eq!(get(admin, "/nope").await.0, 404);
    assert_eq!(health(addr, "").await, ServingStatus::Serving);
    assert_eq!(health(addr, SERVICE).await, ServingStatus::Serving);

    let before = get(admin, "/metrics").await.1;
    // A decision with labels no other test here produces, a refusal, and
    // an unknown workspace.
    let ws = new_workspace();
    set_override(&mut c, &ws, Mode::Disabled, "ops test").await;
    for _ in 0..2 {
        build(
            &mut c,
            &ws,
            vec![env(Origin::Global, "GIT_AUTHOR_NAME", "x")],
        )
        .await
        .expect("BuildEnv on a disabled workspace");
    }
    let missing = new_workspace();
    let err = try_resolve(&mut c, &missing).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let (code, after) = get(admin, "/metrics").await;
    assert_eq!(code, 200);
    let delta = |series: &str| {
        sample(&after, series).unwrap_or(0.0) - sample(&before, series).unwrap_or(0.0)
    };
    assert_eq!(
        delta(r#"billing_mode_decisions_total{mode="disabled",rpc="BuildEnv",source="OVERRIDE"}"#),
        2.0,
        "{after}"
    );
    assert!(
        delta(r#"billing_mode_refusals_total{reason="WORKSPACE_NOT_FOUND",rpc="Resolve"}"#) >= 1.0,
        "{after}"
    );
    assert!(
        delta(
            r#"rpc_server_call_duration_seconds_count{rpc_grpc_status_code="0",rpc_method="BuildEnv",rpc_service="molecule.billing.v1.BillingMode",rpc_system="grpc"}"#
        ) >= 2.0,
        "{after}"
    );
    assert!(
        delta(
            r#"rpc_server_call_duration_seconds_count{rpc_grpc_status_code="5",rpc_method="Resolve",rpc_service="molecule.billing.v1.BillingMode",rpc_system="grpc"}"#
        ) >= 1.0,
        "{after}"
    );
    assert!(
        delta(
            r#"billing_mode_store_operation_duration_seconds_count{operation="load",outcome="ok"}"#
        ) >= 2.0,
        "{after}"
    );
    // The loads above read one at a time, each its own Postgres statement;
    // SQLite's reads are not counted.
    let loads_read = delta("billing_mode_store_loads_per_read_sum");
    let statements = delta("billing_mode_store_loads_per_read_count");
    match db.backend {
        Backend::Postgres => assert!(statements >= 2.0 && loads_read >= statements, "{after}"),
        Backend::Sqlite => assert_eq!((statements, loads_read), (0.0, 0.0), "{after}"),
    }
    assert!(after.contains("billing_mode_store_pool_connections{state=\"idle\"}"));
    assert!(after.contains("billing_mode_store_pool_connections{state=\"in_use\"}"));
    assert!(after.contains("# TYPE billing_mode_spend_snapshot_repairs_total counter"));
    assert!(after.contains(&format!(
        "billing_mode_build_info{{git_commit=\"{}\",version=\"{}\"}} 1",
        billing_mode::metrics::GIT_COMMIT,
        env!("CARGO_PKG_VERSION")
    )));
    // No label carries a workspace id or a value.
    for secret in [ws.as_str(), missing.as_str(), "GIT_AUTHOR_NAME", "ops test"] {
        assert!(!after.contains(secret), "{secret} in /metrics");
    }
    promtool_check(&after);
    // The server finishes its open connections before it exits: the
    // client's is closed by this runtime while the wait blocks elsewhere.
    drop(c);
    let (status, app) = app.stop().await;
    assert!(status.success(), "{status}:\n{}", app.log());
    drop(db); // it owns the SQLite file: kept until the server is gone
}

/// Holds the write lock on `ws`'s record (SQLite: the database's) until
/// `release` fires; `locked` fires once it is held.
async fn hold_write_lock(
    db: &TestDb,
    ws: &str,
    locked: tokio::sync::oneshot::Sender<()>,
    release: tokio::sync::oneshot::Receiver<()>,
) {
    use sqlx::Connection;
    match db.backend {
        Backend::Sqlite => {
            let mut c = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::query("BEGIN IMMEDIATE")
                .execute(&mut c)
                .await
                .unwrap();
            let _ = locked.send(());
            let _ = release.await;
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
            let _ = release.await;
            tx.rollback().await.unwrap();
        }
    }
}

/// Holds `ws`'s record locked for writing (from another connection) once
/// this returns, until `release` is sent; the task ends after that.
async fn lock_record(
    db: &TestDb,
    ws: &str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (locked, is_locked) = tokio::sync::oneshot::channel();
    let (release, released) = tokio::sync::oneshot::channel();
    let holder = {
        let (db, ws) = (TestDb::at(db.backend, db.url.clone()), ws.to_owned());
        tokio::spawn(async move { hold_write_lock(&db, &ws, locked, released).await })
    };
    is_locked.await.unwrap();
    (release, holder)
}

/// A plaintext client of the server at `addr`, connected.
async fn plain_client(
    addr: impl std::fmt::Display,
) -> BillingModeClient<tonic::transport::Channel> {
    BillingModeClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
}

/// A Set of `ws`'s model, sent on a task of its own (to wait on a row lock).
fn set_in_flight(
    mut c: BillingModeClient<tonic::transport::Channel>,
    ws: &str,
) -> tokio::task::JoinHandle<Result<tonic::Response<billing_mode::proto::SetResponse>, tonic::Status>>
{
    let ws = ws.to_owned();
    tokio::spawn(async move {
        c.set(billing_mode::proto::SetRequest {
            workspace_id: ws,
            model: Some("sonnet".into()),
            reason: "in flight".into(),
            ..Default::default()
        })
        .await
    })
}

backends!(postgres: a_stop_lets_the_call_in_flight_finish_and_refuses_new_connections);
/// A graceful stop: a call already running when the stop comes (a write
/// waiting for a row lock) is answered, new connections are refused at
/// once, and the stop completes once the call has.
async fn a_stop_lets_the_call_in_flight_finish_and_refuses_new_connections(db: TestDb) {
    let name = format!("graceful-{}", &new_workspace()[..8]);
    let app = TestApp::spawn_with(db.config_named(&name)).await;
    let addr = app.addr;
    let mut c = app.client().await;
    let ws = new_workspace();
    set_override(&mut c, &ws, Mode::Disabled, "start").await;

    let (release, holder) = lock_record(&db, &ws).await;
    let in_flight = set_in_flight(c.clone(), &ws);
    // In flight: the server's write waits for the row lock.
    let monitor = {
        use sqlx::Connection;
        sqlx::PgConnection::connect(&db.url).await.unwrap()
    };
    let mut monitor = monitor;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = $1 AND wait_event_type = 'Lock'",
        )
        .bind(&name)
        .fetch_one(&mut monitor)
        .await
        .unwrap();
        if waiting == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the Set never waited for the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let stopping = tokio::spawn(app.stop());
    // New connections are refused while the call is still running.
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after the stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!in_flight.is_finished() && !stopping.is_finished());

    let _ = release.send(());
    holder.await.unwrap();
    let answer = in_flight
        .await
        .unwrap()
        .expect("the call in flight is answered")
        .into_inner();
    assert_eq!(answer.resolution.expect("a resolution").revision, 2);
    stopping
        .await
        .unwrap()
        .expect("the stop completes once the call has");
}

backends!(a_call_past_the_server_deadline_is_counted_as_the_answer_the_caller_received);
/// The server's deadline answers `CANCELLED` with reason
/// `DEADLINE_EXCEEDED`: the call-duration metric and the refusal count say
/// the same, not a status the caller never saw.
async fn a_call_past_the_server_deadline_is_counted_as_the_answer_the_caller_received(db: TestDb) {
    let app = ServerProcess::start(&db.url, &["--request-timeout-ms", "300"], &[]);
    let admin = app.admin_addr.expect("the harness turns the admin port on");
    let mut c = BillingModeClient::connect(format!("http://{}", app.addr))
        .await
        .expect("connect to the server");
    let ws = new_workspace();
    set_override(&mut c, &ws, Mode::Disabled, "deadline metrics").await;
    let before = get(admin, "/metrics").await.1;

    // A write that waits for a lock held past the server's deadline.
    let (release, holder) = lock_record(&db, &ws).await;
    let err = c
        .set(billing_mode::proto::SetRequest {
            workspace_id: ws.clone(),
            model: Some("sonnet".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let _ = release.send(());
    holder.await.unwrap();
    assert_error(&err, Code::Cancelled, "DEADLINE_EXCEEDED");

    let after = get(admin, "/metrics").await.1;
    let delta = |series: &str| {
        sample(&after, series).unwrap_or(0.0) - sample(&before, series).unwrap_or(0.0)
    };
    let calls = |code: &str| {
        delta(&format!(
            r#"rpc_server_call_duration_seconds_count{{rpc_grpc_status_code="{code}",rpc_method="Set",rpc_service="molecule.billing.v1.BillingMode",rpc_system="grpc"}}"#
        ))
    };
    assert_eq!(calls("1"), 1.0, "counted as CANCELLED:\n{after}");
    assert_eq!(calls("4"), 0.0, "no DEADLINE_EXCEEDED code:\n{after}");
    assert_eq!(
        delta(r#"billing_mode_refusals_total{reason="DEADLINE_EXCEEDED",rpc="Set"}"#),
        1.0,
        "{after}"
    );
    promtool_check(&after);
    drop(c);
    let (status, app) = app.stop().await;
    assert!(status.success(), "{status}:\n{}", app.log());
    drop(db); // it owns the SQLite file: kept until the server is gone
}

backends!(with_migrations_left_to_the_migrate_step_the_server_waits_not_ready);
async fn with_migrations_left_to_the_migrate_step_the_server_waits_not_ready(db: TestDb) {
    let app = TestApp::spawn_with(Config {
        migrate: false,
        ..config(&db)
    })
    .await;
    let admin = app.admin_addr.unwrap();
    let (code, body) = get(admin, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("failed: migrations applied"), "{body}");
    assert_eq!(health(app.addr, "").await, ServingStatus::NotServing);
    assert_eq!(health(app.addr, SERVICE).await, ServingStatus::NotServing);
    assert_eq!(get(admin, "/healthz").await.0, 200, "alive all the same");

    // The separate step (what `billing-mode migrate` runs).
    billing_mode::store::connect(&db.url)
        .await
        .expect("migrations apply");
    wait_for_health(app.addr, ServingStatus::Serving).await;
    assert_eq!(get(admin, "/readyz").await.0, 200);
    app.stop().await.unwrap();
}

#[test]
fn the_ready_line_does_not_claim_migrations_that_are_pending() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("fresh.db").display());
    let server = ServerProcess::start(&url, &["--no-migrate"], &[]);
    // The address is handed over as the line is read, before it is logged.
    let deadline = Instant::now() + Duration::from_secs(30);
    let ready = loop {
        if let Some(line) = server.log().lines().find(|l| l.contains("ready:")) {
            break line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no ready line:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        ready.contains("NOT serving until the pending migrations are applied")
            && !ready.contains("listening; migrations applied"),
        "{ready}"
    );
    // While it waits for the migrations, the spend snapshot says once that
    // it cannot load, not every quarter of a second.
    std::thread::sleep(Duration::from_secs(2));
    let said = server.log().matches("spend snapshot: cannot load").count();
    assert_eq!(said, 1, "{}", server.log());
    // Migrated: it loads, and says so.
    let (status, stderr, _) = run_to_exit(
        &["migrate", "--database-url", &url],
        &[],
        Duration::from_secs(60),
    );
    assert!(status.success(), "{stderr}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server
        .log()
        .contains("spend snapshot: loaded after failing")
    {
        assert!(Instant::now() < deadline, "never loaded:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

backends!(sqlite: probes_work_on_the_admin_port_with_mtls_on_the_grpc_port);
async fn probes_work_on_the_admin_port_with_mtls_on_the_grpc_port(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let ca = rcgen::generate_simple_self_signed(vec!["billing-mode test CA".into()]).unwrap();
    let server = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let write = |name: &str, text: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let tls = billing_mode::config::TlsFiles {
        cert: write("server.pem", server.cert.pem()),
        key: write("server.key", server.key_pair.serialize_pem()),
        client_ca: Some(write("ca.pem", ca.cert.pem())),
    };
    let app = TestApp::spawn_with(Config {
        tls: Some(tls),
        ..config(&db)
    })
    .await;
    let admin = app.admin_addr.unwrap();
    assert_eq!(get(admin, "/healthz").await.0, 200);
    assert_eq!(get(admin, "/readyz").await.0, 200);
    assert!(get(admin, "/metrics")
        .await
        .1
        .contains("billing_mode_build_info"));
    app.stop().await.unwrap();
}

// ---------------------------------------------------------------------------
// Health follows the store: a private Postgres this test stops and starts
// (never the shared cluster other tests use).

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn health_says_not_serving_while_the_store_is_down_and_serving_once_it_is_back() {
    let Some(pg) =
        tokio::task::spawn_blocking(|| PrivatePostgres::start("health follows the store"))
            .await
            .unwrap()
    else {
        return;
    };
    let app = Application::build(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: Some("127.0.0.1:0".parse().unwrap()),
        database_url: pg.url().into(),
        ..Config::default()
    })
    .await
    .expect("the server starts on the private Postgres");
    let addr = app.local_addr();
    let admin = app.admin_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    let mut c = plain_client(addr).await;
    let ws = new_workspace();
    set_override(&mut c, &ws, Mode::Byok, "before the outage").await;
    wait_for_health(addr, ServingStatus::Serving).await;
    assert_eq!(get(admin, "/readyz").await.0, 200);

    let pg = tokio::task::spawn_blocking(move || {
        pg.down();
        pg
    })
    .await
    .unwrap();
    wait_for_health(addr, ServingStatus::NotServing).await;
    let (code, body) = get(admin, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("failed: store reachable"), "{body}");
    assert_eq!(get(admin, "/healthz").await.0, 200, "still alive");
    let err = try_resolve(&mut c, &ws).await.unwrap_err();
    assert_error(&err, Code::Unavailable, "STORE_UNAVAILABLE");
    // It says when to retry (google.rpc.RetryInfo).
    let delay = tonic_types::StatusExt::get_details_retry_info(&err).and_then(|r| r.retry_delay);
    assert!(
        delay.is_some_and(|d| d > Duration::ZERO),
        "no RetryInfo on {err:?}"
    );

    let pg = tokio::task::spawn_blocking(move || {
        pg.up();
        pg
    })
    .await
    .unwrap();
    // Back without a restart of the server.
    wait_for_health(addr, ServingStatus::Serving).await;
    assert_eq!(get(admin, "/readyz").await.0, 200);
    assert_eq!(resolve(&mut c, &ws).await.mode(), Mode::Byok);

    let _ = stop.send(());
    server.await.unwrap().unwrap();
    drop(pg);
}

// ---------------------------------------------------------------------------
// The real binary

fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_billing-mode")
}

/// A `billing-mode serve` child process, its stderr read line by line.
struct Child {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Child {
    fn serve(args: &[&str], envs: &[(&str, &str)]) -> Child {
        let mut cmd = Command::new(binary());
        cmd.arg("--log-format")
            .arg("json")
            .arg("serve")
            .args(args)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start billing-mode");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Child {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (bounded) for a log line containing every one of `parts`.
    fn wait_for(&mut self, parts: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if parts.iter().all(|p| line.contains(p)) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no log line with {parts:?}; the server said:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn signal(&self, name: &str) {
        run("kill", &[&format!("-{name}"), &self.child.id().to_string()]);
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address a JSON log line names in `field`.
fn field_addr(line: &str, field: &str) -> SocketAddr {
    let v: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
    v["fields"][field]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no {field} address in {line}"))
}

#[test]
fn a_database_url_that_does_not_parse_never_shows_its_password() {
    for url in [
        // libpq's key=value form, pasted where a URL belongs
        "host=127.0.0.1 user=billing password=s3cret-canary dbname=billing",
        // a `?` in the password, not percent-encoded
        "postgres://billing:s3cret?canary@127.0.0.1:1/billing",
        // a parameter sqlx would log, value and all, before ignoring it
        "postgres://billing@127.0.0.1:1/billing?sslpassword=s3cret-canary",
    ] {
        for args in [
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "off",
                "--startup-timeout",
                "1s",
                "--database-url",
                url,
            ][..],
            &["migrate", "--database-url", url][..],
        ] {
            let (status, stderr, _) = run_to_exit(args, &[], Duration::from_secs(60));
            assert!(!status.success(), "{args:?} must fail:\n{stderr}");
            assert!(
                !stderr.contains("s3cret"),
                "{args:?}: the password appears:\n{stderr}"
            );
            assert!(!stderr.trim().is_empty(), "{args:?}: says why");
        }
    }
}

#[test]
fn an_unreachable_store_is_retried_until_the_startup_timeout_then_the_server_exits() {
    let (_reserved, nobody) = refusing_addr();
    let url = format!("postgres://billing:s3cret-canary@{nobody}/billing");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary())
        .current_dir(dir.path())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "off",
            "--startup-timeout",
            "3s",
            "--database-url",
            &url,
        ])
        .env_remove("RUST_LOG")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdin(Stdio::null())
        .output()
        .expect("run billing-mode");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must exit non-zero:\n{stderr}");
    let attempts = stderr
        .lines()
        .filter(|l| l.contains("the store is not reachable yet"))
        .count();
    assert!(attempts >= 2, "each retry is logged:\n{stderr}");
    for n in 1..=attempts {
        assert_eq!(
            stderr
                .lines()
                .filter(|l| l.contains("the store is not reachable yet")
                    && l.contains(&format!("attempt={n} ")))
                .count(),
            1,
            "attempt {n} is logged once:\n{stderr}"
        );
    }
    assert!(
        stderr.contains("was not reachable within 3 s"),
        "a clear final error:\n{stderr}"
    );
    assert!(
        !stderr.contains("s3cret-canary"),
        "the password never appears:\n{stderr}"
    );
}

/// Runs `billing-mode serve EXTRA` against a store that refuses every
/// connection, with a 30 s start-up timeout, and checks that it was refused
/// at once, before the store was tried (a setting that cannot work is said
/// first, not after the timeout); returns what it wrote on standard error.
pub(crate) fn refused_before_the_store(extra: &[&str]) -> String {
    let (_reserved, nobody) = refusing_addr();
    let url = format!("postgres://billing@{nobody}/billing");
    let mut args = vec![
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "off",
        "--startup-timeout",
        "30s",
    ];
    args.extend_from_slice(extra);
    let (status, stderr, ran) = run_to_exit(
        &args,
        &[("DATABASE_URL", url.as_str())],
        Duration::from_secs(45),
    );
    assert!(!status.success(), "must exit non-zero:\n{stderr}");
    assert!(
        !stderr.contains("not reachable yet"),
        "refused before the store is tried:\n{stderr}"
    );
    assert!(
        ran < Duration::from_secs(10),
        "refused at once, not after the start-up timeout: {ran:?}"
    );
    stderr
}

#[test]
fn a_max_staleness_the_feed_cannot_confirm_is_refused_before_the_store_is_waited_for() {
    let stderr = refused_before_the_store(&["--max-staleness", "500ms"]);
    assert!(
        stderr.contains("--max-staleness 500ms is too short")
            && stderr.contains("give at least twice that"),
        "says what is wrong:\n{stderr}"
    );
}

backends!(a_sigterm_the_moment_after_the_ready_line_is_a_graceful_stop);
/// An orchestrator may stop a server as soon as it has said it is ready
/// (a rollout replaced at once). The signal must reach the graceful stop
/// (exit 0, `stopped`), never the default action's kill, which would drop
/// in-flight calls and the log lines not yet written.
async fn a_sigterm_the_moment_after_the_ready_line_is_a_graceful_stop(db: TestDb) {
    for attempt in 1..=3 {
        let app = ServerProcess::start(&db.url, &[], &[]);
        let (status, app) = app.stop().await;
        let log = app.log();
        assert!(status.success(), "attempt {attempt}: {status:?}\n{log}");
        assert!(
            log.contains("shutting down") && log.contains(" stopped"),
            "attempt {attempt}: a graceful stop:\n{log}"
        );
    }
}

backends!(postgres: a_second_stop_signal_exits_at_once_though_a_call_is_in_flight);
/// The graceful stop waits for the calls in flight; an operator who cannot
/// wait (Ctrl-C again) gets the process back at once, told so in the log.
async fn a_second_stop_signal_exits_at_once_though_a_call_is_in_flight(db: TestDb) {
    let mut server = ServerProcess::start(&db.url, &["--request-timeout-ms", "120000"], &[]);
    let mut c = plain_client(&server.addr).await;
    let ws = new_workspace();
    set_override(&mut c, &ws, Mode::Disabled, "start").await;
    let (release, holder) = lock_record(&db, &ws).await;
    let in_flight = set_in_flight(c, &ws);
    let wait_for = |server: &ServerProcess, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !server.log().contains(what) {
            assert!(Instant::now() < deadline, "no {what:?}:\n{}", server.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // The write waits for the row lock; the stop waits for the write.
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.signal("TERM");
    let first = Instant::now();
    wait_for(&server, "shutting down");
    // The same stop sent twice at once (a wrapper forwarding Ctrl-C as
    // SIGTERM too) is one stop.
    server.signal("INT");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        server.exited().is_none(),
        "the stop waits for the call:\n{}",
        server.log()
    );
    tokio::time::sleep(Duration::from_millis(1200).saturating_sub(first.elapsed())).await;
    server.signal("INT");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = server.exited() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running after a second signal"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(1), "{}", server.log());
    wait_for(&server, "a second stop signal: exiting now");
    let _ = release.send(());
    holder.await.unwrap();
    assert!(
        in_flight.await.unwrap().is_err(),
        "the call in flight was cut"
    );
}

#[test]
fn while_start_up_waits_for_the_store_a_sighup_is_ignored_and_a_sigterm_stops_it_at_once() {
    let (_reserved, nobody) = refusing_addr();
    let url = format!("postgres://billing@{nobody}/billing");
    let mut server = Child::serve(
        &[
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "off",
            "--startup-timeout",
            "120s",
            "--database-url",
            &url,
        ],
        &[],
    );
    server.wait_for(&["the store is not reachable yet", "\"attempt\":1,"]);
    // A reload asked for meanwhile (SIGHUP, whose default action kills) is
    // not a stop: start-up goes on.
    server.signal("HUP");
    server.wait_for(&["the store is not reachable yet", "\"attempt\":3,"]);
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "a SIGHUP during start-up stopped the server"
    );
    let asked = Instant::now();
    server.signal("TERM");
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            asked.elapsed() < Duration::from_secs(20),
            "still waiting for the store after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    server.wait_for(&["stopped before ready"]);
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_store_url_that_cannot_work_fails_at_once_without_retrying() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary())
        .current_dir(dir.path())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "off",
            "--database-url",
            "mysql://billing@127.0.0.1/billing",
        ])
        .env_remove("RUST_LOG")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdin(Stdio::null())
        .output()
        .expect("run billing-mode");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must exit non-zero:\n{stderr}");
    assert!(
        !stderr.contains("not reachable yet"),
        "a wrong URL is not retried:\n{stderr}"
    );
    assert!(
        stderr.contains("database URL must start with"),
        "says what is wrong:\n{stderr}"
    );
}

fn token_line(name: &str, role: billing_mode::auth::Role) -> (String, String) {
    let (token, entry) = make_token(name, &[role]);
    (token, entry.line())
}

/// A client of the server at `addr` sending `token`.
async fn client_with(
    addr: SocketAddr,
    token: &str,
) -> BillingModeClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        impl tonic::service::Interceptor,
    >,
> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let header: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    BillingModeClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", header.clone());
        Ok(req)
    })
}

async fn resolve_with(addr: SocketAddr, token: &str, ws: &str) -> Result<(), tonic::Status> {
    let mut c = client_with(addr, token).await;
    c.resolve(billing_mode::proto::ResolveRequest {
        workspace_id: ws.to_owned(),
    })
    .await
    .map(|_| ())
}

/// Waits (bounded) until a Resolve of `ws` with `token` is refused with
/// `want`, or, with `None`, is let through: `ws` being a workspace nobody
/// registered, that is `NOT_FOUND`/`WORKSPACE_NOT_FOUND` (authenticated,
/// authorized, answered), and nothing else.
async fn wait_for_auth(addr: SocketAddr, token: &str, ws: &str, want: Option<Code>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = resolve_with(addr, token, ws).await;
        let got = answer.as_ref().err().map(|s| s.code());
        let done = match want {
            Some(code) => got == Some(code),
            None => answer.as_ref().is_err_and(|s| {
                s.code() == Code::NotFound
                    && billing_mode::client::status_reason(s) == "WORKSPACE_NOT_FOUND"
            }),
        };
        if done {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "token answered {got:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `billing-mode serve` on SQLite in `dir`, its tokens from the file
/// `dir/tokens`, written first with the one token `line`: the server, and
/// the file to rotate.
fn serve_with_tokens_file(dir: &Path, line: &str) -> (Child, std::path::PathBuf) {
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, format!("{line}\n")).unwrap();
    let db = format!("sqlite:{}", dir.join("b.db").display());
    let server = Child::serve(
        &[
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--tokens-file",
            tokens.to_str().unwrap(),
            "--database-url",
            &db,
        ],
        &[],
    );
    (server, tokens)
}

/// A stream outlives the call that opened it: a reload that takes its token
/// away (a leaked token revoked) ends it, as it would refuse a new call; a
/// reload that leaves the token alone does not.
#[tokio::test]
async fn a_watch_stream_ends_when_a_reload_takes_its_token_away() {
    use billing_mode::auth::Role;
    use billing_mode::proto::{watch_response::Event, SetRequest, WatchRequest};
    let dir = tempfile::tempdir().unwrap();
    let (reader, reader_line) = token_line("leaky-reader", Role::Reader);
    let (admin, admin_line) = token_line("admin", Role::Admin);
    let (mut server, tokens) =
        serve_with_tokens_file(dir.path(), &format!("{reader_line}\n{admin_line}"));
    let ready = server.wait_for(&["ready:"]);
    let addr = field_addr(&ready, "addr");
    let mut admin_client = client_with(addr, &admin).await;
    let ws = new_workspace();
    let set = |model: &str| SetRequest {
        workspace_id: ws.clone(),
        runtime: Some("claude-code".into()),
        model: Some(model.into()),
        reason: "test".into(),
        ..SetRequest::default()
    };
    let open = |token: String| async move {
        let mut s = client_with(addr, &token)
            .await
            .watch(WatchRequest::default())
            .await
            .expect("Watch")
            .into_inner();
        let first = s.message().await.unwrap().unwrap();
        assert!(matches!(first.event, Some(Event::Progress(_))), "{first:?}");
        s
    };
    let mut leaky = open(reader.clone()).await;
    let mut other = open(admin.clone()).await;
    // A reload that keeps the token: the stream goes on.
    std::fs::write(&tokens, format!("# rotated\n{reader_line}\n{admin_line}\n")).unwrap();
    server.signal("HUP");
    server.wait_for(&["tokens reloaded"]);
    admin_client.set(set("opus")).await.unwrap();
    for s in [&mut leaky, &mut other] {
        let m = s.message().await.unwrap().expect("a change");
        assert!(matches!(m.event, Some(Event::Resolution(_))), "{m:?}");
    }

    // The reader's token taken away: its stream ends UNAUTHENTICATED, and the
    // change after the reload reaches only the other stream.
    std::fs::write(&tokens, format!("{admin_line}\n")).unwrap();
    server.signal("HUP");
    server.wait_for(&["tokens reloaded"]);
    wait_for_auth(addr, &reader, &ws, Some(Code::Unauthenticated)).await;
    admin_client.set(set("sonnet")).await.unwrap();
    let m = other.message().await.unwrap().expect("a change");
    assert!(matches!(m.event, Some(Event::Resolution(_))), "{m:?}");
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(20), leaky.message())
            .await
            .expect("the revoked stream ends")
        {
            Ok(Some(m)) => assert!(
                matches!(m.event, Some(Event::Progress(_))),
                "the revoked stream carried a change: {m:?}"
            ),
            Ok(None) => panic!("ended without a status"),
            Err(e) => break e,
        }
    };
    assert_error(&ended, Code::Unauthenticated, "UNAUTHENTICATED");
    // The end is logged by its reason (the line may come before the
    // reload's own, so the lines already read count too); no token in it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server
        .seen
        .iter()
        .any(|l| l.contains("stream ended") && l.contains("UNAUTHENTICATED"))
    {
        assert!(Instant::now() < deadline, "{}", server.seen.join("\n"));
        if let Ok(line) = server.lines.recv_timeout(Duration::from_millis(100)) {
            server.seen.push(line);
        }
    }
    assert!(!server.seen.iter().any(|l| l.contains(&reader)));
}

/// A rotation whose SIGHUP comes the moment the server says it is ready (a
/// rollout and a rotation together) is applied, not lost to a reload
/// listener that does not exist yet.
#[tokio::test]
async fn a_sighup_the_moment_after_the_ready_line_reloads_the_tokens() {
    use billing_mode::auth::Role;
    for attempt in 1..=3 {
        let dir = tempfile::tempdir().unwrap();
        let (_, old_line) = token_line("old-reader", Role::Reader);
        let (new, new_line) = token_line("new-reader", Role::Reader);
        let (mut server, tokens) = serve_with_tokens_file(dir.path(), &old_line);
        let ready = server.wait_for(&["ready:"]);
        std::fs::write(&tokens, format!("{new_line}\n")).unwrap();
        server.signal("HUP");
        let reloaded = server.wait_for(&["tokens reloaded"]);
        assert!(
            reloaded.contains("\"tokens\":1"),
            "attempt {attempt}: {reloaded}"
        );
        let addr = field_addr(&ready, "addr");
        wait_for_auth(addr, &new, &new_workspace(), None).await;
    }
}

#[tokio::test]
async fn sighup_rotates_the_tokens_file_and_keeps_the_old_set_when_the_new_one_is_invalid() {
    use billing_mode::auth::Role;
    let dir = tempfile::tempdir().unwrap();
    let (old, old_line) = token_line("old-reader", Role::Reader);
    let (new, new_line) = token_line("new-reader", Role::Reader);
    let (mut server, tokens) = serve_with_tokens_file(dir.path(), &old_line);
    let ready = server.wait_for(&["ready:"]);
    let addr = field_addr(&ready, "addr");
    let admin = field_addr(&ready, "admin");
    let ws = new_workspace();
    // NOT_FOUND: authenticated, the workspace is simply unknown.
    wait_for_auth(addr, &old, &ws, None).await;
    wait_for_auth(addr, &new, &ws, Some(Code::Unauthenticated)).await;

    // A valid new file: the new token works, the old one no longer does.
    std::fs::write(&tokens, format!("# rotated\n{new_line}\n")).unwrap();
    server.signal("HUP");
    server.wait_for(&["tokens reloaded"]);
    wait_for_auth(addr, &new, &ws, None).await;
    wait_for_auth(addr, &old, &ws, Some(Code::Unauthenticated)).await;

    // An invalid file is refused, naming the line; the set in force stays.
    std::fs::write(
        &tokens,
        format!("{old_line}\n# comment\nbroken sha256:nothex reader\n"),
    )
    .unwrap();
    server.signal("HUP");
    let refused = server.wait_for(&["line 3", "ERROR"]);
    assert!(refused.contains(tokens.to_str().unwrap()), "{refused}");
    assert!(!refused.contains(&old), "no token in the log: {refused}");
    wait_for_auth(addr, &new, &ws, None).await;
    wait_for_auth(addr, &old, &ws, Some(Code::Unauthenticated)).await;
    assert!(Path::new(&tokens).exists());

    // This process's metrics: refusals by the interceptor are counted too,
    // and no token or token name is a label.
    let metrics = get(admin, "/metrics").await.1;
    let refused = |reason: &str| {
        sample(
            &metrics,
            &format!(r#"billing_mode_refusals_total{{reason="{reason}",rpc="Resolve"}}"#),
        )
        .unwrap_or(0.0)
    };
    assert!(refused("UNAUTHENTICATED") >= 3.0, "{metrics}");
    assert!(refused("WORKSPACE_NOT_FOUND") >= 3.0, "{metrics}");
    for secret in [
        old.as_str(),
        new.as_str(),
        "old-reader",
        "new-reader",
        ws.as_str(),
    ] {
        assert!(!metrics.contains(secret), "{secret} in /metrics");
    }
    promtool_check(&metrics);
}

#[tokio::test]
async fn sighup_never_swaps_the_registry_a_change_needs_a_rolling_restart() {
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("registry.toml");
    let builtin = include_str!("../../src/domain/default_registry.toml");
    std::fs::write(&registry, builtin).unwrap();
    let db = format!("sqlite:{}", dir.path().join("b.db").display());
    let mut server = Child::serve(
        &[
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "off",
            "--registry",
            registry.to_str().unwrap(),
            "--database-url",
            &db,
        ],
        &[],
    );
    let addr = field_addr(&server.wait_for(&["ready:"]), "addr");
    let mut c = plain_client(addr).await;
    let ws = new_workspace();
    set(
        &mut c,
        billing_mode::proto::SetRequest {
            workspace_id: ws.clone(),
            runtime: Some("claude-code".into()),
            model: Some("opus".into()),
            override_mode: Some(Mode::Disabled.into()),
            reason: "register".into(),
            ..Default::default()
        },
    )
    .await;
    let keys = |r: &billing_mode::proto::BuildEnvResponse| {
        r.env.iter().map(|e| e.key.clone()).collect::<Vec<_>>()
    };
    let before = keys(&build(&mut c, &ws, vec![]).await.unwrap());
    assert!(before.contains(&"MODEL_PROVIDER".to_owned()), "{before:?}");
    assert!(!before.contains(&"MODEL_NAME".to_owned()), "{before:?}");

    // The same registry with a comment added: unchanged.
    std::fs::write(&registry, format!("# edited\n{builtin}")).unwrap();
    server.signal("HUP");
    server.wait_for(&["registry file unchanged"]);

    // A change that would alter decisions: refused until a restart.
    std::fs::write(
        &registry,
        builtin.replace(
            r#"model_vars = ["MODEL_PROVIDER"]"#,
            r#"model_vars = ["MODEL_PROVIDER", "MODEL_NAME"]"#,
        ),
    )
    .unwrap();
    server.signal("HUP");
    let line = server.wait_for(&["needs a rolling restart", "ERROR"]);
    assert!(line.contains(registry.to_str().unwrap()), "{line}");
    assert_eq!(keys(&build(&mut c, &ws, vec![]).await.unwrap()), before);

    // An invalid file: refused, the running registry stays.
    std::fs::write(&registry, "usage_token = 42\n").unwrap();
    server.signal("HUP");
    server.wait_for(&["the registry file is invalid", "ERROR"]);
    assert_eq!(keys(&build(&mut c, &ws, vec![]).await.unwrap()), before);
}

// ---------------------------------------------------------------------------
// Lost store connections on the read path

backends!(postgres: resolve_answers_from_a_fresh_connection_after_the_store_cut_them_all, flavor = "multi_thread", worker_threads = 2);
/// Resolve reads through connections that are not pinged before each use
/// (docs/performance.md): when the database cuts them all (a failover, an
/// idle cut, `pg_terminate_backend`), the next Resolve must still answer from
/// the store, on a fresh connection, and never with an error a client would
/// have to retry.
async fn resolve_answers_from_a_fresh_connection_after_the_store_cut_them_all(db: TestDb) {
    let app_name = format!("reads_{}", uuid::Uuid::new_v4().simple());
    let app = TestApp::spawn_with(db.config_named(&app_name)).await;
    let mut c = app.client().await;
    let ws = new_workspace();
    c.set(billing_mode::proto::SetRequest {
        workspace_id: ws.clone(),
        runtime: Some("claude-code".into()),
        model: Some("opus".into()),
        reason: "register".into(),
        ..Default::default()
    })
    .await
    .expect("registered");
    let resolve = |c: &mut BillingModeClient<tonic::transport::Channel>| {
        let mut c = c.clone();
        let ws = ws.clone();
        async move {
            c.resolve(billing_mode::proto::ResolveRequest { workspace_id: ws })
                .await
                .map(|r| r.into_inner().resolution.unwrap())
        }
    };
    let first = resolve(&mut c).await.expect("resolved");
    for round in 0..3 {
        // Several reads at once, so that several connections are pooled.
        let warm: Vec<_> = (0..8).map(|_| resolve(&mut c)).collect();
        for r in futures_join(warm).await {
            assert_eq!(r.expect("resolved"), first);
        }
        let killed = db.cut_connections(&app_name).await;
        assert!(
            killed > 1,
            "round {round}: the server's connections were found"
        );
        let after = resolve(&mut c)
            .await
            .unwrap_or_else(|s| panic!("round {round}: Resolve after the cut: {s:?}"));
        assert_eq!(after, first, "round {round}");
    }
}

async fn futures_join<F: std::future::Future + Send + 'static>(fs: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

backends!(postgres: a_database_that_has_become_read_only_is_unavailable_not_a_bug);
/// A failover in progress: the database the server reaches is a standby, or
/// was made read-only. Writes cannot be made now, and will be once the
/// primary is back: `UNAVAILABLE` (retry), never `INTERNAL` (which tells a
/// caller to stop retrying and page someone). Reads go on.
async fn a_database_that_has_become_read_only_is_unavailable_not_a_bug(db: TestDb) {
    let primary = TestApp::spawn(&db).await;
    let ws = new_workspace();
    let before = primary
        .set(billing_mode::proto::SetRequest {
            workspace_id: ws.clone(),
            runtime: Some("claude-code".into()),
            model: Some("opus".into()),
            reason: "register".into(),
            ..Default::default()
        })
        .await;
    // Every session of this server is read-only, as on a standby.
    let standby = TestApp::spawn_with(Config {
        database_url: format!("{}&options[default_transaction_read_only]=on", db.url).into(),
        migrate: false,
        ..config(&db)
    })
    .await;
    assert_eq!(standby.resolve(&ws).await, before, "reads go on");
    let mut c = standby.client().await;
    let err = c
        .set(billing_mode::proto::SetRequest {
            workspace_id: ws.clone(),
            model: Some("sonnet".into()),
            reason: "during the failover".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_error(&err, Code::Unavailable, "STORE_UNAVAILABLE");
    assert_eq!(primary.resolve(&ws).await, before, "nothing was written");
}
