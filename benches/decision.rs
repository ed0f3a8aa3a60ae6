//! Benchmark harness: speed and memory of the decision core and of the
//! service over gRPC. Prints figures, ratios and each target's verdict.
//!
//!     cargo bench --bench decision            # full run
//!     cargo bench --bench decision -- --quick # fewer iterations (CI)
//!
//! Targets (per decision, on the 2-core reference machine):
//!
//! - `resolve`: at most 20 µs; `build_env` on a 40-entry env: at most 100 µs;
//! - a Resolve over gRPC on the SQLite default: p99 at most 20 ms;
//! - memory: resident set growth over a long run of decisions at most 10 %
//!   (no per-decision leak).
//!
//! Timing targets are checked here, never in tests, which run on shared
//! machines.

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use billing_mode::{
    config::Config,
    domain::{
        build_env, resolve, CandidateEnv, CredentialKeys, EnvInput, Model, Origin, Record,
        Registry, Runtime, Stored, WorkspaceId,
    },
    proto::{billing_mode_client::BillingModeClient, BuildEnvRequest, ResolveRequest, SetRequest},
    startup::Application,
};

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn per_op(iters: u32, f: impl Fn()) -> Duration {
    // Warm up, then measure.
    for _ in 0..iters / 10 + 1 {
        f();
    }
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    start.elapsed() / iters
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

fn candidate(n_other: usize) -> Vec<EnvInput> {
    let mut env = vec![
        EnvInput {
            key: "CLAUDE_CODE_OAUTH_TOKEN".into(),
            value: "customer".into(),
            origin: Origin::Workspace,
        },
        EnvInput {
            key: "CLAUDE_CODE_OAUTH_TOKEN".into(),
            value: "platform".into(),
            origin: Origin::Global,
        },
        EnvInput {
            key: "ANTHROPIC_API_KEY".into(),
            value: "platform-key".into(),
            origin: Origin::Global,
        },
        EnvInput {
            key: "MOLECULE_LLM_ANTHROPIC_BASE_URL".into(),
            value: "https://proxy".into(),
            origin: Origin::Platform,
        },
        EnvInput {
            key: "MOLECULE_LLM_OPENAI_BASE_URL".into(),
            value: "https://proxy/openai".into(),
            origin: Origin::Platform,
        },
        EnvInput {
            key: "MOLECULE_LLM_USAGE_TOKEN".into(),
            value: "usage".into(),
            origin: Origin::Platform,
        },
    ];
    for i in 0..n_other {
        env.push(EnvInput {
            key: format!("SETTING_{i}"),
            value: format!("value-{i}"),
            origin: if i % 2 == 0 {
                Origin::Global
            } else {
                Origin::Workspace
            },
        });
    }
    env
}

fn core(quick: bool) {
    let registry = Registry::builtin().expect("built-in registry");
    let id = WorkspaceId::new_random();
    let byok = Record {
        runtime: Stored::Valid(Runtime::parse("claude-code").unwrap()),
        model: Stored::Valid(Model::parse("opus").unwrap()),
        credential_keys: Stored::Valid(CredentialKeys::parse(["CLAUDE_CODE_OAUTH_TOKEN"]).unwrap()),
        revision: 1,
        ..Record::new(id)
    };
    let platform = Record {
        runtime: Stored::Valid(Runtime::parse("hermes").unwrap()),
        model: Stored::Valid(Model::parse("openai/gpt-4o").unwrap()),
        revision: 1,
        ..Record::new(id)
    };
    let iters = if quick { 20_000 } else { 200_000 };

    let t_resolve = per_op(iters, || {
        black_box(resolve(black_box(&byok), &registry));
    });
    let env40 = CandidateEnv::parse(candidate(35)).unwrap();
    let res = resolve(&byok, &registry);
    // `build_env` consumes its candidate (it moves the kept entries into the
    // env), so each operation includes a copy of the candidate: an upper
    // bound on what the server pays, whose candidate is the request's own.
    let t_build = per_op(iters, || {
        black_box(build_env(&res, &byok, &registry, black_box(env40.clone())).unwrap());
    });
    let res_pm = resolve(&platform, &registry);
    let t_build_pm = per_op(iters, || {
        black_box(build_env(&res_pm, &platform, &registry, black_box(env40.clone())).unwrap());
    });
    let big = candidate(1024 - candidate(0).len());
    let t_parse_max = per_op(iters / 100 + 1, || {
        black_box(CandidateEnv::parse(big.clone()).unwrap());
    });

    // Memory: resident set before and after a long run of full decisions.
    let before = rss_kib("VmRSS:");
    for _ in 0..iters * 5 {
        let r = resolve(&byok, &registry);
        black_box(build_env(&r, &byok, &registry, env40.clone()).unwrap());
    }
    let after = rss_kib("VmRSS:");
    let growth = if before > 0 {
        after.saturating_sub(before) as f64 / before as f64
    } else {
        0.0
    };

    println!("decision core ({iters} iterations each)");
    println!(
        "  resolve (claude-code/opus, byok)         {:>10.2?}/op   target <= 20µs   {}",
        t_resolve,
        verdict(t_resolve <= Duration::from_micros(20))
    );
    println!(
        "  build_env byok, 40 entries               {:>10.2?}/op   target <= 100µs  {}",
        t_build,
        verdict(t_build <= Duration::from_micros(100))
    );
    println!(
        "  build_env platform_managed, 40 entries   {:>10.2?}/op   target <= 100µs  {}",
        t_build_pm,
        verdict(t_build_pm <= Duration::from_micros(100))
    );
    println!(
        "  CandidateEnv::parse, 1024 entries        {:>10.2?}/op",
        t_parse_max
    );
    println!(
        "  ratio build_env / resolve                {:>10.1}x",
        t_build.as_secs_f64() / t_resolve.as_secs_f64()
    );
    println!(
        "  resident set {before} KiB -> {after} KiB after {} decisions: growth {:.1} %   target <= 10 %   {}",
        iters * 5,
        growth * 100.0,
        verdict(growth <= 0.10)
    );
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn over_grpc(quick: bool) {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        database_url: format!("sqlite:{}", dir.path().join("bench.db").display()).into(),
        ..Config::default()
    };
    let app = Application::build(config).await.expect("server builds");
    let addr = app.local_addr();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async {
        let _ = rx.await;
    }));
    let mut client = BillingModeClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let ws = WorkspaceId::new_random().to_string();
    client
        .set(SetRequest {
            workspace_id: ws.clone(),
            runtime: Some("claude-code".into()),
            model: Some("opus".into()),
            credential_keys: Some(billing_mode::proto::CredentialKeys {
                keys: vec!["CLAUDE_CODE_OAUTH_TOKEN".into()],
            }),
            ..SetRequest::default()
        })
        .await
        .unwrap();

    let n = if quick { 300 } else { 3000 };
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        client
            .resolve(ResolveRequest {
                workspace_id: ws.clone(),
            })
            .await
            .unwrap();
        lat.push(t.elapsed());
    }
    lat.sort();
    let env: Vec<_> = candidate(35)
        .into_iter()
        .map(|e| billing_mode::proto::EnvVar {
            key: e.key,
            value: e.value,
            origin: match e.origin {
                Origin::Workspace => billing_mode::proto::Origin::Workspace,
                Origin::Global => billing_mode::proto::Origin::Global,
                _ => billing_mode::proto::Origin::Platform,
            }
            .into(),
        })
        .collect();
    let mut lat_b = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        client
            .build_env(BuildEnvRequest {
                workspace_id: ws.clone(),
                env: env.clone(),
            })
            .await
            .unwrap();
        lat_b.push(t.elapsed());
    }
    lat_b.sort();

    // Throughput with 16 concurrent callers.
    let start = Instant::now();
    let per = n / 16 + 1;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut c = client.clone();
        let ws = ws.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..per {
                c.resolve(ResolveRequest {
                    workspace_id: ws.clone(),
                })
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let rps = (per * 16) as f64 / start.elapsed().as_secs_f64();

    let p99 = percentile(&lat, 0.99);
    println!("over gRPC, SQLite default store ({n} calls each)");
    println!(
        "  Resolve   p50 {:>9.2?}  p99 {:>9.2?}   target p99 <= 20ms  {}",
        percentile(&lat, 0.5),
        p99,
        verdict(p99 <= Duration::from_millis(20))
    );
    println!(
        "  BuildEnv  p50 {:>9.2?}  p99 {:>9.2?}",
        percentile(&lat_b, 0.5),
        percentile(&lat_b, 0.99)
    );
    println!("  Resolve throughput, 16 concurrent callers: {rps:.0} calls/s");
    println!(
        "  ratio BuildEnv p50 / Resolve p50: {:.2}x",
        percentile(&lat_b, 0.5).as_secs_f64() / percentile(&lat, 0.5).as_secs_f64()
    );
    println!(
        "  peak resident set of the process: {} KiB",
        rss_kib("VmHWM:")
    );
    let _ = tx.send(());
    server.await.unwrap().unwrap();
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    core(quick);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(over_grpc(quick));
    spend_memory();
    rt.block_on(spend(quick));
}

// ---------------------------------------------------------------------------
// Closing the loop: CheckSpend from the spend snapshot.
//
// Targets: a change committed through replica A answered by CheckSpend on
// replica B within 100 ms at p99; the snapshot at most 64 bytes per
// workspace at 10^6 workspaces. (CheckSpend against the no-op RPC, serial
// and at saturation, is a lane of `benches/lanes.rs`.)

/// Resident-set growth of a spend table of 10^6 workspaces, built through
/// the same `Table::apply` the server uses.
fn spend_memory() {
    use billing_mode::{domain::Mode, snapshot::Table};
    let n: u64 = 1_000_000;
    let before = rss_kib("VmRSS:");
    let mut table = Table::default();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..n {
        // Random-looking UUIDs, as real workspace ids are.
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let hi = x ^ (x >> 31);
        let id = WorkspaceId::from_u128((u128::from(hi) << 64) | u128::from(i));
        let mode = [Mode::PlatformManaged, Mode::Byok, Mode::Disabled][(i % 3) as usize];
        table.apply(&id, mode, 1 + i % 7);
    }
    let after = rss_kib("VmRSS:");
    let measured = (after.saturating_sub(before) * 1024) as f64 / n as f64;
    let modelled = table.allocated_bytes() as f64 / n as f64;
    println!("spend snapshot memory, {} workspaces", table.len());
    println!(
        "  resident-set growth {measured:.1} B/workspace (table allocation {modelled:.1} B)   target <= 64 B  {}",
        verdict(measured <= 64.0)
    );
    black_box(&table);
}

/// A database for two replicas: a fresh schema on `DATABASE_URL` when it is
/// Postgres (dropped at the end), else a fresh SQLite file.
async fn spend_database() -> (
    String,
    &'static str,
    Option<(String, String)>,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    match std::env::var("DATABASE_URL") {
        Ok(base) if base.starts_with("postgres") => {
            use sqlx::Connection;
            let schema = format!("bench_spend_{}", uuid::Uuid::new_v4().simple());
            let mut c = sqlx::PgConnection::connect(&base).await.unwrap();
            sqlx::query(&format!("CREATE SCHEMA {schema}"))
                .execute(&mut c)
                .await
                .unwrap();
            let sep = if base.contains('?') { '&' } else { '?' };
            let url = format!("{base}{sep}options[search_path]={schema}");
            (url, "Postgres", Some((base, schema)), dir)
        }
        _ => (
            format!("sqlite:{}", dir.path().join("spend.db").display()),
            "SQLite",
            None,
            dir,
        ),
    }
}

async fn replica(url: &str) -> (String, tokio::sync::oneshot::Sender<()>) {
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        database_url: url.into(),
        ..Config::default()
    };
    let app = Application::build(config).await.expect("server builds");
    let addr = format!("http://{}", app.local_addr());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until(async {
        let _ = rx.await;
    }));
    (addr, tx)
}

async fn spend(quick: bool) {
    use billing_mode::proto::{CheckSpendRequest, Mode as WireMode};

    let (url, backend, schema, _dir) = spend_database().await;
    let (a_addr, a_stop) = replica(&url).await;
    let (b_addr, b_stop) = replica(&url).await;
    let mut a = BillingModeClient::connect(a_addr).await.unwrap();
    let channel = tonic::transport::Endpoint::from_shared(b_addr.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut b = BillingModeClient::new(channel);

    let workspaces: Vec<String> = (0..if quick { 50 } else { 500 })
        .map(|_| WorkspaceId::new_random().to_string())
        .collect();
    for ws in &workspaces {
        a.set(SetRequest {
            workspace_id: ws.clone(),
            override_mode: Some(WireMode::PlatformManaged.into()),
            reason: "bench".into(),
            ..SetRequest::default()
        })
        .await
        .unwrap();
    }
    // Replica B has them all before anything is measured.
    for ws in &workspaces {
        let deadline = Instant::now() + Duration::from_secs(10);
        while b
            .check_spend(CheckSpendRequest {
                workspace_id: ws.clone(),
            })
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "replica B never saw {ws}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    // Change-to-answer: a flip committed through A, polled on B until B
    // answers the new revision; timed from the moment the Set was sent (so
    // the figure includes the Set's own latency: an upper bound).
    let flips = if quick { 40 } else { 300 };
    let mut delays = Vec::with_capacity(flips);
    let mut poller = b.clone();
    for i in 0..flips {
        let ws = &workspaces[i % workspaces.len()];
        let mode = if (i / workspaces.len()) % 2 == 0 {
            WireMode::Byok
        } else {
            WireMode::PlatformManaged
        };
        let sent = Instant::now();
        let r = a
            .set(SetRequest {
                workspace_id: ws.clone(),
                override_mode: Some(mode.into()),
                reason: "bench flip".into(),
                ..SetRequest::default()
            })
            .await
            .unwrap()
            .into_inner()
            .resolution
            .unwrap();
        loop {
            let answer = poller
                .check_spend(CheckSpendRequest {
                    workspace_id: ws.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            if answer.revision >= r.revision {
                break;
            }
            assert!(sent.elapsed() < Duration::from_secs(10), "B never answered");
        }
        delays.push(sent.elapsed());
    }
    delays.sort();
    let p99_delay = percentile(&delays, 0.99);

    println!("closing the loop: CheckSpend on replica B, writes through replica A ({backend})");
    println!(
        "  change-to-answer on another replica ({flips} flips): p50 {:>9.2?}  p99 {p99_delay:>9.2?}  max {:>9.2?}   target p99 < 100ms  {}",
        percentile(&delays, 0.5),
        delays[delays.len() - 1],
        verdict(p99_delay < Duration::from_millis(100))
    );

    let _ = a_stop.send(());
    let _ = b_stop.send(());
    if let Some((base, schema)) = schema {
        use sqlx::Connection;
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok(mut c) = sqlx::PgConnection::connect(&base).await {
            let _ = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
                .execute(&mut c)
                .await;
        }
    }
}
