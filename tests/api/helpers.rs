//! Shared harness for the black-box tests: a fresh database per test (SQLite
//! file, or a fresh Postgres schema when `DATABASE_URL` points at Postgres),
//! the real server started through `Application::build` on port 0, and the
//! generated gRPC client.

use std::{future::Future, net::SocketAddr, time::Duration};

use std::collections::BTreeMap;

use billing_mode::{
    client::Bearer,
    config::Config,
    proto::{
        billing_mode_client::BillingModeClient, BuildEnvRequest, BuildEnvResponse, CredentialKeys,
        EnvVar, HistoryRequest, HistoryResponse, Mode, Origin, Resolution, ResolveRequest,
        SetRequest,
    },
    startup::Application,
};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{
    client::GrpcService,
    codegen::{Body, Bytes, StdError},
    transport::{Channel, Endpoint},
    Code, Status,
};
use tonic_types::StatusExt;

/// Which store a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh, empty database for one test: a SQLite file in a temporary
/// directory (removed when this is dropped), or a uniquely named schema of
/// the Postgres at `DATABASE_URL` (dropped by [`run_on`] once the test has
/// passed).
pub(crate) struct TestDb {
    pub backend: Backend,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    /// The fresh Postgres schema: the server's URL and the schema's name.
    schema: Option<(String, String)>,
}

impl TestDb {
    /// `None` (after saying so loudly) when Postgres is wanted but
    /// `DATABASE_URL` is not set; under CI that is a failure instead.
    pub(crate) async fn new(backend: Backend) -> Option<TestDb> {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite:{}", dir.path().join("billing-mode.db").display());
                Some(TestDb {
                    backend,
                    url,
                    _dir: Some(dir),
                    schema: None,
                })
            }
            Backend::Postgres => {
                let base = postgres_url("Postgres black-box test")?;
                use sqlx::Connection;
                let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
                let mut conn = sqlx::PgConnection::connect(&base)
                    .await
                    .expect("connect to DATABASE_URL");
                sqlx::query(&format!("CREATE SCHEMA {schema}"))
                    .execute(&mut conn)
                    .await
                    .expect("create test schema");
                let sep = if base.contains('?') { '&' } else { '?' };
                Some(TestDb {
                    backend,
                    url: format!("{base}{sep}options[search_path]={schema}"),
                    _dir: None,
                    schema: Some((base, schema)),
                })
            }
        }
    }
}

/// Says `message` on the test process's stderr, past the test harness's
/// capture (which shows `eprintln!` only for failing tests): a test that
/// skips its work passes, and must not do so silently.
pub(crate) fn loud(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{message}");
}

/// The Postgres server the tests use (`DATABASE_URL`). `None` (after saying
/// so loudly) when it is not set to a postgres:// URL; under CI (`CI` set)
/// that is a failure instead.
pub(crate) fn postgres_url(purpose: &str) -> Option<String> {
    let url = std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| u.starts_with("postgres"));
    if url.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the Postgres tests: set DATABASE_URL=postgres://…"
        );
        loud(&format!(
            "SKIPPED: {purpose}: DATABASE_URL is not set to a postgres:// URL"
        ));
    }
    url
}

impl TestDb {
    /// A database the test set up itself (e.g. a private Postgres server).
    pub(crate) fn at(backend: Backend, url: String) -> TestDb {
        TestDb {
            backend,
            url,
            _dir: None,
            schema: None,
        }
    }

    /// `config(self)` whose Postgres connections are named `app_name`, so
    /// that [`TestDb::cut_connections`] cuts exactly them.
    pub(crate) fn config_named(&self, app_name: &str) -> Config {
        Config {
            database_url: format!("{}&application_name={app_name}", self.url).into(),
            ..config(self)
        }
    }

    /// Terminates every Postgres connection named `app_name` (a failover or
    /// an idle cut, as the server sees it); returns how many there were.
    pub(crate) async fn cut_connections(&self, app_name: &str) -> i64 {
        use sqlx::Connection;
        let mut admin = sqlx::PgConnection::connect(&self.url).await.unwrap();
        let (killed,): (i64,) = sqlx::query_as(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = $1",
        )
        .bind(app_name)
        .fetch_one(&mut admin)
        .await
        .unwrap();
        killed
    }
}

impl TestDb {
    /// Runs `statements` on this database over a connection of its own,
    /// behind the back of any server using it.
    pub(crate) async fn execute(&self, statements: &[&str]) {
        use sqlx::Connection;
        match self.backend {
            Backend::Sqlite => {
                let mut c = sqlx::SqliteConnection::connect(&self.url)
                    .await
                    .expect("open the test SQLite database");
                for s in statements {
                    sqlx::query(s)
                        .execute(&mut c)
                        .await
                        .unwrap_or_else(|e| panic!("{s}: {e}"));
                }
                c.close().await.unwrap();
            }
            Backend::Postgres => {
                let mut c = sqlx::PgConnection::connect(&self.url)
                    .await
                    .expect("connect to the test schema");
                for s in statements {
                    sqlx::query(s)
                        .execute(&mut c)
                        .await
                        .unwrap_or_else(|e| panic!("{s}: {e}"));
                }
                c.close().await.unwrap();
            }
        }
    }

    /// Drops the store's tables behind the running server's back.
    pub(crate) async fn break_the_store(&self) {
        self.execute(&[
            "DROP TABLE billing_applied",
            "DROP TABLE billing_changes",
            "DROP TABLE billing_audit",
            "DROP TABLE billing_records",
        ])
        .await;
    }
}

/// Runs `test` on a fresh database of `backend`, unless that backend is
/// skipped (see [`TestDb::new`]). The test's Postgres schema is dropped once
/// it has passed; a failing test's schema is left for inspection.
pub(crate) async fn run_on<F, Fut>(backend: Backend, test: F)
where
    F: FnOnce(TestDb) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let schema = db.schema.clone();
    test(db).await;
    if let Some((base, schema)) = schema {
        drop_schema(&base, &schema).await;
    }
}

/// Drops a passed test's schema. A schema that cannot be dropped (a server
/// of the test still holding a lock) is said and left: the test passed.
async fn drop_schema(base: &str, schema: &str) {
    use sqlx::Connection;
    let dropped = async {
        let mut conn = sqlx::PgConnection::connect(base).await?;
        sqlx::query("SET lock_timeout = '10s'")
            .execute(&mut conn)
            .await?;
        sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&mut conn)
            .await?;
        Ok::<_, sqlx::Error>(())
    };
    if let Err(e) = dropped.await {
        eprintln!("the test schema {schema} is left: {e}");
    }
}

/// `backends!(name)` declares two tests, `name::sqlite` and
/// `name::postgres`, each running `async fn name(db: TestDb)` through
/// [`run_on`], so that a failure on one backend never hides the other.
/// Arguments after the name go to `#[tokio::test(...)]`:
/// `backends!(name, flavor = "multi_thread", worker_threads = 4)`.
/// `backends!(postgres: name)` (or `sqlite:`) declares the one test
/// `name::postgres` for what only that backend has.
macro_rules! backends {
    (postgres: $name:ident $(, $($runtime:tt)+)?) => {
        mod $name {
            #[tokio::test$(($($runtime)+))?]
            async fn postgres() {
                crate::helpers::run_on(crate::helpers::Backend::Postgres, super::$name).await;
            }
        }
    };
    (sqlite: $name:ident $(, $($runtime:tt)+)?) => {
        mod $name {
            #[tokio::test$(($($runtime)+))?]
            async fn sqlite() {
                crate::helpers::run_on(crate::helpers::Backend::Sqlite, super::$name).await;
            }
        }
    };
    ($name:ident $(, $($runtime:tt)+)?) => {
        mod $name {
            #[tokio::test$(($($runtime)+))?]
            async fn sqlite() {
                crate::helpers::run_on(crate::helpers::Backend::Sqlite, super::$name).await;
            }

            #[tokio::test$(($($runtime)+))?]
            async fn postgres() {
                crate::helpers::run_on(crate::helpers::Backend::Postgres, super::$name).await;
            }
        }
    };
}
pub(crate) use backends;

/// A running server, and typed calls to it as an anonymous client (the
/// default configuration has no tokens).
pub(crate) struct TestApp {
    pub addr: SocketAddr,
    /// The admin HTTP listener, unless the configuration turned it off.
    pub admin_addr: Option<SocketAddr>,
    /// What the call methods use: plaintext, connected on first use (a TLS
    /// server's tests make their own clients).
    client: Client,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

/// The default test configuration on `db`: port 0 on loopback (the admin
/// listener too, so parallel tests never collide), no tokens.
pub(crate) fn config(db: &TestDb) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: Some("127.0.0.1:0".parse().unwrap()),
        database_url: db.url.clone().into(),
        ..Config::default()
    }
}

impl TestApp {
    pub(crate) async fn spawn(db: &TestDb) -> TestApp {
        Self::spawn_with(config(db)).await
    }

    pub(crate) async fn spawn_with(config: Config) -> TestApp {
        let app = Application::build(config)
            .await
            .expect("application builds");
        let addr = app.local_addr();
        let admin_addr = app.admin_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(app.run_until(async {
            let _ = rx.await;
        }));
        let client = BillingModeClient::new(
            Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect_timeout(Duration::from_secs(5))
                .connect_lazy(),
        );
        TestApp {
            addr,
            admin_addr,
            client,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    pub(crate) fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.endpoint())
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect to the test server")
    }

    /// A client without a token.
    pub(crate) async fn client(&self) -> BillingModeClient<Channel> {
        BillingModeClient::new(self.channel().await)
    }

    /// A client sending `authorization: Bearer <token>`.
    pub(crate) async fn client_with_token(&self, token: &str) -> TokenClient {
        let bearer = Bearer::new(Some(token)).expect("a token that is header text");
        BillingModeClient::with_interceptor(self.channel().await, bearer)
    }

    /// Set, which must succeed; its resolution.
    pub(crate) async fn set(&self, req: SetRequest) -> Resolution {
        set(&mut self.client.clone(), req).await
    }

    /// See [`set_override`].
    pub(crate) async fn set_override(&self, ws: &str, mode: Mode, reason: &str) -> Resolution {
        set_override(&mut self.client.clone(), ws, mode, reason).await
    }

    /// See [`register`].
    pub(crate) async fn register<'a>(
        &self,
        ws: &str,
        runtime: impl Into<Option<&'a str>>,
        model: impl Into<Option<&'a str>>,
        keys: &[&str],
    ) -> Resolution {
        register(&mut self.client.clone(), ws, runtime, model, keys).await
    }

    /// Resolve, which must succeed.
    pub(crate) async fn resolve(&self, ws: &str) -> Resolution {
        resolve(&mut self.client.clone(), ws).await
    }

    pub(crate) async fn try_resolve(&self, ws: &str) -> Result<Resolution, Status> {
        try_resolve(&mut self.client.clone(), ws).await
    }

    /// BuildEnv of `ws` with the candidate `env`.
    pub(crate) async fn build(
        &self,
        ws: &str,
        env: Vec<EnvVar>,
    ) -> Result<BuildEnvResponse, Status> {
        build(&mut self.client.clone(), ws, env).await
    }

    /// One History page of `ws`.
    pub(crate) async fn history(
        &self,
        ws: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<HistoryResponse, Status> {
        try_history(&mut self.client.clone(), ws, page_size, page_token).await
    }

    /// Graceful shutdown; returns the server's result.
    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.handle.take().unwrap().await.expect("server task")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The CLI's own client type: every call with the bearer header.
pub(crate) type TokenClient = billing_mode::client::Client;

/// Asserts a status's code and ErrorInfo reason/domain; returns the message.
pub(crate) fn assert_error(status: &Status, code: Code, reason: &str) -> String {
    assert_eq!(status.code(), code, "code for {reason}: {status:?}");
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo on {status:?}"));
    assert_eq!(info.reason, reason, "reason: {status:?}");
    assert_eq!(info.domain, "billing-mode.molecule");
    status.message().to_owned()
}

pub(crate) fn env(origin: Origin, key: &str, value: &str) -> EnvVar {
    EnvVar {
        key: key.to_owned(),
        value: value.to_owned(),
        origin: origin.into(),
    }
}

/// A loopback address nobody listens on, reserved for as long as the
/// returned socket lives: bound but never listening, so a connection to it
/// is refused and no other test's server can take the port meanwhile.
pub(crate) fn refusing_addr() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("binding port 0");
    let addr = socket.local_addr().expect("local addr");
    (socket, addr)
}

pub(crate) fn new_workspace() -> String {
    uuid::Uuid::new_v4().to_string()
}

// ---------------------------------------------------------------------------
// Helpers for the trust tests (auth, tls, canary, abuse).

/// A fresh token named `name` with `roles`: the bearer text to send and the
/// configuration entry (hash) to give the server.
pub(crate) fn make_token(
    name: &str,
    roles: &[billing_mode::auth::Role],
) -> (String, billing_mode::auth::TokenEntry) {
    billing_mode::auth::generate_token(name, roles.iter().copied().collect())
        .expect("valid token name and roles")
}

/// `config(db)` with `tokens` configured.
pub(crate) fn config_with_tokens(
    db: &TestDb,
    tokens: Vec<billing_mode::auth::TokenEntry>,
) -> Config {
    Config {
        tokens,
        ..config(db)
    }
}

/// One `billing_audit` row read straight from the database, every column as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawAuditRow {
    pub workspace_id: String,
    pub revision: String,
    pub actor: String,
    pub reason: String,
    pub before: Option<String>,
    pub after: String,
    pub at: String,
}

/// Every `billing_audit` row, by raw SQL (not through the service), ordered
/// by workspace and revision.
pub(crate) async fn raw_audit_rows(db: &TestDb) -> Vec<RawAuditRow> {
    use sqlx::Connection;
    type Row = (
        String,
        String,
        String,
        String,
        Option<String>,
        String,
        String,
    );
    let rows: Vec<Row> = match db.backend {
        Backend::Sqlite => {
            let mut c = sqlx::SqliteConnection::connect(&db.url)
                .await
                .expect("open the test SQLite database");
            sqlx::query_as(
                "SELECT workspace_id, CAST(revision AS TEXT), actor, reason, before, after, at \
                 FROM billing_audit ORDER BY workspace_id, revision",
            )
            .fetch_all(&mut c)
            .await
            .expect("read billing_audit")
        }
        Backend::Postgres => {
            let mut c = sqlx::PgConnection::connect(&db.url)
                .await
                .expect("connect to the test schema");
            sqlx::query_as(
                "SELECT workspace_id::text, revision::text, actor, reason, before::text, \
                 after::text, at::text FROM billing_audit ORDER BY workspace_id, revision",
            )
            .fetch_all(&mut c)
            .await
            .expect("read billing_audit")
        }
    };
    rows.into_iter()
        .map(
            |(workspace_id, revision, actor, reason, before, after, at)| RawAuditRow {
                workspace_id,
                revision,
                actor,
                reason,
                before,
                after,
                at,
            },
        )
        .collect()
}

/// Every `billing_records` row, by raw SQL, as one line of text each.
pub(crate) async fn raw_record_rows(db: &TestDb) -> Vec<String> {
    use sqlx::Connection;
    let sql_sqlite = "SELECT workspace_id || '|' || coalesce(runtime, '') || '|' || \
        coalesce(model, '') || '|' || credential_keys || '|' || coalesce(override_mode, '') \
        || '|' || revision || '|' || updated_at FROM billing_records ORDER BY workspace_id";
    let sql_pg = "SELECT workspace_id::text || '|' || coalesce(runtime, '') || '|' || \
        coalesce(model, '') || '|' || credential_keys::text || '|' || \
        coalesce(override_mode, '') || '|' || revision::text || '|' || updated_at::text \
        FROM billing_records ORDER BY workspace_id";
    let rows: Vec<(String,)> = match db.backend {
        Backend::Sqlite => {
            let mut c = sqlx::SqliteConnection::connect(&db.url)
                .await
                .expect("open the test SQLite database");
            sqlx::query_as(sql_sqlite)
                .fetch_all(&mut c)
                .await
                .expect("read billing_records")
        }
        Backend::Postgres => {
            let mut c = sqlx::PgConnection::connect(&db.url)
                .await
                .expect("connect to the test schema");
            sqlx::query_as(sql_pg)
                .fetch_all(&mut c)
                .await
                .expect("read billing_records")
        }
    };
    rows.into_iter().map(|(r,)| r).collect()
}

// ---------------------------------------------------------------------------
// RPC helpers shared by the black-box suites

pub(crate) type Client = BillingModeClient<Channel>;

/// What a generated client calls over: a channel, with or without an
/// interceptor (the bounds of tonic's generated methods), so that one helper
/// serves [`Client`] and [`TokenClient`] alike.
pub(crate) trait Transport:
    GrpcService<
    tonic::body::Body,
    Error: Into<StdError>,
    ResponseBody: Body<Data = Bytes, Error: Into<StdError> + Send> + Send + 'static,
>
{
}

impl<T> Transport for T where
    T: GrpcService<
        tonic::body::Body,
        Error: Into<StdError>,
        ResponseBody: Body<Data = Bytes, Error: Into<StdError> + Send> + Send + 'static,
    >
{
}

/// A Set of `ws` carrying the fields given (`Some("")` clears one).
pub(crate) fn fields(
    ws: &str,
    runtime: Option<&str>,
    model: Option<&str>,
    keys: Option<&[&str]>,
) -> SetRequest {
    SetRequest {
        workspace_id: ws.to_owned(),
        runtime: runtime.map(str::to_owned),
        model: model.map(str::to_owned),
        credential_keys: keys.map(|k| CredentialKeys {
            keys: k.iter().map(|s| (*s).to_owned()).collect(),
        }),
        ..SetRequest::default()
    }
}

/// Registers `ws` with runtime and model (each optional: `"opus"` or
/// `Some("opus")` or `None`) and the credential names it owns.
pub(crate) async fn register<'a>(
    c: &mut Client,
    ws: &str,
    runtime: impl Into<Option<&'a str>>,
    model: impl Into<Option<&'a str>>,
    keys: &[&str],
) -> Resolution {
    set(c, fields(ws, runtime.into(), model.into(), Some(keys))).await
}

/// A fresh workspace's registration: claude-code on opus, owning its
/// subscription token (it derives byok).
pub(crate) fn byok_registration(ws: &str) -> SetRequest {
    SetRequest {
        workspace_id: ws.to_owned(),
        runtime: Some("claude-code".into()),
        model: Some("opus".into()),
        credential_keys: Some(CredentialKeys {
            keys: vec!["CLAUDE_CODE_OAUTH_TOKEN".into()],
        }),
        ..Default::default()
    }
}

/// Registers a fresh workspace (see [`byok_registration`]); returns its id.
pub(crate) async fn register_byok<T: Transport>(c: &mut BillingModeClient<T>) -> String {
    let ws = new_workspace();
    c.set(byok_registration(&ws))
        .await
        .expect("the workspace registers");
    ws
}

/// One History page of `ws`.
pub(crate) async fn try_history<T: Transport>(
    c: &mut BillingModeClient<T>,
    ws: &str,
    page_size: u32,
    page_token: &str,
) -> Result<HistoryResponse, Status> {
    c.history(HistoryRequest {
        workspace_id: ws.to_owned(),
        page_size,
        page_token: page_token.to_owned(),
    })
    .await
    .map(|r| r.into_inner())
}

pub(crate) async fn set(c: &mut Client, req: SetRequest) -> Resolution {
    c.set(req)
        .await
        .expect("Set succeeds")
        .into_inner()
        .resolution
        .expect("Set returns a resolution")
}

pub(crate) async fn set_override(c: &mut Client, ws: &str, mode: Mode, reason: &str) -> Resolution {
    set(
        c,
        SetRequest {
            workspace_id: ws.to_owned(),
            override_mode: Some(mode.into()),
            reason: reason.to_owned(),
            ..SetRequest::default()
        },
    )
    .await
}

pub(crate) async fn try_resolve(c: &mut Client, ws: &str) -> Result<Resolution, Status> {
    c.resolve(ResolveRequest {
        workspace_id: ws.to_owned(),
    })
    .await
    .map(|r| {
        r.into_inner()
            .resolution
            .expect("Resolve returns a resolution")
    })
}

pub(crate) async fn resolve(c: &mut Client, ws: &str) -> Resolution {
    try_resolve(c, ws).await.expect("Resolve succeeds")
}

pub(crate) async fn build(
    c: &mut Client,
    ws: &str,
    env: Vec<EnvVar>,
) -> Result<BuildEnvResponse, Status> {
    c.build_env(BuildEnvRequest {
        workspace_id: ws.to_owned(),
        env,
    })
    .await
    .map(|r| r.into_inner())
}

pub(crate) fn env_map(resp: &BuildEnvResponse) -> BTreeMap<String, (String, Origin)> {
    resp.env
        .iter()
        .map(|e| (e.key.clone(), (e.value.clone(), e.origin())))
        .collect()
}

/// A TCP proxy in front of a test's Postgres that can stall: while held,
/// it forwards nothing, either way (a network that stops delivering for a
/// while), on every connection or on one, and nothing is lost: what was
/// sent meanwhile, a connection's end included, is delivered on release.
pub(crate) struct StallingProxy {
    /// The test database's URL, through the proxy.
    pub url: String,
    open: tokio::sync::watch::Sender<bool>,
    /// Each connection's own gate, by the port Postgres sees it come from
    /// (`client_port` in `pg_stat_activity`).
    connections: std::sync::Arc<
        std::sync::Mutex<std::collections::HashMap<u16, tokio::sync::watch::Sender<bool>>>,
    >,
    /// New connections are closed at once while set.
    refusing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Connections accepted so far.
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    accept: JoinHandle<()>,
}

impl StallingProxy {
    /// Forwards to `db`'s Postgres, until [`StallingProxy::hold`].
    pub(crate) async fn start(db: &TestDb) -> StallingProxy {
        let opts: sqlx::postgres::PgConnectOptions = db.url.parse().expect("a Postgres URL");
        let upstream = format!("{}:{}", opts.get_host(), opts.get_port());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // The URL's host and port, whatever the user info before them.
        let (scheme, rest) = db.url.split_once("://").expect("a URL");
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let user = authority.rfind('@').map_or("", |at| &authority[..=at]);
        let url = format!("{scheme}://{user}127.0.0.1:{port}{path}");
        let (open, _) = tokio::sync::watch::channel(true);
        let connections = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
            u16,
            tokio::sync::watch::Sender<bool>,
        >::new()));
        let refusing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accept = {
            let open = open.clone();
            let connections = connections.clone();
            let (refusing, accepted) = (refusing.clone(), accepted.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if refusing.load(std::sync::atomic::Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let open = open.clone();
                    let connections = connections.clone();
                    let upstream = upstream.clone();
                    tokio::spawn(async move {
                        let _ = open.subscribe().wait_for(|o| *o).await;
                        let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                            return;
                        };
                        let (own, _) = tokio::sync::watch::channel(true);
                        let gates = |own: &tokio::sync::watch::Sender<bool>| {
                            [open.subscribe(), own.subscribe()]
                        };
                        let (to_server, to_client) = (gates(&own), gates(&own));
                        connections
                            .lock()
                            .unwrap()
                            .insert(server.local_addr().unwrap().port(), own);
                        let (client_read, client_write) = client.into_split();
                        let (server_read, server_write) = server.into_split();
                        tokio::spawn(forward(client_read, server_write, to_server));
                        forward(server_read, client_write, to_client).await;
                    });
                }
            })
        };
        StallingProxy {
            url,
            open,
            connections,
            refusing,
            accepted,
            accept,
        }
    }

    /// While `refuse`, new connections are closed as soon as they come
    /// (a database at its connection limit, say); those open go on.
    pub(crate) fn refuse_new(&self, refuse: bool) {
        self.refusing
            .store(refuse, std::sync::atomic::Ordering::SeqCst);
    }

    /// Connections accepted so far, refused ones included.
    pub(crate) fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Nothing is forwarded from now on.
    pub(crate) fn hold(&self) {
        self.open.send_replace(false);
    }

    /// Forwards what waited, and everything after.
    pub(crate) fn release(&self) {
        self.open.send_replace(true);
    }

    /// Nothing is forwarded on the connection Postgres sees coming from
    /// `client_port`, until [`StallingProxy::release_connection`].
    pub(crate) fn hold_connection(&self, client_port: u16) {
        self.gate(client_port).send_replace(false);
    }

    pub(crate) fn release_connection(&self, client_port: u16) {
        self.gate(client_port).send_replace(true);
    }

    fn gate(&self, client_port: u16) -> tokio::sync::watch::Sender<bool> {
        self.connections
            .lock()
            .unwrap()
            .get(&client_port)
            .unwrap_or_else(|| panic!("no connection of the proxy comes from port {client_port}"))
            .clone()
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies `from` to `to` while every gate is open, waiting while one is
/// not; the end of `from` is passed on the same way.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut gates: [tokio::sync::watch::Receiver<bool>; 2],
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await.unwrap_or(0);
        for gate in &mut gates {
            if gate.wait_for(|o| *o).await.is_err() {
                return;
            }
        }
        if n == 0 {
            let _ = to.shutdown().await;
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
