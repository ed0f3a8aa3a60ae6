//! Re-reading configuration files on SIGHUP, without a restart.
//!
//! - The tokens file: a valid new file takes effect for new calls; an invalid
//!   one (or one that would leave no tokens at all) is refused with a logged
//!   error naming the line, and the set in force stays.
//! - The registry file is re-read and validated too, but never swapped in: a
//!   registry change alters decisions without a revision bump, which the
//!   change stream and the spend check could not deliver as events. When the
//!   file differs from the running registry, the running one stays and an
//!   error says that a registry change needs a rolling restart.

use std::{path::PathBuf, sync::Arc};

use anyhow::Context;

use crate::{
    auth::{self, Authenticator, TokenEntry},
    domain::Registry,
};

/// The authenticator in force; swapped whole on a reload. Calls take the
/// one in force when they start; a stream that outlives a reload follows
/// [`SharedAuth::changes`], so a token taken away ends it.
#[derive(Clone)]
pub struct SharedAuth(Arc<tokio::sync::watch::Sender<Arc<Authenticator>>>);

impl std::fmt::Debug for SharedAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedAuth").finish_non_exhaustive()
    }
}

impl SharedAuth {
    pub fn new(auth: Authenticator) -> Self {
        SharedAuth(Arc::new(tokio::sync::watch::Sender::new(Arc::new(auth))))
    }

    /// The authenticator for one call.
    pub fn current(&self) -> Arc<Authenticator> {
        self.0.borrow().clone()
    }

    /// Each authenticator put in force from now on.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<Arc<Authenticator>> {
        self.0.subscribe()
    }

    fn replace(&self, auth: Authenticator) {
        self.0.send_replace(Arc::new(auth));
    }
}

/// The tokens file's entries followed by `inline` ones (`--tokens`); a name,
/// or a token (its hash), configured twice is an error: one token would
/// otherwise act as whichever entry came last, the other's roles silently
/// unused.
pub fn load_tokens(
    file: Option<&std::path::Path>,
    inline: &[TokenEntry],
) -> anyhow::Result<Vec<TokenEntry>> {
    let mut tokens = Vec::new();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading tokens file {}", path.display()))?;
        tokens.extend(auth::parse_token_lines(&text, &path.display().to_string())?);
    }
    for e in inline {
        if tokens.iter().any(|t: &TokenEntry| t.name == e.name) {
            anyhow::bail!("token name {:?} is configured twice", e.name);
        }
        if let Some(t) = tokens.iter().find(|t| t.same_token(e)) {
            anyhow::bail!(
                "the token of {:?} (--tokens) is also configured as {:?}: the same token hash \
                 appears twice",
                e.name,
                t.name
            );
        }
        tokens.push(e.clone());
    }
    Ok(tokens)
}

/// What a SIGHUP re-reads, and where the results go.
#[derive(Clone)]
pub struct Reloader {
    pub(crate) auth: SharedAuth,
    pub(crate) tokens_file: Option<PathBuf>,
    pub(crate) inline_tokens: Vec<TokenEntry>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) registry_path: Option<PathBuf>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("tokens_file", &self.tokens_file)
            .field("registry_path", &self.registry_path)
            .finish_non_exhaustive()
    }
}

impl Reloader {
    /// Re-reads the tokens file and the registry file; logs what happened.
    pub fn reload(&self) {
        tracing::info!("SIGHUP: re-reading the tokens and registry files");
        self.reload_tokens();
        self.check_registry();
    }

    fn reload_tokens(&self) {
        let Some(path) = &self.tokens_file else {
            tracing::info!("no tokens file configured: nothing to reload");
            return;
        };
        let shown = path.display().to_string();
        match load_tokens(Some(path), &self.inline_tokens) {
            Err(e) => tracing::error!(
                file = %shown,
                error = crate::service::error::anyhow_text(&e),
                "tokens reload refused; the previous tokens stay in force"
            ),
            Ok(tokens) if tokens.is_empty() && !self.auth.current().is_open() => {
                tracing::error!(
                    file = %shown,
                    "tokens reload refused: the file has no tokens, which would turn \
                     authentication off; the previous tokens stay in force"
                )
            }
            Ok(tokens) => {
                let count = tokens.len();
                self.auth.replace(Authenticator::new(tokens));
                tracing::info!(file = %shown, tokens = count, "tokens reloaded");
            }
        }
    }

    fn check_registry(&self) {
        let Some(path) = &self.registry_path else {
            return;
        };
        let shown = path.display().to_string();
        match crate::config::load_registry(Some(path)) {
            Err(e) => tracing::error!(
                file = %shown,
                error = %e,
                "the registry file is invalid; the running registry stays in force"
            ),
            // The registry holds compiled regexes and has no `PartialEq`; its
            // `Debug` form is deterministic (ordered maps, vectors, regex
            // patterns) and shows every field, so equal forms mean an equal
            // registry.
            Ok(new) if format!("{new:?}") == format!("{:?}", self.registry) => {
                tracing::info!(file = %shown, "registry file unchanged")
            }
            Ok(_) => tracing::error!(
                file = %shown,
                "the registry file changed, but a registry change needs a rolling restart \
                 (it alters decisions without a revision, which Watch and CheckSpend cannot \
                 deliver); the running registry stays in force"
            ),
        }
    }
}

/// SIGHUPs heard from the moment [`Hangups::listen`] is called: one sent
/// after that but before [`on_sighup`] runs is reloaded once it does.
#[derive(Debug)]
pub struct Hangups {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangups {
    /// Starts listening (on a runtime). When the signal cannot be listened
    /// for, says so: reloading is then off.
    pub fn listen() -> Hangups {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let signal = signal(SignalKind::hangup())
                .inspect_err(
                    |e| tracing::warn!(error = %e, "cannot listen for SIGHUP: reloading is off"),
                )
                .ok();
            Hangups { signal }
        }
        #[cfg(not(unix))]
        Hangups {}
    }
}

/// Calls [`Reloader::reload`] on every SIGHUP, for as long as it runs.
pub async fn on_sighup(reloader: Reloader, hangups: Hangups) {
    #[cfg(unix)]
    if let Some(mut hup) = hangups.signal {
        while hup.recv().await.is_some() {
            reloader.reload();
        }
    }
    #[cfg(not(unix))]
    let _ = (reloader, hangups);
    std::future::pending::<()>().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{generate_token, parse_token_lines, Role};

    #[test]
    fn a_token_in_the_file_and_on_the_command_line_is_refused_by_name_or_hash() {
        let (_, entry) = generate_token("ci", [Role::Reader].into()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        // The same hash under another name and role.
        let hash = entry.line().split_whitespace().nth(1).unwrap().to_owned();
        std::fs::write(&file, format!("ops {hash} admin\n")).unwrap();
        let inline = parse_token_lines(&entry.line(), "--tokens").unwrap();
        let e = load_tokens(Some(&file), &inline).unwrap_err().to_string();
        assert!(e.contains("same token hash appears twice"), "{e}");
        assert!(!e.contains(&hash), "{e}");
        // The same name.
        let (_, other) = generate_token("ops", [Role::Reader].into()).unwrap();
        let inline = parse_token_lines(&other.line(), "--tokens").unwrap();
        let e = load_tokens(Some(&file), &inline).unwrap_err().to_string();
        assert!(e.contains("configured twice"), "{e}");
        // Different both: fine.
        let (_, fine) = generate_token("ci2", [Role::Reader].into()).unwrap();
        let inline = parse_token_lines(&fine.line(), "--tokens").unwrap();
        assert_eq!(load_tokens(Some(&file), &inline).unwrap().len(), 2);
    }
}
