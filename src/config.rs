//! Typed configuration of the server, independent of how it was given
//! (flags and environment variables are mapped onto it in `main.rs`).

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    auth::TokenEntry,
    domain::registry::{Registry, RegistryError, RegistryProblem},
};

/// The default database: an SQLite file in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite:billing-mode.db";
/// The default listen address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// The default admin listen address (HTTP: /healthz, /readyz, /metrics).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// How long start-up waits for the store by default.
pub const DEFAULT_STARTUP_TIMEOUT: &str = "60s";
/// How recently a replica must have confirmed its spend snapshot current.
pub const DEFAULT_MAX_STALENESS: Duration = Duration::from_secs(2);
/// Largest request or response message.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Requests served at once on one connection by default.
pub const DEFAULT_MAX_CONCURRENT_PER_CONNECTION: usize = 64;

/// How long the change log is kept by default: 7 days.
pub const DEFAULT_CHANGE_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Messages queued for one Watch stream by default.
pub const DEFAULT_WATCH_BUFFER: usize = 1024;

/// A database URL. It may carry a password (`postgres://user:PASSWORD@…` or
/// a `password=` query parameter), so it is a secret: `Debug` and `Display`
/// show it redacted ([`redact_url`]); [`DatabaseUrl::expose`] gives the URL
/// itself, to connect with.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn new(url: impl Into<String>) -> Self {
        DatabaseUrl(url.into())
    }

    /// The URL with its password: only to connect with, never to show.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Default for DatabaseUrl {
    fn default() -> Self {
        DatabaseUrl::new(DEFAULT_DATABASE_URL)
    }
}

impl From<String> for DatabaseUrl {
    fn from(url: String) -> Self {
        DatabaseUrl(url)
    }
}

impl From<&str> for DatabaseUrl {
    fn from(url: &str) -> Self {
        DatabaseUrl(url.to_owned())
    }
}

impl std::str::FromStr for DatabaseUrl {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(DatabaseUrl::new(s))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("DatabaseUrl")
            .field(&redact_url(&self.0))
            .finish()
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

/// A database URL without its password, for messages: the password of the
/// user info (`user:PASSWORD@`) and the value of every query parameter
/// whose name holds `password` (`password=`, `sslpassword=`) become `***`.
/// Text that is not a URL (a libpq `key=value` string, pasted where a URL
/// belongs) may hold a password anywhere, so none of it is shown.
pub fn redact_url(url: &str) -> String {
    // A URL begins with its scheme: `://` further on (inside a libpq
    // `key=value` string, say) does not make one.
    let scheme_end = url.find("://").filter(|&i| {
        let scheme = &url[..i];
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
    });
    let (head, rest) = match scheme_end {
        Some(scheme_end) => url.split_at(scheme_end + 3),
        // `sqlite:FILE[?PARAMS]` names a file, with no user info.
        None if url.starts_with("sqlite:") => ("", url),
        None => return "(not a URL; not shown)".to_owned(),
    };
    // The user info ends at the last `@`: a password may hold an `@`, a `/`
    // or a `?` (badly encoded), and an `@` further on (in the path or the
    // query) only hides more than needed.
    let (mut out, rest) = match rest.rfind('@') {
        Some(at) if !head.is_empty() => {
            let userinfo = &rest[..at];
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            let shown = if user.contains(['/', '?', '#', '=', '@']) {
                // Not a user name: the last `@` was further on, and what
                // comes before it may be a query with a password in it.
                "***".to_owned()
            } else if user.len() < userinfo.len() {
                format!("{user}:***")
            } else {
                user.to_owned()
            };
            (format!("{head}{shown}"), &rest[at..])
        }
        _ => (head.to_owned(), rest),
    };
    match rest.split_once('?') {
        None => out.push_str(rest),
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            // After a parameter named like a password, nothing is shown: a
            // password with an unencoded `&` would go on in the next one.
            let mut params = Vec::new();
            for param in query.split('&') {
                let key = param.split_once('=').map_or(param, |(key, _)| key);
                if percent_decoded(key).to_ascii_lowercase().contains("pass") {
                    params.push(format!("{key}=***"));
                    if params.len() < query.split('&').count() {
                        params.push("***".to_owned());
                    }
                    break;
                }
                params.push(param.to_owned());
            }
            out.push_str(&params.join("&"));
        }
    }
    out
}

/// `%XX` escapes decoded (an invalid one kept as it is), for comparing a
/// URL parameter's name as the database driver will read it.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Server TLS material (PEM files).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When given, clients must present a certificate signed by this CA (mTLS).
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub database_url: DatabaseUrl,
    /// A registry file replacing the built-in one.
    pub registry_path: Option<PathBuf>,
    /// A tokens file (re-read on SIGHUP); its entries come before `tokens`.
    pub tokens_file: Option<PathBuf>,
    /// Accepted bearer tokens (hashes) given directly. With no tokens file
    /// either, empty means no authentication, loopback only.
    pub tokens: Vec<TokenEntry>,
    /// Serve without tokens on a non-loopback address anyway.
    pub insecure_allow_unauthenticated: bool,
    pub tls: Option<TlsFiles>,
    /// Each request must finish within this.
    pub request_timeout: Duration,
    /// Requests served at once, across all connections; more wait.
    pub concurrency_limit: usize,
    /// Requests served at once on one connection; more wait.
    pub max_concurrent_per_connection: usize,
    /// The store's connection pool size (on Postgres, of each of its two
    /// pools: `load`'s reads and the rest); `None`: the backend's default
    /// (16 on Postgres, 4 on SQLite).
    pub db_max_connections: Option<u32>,
    /// Postgres: loads read at once (`store::PoolSize::reads_in_flight`);
    /// `None`: one per 16 connections of the read pool.
    pub db_reads_in_flight: Option<u32>,
    /// The admin HTTP listener; `None` disables it. (`serve` defaults to
    /// [`DEFAULT_ADMIN_LISTEN`].)
    pub admin_listen: Option<SocketAddr>,
    /// How long start-up keeps retrying an unreachable store.
    pub startup_timeout: Duration,
    /// Apply the embedded migrations at start-up (otherwise the server waits,
    /// not ready, until someone else has applied them).
    pub migrate: bool,
    /// Logged changes are kept this long; older Watch cursors expire.
    pub change_retention: Duration,
    /// Messages queued for one Watch stream before it is cut off as too slow.
    pub watch_buffer: usize,
    /// A Watch stream with nothing to send sends progress this often.
    pub watch_progress_interval: Duration,
    /// How often the change feed reads the log without being woken.
    pub feed_poll_interval: Duration,
    /// Changes a change-feed subscriber (a Watch stream, the spend
    /// snapshot) may fall behind and still take live; one further behind
    /// reads them from the store (`feed::FeedConfig::capacity`).
    pub feed_capacity: usize,
    /// CheckSpend answers only while this replica's spend snapshot was
    /// confirmed current this recently; UNAVAILABLE otherwise.
    pub max_staleness: Duration,
    /// How often the spend snapshot reads every record again, to find and
    /// repair what was changed outside the service (`SpendSnapshot::start`).
    pub spend_recheck_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            database_url: DatabaseUrl::default(),
            registry_path: None,
            tokens_file: None,
            tokens: Vec::new(),
            insecure_allow_unauthenticated: false,
            tls: None,
            request_timeout: Duration::from_secs(10),
            concurrency_limit: 256,
            max_concurrent_per_connection: DEFAULT_MAX_CONCURRENT_PER_CONNECTION,
            db_max_connections: None,
            db_reads_in_flight: None,
            // Off for servers embedded in tests and benchmarks, which start
            // many at once; the command line defaults to DEFAULT_ADMIN_LISTEN.
            admin_listen: None,
            startup_timeout: Duration::from_secs(60),
            migrate: true,
            change_retention: DEFAULT_CHANGE_RETENTION,
            watch_buffer: DEFAULT_WATCH_BUFFER,
            watch_progress_interval: Duration::from_secs(10),
            feed_poll_interval: Duration::from_millis(500),
            feed_capacity: 4096,
            max_staleness: DEFAULT_MAX_STALENESS,
            spend_recheck_interval: Duration::from_secs(60),
        }
    }
}

impl Config {
    /// Refuses settings that cannot work together. `Application::build`
    /// calls it first, before anything is opened, so an operator hears of a
    /// mistake at once, not after waiting for the store.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.max_staleness < self.feed_poll_interval * 2 {
            anyhow::bail!(
                "--max-staleness {:?} is too short: the change feed confirms it is current only every {:?}; \
                 give at least twice that",
                self.max_staleness,
                self.feed_poll_interval
            );
        }
        Ok(())
    }
}

/// `--listen`: an IP address and a port. A host name is not looked up: the
/// addresses it names would decide silently which interfaces are served.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.trim().parse().map_err(|_| {
        format!(
            "{s:?} is not an IP address and port like 127.0.0.1:50051 (0.0.0.0:50051 for every \
             interface; a host name such as localhost is not looked up)"
        )
    })
}

/// `--admin-listen`: an address, or `off` to disable the admin listener.
pub fn parse_admin_listen(s: &str) -> Result<Option<SocketAddr>, String> {
    match s.trim() {
        "off" | "none" | "disabled" => Ok(None),
        other => other.parse().map(Some).map_err(|_| {
            format!("{other:?} is not an address like 127.0.0.1:9090 (or `off` to disable)")
        }),
    }
}

/// A duration such as `60s`, `500ms`, `2m`, or plain seconds (`60`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 60s, 500ms or 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!("{s:?} is not a duration like 60s, 500ms or 2m")),
    }
}

/// A PEM file (certificate, key or CA) for TLS, server or client side.
pub fn read_pem(path: &Path) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context;
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// The registry file at `path`, or the built-in registry when there is none.
/// The file is read here, at the edge; the domain parses its text.
pub fn load_registry(path: Option<&Path>) -> Result<Registry, RegistryError> {
    match path {
        None => Registry::builtin(),
        Some(p) => {
            let name = p.display().to_string();
            let text = std::fs::read_to_string(p).map_err(|e| RegistryError {
                source_name: name.clone(),
                entry: "file".into(),
                problem: RegistryProblem::CannotRead(e.to_string()),
            })?;
            Registry::from_toml(&text, &name)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_registry_file_is_an_error_naming_it() {
        let e = load_registry(Some(Path::new("/nonexistent/registry.toml"))).unwrap_err();
        assert_eq!(e.source_name, "/nonexistent/registry.toml");
        assert_eq!(e.entry, "file");
        assert!(matches!(e.problem, RegistryProblem::CannotRead(_)), "{e:?}");
        assert!(e.to_string().contains("/nonexistent/registry.toml"));
    }

    #[test]
    fn a_listen_address_is_an_ip_address_and_a_port() {
        assert_eq!(
            parse_listen("0.0.0.0:50051").unwrap(),
            "0.0.0.0:50051".parse::<SocketAddr>().unwrap()
        );
        assert!(parse_listen("[::1]:50051").is_ok());
        let e = parse_listen("localhost:50555").unwrap_err();
        assert!(
            e.contains("127.0.0.1:50051") && e.contains("not looked up"),
            "{e}"
        );
        assert!(parse_listen("127.0.0.1").is_err(), "a port is needed");
    }

    #[test]
    fn a_max_staleness_under_twice_the_feed_poll_is_refused() {
        let config = |max_staleness| Config {
            max_staleness,
            ..Config::default()
        };
        assert!(config(DEFAULT_MAX_STALENESS).validate().is_ok());
        assert!(config(Duration::from_secs(1)).validate().is_ok());
        let e = config(Duration::from_millis(500))
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--max-staleness 500ms is too short") && e.contains("at least twice"),
            "{e}"
        );
    }

    #[test]
    fn durations_and_admin_addresses_parse() {
        assert_eq!(parse_duration("60"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for bad in ["", "s", "1h", "-1s", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_admin_listen("off"), Ok(None));
        assert_eq!(
            parse_admin_listen("0.0.0.0:9090"),
            Ok(Some("0.0.0.0:9090".parse().unwrap()))
        );
        assert!(parse_admin_listen("localhost").is_err());
    }

    #[test]
    fn database_passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(redact_url("postgres://app@db/x"), "postgres://app@db/x");
        assert_eq!(
            redact_url("sqlite:billing-mode.db"),
            "sqlite:billing-mode.db"
        );
    }

    #[test]
    fn a_password_query_parameter_is_redacted() {
        assert_eq!(
            redact_url("postgres://app@db/x?sslmode=require&password=s3cret"),
            "postgres://app@db/x?sslmode=require&password=***"
        );
        assert_eq!(
            redact_url("postgres://db/x?PASSWORD=s3cret&application_name=bm"),
            "postgres://db/x?PASSWORD=***&***"
        );
        // Any name holding `password` is hidden, erring on the safe side.
        assert_eq!(
            redact_url("postgres://db/x?passwordless=1&user=app"),
            "postgres://db/x?passwordless=***&***"
        );
    }

    #[test]
    fn a_password_in_both_places_is_redacted_twice() {
        let url = "postgresql://app:s3cret@db:5432/x?password=0ther%40pw&sslmode=verify-full";
        assert_eq!(
            redact_url(url),
            "postgresql://app:***@db:5432/x?password=***&***"
        );
        // An `@` in the password itself (unencoded) does not end the user info early.
        assert_eq!(
            redact_url("postgres://app:p@ss@db/x"),
            "postgres://app:***@db/x"
        );
        // Nor does a `?` or a `/` in it.
        assert_eq!(
            redact_url("postgres://app:pa?ss@db/x"),
            "postgres://app:***@db/x"
        );
        assert_eq!(
            redact_url("postgres://app:pa/ss@db/x?sslmode=require"),
            "postgres://app:***@db/x?sslmode=require"
        );
    }

    #[test]
    fn what_is_not_a_url_is_not_shown_and_any_password_parameter_is_hidden() {
        for not_a_url in [
            "host=db user=billing password=s3cret dbname=billing",
            "billing:s3cret@db/billing",
        ] {
            assert_eq!(
                redact_url(not_a_url),
                "(not a URL; not shown)",
                "{not_a_url}"
            );
        }
        // An `@` in the query: what comes before it is not shown.
        for url in [
            "postgres://db/x?password=s3cret@x",
            "postgres://db/x?password=s3:cret@x",
            "postgres://app@db/x?sslpassword=s3cret@x",
        ] {
            assert!(!redact_url(url).contains("s3"), "{}", redact_url(url));
        }
        // `://` inside text that is not a URL; a password's name encoded; a
        // password with an unencoded `&`.
        for (text, hidden) in [
            (
                "host=db user=b password=s3cret application_name=https://billing",
                "s3cret",
            ),
            ("postgres://db/x?pass%77ord=s3cret", "s3cret"),
            ("postgres://app@db/x?password=s3&cret", "cret"),
            (
                "postgres://app@db/x?sslmode=require&PassWord=s3&cret=1",
                "cret",
            ),
        ] {
            let shown = redact_url(text);
            assert!(!shown.contains(hidden) && !shown.contains("s3"), "{shown}");
        }
        assert_eq!(
            redact_url("postgres://app@db/x?sslmode=require&password=s3&cret"),
            "postgres://app@db/x?sslmode=require&password=***&***"
        );
        assert_eq!(
            redact_url("sqlite:x.db?mode=ro&password=s3cret"),
            "sqlite:x.db?mode=ro&password=***"
        );
        assert_eq!(
            redact_url("postgres://app@db/x?sslpassword=s3cret&sslmode=require"),
            "postgres://app@db/x?sslpassword=***&***"
        );
    }

    #[test]
    fn a_database_url_never_shows_its_password() {
        let url = DatabaseUrl::new("postgres://app:s3cret@db/x?password=0ther");
        for shown in [
            format!("{url:?}"),
            format!("{url:#?}"),
            url.to_string(),
            format!(
                "{:?}",
                Config {
                    database_url: url.clone(),
                    ..Config::default()
                }
            ),
        ] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(!shown.contains("0ther"), "{shown}");
            assert!(shown.contains("app:***@db/x?password=***"), "{shown}");
        }
        assert_eq!(url.expose(), "postgres://app:s3cret@db/x?password=0ther");
        assert_eq!(
            "sqlite:x.db".parse::<DatabaseUrl>().unwrap().expose(),
            "sqlite:x.db"
        );
    }
}
