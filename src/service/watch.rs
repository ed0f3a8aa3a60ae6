//! `Watch`: the change stream, served from this replica's [`Feed`].
//!
//! A stream starts from now (opening with a progress message, so the consumer
//! holds a cursor at once), after a cursor, or with a snapshot taken at one
//! position. Each change becomes the Resolution at its revision, computed
//! with the one [`resolve`]. Cursors encode the store's id and a log
//! position, so they are valid on every replica of the same store and refused
//! on any other.

use std::{
    collections::HashSet,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};
use tonic::{metadata::MetadataMap, Status};

use crate::{
    auth::{Action, Authenticator},
    config::Config,
    domain::{resolve, Record, Registry, WorkspaceId},
    feed::{Feed, FeedError, Subscription},
    proto::{self, watch_response::Event},
};

use super::error::{ApiError, ErrorReason};
use crate::wire::convert;

/// The Watch side of the service: the feed and how streams are paced.
#[derive(Clone)]
pub struct Watcher {
    feed: Feed,
    buffer: usize,
    progress_interval: Duration,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("buffer", &self.buffer)
            .field("progress_interval", &self.progress_interval)
            .finish_non_exhaustive()
    }
}

impl Watcher {
    pub fn new(feed: Feed, config: &Config) -> Self {
        Watcher {
            feed,
            buffer: config.watch_buffer.max(1),
            progress_interval: config.watch_progress_interval,
        }
    }
}

/// Cursor format version 1: `01`, the store id (16 bytes), the position (8
/// bytes, big-endian), hex-encoded. Hex rather than base64 because the crate
/// already depends on `hex`, and a cursor's length does not matter.
const CURSOR_VERSION: u8 = 1;

/// Bytes of a store id (32 hex digits, as the change log's table holds it).
const STORE_ID_BYTES: usize = 16;

pub fn encode_cursor(store_id: &str, position: u64) -> String {
    let mut bytes = Vec::with_capacity(1 + STORE_ID_BYTES + 8);
    bytes.push(CURSOR_VERSION);
    bytes.extend(hex::decode(store_id).unwrap_or_default());
    bytes.extend(position.to_be_bytes());
    hex::encode(bytes)
}

/// A cursor whose format is checked: the store that handed it out and the
/// position it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    store: [u8; STORE_ID_BYTES],
    position: u64,
}

fn invalid_cursor() -> ApiError {
    ApiError::new(
        ErrorReason::InvalidCursor,
        "cursor: not a cursor this service handed out for this store; \
         resume from a cursor of an earlier WatchResponse, or start with include_snapshot",
    )
}

/// A cursor's parts; INVALID_CURSOR unless it has the format this service
/// hands out. Needs nothing of the store, so a malformed cursor is refused
/// as such even while the store is unavailable.
fn parse_cursor(cursor: &str) -> Result<Cursor, ApiError> {
    let bytes = hex::decode(cursor).map_err(|_| invalid_cursor())?;
    if bytes.len() != 1 + STORE_ID_BYTES + 8 || bytes[0] != CURSOR_VERSION {
        return Err(invalid_cursor());
    }
    let store = bytes[1..1 + STORE_ID_BYTES]
        .try_into()
        .map_err(|_| invalid_cursor())?;
    let position: [u8; 8] = bytes[1 + STORE_ID_BYTES..]
        .try_into()
        .map_err(|_| invalid_cursor())?;
    Ok(Cursor {
        store,
        position: u64::from_be_bytes(position),
    })
}

impl Cursor {
    /// The position, when the store `store_id` handed the cursor out;
    /// INVALID_CURSOR otherwise.
    fn position_on(&self, store_id: &str) -> Result<u64, ApiError> {
        match hex::decode(store_id) {
            Ok(store) if store[..] == self.store[..] => Ok(self.position),
            _ => Err(invalid_cursor()),
        }
    }
}

/// The position a cursor names; INVALID_CURSOR unless this store made it.
pub fn decode_cursor(cursor: &str, store_id: &str) -> Result<u64, ApiError> {
    parse_cursor(cursor)?.position_on(store_id)
}

impl From<FeedError> for ApiError {
    fn from(e: FeedError) -> Self {
        match e {
            FeedError::UnknownPosition(_) => ApiError::new(
                ErrorReason::InvalidCursor,
                "cursor: this store never handed out that position; \
                 resume from a cursor of an earlier WatchResponse",
            ),
            FeedError::Expired(_) => ApiError::new(
                ErrorReason::CursorExpired,
                "cursor: changes after it are older than the retained change log; \
                 start again with include_snapshot",
            ),
            FeedError::TooSlow => ApiError::new(
                ErrorReason::ConsumerTooSlow,
                "the stream fell too far behind the changes; resume from your last cursor \
                 and read faster",
            ),
            FeedError::ShuttingDown => ApiError::new(
                ErrorReason::ShuttingDown,
                "the server is shutting down; resume from your last cursor on another replica",
            ),
            FeedError::Lost => {
                tracing::error!("change feed lost its store");
                ApiError::new(
                    ErrorReason::StoreUnavailable,
                    "the change log cannot be read; resume from your last cursor later",
                )
            }
            FeedError::Store(e) => e.into(),
        }
    }
}

/// The response stream: the queued messages, then the status that ended the
/// stream, if one did. The error travels separately so that a full queue can
/// never hold it back.
pub struct WatchStream {
    messages: mpsc::Receiver<proto::WatchResponse>,
    end: Option<oneshot::Receiver<Status>>,
}

impl std::fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchStream").finish_non_exhaustive()
    }
}

impl tokio_stream::Stream for WatchStream {
    type Item = Result<proto::WatchResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.messages.poll_recv(cx) {
            Poll::Ready(Some(m)) => Poll::Ready(Some(Ok(m))),
            Poll::Pending => Poll::Pending,
            // Every queued message was read and the producer has finished:
            // the status that ended the stream, if any.
            Poll::Ready(None) => match self.end.as_mut() {
                None => Poll::Ready(None),
                Some(end) => match Pin::new(end).poll(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(status) => {
                        self.end = None;
                        Poll::Ready(status.ok().map(Err))
                    }
                },
            },
        }
    }
}

/// Whether a stream's caller may still Watch: its credentials checked again
/// against each authenticator a reload puts in force. Holds the call's
/// `authorization` metadata only, never shown.
pub struct StillAllowed {
    auth: tokio::sync::watch::Receiver<Arc<Authenticator>>,
    credentials: MetadataMap,
}

impl std::fmt::Debug for StillAllowed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StillAllowed").finish_non_exhaustive()
    }
}

impl StillAllowed {
    pub fn new(
        auth: tokio::sync::watch::Receiver<Arc<Authenticator>>,
        metadata: &MetadataMap,
    ) -> Self {
        let mut credentials = MetadataMap::new();
        if let Some(v) = metadata.get("authorization") {
            credentials.insert("authorization", v.clone());
        }
        StillAllowed { auth, credentials }
    }

    /// Completes, with the refusal a new call would get, once a reload has
    /// taken the caller's token or its Watch away; never while it has not.
    /// The authenticator in force when it starts is checked first: a reload
    /// between the call's authentication and the stream's start (which a
    /// caller can stretch by holding back its request) is not missed.
    async fn revoked(mut self) -> ApiError {
        loop {
            let auth = self.auth.borrow_and_update().clone();
            let refusal = auth
                .authenticate(&self.credentials)
                .and_then(|who| who.require(Action::Watch));
            if let Err(e) = refusal {
                return e;
            }
            if self.auth.changed().await.is_err() {
                // No more reloads: what is in force stays.
                return std::future::pending().await;
            }
        }
    }
}

/// Starts a stream for `req`; every error that can be known before the first
/// message (role, arguments, cursor, store) is the call's status. With
/// `allowed`, the stream ends as soon as a reload takes the caller's right
/// to Watch away.
pub async fn start(
    watcher: &Watcher,
    registry: Arc<Registry>,
    req: &proto::WatchRequest,
    allowed: Option<StillAllowed>,
) -> Result<WatchStream, ApiError> {
    let filter = req
        .workspace_ids
        .iter()
        .map(|id| convert::workspace_id(id))
        .collect::<Result<HashSet<WorkspaceId>, _>>()?;
    if req.include_snapshot && !req.cursor.is_empty() {
        return Err(ApiError::new(
            ErrorReason::InvalidField,
            "include_snapshot: a snapshot starts a new stream; give either a cursor or \
             include_snapshot, not both",
        ));
    }
    // The cursor's format before the store: a malformed cursor is
    // INVALID_ARGUMENT whatever the store's state (the contract's
    // precedence); whether this store handed it out is known only once the
    // store id is.
    let cursor = if req.cursor.is_empty() {
        None
    } else {
        Some(parse_cursor(&req.cursor)?)
    };
    let feed = &watcher.feed;
    let store_id = feed.store_id().ok_or(FeedError::Lost)?;
    let from_cursor = cursor.map(|c| c.position_on(store_id)).transpose()?;
    let (opening, after) = if req.include_snapshot {
        // Only the records the stream will send are kept.
        let mut records = Vec::new();
        let position = feed
            .snapshot(&mut |record| {
                if wanted(&filter, &record) {
                    records.push(record);
                }
            })
            .await?;
        (Opening::Snapshot(records), position)
    } else if let Some(position) = from_cursor {
        (Opening::Nothing, position)
    } else {
        (Opening::Progress, feed.store_position().await?)
    };
    let subscription = feed.subscribe(after).await?;
    let (tx, messages) = mpsc::channel(watcher.buffer);
    let (end_tx, end) = oneshot::channel();
    let stream = Stream {
        feed: feed.clone(),
        store_id: store_id.to_owned(),
        registry,
        filter,
        tx,
        progress_interval: watcher.progress_interval,
    };
    tokio::spawn(async move {
        let revoked = async {
            match allowed {
                Some(allowed) => allowed.revoked().await,
                None => std::future::pending().await,
            }
        };
        let ended = tokio::select! {
            ended = stream.run(opening, after, subscription) => ended,
            refusal = revoked => Err(End::Error(refusal)),
        };
        if let Err(End::Error(e)) = ended {
            tracing::info!(
                target: "billing_mode::decision",
                rpc = "Watch",
                reason = e.reason.as_str(),
                "stream ended"
            );
            let _ = end_tx.send(e.into());
        }
    });
    Ok(WatchStream {
        messages,
        end: Some(end),
    })
}

/// Whether a stream filtered on `filter` (empty: every workspace) sends
/// `record`'s changes.
fn wanted(filter: &HashSet<WorkspaceId>, record: &Record) -> bool {
    filter.is_empty() || filter.contains(&record.workspace_id)
}

enum Opening {
    Snapshot(Vec<Record>),
    Progress,
    Nothing,
}

enum End {
    /// The consumer went away.
    Gone,
    Error(ApiError),
}

impl<E: Into<ApiError>> From<E> for End {
    fn from(e: E) -> Self {
        End::Error(e.into())
    }
}

struct Stream {
    feed: Feed,
    store_id: String,
    registry: Arc<Registry>,
    filter: HashSet<WorkspaceId>,
    tx: mpsc::Sender<proto::WatchResponse>,
    progress_interval: Duration,
}

impl Stream {
    async fn run(
        &self,
        opening: Opening,
        after: u64,
        mut subscription: Subscription,
    ) -> Result<(), End> {
        match opening {
            Opening::Snapshot(records) => {
                for record in records.iter().filter(|r| self.wanted(r)) {
                    self.send(self.resolution(record, after)).await?;
                }
                self.send(self.progress(after, true)).await?;
            }
            Opening::Progress => self.send(self.progress(after, false)).await?,
            Opening::Nothing => {}
        }
        let idle = tokio::time::sleep(self.progress_interval);
        tokio::pin!(idle);
        loop {
            tokio::select! {
                () = self.tx.closed() => return Err(End::Gone),
                () = &mut idle => {
                    self.send(self.progress(subscription.position(), false)).await?;
                    idle.as_mut().reset(tokio::time::Instant::now() + self.progress_interval);
                }
                change = subscription.next() => {
                    let change = change?;
                    if !self.wanted(&change.record) {
                        continue;
                    }
                    let message = self.resolution(&change.record, change.position);
                    if subscription.took_live() {
                        // Live: a consumer whose queue is full is cut off,
                        // never waited for.
                        match self.tx.try_send(message) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                return Err(FeedError::TooSlow.into())
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => return Err(End::Gone),
                        }
                    } else {
                        // Catching up from the store: at the consumer's pace.
                        self.send(message).await?;
                    }
                    idle.as_mut().reset(tokio::time::Instant::now() + self.progress_interval);
                }
            }
        }
    }

    fn wanted(&self, record: &Record) -> bool {
        wanted(&self.filter, record)
    }

    /// Queues a message at the consumer's pace; ends on shutdown.
    async fn send(&self, message: proto::WatchResponse) -> Result<(), End> {
        tokio::select! {
            sent = self.tx.send(message) => sent.map_err(|_| End::Gone),
            () = self.feed.stopped() => Err(FeedError::ShuttingDown.into()),
        }
    }

    fn cursor(&self, position: u64) -> String {
        encode_cursor(&self.store_id, position)
    }

    fn resolution(&self, record: &Record, position: u64) -> proto::WatchResponse {
        proto::WatchResponse {
            cursor: self.cursor(position),
            event: Some(Event::Resolution(convert::resolution_to_wire(resolve(
                record,
                &self.registry,
            )))),
        }
    }

    fn progress(&self, position: u64, snapshot_complete: bool) -> proto::WatchResponse {
        let now = chrono::Utc::now();
        proto::WatchResponse {
            cursor: self.cursor(position),
            event: Some(Event::Progress(proto::WatchProgress {
                snapshot_complete,
                time: Some(crate::wire::Timestamp::from(now)),
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STORE: &str = "0123456789abcdef0123456789abcdef";

    /// A reload between the call's authentication and the stream's start
    /// (the stream subscribes to reloads only then, and a subscription takes
    /// the value in force as seen) still ends the stream.
    #[tokio::test]
    async fn a_token_revoked_before_the_stream_follows_reloads_ends_it_at_once() {
        use crate::auth::{generate_token, parse_token_lines, Role};
        let (token, entry) = generate_token("leaky", [Role::Reader].into()).unwrap();
        let (_, other) = generate_token("other", [Role::Admin].into()).unwrap();
        let parse = |line: String| Authenticator::new(parse_token_lines(&line, "test").unwrap());
        let reloads = tokio::sync::watch::Sender::new(Arc::new(parse(entry.line())));
        // The reload that takes the token away comes first...
        reloads.send_replace(Arc::new(parse(other.line())));
        // ...then the stream starts following reloads.
        let mut metadata = MetadataMap::new();
        metadata.insert("authorization", format!("Bearer {token}").parse().unwrap());
        let allowed = StillAllowed::new(reloads.subscribe(), &metadata);
        let refusal = tokio::time::timeout(Duration::from_secs(5), allowed.revoked())
            .await
            .expect("ended at once, not at the next reload");
        assert_eq!(refusal.reason, ErrorReason::Unauthenticated);
        // A token still in force is not refused.
        let (kept, kept_entry) = generate_token("kept", [Role::Reader].into()).unwrap();
        let reloads = tokio::sync::watch::Sender::new(Arc::new(parse(kept_entry.line())));
        let mut metadata = MetadataMap::new();
        metadata.insert("authorization", format!("Bearer {kept}").parse().unwrap());
        let allowed = StillAllowed::new(reloads.subscribe(), &metadata);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), allowed.revoked())
                .await
                .is_err(),
            "a token in force keeps its stream"
        );
    }

    #[test]
    fn a_cursor_round_trips_on_its_store_only() {
        for position in [0, 1, 42, u64::MAX] {
            let c = encode_cursor(STORE, position);
            assert_eq!(decode_cursor(&c, STORE).unwrap(), position);
            let other = "fedcba9876543210fedcba9876543210";
            assert_eq!(
                decode_cursor(&c, other).unwrap_err().reason,
                ErrorReason::InvalidCursor
            );
        }
    }

    #[test]
    fn malformed_cursors_are_invalid() {
        let good = encode_cursor(STORE, 7);
        let mut wrong_version = good.clone();
        wrong_version.replace_range(0..2, "02");
        for bad in [
            "".to_owned(),
            "zz".to_owned(),
            "not a cursor".to_owned(),
            good[..good.len() - 2].to_owned(),
            format!("{good}00"),
            wrong_version,
        ] {
            assert_eq!(
                decode_cursor(&bad, STORE).unwrap_err().reason,
                ErrorReason::InvalidCursor,
                "{bad:?}"
            );
            // Malformed whatever the store: checked without it.
            assert_eq!(
                parse_cursor(&bad).unwrap_err().reason,
                ErrorReason::InvalidCursor,
                "{bad:?}"
            );
        }
        // Well formed, of another store: parsed, then refused on this one.
        let other = encode_cursor("fedcba9876543210fedcba9876543210", 7);
        let parsed = parse_cursor(&other).unwrap();
        assert_eq!(parsed.position, 7);
        assert_eq!(
            parsed.position_on(STORE).unwrap_err().reason,
            ErrorReason::InvalidCursor
        );
    }
}
