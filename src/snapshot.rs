//! The spend snapshot: every workspace's current (mode, revision), in memory
//! on each replica, kept current from the change feed. CheckSpend answers
//! from it with no store round trip.
//!
//! Loaded at start-up at one position of the change log and then advanced by
//! every change after that position (see [`crate::feed`]), so nothing between
//! the load and the first change is missed. Fail closed: the snapshot knows
//! when it last confirmed it was current (it had applied every change the
//! feed had read by then); older than the staleness bound, it answers no
//! question at all, and [`SpendSnapshot::current`] turns false, which takes
//! the service's health to NOT_SERVING.
//!
//! Memory: one hash-table slot per workspace, a 16-byte key (the UUID as two
//! `u64`, so the slot is 8-aligned: a `u128` key would be 16-aligned and the
//! slot 32 bytes) and an 8-byte value packing the mode into the revision's two
//! top bits. With hashbrown's control byte and its 7/8 load factor on
//! power-of-two tables this is 25 bytes per slot and, at 10^6 workspaces,
//! 2^21 slots: about 52 bytes per workspace (at most 57 just after a growth).
//! The benchmark measures it.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering},
        Arc, RwLock,
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use crate::{
    domain::{resolve, Mode, Registry, WorkspaceId},
    feed::{self, Feed, FeedError, Moment, Subscription},
};

/// The readiness condition that holds while the spend snapshot is current.
pub const SPEND_SNAPSHOT_CURRENT: &str = "spend snapshot current";

/// Revisions up to this fit beside the mode; a larger one (not reachable
/// through the API) is kept as "undecidable" and answered with an error.
const MAX_PACKED_REVISION: u64 = (1 << 62) - 1;

/// (mode, revision) in one word: the mode in the top two bits (0 marks a
/// workspace whose state cannot be represented), the revision below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Packed(u64);

impl Packed {
    fn new(mode: Mode, revision: u64) -> Packed {
        if revision > MAX_PACKED_REVISION {
            return Packed(0);
        }
        let code: u64 = match mode {
            Mode::PlatformManaged => 1,
            Mode::Byok => 2,
            Mode::Disabled => 3,
        };
        Packed(code << 62 | revision)
    }

    fn mode(self) -> Option<Mode> {
        match self.0 >> 62 {
            1 => Some(Mode::PlatformManaged),
            2 => Some(Mode::Byok),
            3 => Some(Mode::Disabled),
            _ => None,
        }
    }

    fn revision(self) -> u64 {
        self.0 & MAX_PACKED_REVISION
    }
}

fn key(id: &WorkspaceId) -> [u64; 2] {
    let v = id.as_u128();
    [(v >> 64) as u64, v as u64]
}

/// Workspace → (mode, revision).
#[derive(Debug, Default)]
pub struct Table {
    map: HashMap<[u64; 2], Packed>,
}

impl Table {
    pub fn with_capacity(n: usize) -> Table {
        Table {
            map: HashMap::with_capacity(n),
        }
    }

    /// Records `workspace` at `revision` deciding `mode`, unless the table
    /// already holds a later revision of it.
    pub fn apply(&mut self, workspace: &WorkspaceId, mode: Mode, revision: u64) {
        let new = Packed::new(mode, revision);
        self.map
            .entry(key(workspace))
            .and_modify(|old| {
                if old.mode().is_none() || revision >= old.revision() {
                    *old = new;
                }
            })
            .or_insert(new);
    }

    /// `None`: no such workspace. `Some(None)`: present but not decidable.
    pub fn get(&self, workspace: &WorkspaceId) -> Option<Option<(Mode, u64)>> {
        self.map
            .get(&key(workspace))
            .map(|p| p.mode().map(|m| (m, p.revision())))
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes the table's slots take: hashbrown allocates a power-of-two
    /// number of buckets (capacity / (7/8)), each the entry plus a control
    /// byte, plus a group's width of trailing control bytes.
    pub fn allocated_bytes(&self) -> usize {
        let cap = self.map.capacity();
        if cap == 0 {
            return 0;
        }
        let buckets = if cap < 8 {
            (cap + 1).next_power_of_two()
        } else {
            (cap * 8 / 7).next_power_of_two()
        };
        let entry = std::mem::size_of::<([u64; 2], Packed)>();
        buckets * (entry + 1) + 16
    }
}

/// Why the snapshot gives no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpendError {
    /// The snapshot could not confirm it is current within the bound.
    Stale,
    /// No such workspace (in a current snapshot).
    NotFound,
    /// The workspace's state could not be represented: no guess.
    Undecidable,
}

/// A current answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpendAnswer {
    pub mode: Mode,
    pub revision: u64,
    /// When the snapshot last confirmed it was current.
    pub as_of: DateTime<Utc>,
}

impl SpendAnswer {
    /// The platform pays only while the decision is platform_managed.
    pub fn allowed(&self) -> bool {
        self.mode == Mode::PlatformManaged
    }
}

/// What the updater and the readers share.
struct Shared {
    table: RwLock<Table>,
    /// The change-log position the table reflects.
    position: AtomicU64,
    /// When the table last confirmed it was current, on the monotonic clock
    /// ([`feed::monotonic_ns`]) plus one; 0 until the first time. Staleness
    /// is measured on this.
    confirmed_ns: AtomicU64,
    /// The same moment on the wall clock, in microseconds since the epoch:
    /// what answers report as `as_of`; `i64::MIN` until the first time.
    as_of_micros: AtomicI64,
    max_staleness: Duration,
    current: watch::Sender<bool>,
    /// Counts the tables: [`SpendSnapshot::replace`] adds one.
    generation: AtomicU64,
}

/// A handle on this replica's spend snapshot; cheap to clone.
#[derive(Clone)]
pub struct SpendSnapshot {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SpendSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpendSnapshot").finish_non_exhaustive()
    }
}

impl SpendSnapshot {
    /// An empty snapshot that is not current (it answers nothing until
    /// loaded and confirmed).
    pub fn new(max_staleness: Duration) -> SpendSnapshot {
        SpendSnapshot {
            shared: Arc::new(Shared {
                table: RwLock::new(Table::default()),
                position: AtomicU64::new(0),
                confirmed_ns: AtomicU64::new(0),
                as_of_micros: AtomicI64::new(i64::MIN),
                max_staleness,
                current: watch::Sender::new(false),
                generation: AtomicU64::new(0),
            }),
        }
    }

    pub fn max_staleness(&self) -> Duration {
        self.shared.max_staleness
    }

    /// The answer for `workspace`, from memory. Fails closed: when the
    /// snapshot last confirmed it was current longer ago than the bound (or
    /// never), no answer, whatever the table holds.
    pub fn check(&self, workspace: &WorkspaceId) -> Result<SpendAnswer, SpendError> {
        if !self.is_current() {
            return Err(SpendError::Stale);
        }
        let as_of = self.as_of().ok_or(SpendError::Stale)?;
        let found = self
            .shared
            .table
            .read()
            .expect("spend snapshot lock")
            .get(workspace);
        match found {
            None => Err(SpendError::NotFound),
            Some(None) => Err(SpendError::Undecidable),
            Some(Some((mode, revision))) => Ok(SpendAnswer {
                mode,
                revision,
                as_of,
            }),
        }
    }

    /// When the snapshot last confirmed it was current.
    pub fn as_of(&self) -> Option<DateTime<Utc>> {
        match self.shared.as_of_micros.load(Ordering::Acquire) {
            i64::MIN => None,
            micros => DateTime::from_timestamp_micros(micros),
        }
    }

    /// Whether the snapshot is current now: it confirmed so within the
    /// staleness bound by both clocks. The monotonic clock is never stepped,
    /// so a wall clock stepped backwards cannot make an old confirmation
    /// look recent (a confirmation whose wall time lies in the future is
    /// judged by the monotonic clock alone); but it stands still while the
    /// machine is suspended or the VM paused, and the wall clock does not,
    /// so a confirmation from before a pause is stale by the wall clock.
    /// Either clock saying too old is enough: the answer fails closed.
    pub fn is_current(&self) -> bool {
        let plus_one = self.shared.confirmed_ns.load(Ordering::Acquire);
        if plus_one == 0 {
            return false;
        }
        let age = Duration::from_nanos(feed::monotonic_ns().saturating_sub(plus_one - 1));
        if age > self.shared.max_staleness {
            return false;
        }
        match self.as_of().map(|t| (Utc::now() - t).to_std()) {
            Some(Ok(wall_age)) => wall_age <= self.shared.max_staleness,
            // In the future: the wall clock stepped back since.
            Some(Err(_)) => true,
            None => false,
        }
    }

    /// Follows [`SpendSnapshot::is_current`] as [`SpendSnapshot::publish`]
    /// observes it.
    pub fn current(&self) -> watch::Receiver<bool> {
        self.shared.current.subscribe()
    }

    /// Publishes [`SpendSnapshot::is_current`] to [`SpendSnapshot::current`]
    /// followers (when it changed); returns it.
    pub fn publish(&self) -> bool {
        let now = self.is_current();
        self.shared.current.send_if_modified(|c| {
            let changed = *c != now;
            *c = now;
            changed
        });
        now
    }

    /// The change-log position the table reflects.
    pub fn position(&self) -> u64 {
        self.shared.position.load(Ordering::Acquire)
    }

    /// Replaces the whole table with one loaded at `position`.
    pub fn replace(&self, table: Table, position: u64) {
        let mut held = self.shared.table.write().expect("spend snapshot lock");
        *held = table;
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        self.shared.position.store(position, Ordering::Release);
    }

    /// Applies one change at `position` (the next after the table's).
    pub fn apply(&self, position: u64, workspace: &WorkspaceId, mode: Mode, revision: u64) {
        self.shared
            .table
            .write()
            .expect("spend snapshot lock")
            .apply(workspace, mode, revision);
        self.shared.position.store(position, Ordering::Release);
    }

    /// Records that the table was current at `at` (it had applied every
    /// change committed before then). Never moves backwards, on either
    /// clock (each is kept at its latest).
    pub fn confirm(&self, at: Moment) {
        self.shared
            .as_of_micros
            .fetch_max(at.wall.timestamp_micros(), Ordering::AcqRel);
        self.shared
            .confirmed_ns
            .fetch_max(at.monotonic_ns.saturating_add(1), Ordering::AcqRel);
    }

    /// Workspaces in the table.
    pub fn len(&self) -> usize {
        self.shared.table.read().expect("spend snapshot lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How often the updater confirms currency while no change arrives.
const CONFIRM_EVERY: Duration = Duration::from_millis(50);
/// How often currency is published to health followers.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);
/// Pause before loading again after the feed or the store failed.
const RELOAD_AFTER: Duration = Duration::from_millis(250);
/// Records of a recheck looked at again once the table has caught up, at
/// most (32 bytes each); a pass that finds more is followed by another
/// after [`RECHECK_AGAIN_AFTER`].
const RECHECK_MOST_PENDING: usize = 100_000;
const RECHECK_AGAIN_AFTER: Duration = Duration::from_secs(1);
/// Repairs of one recheck named in the log one by one; the pass's total
/// is logged too.
const RECHECK_LOGGED: u64 = 20;

/// What one recheck did.
struct Recheck {
    /// The table it compares with ([`Shared::generation`]).
    generation: u64,
    repaired: u64,
    /// Whether every record was looked at (not: too many to look at again
    /// at once, the table not caught up in time, or replaced meanwhile).
    complete: bool,
}

impl SpendSnapshot {
    /// Starts keeping a snapshot current: loads every workspace's decision
    /// at one position of the change log, follows the feed from there, and
    /// keeps confirming currency, in the background until the feed shuts
    /// down (a failed load is retried). Waits at most `max_staleness` for
    /// the first confirmation, so a server usually starts current; until
    /// then CheckSpend answers UNAVAILABLE.
    ///
    /// Every `recheck_every` it also reads every record again and compares
    /// ([`SpendSnapshot::recheck`]): a record changed outside the service
    /// (by hand, in the database) logs no change, and the snapshot would
    /// otherwise answer from what the record was until the replica restarts.
    pub async fn start(
        feed: Feed,
        registry: Arc<Registry>,
        max_staleness: Duration,
        recheck_every: Duration,
    ) -> SpendSnapshot {
        let snapshot = SpendSnapshot::new(max_staleness);
        tokio::spawn(snapshot.clone().run(feed.clone(), registry.clone()));
        tokio::spawn(
            snapshot
                .clone()
                .recheck_every(feed.clone(), registry, recheck_every),
        );
        tokio::spawn(snapshot.clone().publish_every(feed));
        let mut current = snapshot.current();
        let _ = tokio::time::timeout(max_staleness, current.wait_for(|c| *c)).await;
        snapshot
    }

    /// One consistent load at position P, and the subscription from P.
    ///
    /// Each record is decided and packed as it is read, so the load holds one
    /// record at a time besides the table: memory is the table's, whatever
    /// the number of workspaces. A reload is sized from the table it
    /// replaces; the first load grows the table as it goes (by doubling: the
    /// final size is the same as sized up front).
    async fn load(&self, feed: &Feed, registry: &Registry) -> Result<Subscription, FeedError> {
        let mut table = Table::with_capacity(self.len());
        let position = feed
            .snapshot(&mut |record| {
                let mode = resolve(&record, registry).mode;
                table.apply(&record.workspace_id, mode, record.revision);
            })
            .await?;
        let subscription = feed.subscribe(position).await?;
        tracing::info!(position, workspaces = table.len(), "spend snapshot loaded");
        self.replace(table, position);
        Ok(subscription)
    }

    /// Applies every change from the feed; on a feed or store failure, loads
    /// again (meanwhile nothing confirms currency, so the snapshot goes stale
    /// and CheckSpend answers UNAVAILABLE).
    async fn run(self, feed: Feed, registry: Arc<Registry>) {
        let Some(mut sub) = self.load_until_done(&feed, &registry, false).await else {
            return;
        };
        loop {
            let failure = loop {
                tokio::select! {
                    biased;
                    () = feed.stopped() => return,
                    next = sub.next() => match next {
                        Ok(change) => {
                            let r = &change.record;
                            let mode = resolve(r, &registry).mode;
                            self.apply(change.position, &r.workspace_id, mode, r.revision);
                        }
                        Err(FeedError::ShuttingDown) => return,
                        Err(e) => break e,
                    },
                    () = tokio::time::sleep(CONFIRM_EVERY) => {}
                }
                self.confirm_from(&feed, &sub);
            };
            tracing::warn!(error = %failure, "spend snapshot: the change feed failed; loading again");
            match self.load_until_done(&feed, &registry, true).await {
                Some(s) => sub = s,
                None => return,
            }
        }
    }

    /// Loads (retrying after failures, and after a pause when the last
    /// subscription `failed`) until it succeeds; `None` once the feed shuts
    /// down. Never while the feed is failing: a subscription
    /// would end at once, and each load reads every record, so loading
    /// again and again would put the whole store under load for as long as
    /// the change log cannot be read, for nothing.
    async fn load_until_done(
        &self,
        feed: &Feed,
        registry: &Registry,
        failed: bool,
    ) -> Option<Subscription> {
        let mut first = !failed;
        // Said once per outage, not every RELOAD_AFTER (a server started
        // with --no-migrate waits here until the migrations are applied).
        let mut failed_loads = 0u64;
        loop {
            if !first {
                tokio::select! {
                    () = feed.stopped() => return None,
                    () = tokio::time::sleep(RELOAD_AFTER) => {}
                }
            }
            first = false;
            feed.readable().await;
            match self.load(feed, registry).await {
                Ok(s) => {
                    if failed_loads > 0 {
                        tracing::info!(failed_loads, "spend snapshot: loaded after failing");
                    }
                    return Some(s);
                }
                Err(FeedError::ShuttingDown) => return None,
                Err(e) => {
                    failed_loads += 1;
                    if failed_loads == 1 {
                        tracing::warn!(
                            error = %e,
                            every_ms = RELOAD_AFTER.as_millis() as u64,
                            "spend snapshot: cannot load; retrying until it can (CheckSpend \
                             answers UNAVAILABLE meanwhile)"
                        );
                    } else {
                        tracing::debug!(error = %e, failed_loads, "spend snapshot: cannot load yet");
                    }
                }
            }
        }
    }

    /// The table is current as of the feed's last confirmation `T` once it
    /// has applied everything the feed had read by then. `T` is read before
    /// the feed's position, and positions only grow, so the check can only
    /// be stricter than needed, never looser.
    fn confirm_from(&self, feed: &Feed, sub: &Subscription) {
        let Some(at) = feed.current_at() else { return };
        if sub.is_live() && sub.position() >= feed.position() {
            self.confirm(at);
        }
    }

    async fn recheck_every(self, feed: Feed, registry: Arc<Registry>, every: Duration) {
        let mut pause = every;
        loop {
            tokio::select! {
                () = feed.stopped() => return,
                () = tokio::time::sleep(pause) => {}
            }
            pause = every;
            if !self.is_current() {
                // Loading or failing: the next load reads every record anyway.
                continue;
            }
            match self.recheck(&feed, &registry).await {
                Ok(done) => {
                    if done.repaired > 0 {
                        tracing::error!(
                            repaired = done.repaired,
                            "spend snapshot: records changed outside the service (no change-log \
                             entry); CheckSpend answers from the records now. Change records only \
                             through the service: its write logs the change every replica follows"
                        );
                    }
                    if !done.complete {
                        // More to look at than one pass holds, or a reload
                        // came in between: again soon.
                        pause = RECHECK_AGAIN_AFTER.min(every);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "spend snapshot: cannot recheck the records"),
            }
        }
    }

    /// Reads every record at one position P and compares it with the table;
    /// repairs, and names in the log, each entry that differs because its
    /// record was changed without a change-log entry.
    ///
    /// - Same revision, another decision: only an edit that bypassed the
    ///   service does that (the registry never changes in a running server).
    /// - A later revision than the table's, or a workspace the table lacks:
    ///   a change in flight, unless the table, having applied every change
    ///   up to P, still lacks it; so these are looked at again once it has.
    /// - An earlier revision than the table's: changed since P; left alone.
    ///
    /// An entry is repaired only if it is still what was compared, and only
    /// while the table is the one the pass began with: a reload meanwhile
    /// (which reads the records afresh, perhaps after a later hand edit than
    /// this pass saw) ends the pass. A workspace deleted by hand stays in the
    /// table (not looked for).
    async fn recheck(&self, feed: &Feed, registry: &Registry) -> Result<Recheck, FeedError> {
        let mut pass = Recheck {
            generation: self.shared.generation.load(Ordering::Acquire),
            repaired: 0,
            complete: true,
        };
        let mut pending: Vec<(WorkspaceId, Mode, u64)> = Vec::new();
        let position = feed
            .snapshot(&mut |record| {
                let mode = resolve(&record, registry).mode;
                let id = record.workspace_id;
                let held = self.entry(&id);
                match held {
                    Some(Some((m, r))) if r == record.revision && m != mode => {
                        self.repair(&mut pass, &id, held, mode, record.revision);
                    }
                    Some(Some((_, r))) if r >= record.revision => {}
                    _ if pending.len() < RECHECK_MOST_PENDING => {
                        pending.push((id, mode, record.revision))
                    }
                    _ => pass.complete = false,
                }
            })
            .await?;
        if pending.is_empty() {
            return Ok(pass);
        }
        // Until the table has applied every change up to P.
        let deadline = tokio::time::Instant::now() + self.shared.max_staleness;
        while self.position() < position {
            if tokio::time::Instant::now() >= deadline {
                pass.complete = false;
                return Ok(pass);
            }
            tokio::time::sleep(CONFIRM_EVERY).await;
        }
        for (id, mode, revision) in pending {
            let held = self.entry(&id);
            match held {
                Some(Some((_, r))) if r >= revision => {}
                Some(None) => {}
                _ => self.repair(&mut pass, &id, held, mode, revision),
            }
        }
        Ok(pass)
    }

    /// The table's entry for `id` now ([`Table::get`]).
    fn entry(&self, id: &WorkspaceId) -> Option<Option<(Mode, u64)>> {
        self.shared
            .table
            .read()
            .expect("spend snapshot lock")
            .get(id)
    }

    /// Sets `id` to the record's `mode` at `revision`, if its entry is still
    /// `seen` and the table is still the pass's (see [`SpendSnapshot::recheck`]).
    fn repair(
        &self,
        pass: &mut Recheck,
        id: &WorkspaceId,
        seen: Option<Option<(Mode, u64)>>,
        mode: Mode,
        revision: u64,
    ) {
        {
            let mut table = self.shared.table.write().expect("spend snapshot lock");
            if self.shared.generation.load(Ordering::Acquire) != pass.generation {
                pass.complete = false;
                return;
            }
            if table.get(id) != seen {
                return;
            }
            table.apply(id, mode, revision);
        }
        crate::metrics::global().spend_snapshot_repairs.inc();
        pass.repaired += 1;
        if pass.repaired <= RECHECK_LOGGED {
            tracing::error!(
                workspace_id = %id,
                revision,
                was = seen.flatten().map_or("absent", |(m, _)| m.as_str()),
                now = mode.as_str(),
                "spend snapshot: the record differs from what its change log said; repaired"
            );
        }
    }

    async fn publish_every(self, feed: Feed) {
        loop {
            self.publish();
            tokio::select! {
                () = feed.stopped() => {
                    self.shared.current.send_replace(false);
                    return;
                }
                () = tokio::time::sleep(PUBLISH_EVERY) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_and_revision_pack_into_one_word() {
        for mode in [Mode::PlatformManaged, Mode::Byok, Mode::Disabled] {
            for revision in [1, 2, 1 << 40, MAX_PACKED_REVISION] {
                let p = Packed::new(mode, revision);
                assert_eq!((p.mode(), p.revision()), (Some(mode), revision));
            }
        }
        assert_eq!(
            Packed::new(Mode::Byok, MAX_PACKED_REVISION + 1).mode(),
            None
        );
    }

    #[test]
    fn a_table_keeps_the_latest_revision_per_workspace() {
        let mut t = Table::default();
        let a = WorkspaceId::new_random();
        let b = WorkspaceId::new_random();
        t.apply(&a, Mode::PlatformManaged, 1);
        t.apply(&a, Mode::Byok, 2);
        t.apply(&a, Mode::PlatformManaged, 1); // an older revision never wins
        t.apply(&b, Mode::Disabled, 7);
        assert_eq!(t.get(&a), Some(Some((Mode::Byok, 2))));
        assert_eq!(t.get(&b), Some(Some((Mode::Disabled, 7))));
        assert_eq!(t.get(&WorkspaceId::new_random()), None);
        t.apply(&b, Mode::Byok, MAX_PACKED_REVISION + 5);
        assert_eq!(t.get(&b), Some(None), "unrepresentable: undecidable");
        assert_eq!(t.len(), 2);
    }

    /// A snapshot bounded at 200 ms holding one platform_managed workspace
    /// at revision 3, loaded at position 10 and never confirmed.
    fn loaded_unconfirmed() -> (SpendSnapshot, WorkspaceId) {
        let s = SpendSnapshot::new(Duration::from_millis(200));
        let a = WorkspaceId::new_random();
        let mut t = Table::default();
        t.apply(&a, Mode::PlatformManaged, 3);
        s.replace(t, 10);
        (s, a)
    }

    #[test]
    fn a_repair_applies_only_to_the_entry_and_the_table_it_compared() {
        let (s, a) = loaded_unconfirmed();
        let seen = s.entry(&a);
        let pass = || Recheck {
            generation: s.shared.generation.load(Ordering::Acquire),
            repaired: 0,
            complete: true,
        };
        // The entry moved on since it was compared: left alone.
        let mut p = pass();
        s.apply(11, &a, Mode::Byok, 4);
        s.repair(&mut p, &a, seen, Mode::Disabled, 3);
        assert_eq!(s.entry(&a), Some(Some((Mode::Byok, 4))));
        assert_eq!((p.repaired, p.complete), (0, true));
        // The table was reloaded since the pass began (perhaps after a later
        // hand edit than the pass read): nothing repaired, the pass ends
        // incomplete.
        let mut p = pass();
        let mut t = Table::default();
        t.apply(&a, Mode::Byok, 4);
        s.replace(t, 12);
        s.repair(
            &mut p,
            &a,
            Some(Some((Mode::Byok, 4))),
            Mode::PlatformManaged,
            4,
        );
        assert_eq!(s.entry(&a), Some(Some((Mode::Byok, 4))));
        assert_eq!((p.repaired, p.complete), (0, false));
        // Still what was compared, same table: repaired.
        let mut p = pass();
        s.repair(&mut p, &a, Some(Some((Mode::Byok, 4))), Mode::Disabled, 4);
        assert_eq!(s.entry(&a), Some(Some((Mode::Disabled, 4))));
        assert_eq!((p.repaired, p.complete), (1, true));
        // Absent when compared, absent now: added.
        let b = WorkspaceId::new_random();
        s.repair(&mut p, &b, None, Mode::Byok, 1);
        assert_eq!(s.entry(&b), Some(Some((Mode::Byok, 1))));
    }

    #[test]
    fn the_snapshot_answers_only_while_confirmed_current() {
        let (s, a) = loaded_unconfirmed();
        // Loaded but never confirmed: no answer.
        assert_eq!(s.check(&a), Err(SpendError::Stale));
        assert!(!s.publish());
        s.confirm(Moment::now());
        let answer = s.check(&a).unwrap();
        assert!(answer.allowed());
        assert_eq!((answer.mode, answer.revision), (Mode::PlatformManaged, 3));
        assert!(s.publish() && *s.current().borrow());
        assert_eq!(
            s.check(&WorkspaceId::new_random()),
            Err(SpendError::NotFound)
        );
        s.apply(11, &a, Mode::Byok, 4);
        assert!(!s.check(&a).unwrap().allowed());
        assert_eq!(s.position(), 11);
        // Confirmation never moves backwards.
        let before = s.as_of().unwrap();
        s.confirm(Moment {
            wall: before - chrono::Duration::seconds(10),
            monotonic_ns: 0,
        });
        assert_eq!(s.as_of().unwrap(), before);
        // Past the bound: stale, whatever the table holds.
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(s.check(&a), Err(SpendError::Stale));
        assert!(!s.publish() && !*s.current().borrow());
    }

    /// The wall clock stepped back by an hour after the last confirmation
    /// (NTP, a VM resumed): that confirmation's wall time now lies in the
    /// future. It is still as old as it is, and past the bound it is stale.
    #[test]
    fn a_wall_clock_stepped_back_does_not_keep_a_stale_snapshot_current() {
        let (s, a) = loaded_unconfirmed();
        let confirmed = Moment {
            wall: Utc::now() + chrono::Duration::hours(1),
            monotonic_ns: feed::monotonic_ns(),
        };
        s.confirm(confirmed);
        assert!(s.check(&a).unwrap().allowed(), "current just after");
        assert_eq!(
            s.check(&a).unwrap().as_of.timestamp_micros(),
            confirmed.wall.timestamp_micros(),
            "answers say when they were current, on the wall clock"
        );
        std::thread::sleep(Duration::from_millis(250));
        assert!(confirmed.age() >= Duration::from_millis(250));
        assert_eq!(s.check(&a), Err(SpendError::Stale));
        assert!(!s.is_current() && !s.publish());
    }

    /// The machine was suspended (or the VM paused) after the last
    /// confirmation: the monotonic clock stood still, the wall clock went on.
    /// The confirmation is as old as the wall clock says, and stale.
    #[test]
    fn a_pause_the_monotonic_clock_did_not_see_still_makes_the_snapshot_stale() {
        let (s, a) = loaded_unconfirmed();
        s.confirm(Moment {
            wall: Utc::now() - chrono::Duration::seconds(30),
            monotonic_ns: feed::monotonic_ns(),
        });
        assert_eq!(s.check(&a), Err(SpendError::Stale));
        assert!(!s.is_current());
        // Confirmed again, by both clocks: current.
        s.confirm(Moment::now());
        assert!(s.check(&a).unwrap().allowed());
    }

    #[test]
    fn a_million_workspaces_take_at_most_64_bytes_each() {
        let n = 1_000_000;
        let mut t = Table::with_capacity(0);
        for i in 0..n {
            t.apply(&WorkspaceId::from_u128(i as u128 * 7919 + 1), Mode::Byok, 1);
        }
        let per = t.allocated_bytes() as f64 / n as f64;
        assert!(per <= 64.0, "{per} bytes per workspace");
    }
}
