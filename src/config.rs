//! Typed configuration of the server, independent of how it was given
//! (flags and environment variables are mapped onto it in `main.rs`).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::auth::TokenEntry;

/// The default database: an SQLite file in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite:billing-mode.db";
/// The default listen address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Largest request or response message.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

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
    pub database_url: String,
    /// A registry file replacing the built-in one.
    pub registry_path: Option<PathBuf>,
    /// Accepted bearer tokens (hashes). Empty: no authentication, loopback only.
    pub tokens: Vec<TokenEntry>,
    /// Serve without tokens on a non-loopback address anyway.
    pub insecure_allow_unauthenticated: bool,
    pub tls: Option<TlsFiles>,
    /// Each request must finish within this.
    pub request_timeout: Duration,
    /// Requests served at once, across all connections; more wait.
    pub concurrency_limit: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            database_url: DEFAULT_DATABASE_URL.to_owned(),
            registry_path: None,
            tokens: Vec::new(),
            insecure_allow_unauthenticated: false,
            tls: None,
            request_timeout: Duration::from_secs(10),
            concurrency_limit: 256,
        }
    }
}
