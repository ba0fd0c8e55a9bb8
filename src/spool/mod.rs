//! The spool: where deliveries wait between the acknowledgement and their target, and where
//! those that cannot be delivered are kept as dead letters.
//!
//! The ingress stores every delivery of a callback (and the dead letters of routes whose scripts
//! failed) with one [`Spool::enqueue`] before it acknowledges; per-target schedulers
//! (`delivery/`) take due deliveries, and put each back as delivered, to retry later, or dead.
//! The trait is the seam between "accepted" and "delivered": [`RedbSpool`] keeps everything on
//! disk and is the server's default; [`MemorySpool`] keeps it in memory (tests, benchmarks).

pub mod codec;
pub mod memory;
pub mod redb;
mod wal;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use crate::delivery::Delivery;

pub use self::redb::RedbSpool;
pub use memory::MemorySpool;

/// Why the spool could not do what was asked; the ingress answers 503.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SpoolError {
    #[error("the spool is full ({used} of {limit} bytes used)")]
    Full { used: u64, limit: u64 },
    #[error("the spool is closed")]
    Closed,
    #[error("spool storage error: {0}")]
    Storage(String),
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Queue depth of one target, for metrics and the admin API.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetStats {
    /// Deliveries waiting (due or not), not counting those in flight.
    pub queued: u64,
    pub in_flight: u64,
    /// Creation time (ms since the epoch) of the oldest delivery queued or in flight.
    pub oldest_created_at: Option<u64>,
}

/// What the ingress stores for one callback, all or nothing.
#[derive(Debug, Default)]
pub struct Batch {
    pub deliveries: Vec<Delivery>,
    /// Routes whose filter or transform failed: the callback, kept for replay.
    pub dead: Vec<DeadLetter>,
}

/// The request of a callback, as much as replaying it through the rules needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallbackRecord {
    pub app_id: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub received_at: u64,
}

/// A delivery that could not be made, or a callback a route's script failed on.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// The delivery's id (so a replay keeps its `webhook-id`), or a new id for a script failure.
    pub id: Arc<str>,
    pub event_id: Arc<str>,
    pub source: Arc<str>,
    pub command: Arc<str>,
    pub route: Arc<str>,
    /// `None` when the route's script failed before any target was chosen.
    pub target: Option<Arc<str>>,
    pub reason: String,
    pub attempts: u32,
    pub last_status: Option<u16>,
    /// The first KiB of the last answer.
    pub last_answer: Bytes,
    /// When the delivery was created (the callback received), ms since the epoch.
    pub created_at: u64,
    /// When it died, ms since the epoch.
    pub failed_at: u64,
    pub content_type: Option<http::HeaderValue>,
    /// The delivery's body, or the callback's original body for a script failure.
    pub body: Bytes,
    /// Set for script failures: what replaying the callback through the rules needs.
    pub callback: Option<CallbackRecord>,
}

impl DeadLetter {
    /// The dead letter of a delivery that gave up.
    pub fn of_delivery(
        delivery: &Delivery,
        reason: String,
        last_status: Option<u16>,
        last_answer: Bytes,
        now_ms: u64,
    ) -> DeadLetter {
        DeadLetter {
            id: delivery.id.clone(),
            event_id: delivery.event_id.clone(),
            source: delivery.source.clone(),
            command: delivery.command.clone(),
            route: delivery.route.clone(),
            target: Some(delivery.target.clone()),
            reason,
            attempts: delivery.attempts,
            last_status,
            last_answer,
            created_at: delivery.created_at,
            failed_at: now_ms,
            content_type: delivery.content_type.clone(),
            body: delivery.body.clone(),
            callback: None,
        }
    }

    /// The dead letter of a route whose filter or transform failed on a callback: the callback
    /// itself, so it can be replayed through the route once the rule is fixed.
    pub fn of_callback(
        callback: &crate::dialect::Callback,
        route: Arc<str>,
        reason: String,
        now_ms: u64,
    ) -> DeadLetter {
        DeadLetter {
            id: uuid::Uuid::now_v7().to_string().into(),
            event_id: callback.event_id.clone(),
            source: callback.source.name.clone(),
            command: callback.command.clone(),
            route,
            target: None,
            reason,
            attempts: 0,
            last_status: None,
            last_answer: Bytes::new(),
            created_at: callback.received_at,
            failed_at: now_ms,
            content_type: callback.content_type.clone(),
            body: callback.body.clone(),
            callback: Some(CallbackRecord {
                app_id: callback.app_id.clone(),
                query: callback.query.clone(),
                headers: callback.headers.clone(),
                received_at: callback.received_at,
            }),
        }
    }

    /// The `target` label of `switchyard_dead_letters` ("" for script failures).
    pub fn target_label(&self) -> &str {
        self.target.as_deref().unwrap_or("")
    }

    /// Bytes counted against the spool budget.
    pub fn cost(&self) -> u64 {
        self.body.len() as u64 + self.last_answer.len() as u64 + 512
    }
}

/// Which dead letters to list.
#[derive(Clone, Debug, Default)]
pub struct DeadQuery {
    pub target: Option<String>,
    pub route: Option<String>,
    /// Only ids after this one (paging: pass the last id of the previous page).
    pub after: Option<String>,
    pub limit: usize,
}

impl DeadQuery {
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        self.target
            .as_deref()
            .is_none_or(|t| letter.target.as_deref() == Some(t))
            && self.route.as_deref().is_none_or(|r| &*letter.route == r)
    }
}

/// Storage of pending deliveries and dead letters.
pub trait Spool: Send + Sync + 'static {
    /// Stores a callback's deliveries and dead letters: all of them or none. Resolves once they
    /// are durable (for a durable spool: on disk).
    fn enqueue(&self, batch: Batch) -> BoxFuture<'_, Result<(), SpoolError>>;

    /// Takes up to `max` deliveries of `target` due at or before `now_ms`, marking them in flight.
    fn take_due(&self, target: &str, now_ms: u64, max: usize) -> Vec<Delivery>;

    /// Takes `target`'s first due delivery, and tells whether another one is due too.
    fn take_next(&self, target: &str, now_ms: u64) -> Option<(Delivery, bool)> {
        let delivery = self.take_due(target, now_ms, 1).pop()?;
        let more = self.next_due(target).is_some_and(|due| due <= now_ms);
        Some((delivery, more))
    }

    /// The earliest due time of a queued (not in flight) delivery of `target`.
    fn next_due(&self, target: &str) -> Option<u64>;

    /// The in-flight delivery was delivered: forget it.
    fn complete(&self, delivery: &Delivery);

    /// Puts an in-flight delivery back, due at `due_ms`; `delivery.due_at` is still the old due
    /// time, `attempts` and `last_error` are updated.
    fn retry_at(&self, delivery: Delivery, due_ms: u64);

    /// Replaces an in-flight (or queued) delivery by its dead letter.
    fn bury(&self, delivery: &Delivery, letter: DeadLetter);

    /// Every target that has deliveries queued or in flight.
    fn targets(&self) -> Vec<String>;

    /// Depth of one target's queue.
    fn stats(&self, target: &str) -> TargetStats;

    /// Dead letters in id (time) order.
    fn list_dead(&self, query: &DeadQuery) -> Result<Vec<DeadLetter>, SpoolError>;

    fn get_dead(&self, id: &str) -> Result<Option<DeadLetter>, SpoolError>;

    /// Removes a dead letter and queues `deliveries` in its place, atomically. `Ok(false)` when
    /// there is no such dead letter.
    fn revive(
        &self,
        id: &str,
        deliveries: Vec<Delivery>,
    ) -> BoxFuture<'_, Result<bool, SpoolError>>;

    /// Replaces a dead letter by a newer one with the same id (a replay that failed again).
    fn rebury(&self, letter: DeadLetter) -> BoxFuture<'_, Result<(), SpoolError>>;

    /// Drops dead letters; returns how many existed.
    fn drop_dead(&self, ids: Vec<String>) -> BoxFuture<'_, Result<usize, SpoolError>>;

    /// Drops dead letters that died before `before_ms`; returns how many.
    fn purge_dead(&self, before_ms: u64) -> BoxFuture<'_, Result<usize, SpoolError>>;

    /// Dead letters per target label.
    fn dead_counts(&self) -> Vec<(String, u64)>;

    /// Waits until every change handed to the spool so far is stored.
    fn flush(&self) -> BoxFuture<'_, Result<(), SpoolError>>;

    /// Registers what to call, with a target's name, when the target may have work again: new
    /// deliveries of it are stored (enqueued or revived), or deliveries of it that were in flight
    /// have been settled (stored as delivered, retried or dead). The spool calls it itself, once
    /// the change is stored, so the wake-up does not depend on the caller still waiting for it
    /// (a request whose sender hung up is dropped).
    fn on_ready(&self, waker: Waker);
}

/// See [`Spool::on_ready`].
pub type Waker = Arc<dyn Fn(&str) + Send + Sync>;

/// Calls `waker` once for each distinct target among `targets`.
pub(crate) fn wake_each<'a>(waker: &Waker, targets: impl IntoIterator<Item = &'a Arc<str>>) {
    let mut seen: Vec<&Arc<str>> = Vec::new();
    for target in targets {
        if !seen.contains(&target) {
            seen.push(target);
            waker(target);
        }
    }
}
