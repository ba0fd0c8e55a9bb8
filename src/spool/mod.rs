//! The spool: where deliveries wait between the acknowledgement and their target.
//!
//! The ingress stores every delivery of a callback with one [`Spool::enqueue`] before it
//! acknowledges; per-target schedulers (`delivery/`) take due deliveries, and put each back as
//! delivered, to retry later, or failed. The trait is the seam between "accepted" and
//! "delivered": the in-memory backend bounds memory and answers `Full` when over its budget.

pub mod memory;

use std::future::Future;
use std::pin::Pin;

use crate::delivery::Delivery;

pub use memory::MemorySpool;

/// Why deliveries could not be stored; the ingress answers 503.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("the spool is full ({used} of {limit} bytes used)")]
    Full { used: u64, limit: u64 },
    #[error("the spool is closed")]
    Closed,
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

/// Storage of pending deliveries.
pub trait Spool: Send + Sync + 'static {
    /// Stores every delivery of one callback: all of them or none. Resolves when stored.
    fn enqueue(&self, deliveries: Vec<Delivery>) -> BoxFuture<'_, Result<(), SpoolError>>;

    /// Takes up to `max` deliveries of `target` due at or before `now_ms`, marking them in flight.
    fn take_due(&self, target: &str, now_ms: u64, max: usize) -> Vec<Delivery>;

    /// The earliest due time of a queued (not in flight) delivery of `target`.
    fn next_due(&self, target: &str) -> Option<u64>;

    /// The delivery was delivered (or given up): forget it.
    fn complete(&self, delivery: &Delivery);

    /// Puts an in-flight delivery back, due at `due_ms`, with its attempt count updated.
    fn retry_at(&self, delivery: Delivery, due_ms: u64);

    /// Every target that has deliveries queued or in flight.
    fn targets(&self) -> Vec<String>;

    /// Depth of one target's queue.
    fn stats(&self, target: &str) -> TargetStats;
}
