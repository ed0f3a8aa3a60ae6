//! `billing-mode`: the server, its migrations, and client commands for
//! operators without grpcurl.
#![forbid(unsafe_code)]

use std::{
    collections::BTreeSet, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration,
};

use anyhow::Context;
use billing_mode::{
    auth::{self, Role},
    client::{self, adopt, watch},
    config::{self, Config, DatabaseUrl, TlsFiles},
    startup::{self, Application},
    store,
    telemetry::{self, LogFormat, LogLevel, Sink},
};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "billing-mode",
    version,
    about = "The billing-mode authority: who pays for a workspace's LLM usage, and the env its container gets"
)]
struct Cli {
    /// Log filter, e.g. `info` or `billing_mode=debug,info`. Given, it wins
    /// over RUST_LOG; not given, RUST_LOG applies if set, else `info`.
    #[arg(long, env = "BILLING_MODE_LOG", global = true)]
    log_level: Option<String>,
    /// Log output format.
    #[arg(
        long,
        env = "BILLING_MODE_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct DatabaseArgs {
    /// `sqlite:PATH` (created if missing) or `postgres://…`.
    #[arg(long, env = "DATABASE_URL", default_value = config::DEFAULT_DATABASE_URL,
          hide_env_values = true)]
    database_url: DatabaseUrl,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC server.
    Serve(ServeArgs),
    /// Apply the embedded database migrations and exit.
    Migrate(DatabaseArgs),
    /// Manage bearer tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Show a workspace's decision.
    Resolve(client::ResolveArgs),
    /// Record resolution inputs (runtime, model, credential keys, override).
    Set(client::SetArgs),
    /// Remove a workspace's operator override.
    Clear(client::ClearArgs),
    /// Build a provisioning env from a candidate env file.
    BuildEnv(client::BuildEnvArgs),
    /// List a workspace's audit history, newest first.
    History(client::HistoryArgs),
    /// List every reported instance whose applied mode differs from the
    /// current decision, oldest first (re-provision them).
    Drift(client::DriftArgs),
    /// Follow the change stream: one line per committed change (JSON lines
    /// with --json); on Ctrl-C, prints the cursor to resume from.
    Watch(watch::WatchArgs),
    /// List every workspace's decision, in workspace-id order.
    List(adopt::ListArgs),
    /// Register existing workspaces from JSON Lines (create-only; --dry-run
    /// shows the decisions and where they differ from legacy_mode).
    Import(adopt::ImportArgs),
    /// Ask whether the platform may pay for a workspace's LLM calls now (the
    /// metering proxy's spend check).
    CheckSpend(client::CheckSpendArgs),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token: prints the token (give it to the caller) and the line
    /// to add to the tokens file (the server stores only the hash).
    Create {
        /// The token's name, recorded as the actor of its changes.
        #[arg(long)]
        name: String,
        /// Comma-separated roles: reader, provisioner, writer, admin, meter.
        #[arg(long, value_delimiter = ',', required = true)]
        roles: Vec<String>,
    },
}

/// An optional address (`off` is none). An alias, so that clap does not
/// treat the flag itself as optional: its default is an address.
type MaybeAddr = Option<SocketAddr>;

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on: an IP address and a port (0.0.0.0:50051 for
    /// every interface).
    #[arg(long, env = "BILLING_MODE_LISTEN", default_value = config::DEFAULT_LISTEN,
          value_parser = config::parse_listen)]
    listen: SocketAddr,
    #[command(flatten)]
    database: DatabaseArgs,
    /// A provider registry file replacing the built-in one (docs/registry.md).
    #[arg(long, env = "BILLING_MODE_REGISTRY")]
    registry: Option<PathBuf>,
    /// A file of token lines `NAME sha256:HEX ROLE[,ROLE…]`.
    #[arg(long, env = "BILLING_MODE_TOKENS_FILE")]
    tokens_file: Option<PathBuf>,
    /// Token lines given directly (newline- or `;`-separated).
    #[arg(long = "tokens", env = "BILLING_MODE_TOKENS", hide_env_values = true)]
    tokens_inline: Option<String>,
    /// Serve without tokens on a non-loopback address anyway.
    #[arg(long)]
    insecure_allow_unauthenticated: bool,
    /// Server certificate (PEM); enables TLS.
    #[arg(long, env = "BILLING_MODE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, env = "BILLING_MODE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA certificate (PEM) that client certificates must chain to (mTLS).
    #[arg(long, env = "BILLING_MODE_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Per-request timeout in milliseconds (at least 1).
    #[arg(
        long,
        env = "BILLING_MODE_REQUEST_TIMEOUT_MS",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    request_timeout_ms: u64,
    /// Requests served at once across all connections.
    #[arg(long, env = "BILLING_MODE_CONCURRENCY_LIMIT", default_value_t = 256)]
    concurrency_limit: usize,
    /// Requests served at once on one connection.
    #[arg(long, env = "BILLING_MODE_MAX_CONCURRENT_PER_CONNECTION",
          default_value_t = config::DEFAULT_MAX_CONCURRENT_PER_CONNECTION)]
    max_concurrent_per_connection: usize,
    /// Connections the store's pool opens at most (default: 16 on Postgres,
    /// for each of its two pools, reads and the rest; 4 on SQLite).
    #[arg(long, env = "BILLING_MODE_DB_MAX_CONNECTIONS")]
    db_max_connections: Option<u32>,
    /// Postgres: reads run at once, each its own statement; reads arriving
    /// while that many run wait and go to the database together, in one
    /// statement (default: one per 16 of --db-max-connections, 1 of 16).
    /// Fewer: larger statements, less database CPU per read; more: less
    /// waiting on a database with cores to spare. Unused on SQLite.
    #[arg(long, env = "BILLING_MODE_DB_READS_IN_FLIGHT",
          value_parser = clap::value_parser!(u32).range(1..))]
    db_reads_in_flight: Option<u32>,
    /// Admin HTTP listener (/healthz, /readyz, /metrics), or `off`.
    #[arg(long, env = "BILLING_MODE_ADMIN_LISTEN", default_value = config::DEFAULT_ADMIN_LISTEN,
          value_parser = config::parse_admin_listen)]
    admin_listen: MaybeAddr,
    /// How long to keep retrying an unreachable store at start-up (e.g. 60s, 500ms, 2m).
    #[arg(long, env = "BILLING_MODE_STARTUP_TIMEOUT", default_value = config::DEFAULT_STARTUP_TIMEOUT,
          value_parser = config::parse_duration)]
    startup_timeout: Duration,
    /// Do not apply migrations (run `billing-mode migrate` first); the server
    /// is not ready until they are applied.
    #[arg(long)]
    no_migrate: bool,
    /// How long the change log is kept, in seconds (default 7 days); Watch
    /// cursors older than that expire.
    #[arg(long, env = "BILLING_MODE_CHANGE_RETENTION_SECS", default_value_t = config::DEFAULT_CHANGE_RETENTION.as_secs())]
    change_retention_secs: u64,
    /// Messages queued for one Watch stream before it is cut off as too slow.
    #[arg(long, env = "BILLING_MODE_WATCH_BUFFER", default_value_t = config::DEFAULT_WATCH_BUFFER)]
    watch_buffer: usize,
    /// CheckSpend answers UNAVAILABLE (and health says NOT_SERVING) when this
    /// replica cannot confirm its spend snapshot was current this recently
    /// (e.g. 2s, 1500ms, 1m; at least twice the change feed's 500 ms poll).
    #[arg(long, env = "BILLING_MODE_MAX_STALENESS", default_value = "2s", value_parser = config::parse_duration)]
    max_staleness: Duration,
}

impl ServeArgs {
    fn into_config(self) -> anyhow::Result<Config> {
        // The tokens file is read by the server itself (and again on SIGHUP).
        let tokens = match &self.tokens_inline {
            Some(inline) => {
                auth::parse_token_lines(&inline.replace(';', "\n"), "BILLING_MODE_TOKENS")?
            }
            None => Vec::new(),
        };
        // `Application::build` checks it as its first step, before the
        // store is opened: a mistake is said at once.
        Ok(Config {
            listen: self.listen,
            database_url: self.database.database_url,
            registry_path: self.registry,
            tokens_file: self.tokens_file,
            tokens,
            insecure_allow_unauthenticated: self.insecure_allow_unauthenticated,
            tls: match (self.tls_cert, self.tls_key) {
                (Some(cert), Some(key)) => Some(TlsFiles {
                    cert,
                    key,
                    client_ca: self.tls_client_ca,
                }),
                _ => None,
            },
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            concurrency_limit: self.concurrency_limit.max(1),
            max_concurrent_per_connection: self.max_concurrent_per_connection.max(1),
            db_max_connections: self.db_max_connections.map(|n| n.max(1)),
            db_reads_in_flight: self.db_reads_in_flight,
            admin_listen: self.admin_listen,
            startup_timeout: self.startup_timeout,
            migrate: !self.no_migrate,
            change_retention: Duration::from_secs(self.change_retention_secs.max(1)),
            watch_buffer: self.watch_buffer.max(1),
            max_staleness: self.max_staleness,
            ..Config::default()
        })
    }
}

/// jemalloc instead of glibc's allocator (docs/performance.md, change 12):
/// a request allocates and frees a few hundred small blocks, often on two
/// worker threads, where glibc's bins and arena locks were a fifth of the
/// instructions of a Resolve.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match telemetry::runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let level = LogLevel::from_flag(cli.log_level);
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => run_server(&level, cli.log_format, args).await,
            Command::Migrate(db) => report(migrate(&level, cli.log_format, db).await),
            Command::Token(TokenCommand::Create { name, roles }) => {
                report(create_token(&name, &roles))
            }
            Command::Resolve(a) => client::resolve(a).await,
            Command::Set(a) => client::set(a).await,
            Command::Clear(a) => client::clear(a).await,
            Command::BuildEnv(a) => client::build_env(a).await,
            Command::History(a) => client::history(a).await,
            Command::Drift(a) => client::drift(a).await,
            Command::Watch(a) => watch::watch(a).await,
            Command::List(a) => adopt::list(a).await,
            Command::Import(a) => adopt::import(a).await,
            Command::CheckSpend(a) => client::check_spend(a).await,
        }
    })
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", billing_mode::service::error::anyhow_text(&e));
            ExitCode::FAILURE
        }
    }
}

async fn run_server(level: &LogLevel, format: LogFormat, args: ServeArgs) -> ExitCode {
    let _guard = match telemetry::init(level, vec![Sink::stderr(format)]) {
        Ok(g) => g,
        Err(e) => return report(Err(e)),
    };
    let result = async {
        let shutdown = startup::shutdown_signal()?;
        tokio::pin!(shutdown);
        // A stop asked for while the server starts (waiting for the store,
        // migrating) ends it there: each migration is one transaction, so
        // one in progress is rolled back when its connection goes.
        let app = tokio::select! {
            app = Application::build(args.into_config()?) => app?,
            () = &mut shutdown => {
                tracing::info!("stopped before ready");
                return Ok(());
            }
        };
        app.run_until(shutdown).await
    }
    .await;
    if let Err(e) = &result {
        tracing::error!(
            error = billing_mode::service::error::anyhow_text(e),
            "billing-mode stopped with an error"
        );
    }
    report(result)
}

async fn migrate(level: &LogLevel, format: LogFormat, db: DatabaseArgs) -> anyhow::Result<()> {
    let _guard = telemetry::init(level, vec![Sink::stderr(format)])?;
    // The URL's Display is redacted.
    let store = store::connect(db.database_url.expose())
        .await
        .with_context(|| format!("migrating {}", db.database_url))?;
    client::write_stdout(format_args!("migrations applied ({})\n", store.backend()));
    Ok(())
}

fn create_token(name: &str, roles: &[String]) -> anyhow::Result<()> {
    let roles = roles
        .iter()
        .map(|r| r.trim().parse::<Role>())
        .collect::<Result<BTreeSet<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let (token, entry) = auth::generate_token(name, roles).map_err(anyhow::Error::msg)?;
    client::write_stdout(format_args!("token: {token}\nline:  {}\n", entry.line()));
    eprintln!(
        "Give the token to the caller (it is shown only now); add the line to the server's tokens file."
    );
    Ok(())
}
