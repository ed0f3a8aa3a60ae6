//! Start-up: load and check everything, bind, then serve.
//!
//! [`Application::build`] validates the configuration, loads the registry,
//! connects to the store and applies migrations, and binds the listener, so
//! tests run the production path on port 0 and read the bound address.

use std::{
    future::Future,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_stream::StreamExt as _;
use tonic::service::Routes;
use tonic::transport::{server::TcpIncoming, Certificate, Identity, Server, ServerTlsConfig};
use tower::limit::GlobalConcurrencyLimitLayer;

use crate::{
    admin,
    auth::Authenticator,
    coalesced_io::CoalescedIo,
    config::{Config, DatabaseUrl, MAX_MESSAGE_BYTES},
    domain::Registry,
    feed::{Feed, FeedConfig},
    health::{self, Readiness},
    metrics::RpcMetricsLayer,
    proto::{self, billing_mode_server::BillingModeServer},
    reload::{self, SharedAuth},
    service::BillingModeService,
    snapshot::SpendSnapshot,
    store::{self, Store, StoreError},
};

pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    admin_listener: Option<TcpListener>,
    config: Config,
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    auth: SharedAuth,
    readiness: Readiness,
    /// Services served besides the production ones: empty unless a benchmark
    /// adds one (see [`Application::with_extra_service`]).
    extra_routes: Routes,
    feed: Feed,
    spend: SpendSnapshot,
    /// SIGHUPs since start-up began, for the reload task.
    hangups: reload::Hangups,
    /// The server, with its TLS identity already parsed (if any).
    server: Server,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("addr", &self.addr)
            .field("admin_addr", &self.admin_addr())
            .finish_non_exhaustive()
    }
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        // The binary has checked its arguments already; a Config built in
        // code is held to the same rules, still before anything is opened.
        config.validate()?;
        // Before the files are read: a SIGHUP from here on reloads them once
        // the server runs, so a rotation during start-up is not missed.
        let hangups = reload::Hangups::listen();
        let auth = Authenticator::new(reload::load_tokens(
            config.tokens_file.as_deref(),
            &config.tokens,
        )?);
        if auth.is_open() {
            if !config.listen.ip().is_loopback() && !config.insecure_allow_unauthenticated {
                bail!(
                    "refusing to listen on {} without authentication: configure tokens \
                     (--tokens-file, --tokens or BILLING_MODE_TOKENS; create one with `billing-mode token create`), \
                     listen on a loopback address, or pass --insecure-allow-unauthenticated",
                    config.listen
                );
            }
            tracing::warn!(
                listen = %config.listen,
                "no tokens configured: every caller is an anonymous admin; serving without authentication"
            );
        }
        let registry = Arc::new(crate::config::load_registry(
            config.registry_path.as_deref(),
        )?);
        // The certificate and key are parsed here, before the store is
        // waited for and before the ready line: a key that does not parse is
        // a start-up error that names the files, never a server that said
        // ready and then exits.
        let server = match &config.tls {
            Some(files) => Server::builder()
                .tls_config(tls_config(files)?)
                .with_context(|| {
                    format!(
                        "loading the TLS identity (--tls-cert {}, --tls-key {}{})",
                        files.cert.display(),
                        files.key.display(),
                        files
                            .client_ca
                            .as_ref()
                            .map_or_else(String::new, |ca| format!(
                                ", --tls-client-ca {}",
                                ca.display()
                            ))
                    )
                })?,
            None => Server::builder(),
        };
        let store = open_store(
            &config.database_url,
            config.migrate,
            store::PoolSize {
                max_connections: config.db_max_connections,
                reads_in_flight: config.db_reads_in_flight,
            },
            config.startup_timeout,
        )
        .await?;
        let readiness = Readiness::new();
        readiness.condition(health::STORE_REACHABLE).set(true);
        let migrated = readiness.condition(health::MIGRATIONS_APPLIED);
        let migrations_applied = if config.migrate {
            true
        } else {
            let pending = store
                .pending_migrations()
                .await
                .context("checking the store's migrations")?;
            if pending > 0 {
                tracing::warn!(
                    pending,
                    "started with --no-migrate and migrations are pending: not ready until \
                     `billing-mode migrate` has applied them"
                );
            }
            pending == 0
        };
        migrated.set(migrations_applied);
        // The feed waits for the change log (with --no-migrate, until someone
        // has applied the migrations) without holding start-up up.
        let feed = Feed::start(
            store.clone(),
            FeedConfig {
                poll_interval: config.feed_poll_interval,
                capacity: config.feed_capacity,
                retention: config.change_retention,
            },
        )
        .await;
        // Loads and follows in the background; CheckSpend answers (and the
        // server is ready) once the snapshot is confirmed current.
        let spend = SpendSnapshot::start(
            feed.clone(),
            registry.clone(),
            config.max_staleness,
            config.spend_recheck_interval,
        )
        .await;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let addr = listener.local_addr()?;
        let admin_listener = match config.admin_listen {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .with_context(|| format!("binding the admin listener {a}"))?,
            ),
            None => None,
        };
        let admin_addr = admin_listener
            .as_ref()
            .map(|l| l.local_addr())
            .transpose()?;
        // Listening from here; what is not yet true is said, not claimed
        // (health and /readyz follow each condition as it changes).
        let state = if !migrations_applied {
            "listening; registry loaded; NOT serving until the pending migrations are applied \
             (`billing-mode migrate`; /readyz lists what fails)"
        } else if !spend.is_current() {
            "listening; migrations applied, registry loaded; serving once the spend snapshot \
             is current (/readyz lists what fails)"
        } else {
            "listening; migrations applied, registry loaded"
        };
        tracing::info!(
            %addr,
            admin = %admin_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
            store = store.backend(),
            registry = registry.source_name(),
            rules = registry.rules().len(),
            tokens = auth.token_count(),
            tls = config.tls.is_some(),
            mtls = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
            "ready: {state}"
        );
        Ok(Application {
            listener,
            addr,
            admin_listener,
            config,
            store,
            registry,
            auth: SharedAuth::new(auth),
            readiness,
            extra_routes: Routes::default(),
            feed,
            spend,
            hangups,
            server,
        })
    }

    /// This server's change feed.
    pub fn feed(&self) -> &Feed {
        &self.feed
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin listener's bound address, unless it is off.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The readiness conditions; add one with [`Readiness::condition`].
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    /// Serves `svc` too, behind the same layers as the production services.
    /// For benchmarks only (an echo service to measure the RPC stack against);
    /// the server binary never calls it.
    #[doc(hidden)]
    pub fn with_extra_service<S>(mut self, svc: S) -> Self
    where
        S: tower::Service<
                tonic::codegen::http::Request<tonic::body::Body>,
                Response = tonic::codegen::http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.extra_routes = self.extra_routes.add_service(svc);
        self
    }

    /// Serves until `shutdown` completes, then finishes in-flight calls.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let (health, health_service) = tonic_health::server::health_reporter();
        // Background work of this server; dropping the set stops it.
        let mut tasks = JoinSet::new();
        // gRPC health ("" and the service) follows readiness: SERVING only
        // while every condition holds.
        const SERVICES: &[&str] =
            &[<BillingModeServer<BillingModeService> as tonic::server::NamedService>::NAME];
        let accepting = self.readiness.condition(health::ACCEPTING_CALLS);
        accepting.set(true);
        // CheckSpend fails closed while the spend snapshot is not current; the
        // server is not ready meanwhile.
        let spend_current = self
            .readiness
            .condition(crate::snapshot::SPEND_SNAPSHOT_CURRENT);
        spend_current.set(self.spend.publish());
        tasks.spawn(follow_spend_currency(self.spend.current(), spend_current));
        health::set_grpc_health(&health, SERVICES, self.readiness.is_ready()).await;
        tasks.spawn(health::drive_grpc_health(
            self.readiness.clone(),
            health.clone(),
            SERVICES,
        ));
        let store_reachable = self.readiness.condition(health::STORE_REACHABLE);
        tasks.spawn(health::watch_store(
            self.store.clone(),
            store_reachable.clone(),
            health::STORE_PROBE_INTERVAL,
        ));
        let migrated = self.readiness.condition(health::MIGRATIONS_APPLIED);
        if !migrated.holds() {
            tasks.spawn(health::watch_migrations(
                self.store.clone(),
                migrated,
                health::STORE_PROBE_INTERVAL,
            ));
        }
        if let Some(listener) = self.admin_listener {
            tasks.spawn(admin::serve(
                listener,
                Arc::new(admin::AdminState {
                    readiness: self.readiness.clone(),
                    store: self.store.clone(),
                    store_reachable,
                }),
            ));
        }

        // The same descriptors, served on both reflection versions.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;

        let service = BillingModeService::new(
            self.store.clone(),
            self.registry.clone(),
            crate::service::watch::Watcher::new(self.feed.clone(), &self.config),
        )
        .with_spend(self.spend.clone())
        .with_auth(self.auth.clone());
        tasks.spawn(reload::on_sighup(
            reload::Reloader {
                auth: self.auth.clone(),
                tokens_file: self.config.tokens_file.clone(),
                inline_tokens: self.config.tokens.clone(),
                registry: self.registry.clone(),
                registry_path: self.config.registry_path.clone(),
            },
            self.hangups,
        ));
        let auth = self.auth.clone();
        // Only the BillingMode service is authenticated: health and reflection
        // stay open for probes and `grpcurl list/describe`.
        let billing = tonic::service::interceptor::InterceptedService::new(
            BillingModeServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            move |req| auth.current().intercept(req),
        );

        let server = self.server;
        // The stack, outermost first: the call-duration metric and the
        // refusal count (waiting for a slot included), outside everything
        // that answers, so they record the status the caller receives; the
        // per-request deadline, answered with an ErrorInfo, which also gives
        // tonic's own errors (a message over the size limit) theirs; the
        // call's server span (OpenTelemetry RPC conventions, continuing the
        // caller's trace), then the concurrency limits; authentication runs
        // inside the BillingMode service.
        let router = server
            .concurrency_limit_per_connection(self.config.max_concurrent_per_connection)
            .layer(RpcMetricsLayer::new())
            .layer(crate::service::transport_errors::TransportErrorsLayer::new(
                self.config.request_timeout,
            ))
            .layer(crate::telemetry::rpc_span::RpcSpanLayer::new(
                self.config.request_timeout,
            ))
            .layer(GlobalConcurrencyLimitLayer::new(
                self.config.concurrency_limit,
            ))
            .add_routes(self.extra_routes)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(billing);

        let incoming = TcpIncoming::from(self.listener).with_nodelay(Some(true));
        let tls = self.config.tls.is_some();
        let feed = self.feed.clone();
        let shutdown = async move {
            shutdown.await;
            tracing::info!("shutting down: finishing in-flight calls");
            accepting.set(false);
            // Watch streams end with SHUTTING_DOWN, so in-flight calls finish.
            feed.shutdown();
        };
        let served = if tls {
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        } else {
            // One write per flush (see `coalesced_io`).
            let incoming = incoming.map(|conn| conn.map(CoalescedIo::new));
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        };
        served.context("serving")?;
        drop(tasks);
        tracing::info!("stopped");
        Ok(())
    }
}

/// Opens the store, retrying with backoff while it is unreachable, for up to
/// `timeout`; each failed attempt is logged once.
async fn open_store(
    url: &DatabaseUrl,
    migrate: bool,
    size: store::PoolSize,
    timeout: Duration,
) -> anyhow::Result<Arc<dyn Store>> {
    // Shown redacted (its Display).
    let shown = url;
    let deadline = Instant::now() + timeout;
    let mut backoff = Duration::from_millis(250);
    let mut attempt = 1u32;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let error =
            match tokio::time::timeout(remaining, store::open(url.expose(), migrate, size)).await {
                Ok(Ok(store)) => return Ok(store),
                Ok(Err(e)) if !is_transient(&e) => {
                    return Err(e).with_context(|| format!("opening the store ({shown})"))
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer in time".to_owned(),
            };
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            bail!(
                "the store ({shown}) was not reachable within {} s ({attempt} attempts; \
                 --startup-timeout): {error}",
                timeout.as_secs_f64()
            );
        }
        let wait = backoff.min(remaining);
        tracing::warn!(
            store = %shown,
            attempt,
            retry_in_ms = wait.as_millis() as u64,
            %error,
            "the store is not reachable yet"
        );
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
        attempt += 1;
    }
}

/// Whether waiting may help: the database is not there (yet), as opposed to
/// a wrong URL, a refused login or a failed migration.
fn is_transient(e: &StoreError) -> bool {
    let StoreError::Unavailable(e) = e else {
        return false;
    };
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) => true,
        // Class 08: connection exception; 53: insufficient resources (too
        // many connections); 57: operator intervention (starting up,
        // shutting down).
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("53") || c.starts_with("57")),
        _ => false,
    }
}

/// Keeps the readiness condition `current` in step with the spend snapshot:
/// holding while it is current, not while it is not (and once it stops).
async fn follow_spend_currency(
    mut current: tokio::sync::watch::Receiver<bool>,
    condition: health::Condition,
) {
    loop {
        condition.set(*current.borrow_and_update());
        if current.changed().await.is_err() {
            condition.set(false);
            return;
        }
    }
}

fn tls_config(files: &crate::config::TlsFiles) -> anyhow::Result<ServerTlsConfig> {
    let read = crate::config::read_pem;
    let mut cfg =
        ServerTlsConfig::new().identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?));
    if let Some(ca) = &files.client_ca {
        cfg = cfg
            .client_ca_root(Certificate::from_pem(read(ca)?))
            .client_auth_optional(false);
    }
    Ok(cfg)
}

/// A stop signal this long after the first is a second one (see
/// [`shutdown_signal`]).
const SECOND_SIGNAL_AFTER: Duration = Duration::from_secs(1);

/// Completes on SIGINT or SIGTERM. The handlers are installed by this call,
/// not when the future is first polled: call it before anything announces the
/// process (the ready line), so that a SIGTERM sent the moment after is a
/// graceful stop, not the default action's kill. SIGHUP, whose default
/// action kills too, is taken over as well: one sent while the server starts
/// is not a stop (from the start of [`Application::build`] it is a reload,
/// done once the server runs: `reload::Hangups`).
///
/// A second SIGINT or SIGTERM a second or more after the first (an operator
/// pressing Ctrl-C again while the graceful stop waits for calls in flight)
/// exits at once, with status 1, the log written out first.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        // Once registered, tokio's handler replaces the default action for
        // the rest of the process, listener or not.
        drop(signal(SignalKind::hangup())?);
        let mut term = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = interrupt.recv() => {},
            }
            let first = tokio::time::Instant::now();
            tokio::spawn(async move {
                // One stop sent twice at once (a wrapper forwarding Ctrl-C
                // as SIGTERM too) is one stop: only a signal a second or
                // more after the first is a second one.
                loop {
                    tokio::select! {
                        _ = term.recv() => {},
                        _ = interrupt.recv() => {},
                    }
                    if first.elapsed() >= SECOND_SIGNAL_AFTER {
                        break;
                    }
                }
                tracing::warn!(
                    "a second stop signal: exiting now, without waiting for the calls in flight"
                );
                crate::telemetry::lines::flush_all();
                std::process::exit(1);
            });
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}
