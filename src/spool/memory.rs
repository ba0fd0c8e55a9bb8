//! A bounded in-memory spool. Nothing survives a restart; the byte budget keeps memory bounded.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{BoxFuture, Spool, SpoolError, TargetStats};
use crate::delivery::Delivery;

/// Bytes counted per delivery beside its body (ids, names, bookkeeping).
const OVERHEAD: u64 = 256;

#[derive(Default)]
struct Queue {
    /// (due time, sequence) → delivery; the sequence keeps FIFO order among equal due times.
    ready: BTreeMap<(u64, u64), Delivery>,
    /// In-flight deliveries: id → created_at.
    in_flight: HashMap<Arc<str>, u64>,
}

/// In-memory spool with a byte budget.
pub struct MemorySpool {
    queues: Mutex<HashMap<Arc<str>, Queue>>,
    used: AtomicU64,
    limit: u64,
    seq: AtomicU64,
}

impl MemorySpool {
    pub fn new(limit_bytes: u64) -> MemorySpool {
        MemorySpool {
            queues: Mutex::new(HashMap::new()),
            used: AtomicU64::new(0),
            limit: limit_bytes,
            seq: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, Queue>> {
        // A panic while holding the lock cannot leave a queue half-updated in a way that
        // matters more than losing the process, so keep serving.
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cost(d: &Delivery) -> u64 {
        d.body.len() as u64 + OVERHEAD
    }

    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

impl Spool for MemorySpool {
    fn enqueue(&self, deliveries: Vec<Delivery>) -> BoxFuture<'_, Result<(), SpoolError>> {
        let result = (|| {
            if deliveries.is_empty() {
                return Ok(());
            }
            // Bodies shared between deliveries are counted once per delivery: a bound, not a
            // measurement.
            let cost: u64 = deliveries.iter().map(Self::cost).sum();
            let before = self.used.fetch_add(cost, Ordering::AcqRel);
            if before + cost > self.limit {
                self.used.fetch_sub(cost, Ordering::AcqRel);
                return Err(SpoolError::Full {
                    used: before,
                    limit: self.limit,
                });
            }
            let mut queues = self.lock();
            for d in deliveries {
                let seq = self.seq.fetch_add(1, Ordering::Relaxed);
                queues
                    .entry(d.target.clone())
                    .or_default()
                    .ready
                    .insert((d.due_at, seq), d);
            }
            Ok(())
        })();
        Box::pin(std::future::ready(result))
    }

    fn take_due(&self, target: &str, now_ms: u64, max: usize) -> Vec<Delivery> {
        let mut queues = self.lock();
        let Some(queue) = queues.get_mut(target) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        while out.len() < max {
            let Some(entry) = queue.ready.first_entry() else {
                break;
            };
            if entry.key().0 > now_ms {
                break;
            }
            let d = entry.remove();
            queue.in_flight.insert(d.id.clone(), d.created_at);
            out.push(d);
        }
        out
    }

    fn next_due(&self, target: &str) -> Option<u64> {
        let queues = self.lock();
        queues
            .get(target)
            .and_then(|q| q.ready.first_key_value().map(|(k, _)| k.0))
    }

    fn complete(&self, delivery: &Delivery) {
        let mut queues = self.lock();
        if let Some(q) = queues.get_mut(&delivery.target) {
            if q.in_flight.remove(&delivery.id).is_some() {
                self.used.fetch_sub(Self::cost(delivery), Ordering::AcqRel);
            }
            if q.ready.is_empty() && q.in_flight.is_empty() {
                queues.remove(&delivery.target);
            }
        }
    }

    fn retry_at(&self, mut delivery: Delivery, due_ms: u64) {
        let mut queues = self.lock();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let q = queues.entry(delivery.target.clone()).or_default();
        q.in_flight.remove(&delivery.id);
        delivery.due_at = due_ms;
        q.ready.insert((due_ms, seq), delivery);
    }

    fn targets(&self) -> Vec<String> {
        self.lock().keys().map(|k| k.to_string()).collect()
    }

    fn stats(&self, target: &str) -> TargetStats {
        let queues = self.lock();
        let Some(q) = queues.get(target) else {
            return TargetStats::default();
        };
        let oldest = q
            .ready
            .values()
            .map(|d| d.created_at)
            .chain(q.in_flight.values().copied())
            .min();
        TargetStats {
            queued: q.ready.len() as u64,
            in_flight: q.in_flight.len() as u64,
            oldest_created_at: oldest,
        }
    }
}
