//! Postgres `load`s that wait go to the database together.
//!
//! Up to [`Batcher::new`]'s `in_flight` loads run at once, each its own
//! one-row statement, as they come: one caller, or a few, never wait for
//! anything but their own query. A load that arrives while that many are
//! running waits; when a running one ends, every load waiting then (up to
//! [`MOST_PER_STATEMENT`]) is read by one statement, sent by one of them.
//! Under load, then, one round trip answers several requests: the server and
//! Postgres are each woken once for them instead of once each, which is most
//! of what a Resolve costs on a busy machine (docs/performance.md).
//!
//! Nothing is cached and no answer is shared between requests: every load
//! is answered by a statement sent after the load began, so it sees every
//! change committed before its request arrived, as a read of its own would.
//! Each requested position has its own row (`UNNEST … WITH ORDINALITY`,
//! numbered in the order the ids are bound), so a workspace asked for twice
//! is answered twice, and a row goes to the load at its position, never by
//! matching ids.
//!
//! A load whose request is cancelled while it waits is skipped (its answer
//! is dropped). One cancelled while it reads for the others hands its turn
//! on, and the others wait again. When the statement fails, each of the
//! others runs its own read at once ([`ReadPool`]'s retries included), so
//! each reports its own error, as it would have without waiting.

use std::sync::{Arc, Mutex, PoisonError};

use sqlx::{postgres::PgRow, Row as _};
use tokio::sync::oneshot;

use super::pg_reads::ReadPool;

/// The most loads one statement reads; more waiting go in the next.
const MOST_PER_STATEMENT: usize = 64;

/// Loads running now, and those waiting for one of them to end.
#[derive(Debug)]
pub(crate) struct Batcher {
    queue: Arc<Mutex<Queue>>,
    in_flight: usize,
    /// Loads answered by a statement another load sent (for the tests).
    #[cfg(test)]
    pub(crate) answered_together: std::sync::atomic::AtomicUsize,
}

#[derive(Debug, Default)]
struct Queue {
    /// Turns held (statements being read, or handed on and not yet taken).
    running: usize,
    waiting: Vec<Waiter>,
}

/// A load waiting: its workspace (as text, bound as `uuid`) and where its
/// answer goes.
#[derive(Debug)]
struct Waiter {
    id: String,
    answer: oneshot::Sender<Answer>,
}

#[derive(Debug)]
enum Answer {
    /// Read: the row, if the workspace has one.
    Row(Option<PgRow>),
    /// Yours to read, for yourself and for these, holding this turn.
    Lead(Turn, Vec<Waiter>),
    /// The statement failed: read on your own.
    Alone,
}

/// One of the `in_flight` turns. Dropped, it goes to the loads waiting, or
/// back to the count if none are.
#[derive(Debug)]
struct Turn(Arc<Mutex<Queue>>);

impl Drop for Turn {
    fn drop(&mut self) {
        let mut waiting = {
            let mut q = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            if q.waiting.is_empty() {
                q.running -= 1;
                return;
            }
            let n = q.waiting.len().min(MOST_PER_STATEMENT);
            q.waiting.drain(..n).collect::<Vec<_>>()
        };
        // The turn passes on, so the count stays. A waiter whose request was
        // cancelled cannot take it: try the next. If none can, the new turn
        // is dropped in its turn and looks at the queue again.
        let mut turn = Turn(self.0.clone());
        while let Some(lead) = waiting.pop() {
            match lead.answer.send(Answer::Lead(turn, waiting)) {
                Ok(()) => return,
                Err(Answer::Lead(t, rest)) => (turn, waiting) = (t, rest),
                Err(_) => unreachable!("the answer sent is the one returned"),
            }
        }
    }
}

impl Batcher {
    /// Statements read at once, at most.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Loads waiting for a turn now.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .waiting
            .len()
    }

    /// Up to `in_flight` (at least 1) statements at once.
    pub(crate) fn new(in_flight: usize) -> Self {
        Batcher {
            queue: Arc::default(),
            in_flight: in_flight.max(1),
            #[cfg(test)]
            answered_together: Default::default(),
        }
    }

    /// The row of workspace `id`, if any: `one` (the id bound as `$1`) at
    /// once if a turn is free, otherwise in the next `many` (the ids bound
    /// as `$1`, an array; each row's first column its 1-based position).
    pub(crate) async fn load(
        &self,
        reads: &ReadPool,
        one: &str,
        many: &str,
        id: String,
    ) -> Result<Option<PgRow>, sqlx::Error> {
        loop {
            let waiting = {
                let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                if q.running < self.in_flight {
                    q.running += 1;
                    None
                } else {
                    let (answer, wait) = oneshot::channel();
                    q.waiting.push(Waiter {
                        id: id.clone(),
                        answer,
                    });
                    Some(wait)
                }
            };
            let (turn, others) = match waiting {
                None => (Turn(self.queue.clone()), Vec::new()),
                Some(wait) => match wait.await {
                    Ok(Answer::Row(row)) => return Ok(row),
                    Ok(Answer::Lead(turn, others)) => (turn, others),
                    Ok(Answer::Alone) => {
                        return reads.fetch_optional(|| sqlx::query(one).bind(&id)).await
                    }
                    // The load reading for us was cancelled: wait again.
                    Err(_) => continue,
                },
            };
            crate::metrics::global()
                .store_loads_per_read
                .observe((others.len() + 1) as f64);
            let row = if others.is_empty() {
                reads.fetch_optional(|| sqlx::query(one).bind(&id)).await
            } else {
                #[cfg(test)]
                self.answered_together
                    .fetch_add(others.len(), std::sync::atomic::Ordering::Relaxed);
                read_together(reads, one, many, id, others).await
            };
            drop(turn);
            return row;
        }
    }
}

/// Reads `id` and every `others`' workspace with one statement, answers
/// the others and returns the row of `id`.
async fn read_together(
    reads: &ReadPool,
    one: &str,
    many: &str,
    id: String,
    others: Vec<Waiter>,
) -> Result<Option<PgRow>, sqlx::Error> {
    let rows = {
        let mut ids = Vec::with_capacity(others.len() + 1);
        ids.push(id.as_str());
        ids.extend(others.iter().map(|w| w.id.as_str()));
        reads.fetch(|| sqlx::query(many).bind(&ids)).await
    };
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => {
            each_alone(others);
            return Err(e);
        }
    };
    let mut at: Vec<Option<PgRow>> = std::iter::repeat_with(|| None)
        .take(others.len() + 1)
        .collect();
    for row in rows {
        let position = row.try_get::<i64, _>(0).ok();
        let slot = position
            .and_then(|n| usize::try_from(n).ok()?.checked_sub(1))
            .and_then(|i| at.get_mut(i));
        match slot {
            Some(slot) if slot.is_none() => *slot = Some(row),
            // A position not asked for, or answered twice: the statement
            // is not the one this was written for. Nobody gets a row of it;
            // each reads its own.
            _ => {
                tracing::error!("a batched read answered a position it was not asked for");
                each_alone(others);
                return reads.fetch_optional(|| sqlx::query(one).bind(&id)).await;
            }
        }
    }
    let mut at = at.into_iter();
    let mine = at.next().flatten();
    for (w, row) in others.into_iter().zip(at) {
        // A load whose request was cancelled no longer listens.
        let _ = w.answer.send(Answer::Row(row));
    }
    Ok(mine)
}

/// Tells each of `others` to read on its own.
fn each_alone(others: Vec<Waiter>) {
    for w in others {
        // A load whose request was cancelled no longer listens.
        let _ = w.answer.send(Answer::Alone);
    }
}
