//! The per-replica change feed: one tailer task per server reads the store's
//! change log in position order and fans every committed change out to its
//! subscribers (Watch streams, and anything else that keeps state current
//! from the log, such as an in-memory snapshot).
//!
//! How to use it:
//!
//! - [`Feed::start`] once per server; [`Feed::shutdown`] on the way out.
//! - For a state kept current from the log: [`Feed::snapshot`] reads every
//!   record at one position `P` (one consistent read, handing them over one
//!   at a time), then [`Feed::subscribe`]`(P)` yields every change committed
//!   after `P`, exactly once, in position order, with no gap.
//! - [`Feed::current_at`] is the [`Moment`] at which the tailer last
//!   confirmed it was current (the start of its last read that reached the
//!   end of the log). A caller that must not act on stale state judges its
//!   age by both clocks (see [`Moment`]) against its staleness bound, and
//!   fails closed.
//!
//! Why it cannot lose or repeat a change: positions are dense and assigned
//! in commit order by the store (see `store/postgres.rs`), so the tailer only
//! ever advances from `N` to `N + 1` (a gap is an error, never skipped), and a
//! subscription starting below the tailer reads the missing range from the
//! store before it takes live events, skipping any it already has by position.
//! The tailer is woken by the store's listener (Postgres `NOTIFY` from any
//! replica; in process on SQLite) and polls every `poll_interval` besides, so
//! a missed wake-up only delays. Subscribers never slow the tailer or a
//! writer: a subscriber that falls more than the broadcast capacity behind
//! (it read its backlog from the store while more than that many changes
//! committed, or it could not keep pace with a burst) goes back to reading
//! from the store, as a new subscription would, and takes live changes again
//! once it has caught up. How slow a consumer may be is its own buffer's
//! business (Watch's `--watch-buffer`), not the feed's.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use tokio::sync::{broadcast, watch};

use crate::store::{ChangeListener, LoggedChange, Store, StoreError, Visit, Wake};

/// One committed change: position, commit time and the record after it (its
/// workspace id and revision included), from which `resolve` gives the
/// Resolution at that revision.
pub type ChangeEvent = LoggedChange;

/// Changes read from the store per query.
const BATCH: u32 = 500;

/// How long the tailer may fail to read the log before subscribers are told
/// the store is lost.
const LOST_AFTER: Duration = Duration::from_secs(5);
/// How often the tailer reads the log while it cannot be notified of
/// changes (the store's listener could not be set up: Postgres `LISTEN`
/// refused or its connection lost): often enough that a change still
/// reaches this replica (CheckSpend's snapshot, Watch) within the
/// contract's 100 ms, instead of only at the next `poll_interval`.
const UNNOTIFIED_POLL: Duration = Duration::from_millis(50);

/// A listener that has woken nobody for this long is sent a heartbeat
/// ([`ChangeListener::heartbeat`]): a connection the network dropped without
/// closing it wakes nobody ever again, and this replica would learn of
/// changes only at each `poll_interval`, saying nothing.
const HEARTBEAT_AFTER_SILENCE: Duration = Duration::from_secs(1);
/// A heartbeat that has not woken the listener this long after it was sent
/// means the listener's connection is gone: the tailer listens on a new one
/// and reads the log. Reads go on meanwhile, every `poll_interval`.
const HEARTBEAT_WITHIN: Duration = Duration::from_secs(1);
/// Waits between attempts to set a listener up, doubling from the first to
/// the last while they fail (the log is read every [`UNNOTIFIED_POLL`]
/// meanwhile): a database that refuses `LISTEN` (a standby during a
/// failover) or has no connection to spare is not asked 20 times a second.
const LISTEN_RETRY_FIRST: Duration = Duration::from_millis(100);
/// Setting a listener up takes at most this long, or counts as failed.
const LISTEN_WITHIN: Duration = Duration::from_secs(2);
const LISTEN_RETRY_LAST: Duration = Duration::from_secs(5);

/// Tuning of a feed.
#[derive(Debug, Clone)]
pub struct FeedConfig {
    /// How often the tailer reads the log without a wake-up.
    pub poll_interval: Duration,
    /// Logged changes older than this are pruned (cursors older expire).
    pub retention: Duration,
    /// Changes a subscriber may fall behind the tailer and still take them
    /// live; one further behind reads them from the store.
    pub capacity: usize,
}

impl Default for FeedConfig {
    fn default() -> Self {
        FeedConfig {
            poll_interval: Duration::from_millis(500),
            retention: Duration::from_secs(7 * 24 * 3600),
            capacity: 4096,
        }
    }
}

/// Why a subscription ended or could not start.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The position is beyond anything the store has handed out.
    #[error("position {0} was never handed out by this store")]
    UnknownPosition(u64),
    /// Changes after the position were pruned.
    #[error("changes after position {0} were pruned")]
    Expired(u64),
    /// The consumer's own queue filled (Watch's `--watch-buffer`): the feed
    /// itself never ends a subscription for falling behind.
    #[error("the subscriber fell too far behind")]
    TooSlow,
    /// The server is shutting down.
    #[error("the feed is shutting down")]
    ShuttingDown,
    /// The tailer has not been able to read the log for a while.
    #[error("the change log has been unreadable for too long")]
    Lost,
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A moment, on both clocks, so that how long ago it was can be judged by
/// each: the wall clock may be stepped backwards (NTP), and an old
/// confirmation would look recent by it, or lie in the future; the
/// monotonic clock is never stepped, but stands still while the machine is
/// suspended or the VM paused. A caller failing closed takes the moment as
/// too old when either clock says so (`SpendSnapshot::is_current`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moment {
    /// Wall-clock time: what an answer reports (`as_of`).
    pub wall: DateTime<Utc>,
    /// Nanoseconds on this process's monotonic clock ([`monotonic_ns`]).
    pub monotonic_ns: u64,
}

impl Moment {
    pub fn now() -> Moment {
        Moment {
            monotonic_ns: monotonic_ns(),
            wall: Utc::now(),
        }
    }

    /// How long ago this moment was, on the monotonic clock.
    pub fn age(&self) -> Duration {
        Duration::from_nanos(monotonic_ns().saturating_sub(self.monotonic_ns))
    }
}

/// Nanoseconds since this process first asked (a monotonic clock: never
/// stepped, never goes backwards), as a number so that it fits an atomic.
pub fn monotonic_ns() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The tailer's health, as subscribers and callers see it.
#[derive(Debug, Clone, Default)]
struct Health {
    /// Start of the last read that reached the end of the log.
    current_at: Option<Moment>,
    /// The log has been unreadable for longer than [`LOST_AFTER`].
    lost: bool,
    /// The tailer's last read met a log it cannot interpret (a gap in the
    /// positions, an entry that does not parse): what it met. Said at once,
    /// not after [`LOST_AFTER`]: reading again reads the same bytes, so an
    /// operator must look before anyone resumes (the contract's
    /// `DATA_LOSS`/`STORE_CORRUPT`), where a store merely unreachable is
    /// worth retrying later.
    corrupt: Option<String>,
}

impl Health {
    /// Whether the tailer is known to be failing (lost, or corrupt).
    fn failing(&self) -> bool {
        self.lost || self.corrupt.is_some()
    }

    /// Why a subscription cannot go on, if it cannot.
    fn failure(&self) -> Option<FeedError> {
        match (&self.corrupt, self.lost) {
            (Some(what), _) => Some(FeedError::Store(StoreError::corrupt(what.clone()))),
            (None, true) => Some(FeedError::Lost),
            (None, false) => None,
        }
    }
}

/// What the tailer, the subscriptions and the handles share.
struct Shared {
    store: Arc<dyn Store>,
    /// Set once the tailer has first read the log's state.
    store_id: OnceLock<String>,
    /// The last position the tailer broadcast; held while broadcasting, so a
    /// subscriber learns exactly which positions its receiver will carry.
    position: Mutex<u64>,
    tx: broadcast::Sender<Arc<ChangeEvent>>,
    health: watch::Sender<Health>,
    shutdown: watch::Sender<bool>,
}

impl Shared {
    /// Starts at the log's end; the position started from.
    fn init(&self, state: crate::store::LogState) -> u64 {
        *self.position.lock().expect("feed position lock") = state.last_position;
        let _ = self.store_id.set(state.store_id);
        state.last_position
    }
}

/// A handle on the server's feed; cheap to clone. The tailer and pruner stop
/// on [`Feed::shutdown`] or when the last handle is dropped.
#[derive(Clone)]
pub struct Feed {
    shared: Arc<Shared>,
    _guard: Arc<StopOnDrop>,
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed").finish_non_exhaustive()
    }
}

struct StopOnDrop(watch::Sender<bool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

impl Feed {
    /// Starts the tailer (from the log's end once it can first read it: at
    /// once, or, on a store still waiting for its migrations, later) and the
    /// pruning job. Until then, subscribing is refused as the store being
    /// unavailable.
    pub async fn start(store: Arc<dyn Store>, config: FeedConfig) -> Feed {
        let (tx, _) = broadcast::channel(config.capacity.max(1));
        let shutdown = watch::Sender::new(false);
        let shared = Arc::new(Shared {
            store,
            store_id: OnceLock::new(),
            position: Mutex::new(0),
            tx,
            health: watch::Sender::new(Health::default()),
            shutdown: shutdown.clone(),
        });
        // Usually the log is there: start from its end before returning.
        if let Ok(state) = shared.store.log_state().await {
            shared.init(state);
        }
        tokio::spawn(tail(shared.clone(), config.poll_interval));
        tokio::spawn(prune(shared.clone(), config.retention));
        Feed {
            shared,
            _guard: Arc::new(StopOnDrop(shutdown)),
        }
    }

    /// Names the store (cursors carry it, so a cursor of another store is
    /// refused): 32 hex digits. `None` until the tailer first read the log.
    pub fn store_id(&self) -> Option<&str> {
        self.shared.store_id.get().map(String::as_str)
    }

    /// The last position this replica's tailer has broadcast.
    pub fn position(&self) -> u64 {
        *self.shared.position.lock().expect("feed position lock")
    }

    /// When the tailer last confirmed it was current: the start time of its
    /// last read that reached the end of the log. `None` until the first.
    pub fn current_at(&self) -> Option<Moment> {
        self.shared.health.borrow().current_at
    }

    /// The last position the store has handed out (one read, not the tailer's).
    pub async fn store_position(&self) -> Result<u64, StoreError> {
        Ok(self.shared.store.log_state().await?.last_position)
    }

    /// Every record at one position `P` (one consistent read), each handed
    /// to `visit` as it is read, never all held at once; returns `P`. Follow
    /// with [`Feed::subscribe`]`(P)` to miss nothing after it. On an error,
    /// discard what was visited.
    pub async fn snapshot(&self, visit: Visit<'_>) -> Result<u64, StoreError> {
        self.shared.store.snapshot(visit).await
    }

    /// Every change committed after position `after`, exactly once, in
    /// position order. `after` must be a position this store handed out that
    /// is not older than the retained log.
    pub async fn subscribe(&self, after: u64) -> Result<Subscription, FeedError> {
        if *self.shared.shutdown.borrow() {
            return Err(FeedError::ShuttingDown);
        }
        if self.store_id().is_none() {
            return Err(FeedError::Lost);
        }
        let state = self.shared.store.log_state().await?;
        if after > state.last_position {
            return Err(FeedError::UnknownPosition(after));
        }
        if after < state.pruned_through {
            return Err(FeedError::Expired(after));
        }
        let (rx, tailer) = {
            let position = self.shared.position.lock().expect("feed position lock");
            (self.shared.tx.subscribe(), *position)
        };
        Ok(Subscription {
            shared: self.shared.clone(),
            rx,
            last: after,
            catch_up_to: tailer,
            backlog: VecDeque::new(),
            took_live: false,
            health: self.shared.health.subscribe(),
            shutdown: self.shared.shutdown.subscribe(),
        })
    }

    /// Completes once the tailer is not known to be failing (it has not
    /// lost the log, nor met a log it cannot interpret), or the feed shuts
    /// down: before then a new subscription would fail at once.
    pub async fn readable(&self) {
        let mut health = self.shared.health.subscribe();
        tokio::select! {
            _ = health.wait_for(|h| !h.failing()) => {}
            () = self.stopped() => {}
        }
    }

    /// Completes once [`Feed::shutdown`] was called.
    pub async fn stopped(&self) {
        let mut rx = self.shared.shutdown.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Stops the tailer and the pruner; subscriptions end with
    /// [`FeedError::ShuttingDown`].
    pub fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
    }
}

/// A subscriber's view of the feed: see [`Feed::subscribe`].
pub struct Subscription {
    shared: Arc<Shared>,
    rx: broadcast::Receiver<Arc<ChangeEvent>>,
    /// The last position handed to the subscriber.
    last: u64,
    /// Below this, changes come from the store; above, from the tailer.
    catch_up_to: u64,
    backlog: VecDeque<Arc<ChangeEvent>>,
    /// Whether the change last returned came from the tailer (live), not
    /// from the store.
    took_live: bool,
    health: watch::Receiver<Health>,
    shutdown: watch::Receiver<bool>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("last", &self.last)
            .field("catch_up_to", &self.catch_up_to)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// The position of the last change returned (or the starting position).
    pub fn position(&self) -> u64 {
        self.last
    }

    /// True once the subscription has caught up with the tailer: further
    /// changes come live, as they commit.
    pub fn is_live(&self) -> bool {
        self.backlog.is_empty() && self.last >= self.catch_up_to
    }

    /// Whether the change [`Subscription::next`] returned last came live,
    /// as it was committed, rather than from the store (a backlog, read at
    /// the consumer's pace). The last change of a backlog is not live even
    /// though the subscription is live after it.
    pub fn took_live(&self) -> bool {
        self.took_live
    }

    /// The next change. Cancel-safe: dropping the future loses nothing.
    pub async fn next(&mut self) -> Result<Arc<ChangeEvent>, FeedError> {
        loop {
            if *self.shutdown.borrow() {
                return Err(FeedError::ShuttingDown);
            }
            if let Some(change) = self.backlog.pop_front() {
                self.last = change.position;
                self.took_live = false;
                return Ok(change);
            }
            if self.last < self.catch_up_to {
                self.fill_backlog().await?;
                continue;
            }
            let received = tokio::select! {
                biased;
                _ = self.shutdown.wait_for(|s| *s) => return Err(FeedError::ShuttingDown),
                failed = self.health.wait_for(Health::failing) => {
                    let failure = failed.ok().and_then(|h| h.failure());
                    return Err(failure.unwrap_or(FeedError::ShuttingDown));
                }
                received = self.rx.recv() => received,
            };
            match received {
                Ok(change) if change.position <= self.last => continue,
                Ok(change) if change.position == self.last + 1 => {
                    self.last = change.position;
                    self.took_live = true;
                    return Ok(change);
                }
                Ok(change) => {
                    return Err(FeedError::Store(StoreError::corrupt(format!(
                        "the feed skipped from position {} to {}",
                        self.last, change.position
                    ))))
                }
                Err(broadcast::error::RecvError::Lagged(_)) => self.rejoin(),
                Err(broadcast::error::RecvError::Closed) => return Err(FeedError::ShuttingDown),
            }
        }
    }

    /// Fallen further behind the tailer than the broadcast holds: what was
    /// missed is read from the store, as at [`Feed::subscribe`] (a receiver
    /// taken under the tailer's lock gets every change after the position
    /// read with it), so nothing is lost or repeated, and no writer waits.
    fn rejoin(&mut self) {
        let position = self.shared.position.lock().expect("feed position lock");
        self.rx = self.shared.tx.subscribe();
        self.catch_up_to = *position;
        tracing::debug!(
            last = self.last,
            catch_up_to = self.catch_up_to,
            "change feed: a subscriber fell behind the broadcast; reading from the store"
        );
    }

    /// Reads the next stretch of `(last, catch_up_to]` from the store.
    async fn fill_backlog(&mut self) -> Result<(), FeedError> {
        let want = u32::try_from(self.catch_up_to - self.last).unwrap_or(BATCH);
        let (changes, state) = self
            .shared
            .store
            .changes_after(self.last, want.min(BATCH))
            .await?;
        for (expected, change) in (self.last + 1..).zip(changes) {
            if change.position != expected {
                break;
            }
            self.backlog.push_back(Arc::new(change));
        }
        if self.backlog.is_empty() {
            return Err(if state.pruned_through > self.last {
                FeedError::Expired(self.last)
            } else {
                FeedError::Store(StoreError::corrupt(format!(
                    "the change log has no position {} though {} were handed out",
                    self.last + 1,
                    state.last_position
                )))
            });
        }
        Ok(())
    }
}

/// Reads the log from `position` to its end, broadcasting each change; the
/// start of the read that reached the end.
async fn read_to_end(shared: &Shared, position: &mut u64) -> Result<Moment, StoreError> {
    loop {
        let started = Moment::now();
        let (changes, _) = shared.store.changes_after(*position, BATCH).await?;
        let count = changes.len();
        let mut contiguous = Vec::with_capacity(count);
        for (next, change) in (*position + 1..).zip(changes) {
            if change.position != next {
                // Never skip: positions are dense, so a hole is an error
                // (and stays one until someone looks), not a change to pass.
                return Err(StoreError::corrupt(format!(
                    "the change log jumps from position {} to {}",
                    next - 1,
                    change.position
                )));
            }
            contiguous.push(Arc::new(change));
        }
        if let Some(last) = contiguous.last() {
            let new_position = last.position;
            let mut broadcast_position = shared.position.lock().expect("feed position lock");
            for change in contiguous {
                // No receivers is fine: nobody is watching.
                let _ = shared.tx.send(change);
            }
            *broadcast_position = new_position;
            *position = new_position;
        }
        if count < BATCH as usize {
            return Ok(started);
        }
    }
}

/// The tailer: read to the end, wait for a wake-up or the poll interval,
/// repeat until shutdown.
async fn tail(shared: Arc<Shared>, poll: Duration) {
    // Start from the log's end, once it can be read.
    let mut position = loop {
        if *shared.shutdown.borrow() {
            return;
        }
        if shared.store_id.get().is_some() {
            break *shared.position.lock().expect("feed position lock");
        }
        match shared.store.log_state().await {
            Ok(state) => break shared.init(state),
            Err(e) => {
                tracing::debug!(error = %e, "change feed: waiting for the change log");
                tokio::time::sleep(poll).await;
            }
        }
    };
    let mut notifications = Notifications::default();
    let mut shutdown = shared.shutdown.subscribe();
    let mut failing_since: Option<Instant> = None;
    loop {
        if *shutdown.borrow() {
            return;
        }
        // Listening before reading: a change committed after this wakes the
        // tailer, and every one before it is in the read.
        notifications.listen(&*shared.store).await;
        match read_to_end(&shared, &mut position).await {
            Ok(started) => {
                if failing_since.take().is_some() {
                    tracing::info!(position, "change feed: the change log is readable again");
                }
                shared.health.send_modify(|h| {
                    h.current_at = Some(started);
                    h.lost = false;
                    h.corrupt = None;
                });
            }
            Err(e) => {
                let since = *failing_since.get_or_insert_with(|| {
                    tracing::warn!(position, error = %e, "change feed: cannot read the change log");
                    Instant::now()
                });
                if let StoreError::Corrupt { what, .. } = &e {
                    if shared.health.borrow().corrupt.as_ref() != Some(what) {
                        tracing::error!(position, error = %e, "change feed: the change log cannot be interpreted; ending subscriptions");
                        let what = what.clone();
                        shared.health.send_modify(|h| h.corrupt = Some(what));
                    }
                }
                if since.elapsed() >= LOST_AFTER && !shared.health.borrow().lost {
                    tracing::error!(position, error = %e, "change feed: the change log is lost; ending subscriptions");
                    shared.health.send_modify(|h| h.lost = true);
                }
            }
        }
        let wait = next_wait(
            poll,
            failing_since.is_some(),
            notifications.listener.is_some(),
        );
        let read_again = tokio::time::Instant::now() + wait;
        loop {
            let beat_at = notifications.heard + HEARTBEAT_AFTER_SILENCE;
            let dead_at = notifications.awaiting;
            let sending = notifications.sending.is_some();
            tokio::select! {
                // A wake-up first: a heartbeat already come back never loses
                // to its own deadline.
                biased;
                woken = wait_for(&mut notifications.listener) => {
                    match woken {
                        Ok(wake) => {
                            notifications.alive();
                            if wake == Wake::Heartbeat {
                                // Nothing changed: wait on until the read is due.
                                continue;
                            }
                        }
                        // Listen again, then read: what was committed
                        // meanwhile is in that read.
                        Err(_) => notifications.listener = None,
                    }
                }
                _ = shutdown.changed() => {}
                _ = tokio::time::sleep_until(read_again) => {}
                sent = async { notifications.sending.as_mut().expect("sending").await }, if sending => {
                    notifications.sending = None;
                    if sent.unwrap_or(false) {
                        // Committed: it must wake the listener soon.
                        notifications.awaiting =
                            Some(tokio::time::Instant::now() + HEARTBEAT_WITHIN);
                    } else {
                        // Not sent (the store busy or failing): no verdict
                        // on the listener; another heartbeat later.
                        notifications.heard = tokio::time::Instant::now();
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(beat_at),
                    if notifications.listener.is_some() && dead_at.is_none() && !sending =>
                {
                    notifications.send_heartbeat();
                    continue;
                }
                _ = tokio::time::sleep_until(dead_at.unwrap_or(read_again)), if dead_at.is_some() => {
                    tracing::warn!(
                        within_ms = HEARTBEAT_WITHIN.as_millis() as u64,
                        "change feed: the connection that is notified of changes did not \
                         answer a heartbeat; listening on a new one"
                    );
                    notifications.listener = None;
                    notifications.awaiting = None;
                }
            }
            break;
        }
    }
}

/// How long the tailer waits for a wake-up before it reads the log again:
/// `poll`, less while the log cannot be read (to see it back soon) or while
/// no listener would wake it ([`UNNOTIFIED_POLL`]).
fn next_wait(poll: Duration, failing: bool, notified: bool) -> Duration {
    if failing {
        poll.min(Duration::from_millis(250))
    } else if !notified {
        poll.min(UNNOTIFIED_POLL)
    } else {
        poll
    }
}

/// The store's change listener, if it could be set up, and whether the
/// tailer has said it has none (said once per outage, not every round).
struct Notifications {
    listener: Option<Box<dyn ChangeListener>>,
    /// When the listener last showed it is alive (set up, or woken).
    heard: tokio::time::Instant,
    /// A heartbeat on its way: whether the store took it.
    sending: Option<tokio::sync::oneshot::Receiver<bool>>,
    /// A heartbeat is out: the listener is dead if not woken by then.
    awaiting: Option<tokio::time::Instant>,
    said_missing: bool,
    /// No new listener before this (after failed attempts), and the wait
    /// before the next attempt after that one fails.
    listen_after: tokio::time::Instant,
    listen_backoff: Duration,
}

impl Default for Notifications {
    fn default() -> Self {
        let now = tokio::time::Instant::now();
        Notifications {
            listener: None,
            heard: now,
            sending: None,
            awaiting: None,
            said_missing: false,
            listen_after: now,
            listen_backoff: LISTEN_RETRY_FIRST,
        }
    }
}

impl Notifications {
    /// The listener woke: it is alive.
    fn alive(&mut self) {
        self.heard = tokio::time::Instant::now();
        self.sending = None;
        self.awaiting = None;
    }

    /// Sends the listener a heartbeat, on a task of its own (a store that
    /// is slow to take it must not hold the tailer's reads up). Only once
    /// the store has taken it must it wake the listener within
    /// [`HEARTBEAT_WITHIN`]: one the store did not take (every connection
    /// busy, say) says nothing about the listener.
    fn send_heartbeat(&mut self) {
        let Some(beat) = self.listener.as_ref().and_then(|l| l.heartbeat()) else {
            // A listener that cannot go silent needs none.
            self.heard = tokio::time::Instant::now();
            return;
        };
        let (sent, sending) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let taken = match tokio::time::timeout(HEARTBEAT_WITHIN, beat).await {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "change feed: cannot send a heartbeat");
                    false
                }
                Err(_) => false,
            };
            let _ = sent.send(taken);
        });
        self.sending = Some(sending);
    }

    /// Sets the listener up if there is none (and the last failed attempt
    /// was long enough ago).
    async fn listen(&mut self, store: &dyn Store) {
        if self.listener.is_some() || tokio::time::Instant::now() < self.listen_after {
            return;
        }
        self.sending = None;
        self.awaiting = None;
        // Bounded: a connection that goes silent while it is set up must not
        // hold the tailer's reads up either.
        let listened = match tokio::time::timeout(LISTEN_WITHIN, store.listen()).await {
            Ok(l) => l,
            Err(_) => Err(StoreError::Unavailable(sqlx::Error::Io(
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("setting the listener up took over {LISTEN_WITHIN:?}"),
                ),
            ))),
        };
        match listened {
            Ok(l) => {
                self.heard = tokio::time::Instant::now();
                self.listen_backoff = LISTEN_RETRY_FIRST;
                if std::mem::take(&mut self.said_missing) {
                    tracing::info!("change feed: notified of changes again");
                }
                self.listener = Some(l);
            }
            Err(e) => {
                self.listen_after = tokio::time::Instant::now() + self.listen_backoff;
                self.listen_backoff = (self.listen_backoff * 2).min(LISTEN_RETRY_LAST);
                if !std::mem::replace(&mut self.said_missing, true) {
                    tracing::warn!(
                        error = %e,
                        every_ms = UNNOTIFIED_POLL.as_millis() as u64,
                        "change feed: cannot be notified of changes; reading the change log \
                         on a short interval until it can"
                    );
                }
            }
        }
    }
}

async fn wait_for(listener: &mut Option<Box<dyn ChangeListener>>) -> Result<Wake, StoreError> {
    match listener {
        Some(l) => l.wait().await,
        None => std::future::pending().await,
    }
}

/// The pruning job: deletes changes older than `retention`, at start and
/// then every quarter of it (at most hourly).
async fn prune(shared: Arc<Shared>, retention: Duration) {
    let mut shutdown = shared.shutdown.subscribe();
    let every = (retention / 4).clamp(Duration::from_millis(100), Duration::from_secs(3600));
    loop {
        if *shutdown.borrow() {
            return;
        }
        let cutoff = chrono::Duration::from_std(retention)
            .ok()
            .and_then(|r| Utc::now().checked_sub_signed(r));
        if let Some(cutoff) = cutoff {
            match shared.store.prune_changes(cutoff).await {
                Ok(through) => {
                    tracing::debug!(pruned_through = through, "change log pruned")
                }
                Err(e) => tracing::warn!(error = %e, "change log: pruning failed; will retry"),
            }
        }
        tokio::select! {
            _ = shutdown.changed() => {}
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_listener_the_log_is_read_often_enough_for_the_100_ms_promise() {
        let poll = Duration::from_millis(500);
        assert_eq!(next_wait(poll, false, true), poll, "woken by the listener");
        assert!(next_wait(poll, false, false) <= Duration::from_millis(50));
        assert_eq!(
            next_wait(poll, true, true),
            Duration::from_millis(250),
            "the log unreadable: back soon"
        );
        assert!(next_wait(Duration::from_millis(20), false, false) <= Duration::from_millis(20));
    }
}
