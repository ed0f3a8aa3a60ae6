//! The connections Postgres `load` reads through: the one query on the
//! request path of Resolve and BuildEnv.
//!
//! Not sqlx's pool, on purpose. sqlx 0.8 pings every connection it hands out
//! (`test_before_acquire`) and pings it again, in a task it spawns, every
//! time it is returned (always; no option turns that off). For a one-statement
//! read that is three round trips to Postgres where the query needs one, and
//! the spawned task is a wake-up of another worker thread per request
//! (docs/performance.md has the counts). `deadpool` hands a connection back
//! synchronously on drop and checks it only when we say so: here, only when
//! it has been idle long enough that the server or a proxy may have dropped
//! it (the recipe sqlx documents for `before_acquire`).
//!
//! What the pings protected against is handled where it happens instead:
//! a query that fails on a lost connection (killed backend, failover, idle
//! cut) drops that connection and is retried once on another; a read is
//! idempotent, and a second failure is returned (the caller answers
//! UNAVAILABLE, never a guess). A connection whose query did not finish
//! (an error of any kind, or the request cancelled mid-query) is never
//! reused.

use std::time::Duration;

use deadpool::managed::{self, Metrics, Object, RecycleResult};
use sqlx::{
    postgres::{PgConnectOptions, PgRow},
    Connection as _, PgConnection,
};

/// A connection idle for longer than this is pinged before it is used.
const CHECK_IDLE_AFTER: Duration = Duration::from_secs(30);
/// Tries of one read: the first, and after a lost connection two more.
const ATTEMPTS: u32 = 3;

/// Creates and checks the read connections.
#[derive(Debug)]
pub(crate) struct Manager {
    opts: PgConnectOptions,
}

impl managed::Manager for Manager {
    type Type = PgConnection;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<PgConnection, sqlx::Error> {
        PgConnection::connect_with(&self.opts).await
    }

    async fn recycle(&self, conn: &mut PgConnection, m: &Metrics) -> RecycleResult<sqlx::Error> {
        if m.last_used() > CHECK_IDLE_AFTER {
            conn.ping().await?;
        }
        Ok(())
    }
}

/// The read connections of one store.
#[derive(Debug, Clone)]
pub(crate) struct ReadPool {
    pool: managed::Pool<Manager>,
}

impl ReadPool {
    pub(crate) fn new(
        opts: PgConnectOptions,
        max_connections: usize,
        acquire_timeout: Duration,
    ) -> Result<Self, sqlx::Error> {
        let pool = managed::Pool::builder(Manager { opts })
            .max_size(max_connections)
            .wait_timeout(Some(acquire_timeout))
            .create_timeout(Some(acquire_timeout))
            .recycle_timeout(Some(acquire_timeout))
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(|e| sqlx::Error::Configuration(e.to_string().into()))?;
        Ok(ReadPool { pool })
    }

    /// [`ReadPool::fetch`] of a statement that returns at most one row.
    pub(crate) async fn fetch_optional<'q, F>(&self, query: F) -> Result<Option<PgRow>, sqlx::Error>
    where
        F: Fn() -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    {
        Ok(self.fetch(query).await?.pop())
    }

    /// Runs one read `query` (built anew for each attempt) for all its rows.
    /// On a lost connection the pool's idle connections are dropped too (a
    /// failover or a restart takes them all; one killed backend costs only
    /// reconnects) and the read runs again, on a connection checked first.
    pub(crate) async fn fetch<'q, F>(&self, query: F) -> Result<Vec<PgRow>, sqlx::Error>
    where
        F: Fn() -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let last = attempt == ATTEMPTS;
            let mut conn = InUse::new(self.get().await?);
            if attempt > 1 {
                if let Err(e) = conn.get().ping().await {
                    if !last && is_lost_connection(&e) {
                        continue;
                    }
                    return Err(e);
                }
            }
            match query().fetch_all(conn.get()).await {
                Ok(rows) => {
                    conn.finished();
                    return Ok(rows);
                }
                // `conn` is dropped unfinished, so it is closed, not reused.
                Err(e) if !last && is_lost_connection(&e) => {
                    tracing::debug!(error = %e, "a read connection was lost; retrying");
                    self.pool.retain(|_, _| false);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn get(&self) -> Result<Object<Manager>, sqlx::Error> {
        self.pool.get().await.map_err(|e| match e {
            managed::PoolError::Backend(e) => e,
            managed::PoolError::Timeout(_) => sqlx::Error::PoolTimedOut,
            managed::PoolError::Closed => sqlx::Error::PoolClosed,
            other => sqlx::Error::Configuration(other.to_string().into()),
        })
    }

    /// Takes a connection from the pool until the returned one is dropped.
    #[cfg(test)]
    pub(crate) async fn hold(&self) -> Object<Manager> {
        self.get().await.expect("a read connection")
    }

    /// (connections open, connections idle).
    pub(crate) fn status(&self) -> (u32, usize) {
        let s = self.pool.status();
        (u32::try_from(s.size).unwrap_or(u32::MAX), s.available)
    }
}

/// A connection lent to one query: back to the pool only if the query
/// finished, otherwise closed (its state is unknown).
struct InUse(Option<Object<Manager>>);

impl InUse {
    fn new(conn: Object<Manager>) -> Self {
        InUse(Some(conn))
    }

    fn get(&mut self) -> &mut PgConnection {
        self.0
            .as_mut()
            .expect("a connection until finished or dropped")
    }

    fn finished(mut self) {
        drop(self.0.take());
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            // Detached from the pool, the connection closes when dropped.
            drop(Object::take(conn));
        }
    }
}

/// Whether `e` says the connection itself is gone, so that the same query
/// on another connection may succeed.
fn is_lost_connection(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        // Class 08: connection exception; 57P01..57P03: the server is
        // terminating the session (admin command, crash, shutdown).
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_connection_failures_are_retried() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        assert!(is_lost_connection(&io));
        assert!(is_lost_connection(&sqlx::Error::Protocol("eof".into())));
        assert!(!is_lost_connection(&sqlx::Error::RowNotFound));
        assert!(!is_lost_connection(&sqlx::Error::PoolTimedOut));
    }
}
