//! Readiness: named conditions, each set by the part of the server that owns
//! it ("store reachable", "migrations applied", ...). The server is ready only
//! while every registered condition holds; that one answer drives both the
//! gRPC health service and the admin port's `/readyz`.
//!
//! A new condition starts out *not* holding (fail closed): its owner says when
//! it holds. To add one, take a [`Condition`] from the application's
//! [`Readiness`] and call [`Condition::set`] whenever it changes.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;
use tonic_health::{server::HealthReporter, ServingStatus};

use crate::store::Store;

/// How often the store is probed in the background.
pub const STORE_PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// How long one store probe may take before the store counts as unreachable.
pub const STORE_PROBE_BOUND: Duration = Duration::from_secs(2);

/// Condition names used by the server itself.
pub const MIGRATIONS_APPLIED: &str = "migrations applied";
pub const STORE_REACHABLE: &str = "store reachable";
pub const ACCEPTING_CALLS: &str = "accepting calls";

/// The set of readiness conditions of one server.
#[derive(Clone)]
pub struct Readiness {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}

struct Inner {
    conditions: Mutex<BTreeMap<&'static str, bool>>,
    ready: watch::Sender<bool>,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, bool>> {
        // A panic while holding this lock cannot leave the map half-written
        // (each update is one insert), so a poisoned lock is still usable.
        self.conditions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl Readiness {
    pub fn new() -> Self {
        Readiness {
            inner: Arc::new(Inner {
                conditions: Mutex::new(BTreeMap::new()),
                ready: watch::channel(false).0,
            }),
        }
    }

    /// Registers the condition `name` (not holding until its owner says so)
    /// and returns its handle. Asking again for the same name returns a
    /// handle to the same condition.
    pub fn condition(&self, name: &'static str) -> Condition {
        {
            let mut map = self.inner.lock();
            map.entry(name).or_insert(false);
            self.inner.ready.send_replace(all_hold(&map));
        }
        Condition {
            name,
            inner: self.inner.clone(),
        }
    }

    /// True when at least one condition is registered and all of them hold.
    pub fn is_ready(&self) -> bool {
        all_hold(&self.inner.lock())
    }

    /// Every condition and whether it holds, by name.
    pub fn conditions(&self) -> Vec<(&'static str, bool)> {
        self.inner.lock().iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// Follows [`Readiness::is_ready`] as it changes.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.inner.ready.subscribe()
    }
}

fn all_hold(map: &BTreeMap<&'static str, bool>) -> bool {
    !map.is_empty() && map.values().all(|v| *v)
}

/// One named condition; its owner sets it.
#[derive(Clone)]
pub struct Condition {
    name: &'static str,
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Condition")
            .field("name", &self.name)
            .field("holds", &self.holds())
            .finish()
    }
}

impl Condition {
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Records whether the condition holds now; a change is logged.
    pub fn set(&self, holds: bool) {
        let mut map = self.inner.lock();
        let before = map.insert(self.name, holds);
        if before != Some(holds) {
            if holds {
                tracing::info!(condition = self.name, "readiness: condition holds");
            } else {
                tracing::warn!(condition = self.name, "readiness: condition does not hold");
            }
        }
        self.inner.ready.send_replace(all_hold(&map));
    }

    pub fn holds(&self) -> bool {
        self.inner.lock().get(self.name).copied().unwrap_or(false)
    }
}

/// Keeps the gRPC health service in step with `readiness`: the overall
/// status (`""`) and each of `services` are SERVING exactly while the server
/// is ready. Runs until the readiness set is dropped.
pub async fn drive_grpc_health(
    readiness: Readiness,
    reporter: HealthReporter,
    services: &'static [&'static str],
) {
    let mut rx = readiness.subscribe();
    loop {
        let ready = *rx.borrow_and_update();
        set_grpc_health(&reporter, services, ready).await;
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Sets the overall status (`""`) and each of `services` at once.
pub async fn set_grpc_health(reporter: &HealthReporter, services: &[&str], ready: bool) {
    let status = if ready {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
    for s in services {
        reporter.set_service_status(s, status).await;
    }
}

/// One bounded probe of the store: `Ok` when it answered within `bound`.
pub async fn probe_store(store: &dyn Store, bound: Duration) -> Result<(), String> {
    match tokio::time::timeout(bound, store.ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} ms", bound.as_millis().max(1))),
    }
}

/// Probes the store now and records the answer in `reachable`; a failure is
/// logged when the condition turns false.
pub async fn check_store(store: &dyn Store, reachable: &Condition, bound: Duration) -> bool {
    match probe_store(store, bound).await {
        Ok(()) => {
            reachable.set(true);
            true
        }
        Err(error) => {
            if reachable.holds() {
                tracing::warn!(%error, "the store is unreachable");
            }
            reachable.set(false);
            false
        }
    }
}

/// Probes the store every `interval` for as long as it runs.
pub async fn watch_store(store: Arc<dyn Store>, reachable: Condition, interval: Duration) {
    loop {
        check_store(store.as_ref(), &reachable, STORE_PROBE_BOUND).await;
        tokio::time::sleep(interval).await;
    }
}

/// Checks every `interval` whether the embedded migrations have been
/// applied (by `billing-mode migrate`), until they have.
pub async fn watch_migrations(store: Arc<dyn Store>, applied: Condition, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        match store.pending_migrations().await {
            Ok(0) => {
                applied.set(true);
                return;
            }
            Ok(pending) => tracing::debug!(pending, "migrations still pending"),
            Err(e) => tracing::debug!(error = %e, "cannot check the migrations"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_while_every_condition_holds() {
        let r = Readiness::new();
        assert!(!r.is_ready(), "no conditions: not ready (fail closed)");
        let a = r.condition("a");
        assert!(!r.is_ready(), "a new condition does not hold yet");
        a.set(true);
        assert!(r.is_ready());
        let b = r.condition("b");
        assert!(!r.is_ready());
        b.set(true);
        assert!(r.is_ready());
        a.set(false);
        assert!(!r.is_ready());
        assert_eq!(r.conditions(), vec![("a", false), ("b", true)]);
        // Same name, same condition.
        r.condition("a").set(true);
        assert!(a.holds() && r.is_ready());
    }

    #[tokio::test]
    async fn subscribers_see_each_change() {
        let r = Readiness::new();
        let mut rx = r.subscribe();
        let c = r.condition("c");
        c.set(true);
        rx.changed().await.unwrap();
        assert!(*rx.borrow_and_update());
        c.set(false);
        rx.changed().await.unwrap();
        assert!(!*rx.borrow_and_update());
    }
}
