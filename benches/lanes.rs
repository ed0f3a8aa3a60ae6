//! The lanes harness: the service's speed measured against its floor.
//!
//!     DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo bench --bench lanes
//!     cargo bench --bench lanes -- --quick        # short run (CI): prints, never fails on timing
//!     cargo bench --bench lanes -- --quick --only import --backend postgres
//!
//! `--only` takes lane keys (`N,D,Resolve`, see [`lanes`]) and `import` and
//! `stream` for the import and the change-stream figures; without it,
//! everything runs. `--backend postgres|sqlite` runs one backend.
//! `--reads-in-flight N` sets the server's `--db-reads-in-flight` and lane
//! D's store alike (Postgres; default: the server's default).
//!
//! The real server (`startup::Application`, production layers, decision log
//! at INFO to a file) runs as a child process of this binary, on Postgres
//! (when `DATABASE_URL` is a postgres:// URL; a fresh schema, dropped at the
//! end) and on SQLite (a fresh file), with 100,000 workspaces stored. Every
//! lane runs in this one process and one run: a warm-up that is discarded,
//! then one caller on one connection (latency), then `--concurrency` callers
//! over `--connections` connections (throughput). Latencies go into
//! HdrHistograms. CPU seconds come from `/proc`: the server process, the
//! Postgres backends of the server's pool (found by `application_name` in
//! `pg_stat_activity`), and this process (the load generator, or the plain
//! loop of lane D); for the process doing a lane's work, also the kernel's
//! share of its CPU and its threads' context switches per request (where a
//! request's cost is waiting and waking rather than instructions).
//!
//! The lanes:
//!
//! - N: a no-op unary RPC on the same server and stack (grpc.health.v1 Check);
//! - D: the record's primary-key select through the same store, pool type and
//!   settings as the server (`Store::load`), from a plain loop in this process;
//! - E: an echo RPC (a bench-only service on the same server builder) carrying
//!   the same 50-entry env as BuildEnv;
//! - Resolve, BuildEnv (50 entries), Set;
//! - the change stream (Postgres): the delay from a committed Set on this
//!   server to its event at a Watch client of a second server (a replica on
//!   the same store), and Set latency with 100 idle Watch streams open
//!   against none (see [`change_stream_lanes`]);
//! - after the lanes, an import (`billing_mode::import`: new workspaces in
//!   create-only `BatchCreateWorkspaces` calls of its default batch size) at
//!   its default concurrency and a wider one, with its target of 2,000
//!   workspaces per second on Postgres.
//!
//! The targets, each a ratio from the same run (see [`targets`]), are printed
//! with PASS or MISS; timing is never asserted, here or in tests.
//!
//! `LANES_SERVER_WRAPPER` (a command and its arguments, e.g. `valgrind
//! --tool=callgrind`) runs the server child under that command: instruction
//! counts per request are stable where timings are not.
//!
//! Adding a lane: write a `fn(&Ctx) -> Call` (one request; see the existing
//! lanes) and add a [`Lane`] to [`lanes`]; a ratio target goes in [`targets`].

use std::{
    collections::HashMap,
    fmt::Write as _,
    future::Future,
    io::{BufRead, BufReader, Write as _},
    net::SocketAddr,
    pin::Pin,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use billing_mode::{
    auth::{generate_token, Role},
    config::Config,
    domain::WorkspaceId,
    proto::{
        billing_mode_client::BillingModeClient, watch_response, BuildEnvRequest, CheckSpendRequest,
        EnvVar, Origin, ResolveRequest, SetRequest, WatchRequest,
    },
    service::codec::Codec,
    startup::Application,
    store::{self, Store},
    telemetry::{self, LogFormat, LogLevel, Sink},
};
use hdrhistogram::Histogram;
use tonic::{
    metadata::MetadataValue,
    transport::{Channel, Endpoint},
    Request,
};
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

/// Workspaces stored before any lane runs.
const WORKSPACES: usize = 100_000;
/// Entries in the candidate env of BuildEnv and E.
const ENV_ENTRIES: usize = 50;

/// The server's allocator (`src/main.rs`): the server child runs this
/// binary.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// One request of a lane. Arguments: the connection to use (an index into
/// [`Ctx::channels`]) and a sequence number unique within the lane (for
/// choosing a workspace). The output is `None` to record the call's wall
/// time, or `Some(latency)` for lanes whose latency is not the call itself
/// (e.g. a change-stream delay).
type Call = Arc<dyn Fn(usize, u64) -> BoxFuture<anyhow::Result<Option<Duration>>> + Send + Sync>;

/// Which process does a lane's service-side work (for the CPU columns).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// The server child process.
    Server,
    /// This process (a plain loop on the store, no RPC).
    Harness,
}

/// A lane: what one request is.
struct Lane {
    key: &'static str,
    what: &'static str,
    side: Side,
    build: fn(&Ctx) -> Call,
}

/// The lanes, in the order they run and print. Add a lane here.
fn lanes() -> Vec<Lane> {
    vec![
        Lane {
            key: "N",
            what: "health Check (no-op RPC, same stack)",
            side: Side::Server,
            build: lane_health,
        },
        Lane {
            key: "D",
            what: "Store::load, same pool, plain loop",
            side: Side::Harness,
            build: lane_direct,
        },
        Lane {
            key: "E",
            what: "echo RPC, 50-entry env",
            side: Side::Server,
            build: lane_echo,
        },
        Lane {
            key: "Resolve",
            what: "Resolve",
            side: Side::Server,
            build: lane_resolve,
        },
        Lane {
            key: "BuildEnv",
            what: "BuildEnv, 50-entry env",
            side: Side::Server,
            build: lane_build_env,
        },
        Lane {
            key: "CheckSpend",
            what: "CheckSpend (in-memory spend snapshot)",
            side: Side::Server,
            build: lane_check_spend,
        },
        Lane {
            key: "Set",
            what: "Set (one field changes)",
            side: Side::Server,
            build: lane_set,
        },
    ]
}

/// What the lanes share: connections to the server, the store for lane D,
/// the stored workspaces, the candidate env.
struct Ctx {
    channels: Vec<Channel>,
    token: MetadataValue<tonic::metadata::Ascii>,
    store: Arc<dyn Store>,
    ids: Arc<Vec<String>>,
    env: Vec<EnvVar>,
    /// A counter for lanes that must not repeat a request (Set).
    counter: Arc<AtomicU64>,
}

impl Ctx {
    /// A stored workspace, spread pseudo-randomly over all of them.
    fn workspace(&self, seq: u64) -> String {
        pick(&self.ids, seq).to_owned()
    }

    fn authorized<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.metadata_mut()
            .insert("authorization", self.token.clone());
        req
    }

    fn client(&self, conn: usize) -> BillingModeClient<Channel> {
        BillingModeClient::new(self.channels[conn].clone())
            .max_decoding_message_size(billing_mode::config::MAX_MESSAGE_BYTES)
    }
}

fn pick(ids: &[String], seq: u64) -> &str {
    // splitmix64: the same spread for every lane that reads.
    let mut z = seq.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    &ids[(z % ids.len() as u64) as usize]
}

fn lane_health(ctx: &Ctx) -> Call {
    let channels = ctx.channels.clone();
    Arc::new(move |conn, _| {
        let mut client = HealthClient::new(channels[conn].clone());
        Box::pin(async move {
            client
                .check(HealthCheckRequest {
                    service: "molecule.billing.v1.BillingMode".into(),
                })
                .await?;
            Ok(None)
        })
    })
}

fn lane_direct(ctx: &Ctx) -> Call {
    let store = ctx.store.clone();
    let ids = ctx.ids.clone();
    Arc::new(move |_, seq| {
        let store = store.clone();
        let id = WorkspaceId::parse(pick(&ids, seq)).expect("stored ids are valid");
        Box::pin(async move {
            store.load(&id).await?.context("a stored workspace")?;
            Ok(None)
        })
    })
}

fn lane_echo(ctx: &Ctx) -> Call {
    let channels = ctx.channels.clone();
    let ids = ctx.ids.clone();
    let env = ctx.env.clone();
    let token = ctx.token.clone();
    Arc::new(move |conn, seq| {
        let mut grpc = tonic::client::Grpc::new(channels[conn].clone());
        let mut req = Request::new(BuildEnvRequest {
            workspace_id: pick(&ids, seq).to_owned(),
            env: env.clone(),
        });
        req.metadata_mut().insert("authorization", token.clone());
        Box::pin(async move {
            grpc.ready().await?;
            grpc.unary::<_, BuildEnvRequest, _>(
                req,
                echo::PATH.parse().expect("valid path"),
                Codec::<BuildEnvRequest, BuildEnvRequest>::default(),
            )
            .await?;
            Ok(None)
        })
    })
}

fn lane_resolve(ctx: &Ctx) -> Call {
    let ctx = Arc::new(ctx.share());
    Arc::new(move |conn, seq| {
        let mut client = ctx.client(conn);
        let req = ctx.authorized(ResolveRequest {
            workspace_id: ctx.workspace(seq),
        });
        Box::pin(async move {
            client.resolve(req).await?;
            Ok(None)
        })
    })
}

fn lane_build_env(ctx: &Ctx) -> Call {
    let ctx = Arc::new(ctx.share());
    Arc::new(move |conn, seq| {
        let mut client = ctx.client(conn);
        let req = ctx.authorized(BuildEnvRequest {
            workspace_id: ctx.workspace(seq),
            env: ctx.env.clone(),
        });
        Box::pin(async move {
            let resp = client.build_env(req).await?.into_inner();
            if resp.env.is_empty() {
                bail!("BuildEnv returned no env");
            }
            Ok(None)
        })
    })
}

fn lane_check_spend(ctx: &Ctx) -> Call {
    let ctx = Arc::new(ctx.share());
    Arc::new(move |conn, seq| {
        let mut client = ctx.client(conn);
        let req = ctx.authorized(CheckSpendRequest {
            workspace_id: ctx.workspace(seq),
        });
        Box::pin(async move {
            client.check_spend(req).await?;
            Ok(None)
        })
    })
}

fn lane_set(ctx: &Ctx) -> Call {
    let ctx = Arc::new(ctx.share());
    Arc::new(move |conn, _| {
        // Walk the workspaces in order, switching the model on each pass, so
        // every Set changes the record (a Set that changes nothing writes
        // nothing) and no two callers write one workspace at once.
        let n = ctx.counter.fetch_add(1, Ordering::Relaxed);
        let len = ctx.ids.len() as u64;
        let model = if (n / len) % 2 == 0 { "sonnet" } else { "opus" };
        let mut client = ctx.client(conn);
        let req = ctx.authorized(SetRequest {
            workspace_id: ctx.ids[(n % len) as usize].clone(),
            model: Some(model.into()),
            reason: "lanes".into(),
            ..SetRequest::default()
        });
        Box::pin(async move {
            client.set(req).await?;
            Ok(None)
        })
    })
}

impl Ctx {
    fn share(&self) -> Ctx {
        Ctx {
            channels: self.channels.clone(),
            token: self.token.clone(),
            store: self.store.clone(),
            ids: self.ids.clone(),
            env: self.env.clone(),
            counter: self.counter.clone(),
        }
    }
}

/// The targets: each a ratio of figures from the same run.
fn targets(r: &HashMap<&str, LaneResult>) -> Vec<(String, f64, f64, bool)> {
    // (description, measured, limit, pass)
    let mut out = Vec::new();
    let (Some(n), Some(d)) = (r.get("N"), r.get("D")) else {
        return out;
    };
    if let Some(res) = r.get("Resolve") {
        let floor = n.c1.p50 + d.c1.p50;
        out.push((
            "Resolve p50 <= 1.10 x (p50(N) + p50(D))".into(),
            res.c1.p50 / floor,
            1.10,
            res.c1.p50 <= 1.10 * floor,
        ));
        let floor = n.c1.p99 + d.c1.p99;
        out.push((
            "Resolve p99 <= 1.25 x (p99(N) + p99(D))".into(),
            res.c1.p99 / floor,
            1.25,
            res.c1.p99 <= 1.25 * floor,
        ));
        let floor = 1.0 / (1.0 / n.cn.rate + 1.0 / d.cn.rate);
        out.push((
            "Resolve throughput >= 0.80 x 1/(1/X(N) + 1/X(D))".into(),
            res.cn.rate / floor,
            0.80,
            res.cn.rate >= 0.80 * floor,
        ));
        let floor = n.cn.cpu_total() + d.cn.cpu_total();
        out.push((
            "CPU per Resolve <= 1.2 x (CPU(N) + CPU(D))".into(),
            res.cn.cpu_total() / floor,
            1.2,
            res.cn.cpu_total() <= 1.2 * floor,
        ));
    }
    if let Some(c) = r.get("CheckSpend") {
        out.push((
            "CheckSpend p50 <= 1.20 x p50(N)".into(),
            c.c1.p50 / n.c1.p50,
            1.20,
            c.c1.p50 <= 1.20 * n.c1.p50,
        ));
        out.push((
            "CheckSpend throughput >= 0.70 x X(N)".into(),
            c.cn.rate / n.cn.rate,
            0.70,
            c.cn.rate >= 0.70 * n.cn.rate,
        ));
    }
    if let (Some(b), Some(e)) = (r.get("BuildEnv"), r.get("E")) {
        let floor = e.c1.p50 + d.c1.p50;
        out.push((
            "BuildEnv p50 <= 1.10 x (p50(E) + p50(D))".into(),
            b.c1.p50 / floor,
            1.10,
            b.c1.p50 <= 1.10 * floor,
        ));
    }
    out
}

// ---------------------------------------------------------------------------
// Measuring.

#[derive(Clone)]
struct Opts {
    quick: bool,
    warmup: Duration,
    measure: Duration,
    concurrency: usize,
    connections: usize,
    /// `--only N,D,Resolve,import,stream`: run just these lanes (and the
    /// import and change-stream figures when named).
    only: Option<Vec<String>>,
    /// `--backend postgres|sqlite`: run just this backend.
    backend: Option<String>,
    /// `--reads-in-flight N`: the server's `--db-reads-in-flight`, and lane
    /// D's store's.
    reads_in_flight: Option<u32>,
}

/// One phase of one lane.
#[derive(Default, Clone)]
struct Phase {
    /// Requests per second.
    rate: f64,
    /// Microseconds.
    p50: f64,
    p99: f64,
    /// CPU microseconds per request: the process doing the lane's work, the
    /// Postgres backends, the load generator (this process) when it is not
    /// the former.
    cpu_svc: f64,
    cpu_pg: Option<f64>,
    cpu_gen: Option<f64>,
    /// The share of `cpu_svc` spent in the kernel (system calls, wake-ups).
    svc_sys: f64,
    /// Context switches of the process doing the lane's work, per request
    /// (a thread that waits and is woken, or is preempted).
    svc_switches: f64,
}

impl Phase {
    fn cpu_total(&self) -> f64 {
        self.cpu_svc + self.cpu_pg.unwrap_or(0.0)
    }
}

#[derive(Default, Clone)]
struct LaneResult {
    c1: Phase,
    cn: Phase,
}

/// Reads CPU time from `/proc`.
struct CpuProbe {
    server_pid: u32,
    /// Finds the Postgres backends serving the server and lane D.
    pg: Option<(sqlx::PgPool, Vec<String>)>,
    tick_us: f64,
}

#[derive(Default)]
struct CpuSnap {
    server: ProcCpu,
    harness: ProcCpu,
    pg: HashMap<u32, f64>,
}

/// One process's CPU time, in µs, and its threads' context switches.
#[derive(Default, Clone, Copy)]
struct ProcCpu {
    user: f64,
    sys: f64,
    switches: f64,
}

impl ProcCpu {
    fn of(pid: &str, tick_us: f64) -> ProcCpu {
        let (user, sys) = proc_cpu_us(pid, tick_us).unwrap_or_default();
        ProcCpu {
            user,
            sys,
            switches: proc_switches(pid).unwrap_or_default(),
        }
    }

    fn total(self) -> f64 {
        self.user + self.sys
    }
}

/// utime and stime of a process (all its threads, live and exited), in µs.
fn proc_cpu_us(pid: &str, tick_us: f64) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the line.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime * tick_us, stime * tick_us))
}

/// The context switches (voluntary and not) of a process's live threads.
/// (A thread that exited during a phase takes its count with it; the
/// server's runtime workers and connection threads live for the whole run.)
fn proc_switches(pid: &str) -> Option<f64> {
    let mut total = 0.0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(status) = std::fs::read_to_string(task.ok()?.path().join("status")) else {
            continue;
        };
        for line in status.lines() {
            if let Some(n) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += n.trim().parse::<f64>().unwrap_or(0.0);
            }
        }
    }
    Some(total)
}

impl CpuProbe {
    async fn snap(&self) -> CpuSnap {
        let mut s = CpuSnap {
            server: ProcCpu::of(&self.server_pid.to_string(), self.tick_us),
            harness: ProcCpu::of("self", self.tick_us),
            pg: HashMap::new(),
        };
        if let Some((pool, names)) = &self.pg {
            let pids: Vec<i32> = sqlx::query_scalar(
                "SELECT pid FROM pg_stat_activity WHERE application_name = ANY($1)",
            )
            .bind(names)
            .fetch_all(pool)
            .await
            .unwrap_or_default();
            for pid in pids {
                if let Some((user, sys)) = proc_cpu_us(&pid.to_string(), self.tick_us) {
                    s.pg.insert(pid as u32, user + sys);
                }
            }
        }
        s
    }
}

fn pg_delta(before: &CpuSnap, after: &CpuSnap) -> f64 {
    after
        .pg
        .iter()
        .map(|(pid, us)| us - before.pg.get(pid).copied().unwrap_or(0.0))
        .sum()
}

fn new_hist() -> Histogram<u64> {
    // Nanoseconds, 1 ns to 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds")
}

/// Runs `workers` callers spread over `conns` connections until `until`.
async fn drive(
    call: &Call,
    workers: usize,
    conns: usize,
    seq: &Arc<AtomicU64>,
    until: Instant,
) -> anyhow::Result<(Histogram<u64>, u64)> {
    let mut tasks = Vec::with_capacity(workers);
    for w in 0..workers {
        let call = call.clone();
        let seq = seq.clone();
        let conn = w % conns;
        tasks.push(tokio::spawn(async move {
            let mut hist = new_hist();
            let mut n = 0u64;
            while Instant::now() < until {
                let s = seq.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                let measured = call(conn, s).await?;
                let took = measured.unwrap_or_else(|| t.elapsed());
                hist.saturating_record(took.as_nanos().max(1) as u64);
                n += 1;
            }
            anyhow::Ok((hist, n))
        }));
    }
    let mut hist = new_hist();
    let mut n = 0;
    for t in tasks {
        let (h, c) = t.await??;
        hist.add(&h).expect("same bounds");
        n += c;
    }
    Ok((hist, n))
}

async fn phase(
    lane: &Lane,
    call: &Call,
    workers: usize,
    conns: usize,
    opts: &Opts,
    cpu: &CpuProbe,
    seq: &Arc<AtomicU64>,
) -> anyhow::Result<Phase> {
    // Warm-up: same callers, figures discarded.
    let (_, warm) = drive(call, workers, conns, seq, Instant::now() + opts.warmup).await?;
    let before = cpu.snap().await;
    let start = Instant::now();
    let (hist, count) = drive(call, workers, conns, seq, start + opts.measure).await?;
    let elapsed = start.elapsed().as_secs_f64();
    let after = cpu.snap().await;
    if std::env::var_os("LANES_VERBOSE").is_some() {
        eprintln!(
            "lane {} x{workers}: {warm} warm-up + {count} measured requests",
            lane.key
        );
    }
    let per = |us: f64| us / count.max(1) as f64;
    let harness = per(after.harness.total() - before.harness.total());
    let server = per(after.server.total() - before.server.total());
    let (cpu_svc, cpu_gen) = match lane.side {
        Side::Server => (server, Some(harness)),
        Side::Harness => (harness, None),
    };
    let (svc_before, svc_after) = match lane.side {
        Side::Server => (before.server, after.server),
        Side::Harness => (before.harness, after.harness),
    };
    let svc_sys = (svc_after.sys - svc_before.sys)
        / (svc_after.total() - svc_before.total()).max(f64::MIN_POSITIVE);
    Ok(Phase {
        rate: count as f64 / elapsed,
        p50: hist.value_at_quantile(0.50) as f64 / 1000.0,
        p99: hist.value_at_quantile(0.99) as f64 / 1000.0,
        cpu_svc,
        cpu_pg: cpu.pg.as_ref().map(|_| per(pg_delta(&before, &after))),
        cpu_gen,
        svc_sys,
        svc_switches: per(svc_after.switches - svc_before.switches),
    })
}

// ---------------------------------------------------------------------------
// The server child, the databases, the workspaces.

/// The bench-only echo service: answers a BuildEnvRequest with itself.
mod echo {
    use std::{convert::Infallible, future::Future, pin::Pin, task::Poll};

    use billing_mode::{proto::BuildEnvRequest, service::codec::Codec};
    use tonic::codegen::{http, Body, StdError};

    pub(crate) const PATH: &str = "/molecule.billing.bench.v1.Echo/Echo";

    #[derive(Clone, Default)]
    pub(crate) struct EchoServer;

    impl tonic::server::NamedService for EchoServer {
        const NAME: &'static str = "molecule.billing.bench.v1.Echo";
    }

    struct Echo;

    impl tonic::server::UnaryService<BuildEnvRequest> for Echo {
        type Response = BuildEnvRequest;
        type Future = std::future::Ready<Result<tonic::Response<BuildEnvRequest>, tonic::Status>>;

        fn call(&mut self, request: tonic::Request<BuildEnvRequest>) -> Self::Future {
            std::future::ready(Ok(tonic::Response::new(request.into_inner())))
        }
    }

    impl<B> tower::Service<http::Request<B>> for EchoServer
    where
        B: Body + Send + 'static,
        B::Error: Into<StdError> + Send + 'static,
    {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<B>) -> Self::Future {
            Box::pin(async move {
                let mut grpc =
                    tonic::server::Grpc::new(Codec::<BuildEnvRequest, BuildEnvRequest>::default());
                Ok(grpc.unary(Echo, req).await)
            })
        }
    }
}

/// In the child: serve like `billing-mode serve` (same runtime, same log
/// set-up), plus the echo service; print the address; stop when stdin closes.
fn serve_child(database_url: String, token_line: String) -> anyhow::Result<()> {
    let runtime = telemetry::runtime()?;
    runtime.block_on(async move {
        let _guard = telemetry::init(
            &LogLevel::from_flag(None),
            vec![Sink::stderr(LogFormat::Text)],
        )?;
        let config = Config {
            listen: "127.0.0.1:0".parse()?,
            // The admin port (metrics, health) is on in production.
            admin_listen: Some("127.0.0.1:0".parse()?),
            database_url: database_url.into(),
            tokens: billing_mode::auth::parse_token_lines(&token_line, "lanes")
                .map_err(anyhow::Error::msg)?,
            db_reads_in_flight: match std::env::var("LANES_READS_IN_FLIGHT") {
                Ok(n) if !n.is_empty() => Some(n.parse().context("LANES_READS_IN_FLIGHT")?),
                _ => None,
            },
            // The spend snapshot's recheck reads every stored record (here
            // 100,000) once a minute: a cost per minute, not per request,
            // which would land in the CPU figures of whichever lane ran then
            // (the server's Postgres backends are counted for lane D and
            // Resolve alike). Off for the run; its cost is not a lane's.
            spend_recheck_interval: Duration::from_secs(24 * 3600),
            ..Config::default()
        };
        let app = Application::build(config)
            .await?
            .with_extra_service(echo::EchoServer);
        println!("listening {}", app.local_addr());
        std::io::stdout().flush()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let mut sink = String::new();
            while std::io::stdin()
                .read_line(&mut sink)
                .map(|n| n > 0)
                .unwrap_or(false)
            {}
            let _ = tx.send(());
        });
        app.run_until(async {
            let _ = rx.await;
        })
        .await
    })
}

struct Server {
    child: Child,
    addr: SocketAddr,
    log: std::path::PathBuf,
}

impl Server {
    fn spawn(
        database_url: &str,
        token_line: &str,
        dir: &std::path::Path,
        reads_in_flight: Option<u32>,
    ) -> anyhow::Result<Server> {
        let log = dir.join("server.log");
        // `LANES_SERVER_WRAPPER="valgrind --tool=callgrind"` (any command and
        // its arguments) runs the server under it, to count its instructions
        // per request; the load generator runs as usual.
        let wrapper = std::env::var("LANES_SERVER_WRAPPER").unwrap_or_default();
        let mut wrapper = wrapper.split_whitespace();
        let mut command = match wrapper.next() {
            Some(program) => {
                let mut c = Command::new(program);
                c.args(wrapper).arg(std::env::current_exe()?);
                c
            }
            None => Command::new(std::env::current_exe()?),
        };
        let mut child = command
            .arg("--lanes-server")
            .env("LANES_DATABASE_URL", database_url)
            .env("LANES_TOKEN_LINE", token_line)
            .env(
                "LANES_READS_IN_FLIGHT",
                reads_in_flight.map(|n| n.to_string()).unwrap_or_default(),
            )
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("child stdout")?).read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("listening ") else {
            let _ = child.kill();
            bail!(
                "the server did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        Ok(Server {
            addr: addr.parse()?,
            child,
            log,
        })
    }

    /// VmHWM (peak resident set) of the server, in KiB.
    fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    fn stop(mut self) -> anyhow::Result<()> {
        drop(self.child.stdin.take());
        let status = self.child.wait()?;
        if !status.success() {
            bail!(
                "the server exited with {status}: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        Ok(())
    }
}

/// Stores `n` workspaces (claude-code on opus with the customer's token:
/// byok), each with its creation audit row, in batches; returns their ids.
async fn seed(url: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let ids: Vec<String> = (0..n)
        .map(|_| WorkspaceId::new_random().to_string())
        .collect();
    let postgres = url.starts_with("postgres");
    let (keys, at) = if postgres {
        ("'[\"CLAUDE_CODE_OAUTH_TOKEN\"]'::jsonb", "now()")
    } else {
        (
            "'[\"CLAUDE_CODE_OAUTH_TOKEN\"]'",
            "'2026-01-01T00:00:00+00:00'",
        )
    };
    let after = r#"'{"runtime":"claude-code","model":"opus","credential_keys":["CLAUDE_CODE_OAUTH_TOKEN"],"override_mode":null}'"#;
    let cast = if postgres { "::uuid" } else { "" };
    let mut statements = Vec::new();
    for chunk in ids.chunks(2000) {
        // The ids are generated here (hex and hyphens): safe to inline.
        let mut records = String::from(
            "INSERT INTO billing_records (workspace_id, runtime, model, credential_keys, override_mode, revision, updated_at) VALUES ",
        );
        let mut audit = String::from(
            "INSERT INTO billing_audit (workspace_id, revision, actor, reason, before, after, at) VALUES ",
        );
        for (i, id) in chunk.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            write!(
                records,
                "{sep}('{id}'{cast}, 'claude-code', 'opus', {keys}, NULL, 1, {at})"
            )?;
            write!(
                audit,
                "{sep}('{id}'{cast}, 1, 'lanes', 'seed', NULL, {after}, {at})"
            )?;
        }
        statements.push(records);
        statements.push(audit);
    }
    if postgres {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(url).await?;
        let mut tx = conn.begin().await?;
        for s in &statements {
            sqlx::raw_sql(s).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        sqlx::raw_sql("ANALYZE billing_records; ANALYZE billing_audit")
            .execute(&mut conn)
            .await?;
    } else {
        use sqlx::{sqlite::SqliteConnectOptions, Connection};
        use std::str::FromStr;
        let mut conn =
            sqlx::SqliteConnection::connect_with(&SqliteConnectOptions::from_str(url)?).await?;
        let mut tx = conn.begin().await?;
        for s in &statements {
            sqlx::raw_sql(s).execute(&mut *tx).await?;
        }
        tx.commit().await?;
    }
    Ok(ids)
}

/// The candidate env of BuildEnv and E: the customer's token, the platform's
/// key and proxy settings, and other settings up to `entries`.
fn candidate_env(entries: usize) -> Vec<EnvVar> {
    let var = |key: &str, value: &str, origin: Origin| EnvVar {
        key: key.into(),
        value: value.into(),
        origin: origin.into(),
    };
    let mut env = vec![
        var(
            "CLAUDE_CODE_OAUTH_TOKEN",
            "sk-ant-oat-customer-0123456789",
            Origin::Workspace,
        ),
        var(
            "CLAUDE_CODE_OAUTH_TOKEN",
            "sk-ant-oat-platform-0123456789",
            Origin::Global,
        ),
        var(
            "ANTHROPIC_API_KEY",
            "sk-ant-api-platform-0123456789",
            Origin::Global,
        ),
        var(
            "MOLECULE_LLM_ANTHROPIC_BASE_URL",
            "https://llm-proxy.internal/anthropic",
            Origin::Platform,
        ),
        var(
            "MOLECULE_LLM_OPENAI_BASE_URL",
            "https://llm-proxy.internal/openai",
            Origin::Platform,
        ),
        var(
            "MOLECULE_LLM_USAGE_TOKEN",
            "usage-token-0123456789",
            Origin::Platform,
        ),
    ];
    let mut i = 0;
    while env.len() < entries {
        let origin = if i % 2 == 0 {
            Origin::Global
        } else {
            Origin::Workspace
        };
        env.push(var(
            &format!("SETTING_{i}"),
            &format!("value-of-setting-{i}"),
            origin,
        ));
        i += 1;
    }
    env
}

struct Backend {
    name: &'static str,
    url: String,
    /// Postgres: (base URL, schema) to drop at the end.
    pg_schema: Option<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

async fn backends(opts: &Opts) -> anyhow::Result<Vec<Backend>> {
    let wanted = |name: &str| opts.backend.as_ref().is_none_or(|b| b == name);
    let mut out = Vec::new();
    match std::env::var("DATABASE_URL") {
        _ if !wanted("postgres") => {}
        Ok(base) if base.starts_with("postgres") => {
            use sqlx::Connection;
            let schema = format!("lanes_{}", uuid::Uuid::new_v4().simple());
            let mut conn = sqlx::PgConnection::connect(&base)
                .await
                .context("connecting to DATABASE_URL")?;
            sqlx::raw_sql(&format!("CREATE SCHEMA {schema}"))
                .execute(&mut conn)
                .await?;
            let sep = if base.contains('?') { '&' } else { '?' };
            out.push(Backend {
                name: "Postgres",
                url: format!("{base}{sep}options[search_path]={schema}"),
                pg_schema: Some((base, schema)),
                _dir: None,
            });
        }
        _ => println!(
            "Postgres: SKIPPED (set DATABASE_URL=postgres://… to measure the production backend)"
        ),
    }
    if !wanted("sqlite") {
        return Ok(out);
    }
    let dir = tempfile::tempdir()?;
    out.push(Backend {
        name: "SQLite",
        url: format!("sqlite:{}", dir.path().join("lanes.db").display()),
        pg_schema: None,
        _dir: Some(dir),
    });
    Ok(out)
}

fn with_app_name(url: &str, name: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}application_name={name}")
}

async fn run_backend(backend: &Backend, opts: &Opts) -> anyhow::Result<()> {
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let postgres = backend.pg_schema.is_some();
    let (server_url, direct_url) = if postgres {
        (
            with_app_name(&backend.url, &format!("lanes-server-{run_id}")),
            with_app_name(&backend.url, &format!("lanes-direct-{run_id}")),
        )
    } else {
        (backend.url.clone(), backend.url.clone())
    };

    // The store of lane D: the same constructor (pool type and settings) as
    // the server's. Connecting applies the migrations.
    let store = store::open(
        &direct_url,
        true,
        store::PoolSize {
            max_connections: None,
            reads_in_flight: opts.reads_in_flight,
        },
    )
    .await?;
    let t = Instant::now();
    let ids = Arc::new(seed(&backend.url, WORKSPACES).await?);
    let seeded = t.elapsed();

    let dir = tempfile::tempdir()?;
    let (token, entry) =
        generate_token("lanes", [Role::Admin].into()).map_err(anyhow::Error::msg)?;
    let server = Server::spawn(&server_url, &entry.line(), dir.path(), opts.reads_in_flight)?;
    let mut channels = Vec::new();
    for _ in 0..opts.connections.max(1) {
        // One HTTP/2 connection each.
        channels.push(
            Endpoint::from_shared(format!("http://{}", server.addr))?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }
    let ctx = Ctx {
        channels,
        token: format!("Bearer {token}").parse()?,
        store,
        ids,
        env: candidate_env(ENV_ENTRIES),
        counter: Arc::new(AtomicU64::new(0)),
    };
    let tick_us = clock_tick_us();
    let cpu = CpuProbe {
        server_pid: server.child.id(),
        pg: if postgres {
            Some((
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&with_app_name(
                        &backend.url,
                        &format!("lanes-monitor-{run_id}"),
                    ))
                    .await?,
                vec![
                    format!("lanes-server-{run_id}"),
                    format!("lanes-direct-{run_id}"),
                ],
            ))
        } else {
            None
        },
        tick_us,
    };

    let mut results: HashMap<&str, LaneResult> = HashMap::new();
    let lanes: Vec<Lane> = lanes()
        .into_iter()
        .filter(|l| {
            opts.only
                .as_ref()
                .is_none_or(|only| only.iter().any(|k| k == l.key))
        })
        .collect();
    for lane in &lanes {
        let call = (lane.build)(&ctx);
        let seq = Arc::new(AtomicU64::new(0));
        let c1 = phase(lane, &call, 1, 1, opts, &cpu, &seq)
            .await
            .with_context(|| format!("lane {} at concurrency 1", lane.key))?;
        let cn = phase(
            lane,
            &call,
            opts.concurrency,
            opts.connections,
            opts,
            &cpu,
            &seq,
        )
        .await
        .with_context(|| format!("lane {} at concurrency {}", lane.key, opts.concurrency))?;
        results.insert(lane.key, LaneResult { c1, cn });
    }
    let wanted = |key: &str| {
        opts.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|k| k == key))
    };
    let imported = if wanted("import") {
        import_throughput(&ctx, opts).await?
    } else {
        Vec::new()
    };
    let stream = if postgres && wanted("stream") {
        Some(
            change_stream_lanes(
                &ctx,
                server.addr,
                &server_url,
                &entry.line(),
                dir.path(),
                opts,
            )
            .await?,
        )
    } else {
        None
    };
    let peak = server.peak_rss_kib();
    server.stop()?;

    print_table(backend, opts, &lanes, &results, seeded, peak);
    print_import(backend, &imported);
    if let Some(stream) = &stream {
        print_change_stream(stream, opts);
    }
    if let Some((base, schema)) = &backend.pg_schema {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(base).await?;
        sqlx::raw_sql(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&mut conn)
            .await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Import throughput: `billing_mode::import::run` (the library behind
// `billing-mode import`) registering new workspaces through the same server,
// in create-only batches (`BatchCreateWorkspaces`, one commit each).

/// Workspaces registered per second by one import at its default
/// concurrency (8), against a local server on Postgres.
const IMPORT_TARGET_PER_SEC: f64 = 2000.0;
/// The import's default `--concurrency`.
const IMPORT_DEFAULT_CONCURRENCY: usize = 8;

/// (concurrency, workspaces, per second) for the default concurrency and a
/// wider one.
async fn import_throughput(ctx: &Ctx, opts: &Opts) -> anyhow::Result<Vec<(usize, usize, f64)>> {
    use billing_mode::import;
    let n = if opts.quick { 2_000 } else { 20_000 };
    let conn = import::Connection::new(ctx.channels[0].clone(), Some(ctx.token.clone().into()));
    let mut out = Vec::new();
    for concurrency in [IMPORT_DEFAULT_CONCURRENCY, 32] {
        let text: String = (0..n)
            .map(|_| {
                format!(
                    "{{\"workspace_id\":\"{}\",\"runtime\":\"claude-code\",\"model\":\"opus\",\
                     \"credential_keys\":[\"CLAUDE_CODE_OAUTH_TOKEN\"],\"legacy_mode\":\"byok\"}}\n",
                    WorkspaceId::new_random()
                )
            })
            .collect();
        let parsed = import::parse(std::io::Cursor::new(text))?;
        let options = import::Options {
            dry_run: false,
            update: false,
            concurrency,
            batch_size: import::DEFAULT_BATCH_SIZE,
            reason: "lanes: import".into(),
        };
        let start = Instant::now();
        let report = import::run(
            &conn,
            parsed.entries,
            &options,
            Arc::new(std::sync::atomic::AtomicBool::new(false)),
            |_| {},
        )
        .await;
        let rate = n as f64 / start.elapsed().as_secs_f64();
        if report.created != n {
            bail!(
                "the import created {} of {n}: {:?}",
                report.created,
                report.failures.first()
            );
        }
        out.push((concurrency, n, rate));
    }
    Ok(out)
}

/// The change stream's figures (Postgres).
struct StreamFigures {
    /// Committed Set (its answer received) to the event at a Watch client
    /// of the other replica, in ns; an event that came first counts 0.
    delay: Histogram<u64>,
    /// Sequential Sets on one connection with no Watch stream open, and
    /// with 100 idle ones (filtered to a workspace nobody writes).
    set_without: Histogram<u64>,
    set_with_idle: Histogram<u64>,
}

/// The change-stream lanes: a second server (a replica on the same store)
/// serves a Watch stream; each Set through the first is timed to its event
/// there, one change at a time. Then Set latency, sequentially, without any
/// Watch stream and with 100 idle ones open on the first server.
async fn change_stream_lanes(
    ctx: &Ctx,
    addr: SocketAddr,
    server_url: &str,
    token_line: &str,
    dir: &std::path::Path,
    opts: &Opts,
) -> anyhow::Result<StreamFigures> {
    let changes = if opts.quick { 100 } else { 1_000 };
    let replica_dir = dir.join("replica");
    std::fs::create_dir_all(&replica_dir)?;
    let replica = Server::spawn(server_url, token_line, &replica_dir, opts.reads_in_flight)?;
    let replica_channel = Endpoint::from_shared(format!("http://{}", replica.addr))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut stream = BillingModeClient::new(replica_channel)
        .watch(ctx.authorized(WatchRequest::default()))
        .await?
        .into_inner();
    // The opening progress message: the stream is live from here.
    stream
        .message()
        .await?
        .context("the opening progress message")?;
    let (events, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Ok(Some(m)) = stream.message().await {
            if let Some(watch_response::Event::Resolution(r)) = m.event {
                let _ = events.send((r.workspace_id, r.revision, Instant::now()));
            }
        }
    });
    let mut client = ctx.client(0);
    let set = |i: usize, tag: &str| {
        ctx.authorized(SetRequest {
            workspace_id: ctx.ids[i % ctx.ids.len()].clone(),
            // A model never set before: every Set is a change.
            model: Some(format!("stream-{tag}-{i}")),
            reason: "lanes".into(),
            ..SetRequest::default()
        })
    };
    let mut delay = new_hist();
    for i in 0..changes {
        let answer = client.set(set(i, "delay")).await?.into_inner();
        let committed = Instant::now();
        let r = answer.resolution.context("Set answers a resolution")?;
        loop {
            let (ws, revision, at) = tokio::time::timeout(Duration::from_secs(10), arrivals.recv())
                .await
                .context("the event reached the other replica within 10 s")?
                .context("the replica's stream ended")?;
            if ws == r.workspace_id && revision == r.revision {
                let ns = at.saturating_duration_since(committed).as_nanos();
                delay.record(u64::try_from(ns).unwrap_or(u64::MAX).max(1))?;
                break;
            }
        }
    }
    reader.abort();
    replica.stop()?;

    let sets = changes;
    let timed_sets = |tag: &'static str| {
        let mut client = ctx.client(0);
        let reqs: Vec<_> = (0..sets).map(|i| set(i + 7, tag)).collect();
        async move {
            let mut h = new_hist();
            for req in reqs {
                let t = Instant::now();
                client.set(req).await?;
                h.record(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX))?;
            }
            anyhow::Ok(h)
        }
    };
    let set_without = timed_sets("without").await?;
    // 100 idle streams, over two connections (64 streams per connection).
    let quiet = WorkspaceId::new_random().to_string();
    let mut idle = Vec::new();
    for _ in 0..2 {
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        for _ in 0..50 {
            let mut s = BillingModeClient::new(channel.clone())
                .watch(ctx.authorized(WatchRequest {
                    workspace_ids: vec![quiet.clone()],
                    ..WatchRequest::default()
                }))
                .await?
                .into_inner();
            s.message().await?.context("the opening progress message")?;
            idle.push(s);
        }
    }
    let set_with_idle = timed_sets("idle").await?;
    drop(idle);
    Ok(StreamFigures {
        delay,
        set_without,
        set_with_idle,
    })
}

fn print_change_stream(f: &StreamFigures, opts: &Opts) {
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e6;
    println!(
        "change stream (postgres): {} changes, one at a time; Set -> event at a Watch client of another replica",
        f.delay.len()
    );
    let p99 = ms(&f.delay, 0.99);
    println!(
        "  delay p50 {:.2} ms, p99 {p99:.2} ms   target p99 < 50 ms  {}",
        ms(&f.delay, 0.5),
        if p99 < 50.0 { "PASS" } else { "MISS" }
    );
    let (p50_0, p99_0) = (ms(&f.set_without, 0.5), ms(&f.set_without, 0.99));
    let (p50_1, p99_1) = (ms(&f.set_with_idle, 0.5), ms(&f.set_with_idle, 0.99));
    let ratio = p50_1 / p50_0;
    println!(
        "  Set c1 without Watch streams: p50 {p50_0:.2} ms p99 {p99_0:.2} ms; with 100 idle streams: \
         p50 {p50_1:.2} ms p99 {p99_1:.2} ms"
    );
    println!(
        "  Set p50 with 100 idle streams / without {ratio:.2}   target <= 1.10  {}",
        if ratio <= 1.10 { "PASS" } else { "MISS" }
    );
    if opts.quick {
        println!("  (quick run: figures are indicative only)");
    }
}

fn print_import(backend: &Backend, figures: &[(usize, usize, f64)]) {
    for (concurrency, n, rate) in figures {
        let verdict = if *concurrency == IMPORT_DEFAULT_CONCURRENCY && backend.pg_schema.is_some() {
            format!(
                "  target >= {IMPORT_TARGET_PER_SEC:.0}/s on Postgres  {}",
                if *rate >= IMPORT_TARGET_PER_SEC {
                    "PASS"
                } else {
                    "MISS"
                }
            )
        } else {
            String::new()
        };
        println!(
            "  import, {n} new workspaces, --concurrency {concurrency:>2} --batch-size {}: \
             {rate:>7.0} workspaces/s{verdict}",
            billing_mode::import::DEFAULT_BATCH_SIZE
        );
    }
}

fn clock_tick_us() -> f64 {
    // `getconf CLK_TCK` (the unit of /proc/<pid>/stat times); 100 on Linux.
    let hz = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0);
    1_000_000.0 / hz
}

fn print_table(
    backend: &Backend,
    opts: &Opts,
    lanes: &[Lane],
    r: &HashMap<&str, LaneResult>,
    seeded: Duration,
    peak_kib: Option<u64>,
) {
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
    println!();
    println!(
        "== {}: {WORKSPACES} workspaces stored (in {:.1?}); warm-up {:?} discarded, then {:?} per phase; \
         c1 = 1 caller on 1 connection, cN = {} callers over {} connections",
        backend.name, seeded, opts.warmup, opts.measure, opts.concurrency, opts.connections
    );
    println!(
        "{:<9} {:<38} | {:>8} {:>8} | {:>9} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>7} {:>7}",
        "lane",
        "",
        "c1 p50",
        "c1 p99",
        "cN req/s",
        "cN p50",
        "cN p99",
        "cpu svc",
        "cpu pg",
        "cpu gen",
        "svc sys",
        "svc cs"
    );
    println!(
        "{:<9} {:<38} | {:>8} {:>8} | {:>9} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>7} {:>7}",
        "", "", "µs", "µs", "", "µs", "µs", "µs/req", "µs/req", "µs/req", "%", "/req"
    );
    for lane in lanes {
        let Some(l) = r.get(lane.key) else { continue };
        println!(
            "{:<9} {:<38} | {:>8.0} {:>8.0} | {:>9.0} {:>8.0} {:>8.0} | {:>8.1} {:>8} {:>8} | {:>7.0} {:>7.2}",
            lane.key,
            lane.what,
            l.c1.p50,
            l.c1.p99,
            l.cn.rate,
            l.cn.p50,
            l.cn.p99,
            l.cn.cpu_svc,
            opt(l.cn.cpu_pg),
            opt(l.cn.cpu_gen),
            100.0 * l.cn.svc_sys,
            l.cn.svc_switches,
        );
    }
    println!(
        "  (cpu svc: the server process, or this process for D; cpu pg: the Postgres backends; \
         cpu gen: this process as load generator; svc sys: the share of cpu svc in the kernel; \
         svc cs: context switches of cpu svc's process; all per request, from the cN phase)"
    );
    println!("targets ({}):", backend.name);
    for (what, measured, limit, pass) in targets(r) {
        println!(
            "  {what:<52} {measured:>6.2} (limit {limit:.2})  {}",
            if pass { "PASS" } else { "MISS" }
        );
    }
    match peak_kib {
        Some(kib) => {
            let mib = kib as f64 / 1024.0;
            println!(
                "  {:<52} {mib:>6.1} MiB (limit 64)  {}",
                "server peak RSS under load",
                if mib <= 64.0 { "PASS" } else { "MISS" }
            );
        }
        None => println!("  server peak RSS under load: unavailable (no /proc)"),
    }
    if opts.quick {
        println!("  (quick run: short phases, figures are indicative only)");
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--lanes-server") {
        return serve_child(
            std::env::var("LANES_DATABASE_URL")?,
            std::env::var("LANES_TOKEN_LINE")?,
        );
    }
    let quick = args.iter().any(|a| a == "--quick");
    let text_flag = |name: &str| -> Option<String> {
        let i = args.iter().position(|a| a == name)?;
        args.get(i + 1).cloned()
    };
    let flag = |name: &str| -> Option<usize> { text_flag(name)?.parse().ok() };
    let opts = Opts {
        quick,
        warmup: if quick {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(1)
        },
        measure: if quick {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(3)
        },
        concurrency: flag("--concurrency").unwrap_or(16),
        connections: flag("--connections").unwrap_or(4),
        reads_in_flight: match text_flag("--reads-in-flight") {
            Some(n) => Some(n.parse().context("--reads-in-flight takes a number")?),
            None => None,
        },
        only: text_flag("--only").map(|s| s.split(',').map(str::to_owned).collect()),
        backend: text_flag("--backend").map(|s| s.to_lowercase()),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        for backend in backends(&opts).await? {
            run_backend(&backend, &opts)
                .await
                .with_context(|| format!("lanes on {}", backend.name))?;
        }
        anyhow::Ok(())
    })
}
