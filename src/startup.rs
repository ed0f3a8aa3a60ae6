//! Start-up: load and check everything, bind, then serve.
//!
//! [`Application::build`] validates the configuration, loads the registry,
//! connects to the store and applies migrations, and binds the listener, so
//! tests run the production path on port 0 and read the bound address.

use std::{future::Future, net::SocketAddr, sync::Arc};

use anyhow::{bail, Context};
use tokio::net::TcpListener;
use tonic::transport::{server::TcpIncoming, Certificate, Identity, Server, ServerTlsConfig};
use tower::limit::GlobalConcurrencyLimitLayer;

use crate::{
    auth::Authenticator,
    config::{Config, MAX_MESSAGE_BYTES},
    domain::Registry,
    proto::{self, billing_mode_server::BillingModeServer},
    service::BillingModeService,
    store::{self, Store},
};

pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    config: Config,
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    auth: Arc<Authenticator>,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let auth = Arc::new(Authenticator::new(config.tokens.clone()));
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
        let registry = Arc::new(Registry::load(config.registry_path.as_deref())?);
        let store = store::connect(&config.database_url)
            .await
            .with_context(|| format!("opening the store ({})", redact_url(&config.database_url)))?;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let addr = listener.local_addr()?;
        tracing::info!(
            %addr,
            store = store.backend(),
            registry = registry.source_name(),
            rules = registry.rules().len(),
            tokens = auth.token_count(),
            tls = config.tls.is_some(),
            mtls = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
            "ready: migrations applied, registry loaded"
        );
        Ok(Application {
            listener,
            addr,
            config,
            store,
            registry,
            auth,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` completes, then finishes in-flight calls.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let (health, health_service) = tonic_health::server::health_reporter();
        // Migrations were applied in build(): the service is ready.
        health
            .set_serving::<BillingModeServer<BillingModeService>>()
            .await;

        // The same descriptors, served on both reflection versions.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;

        let service = BillingModeService::new(self.store.clone(), self.registry.clone());
        let auth = self.auth.clone();
        // Only the BillingMode service is authenticated: health and reflection
        // stay open for probes and `grpcurl list/describe`.
        let billing = tonic::service::interceptor::InterceptedService::new(
            BillingModeServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            move |req| auth.intercept(req),
        );

        let mut server = Server::builder();
        if let Some(tls) = &self.config.tls {
            server = server.tls_config(tls_config(tls)?)?;
        }
        // The stack, outermost first: a span per request, the per-request
        // timeout, then the concurrency limits; authentication runs inside
        // the BillingMode service.
        let router = server
            .trace_fn(|req| tracing::info_span!("grpc", path = %req.uri().path()))
            .timeout(self.config.request_timeout)
            .concurrency_limit_per_connection(64)
            .layer(GlobalConcurrencyLimitLayer::new(
                self.config.concurrency_limit,
            ))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(billing);

        let incoming = TcpIncoming::from(self.listener).with_nodelay(Some(true));
        let shutdown = async move {
            shutdown.await;
            tracing::info!("shutting down: finishing in-flight calls");
            health
                .set_not_serving::<BillingModeServer<BillingModeService>>()
                .await;
        };
        router
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .context("serving")?;
        tracing::info!("stopped");
        Ok(())
    }
}

fn tls_config(files: &crate::config::TlsFiles) -> anyhow::Result<ServerTlsConfig> {
    let read =
        |p: &std::path::Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let mut cfg =
        ServerTlsConfig::new().identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?));
    if let Some(ca) = &files.client_ca {
        cfg = cfg
            .client_ca_root(Certificate::from_pem(read(ca)?))
            .client_auth_optional(false);
    }
    Ok(cfg)
}

/// A database URL without its password, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

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
}
