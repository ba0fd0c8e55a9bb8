//! A bounded in-memory spool: nothing survives a restart. For tests and as the baseline the
//! durable spool is measured against; `serve --spool memory` runs with it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Batch, BoxFuture, DeadLetter, DeadQuery, Spool, SpoolError, TargetStats, Waker};
use crate::delivery::Delivery;

/// Bytes counted per delivery beside its body (ids, names, bookkeeping).
const OVERHEAD: u64 = 256;

#[derive(Default)]
struct Queue {
    /// (due time, sequence) → delivery; the sequence keeps FIFO order among equal due times.
    ready: BTreeMap<(u64, u64), Delivery>,
    /// In-flight deliveries: id → (created_at, cost).
    in_flight: HashMap<Arc<str>, (u64, u64)>,
}

#[derive(Default)]
struct State {
    queues: HashMap<Arc<str>, Queue>,
    /// Dead letters by id (UUIDv7 text sorts by time).
    dead: BTreeMap<String, DeadLetter>,
    /// Every target label that ever had a dead letter, so a count that falls to zero says so.
    dead_labels: std::collections::BTreeSet<String>,
}

/// In-memory spool with a byte budget.
pub struct MemorySpool {
    state: Mutex<State>,
    used: AtomicU64,
    limit: u64,
    seq: AtomicU64,
    waker: Mutex<Option<Waker>>,
}

fn ready<T: Send + 'static>(value: T) -> BoxFuture<'static, T> {
    Box::pin(std::future::ready(value))
}

impl MemorySpool {
    pub fn new(limit_bytes: u64) -> MemorySpool {
        MemorySpool {
            state: Mutex::new(State::default()),
            used: AtomicU64::new(0),
            limit: limit_bytes,
            seq: AtomicU64::new(0),
            waker: Mutex::new(None),
        }
    }

    /// Wakes the schedulers of the targets of just-stored deliveries.
    fn wake(&self, targets: &[Arc<str>]) {
        let waker = self.waker.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(waker) = waker {
            super::wake_each(&waker, targets);
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cost(d: &Delivery) -> u64 {
        d.body.len() as u64 + OVERHEAD
    }

    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn reserve(&self, cost: u64) -> Result<(), SpoolError> {
        let before = self.used.fetch_add(cost, Ordering::AcqRel);
        if before + cost > self.limit {
            self.used.fetch_sub(cost, Ordering::AcqRel);
            return Err(SpoolError::Full {
                used: before,
                limit: self.limit,
            });
        }
        Ok(())
    }

    fn push(&self, state: &mut State, d: Delivery) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        state
            .queues
            .entry(d.target.clone())
            .or_default()
            .ready
            .insert((d.due_at, seq), d);
    }

    /// Forgets an in-flight delivery, releasing its budget.
    fn release(&self, state: &mut State, delivery: &Delivery) {
        if let Some(q) = state.queues.get_mut(&delivery.target) {
            if let Some((_, cost)) = q.in_flight.remove(&delivery.id) {
                self.used.fetch_sub(cost, Ordering::AcqRel);
            }
            if q.ready.is_empty() && q.in_flight.is_empty() {
                state.queues.remove(&delivery.target);
            }
        }
    }
}

impl Spool for MemorySpool {
    fn enqueue(&self, batch: Batch) -> BoxFuture<'_, Result<(), SpoolError>> {
        let cost: u64 = batch.deliveries.iter().map(Self::cost).sum();
        if let Err(e) = self.reserve(cost) {
            return ready(Err(e));
        }
        let targets: Vec<Arc<str>> = batch.deliveries.iter().map(|d| d.target.clone()).collect();
        let mut state = self.lock();
        for d in batch.deliveries {
            self.push(&mut state, d);
        }
        for letter in batch.dead {
            state.dead_labels.insert(letter.target_label().to_string());
            state.dead.insert(letter.id.to_string(), letter);
        }
        drop(state);
        self.wake(&targets);
        ready(Ok(()))
    }

    fn take_due(&self, target: &str, now_ms: u64, max: usize) -> Vec<Delivery> {
        let mut state = self.lock();
        let Some(queue) = state.queues.get_mut(target) else {
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
            queue
                .in_flight
                .insert(d.id.clone(), (d.created_at, Self::cost(&d)));
            out.push(d);
        }
        out
    }

    fn next_due(&self, target: &str) -> Option<u64> {
        let state = self.lock();
        state
            .queues
            .get(target)
            .and_then(|q| q.ready.first_key_value().map(|(k, _)| k.0))
    }

    fn complete(&self, delivery: &Delivery) {
        let mut state = self.lock();
        self.release(&mut state, delivery);
    }

    fn retry_at(&self, mut delivery: Delivery, due_ms: u64) {
        let mut state = self.lock();
        if let Some(q) = state.queues.get_mut(&delivery.target) {
            q.in_flight.remove(&delivery.id);
        }
        delivery.due_at = due_ms;
        self.push(&mut state, delivery);
    }

    fn bury(&self, delivery: &Delivery, letter: DeadLetter) {
        let mut state = self.lock();
        self.release(&mut state, delivery);
        state.dead_labels.insert(letter.target_label().to_string());
        state.dead.insert(letter.id.to_string(), letter);
    }

    fn targets(&self) -> Vec<String> {
        self.lock().queues.keys().map(|k| k.to_string()).collect()
    }

    fn stats(&self, target: &str) -> TargetStats {
        let state = self.lock();
        let Some(q) = state.queues.get(target) else {
            return TargetStats::default();
        };
        let oldest = q
            .ready
            .values()
            .map(|d| d.created_at)
            .chain(q.in_flight.values().map(|(created, _)| *created))
            .min();
        TargetStats {
            queued: q.ready.len() as u64,
            in_flight: q.in_flight.len() as u64,
            oldest_created_at: oldest,
        }
    }

    fn list_dead(&self, query: &DeadQuery) -> Result<Vec<DeadLetter>, SpoolError> {
        let state = self.lock();
        let start = query.after.clone().unwrap_or_default();
        Ok(state
            .dead
            .range::<String, _>((std::ops::Bound::Excluded(start), std::ops::Bound::Unbounded))
            .map(|(_, d)| d)
            .filter(|d| query.matches(d))
            .take(query.limit)
            .cloned()
            .collect())
    }

    fn get_dead(&self, id: &str) -> Result<Option<DeadLetter>, SpoolError> {
        Ok(self.lock().dead.get(id).cloned())
    }

    fn revive(
        &self,
        id: &str,
        deliveries: Vec<Delivery>,
    ) -> BoxFuture<'_, Result<bool, SpoolError>> {
        let mut state = self.lock();
        if !state.dead.contains_key(id) {
            return ready(Ok(false));
        }
        let cost: u64 = deliveries.iter().map(Self::cost).sum();
        if let Err(e) = self.reserve(cost) {
            return ready(Err(e));
        }
        state.dead.remove(id);
        let targets: Vec<Arc<str>> = deliveries.iter().map(|d| d.target.clone()).collect();
        for d in deliveries {
            self.push(&mut state, d);
        }
        drop(state);
        self.wake(&targets);
        ready(Ok(true))
    }

    fn rebury(&self, letter: DeadLetter) -> BoxFuture<'_, Result<(), SpoolError>> {
        let mut state = self.lock();
        state.dead_labels.insert(letter.target_label().to_string());
        state.dead.insert(letter.id.to_string(), letter);
        ready(Ok(()))
    }

    fn drop_dead(&self, ids: Vec<String>) -> BoxFuture<'_, Result<usize, SpoolError>> {
        let mut state = self.lock();
        let n = ids
            .iter()
            .filter(|id| state.dead.remove(id.as_str()).is_some())
            .count();
        ready(Ok(n))
    }

    fn purge_dead(&self, before_ms: u64) -> BoxFuture<'_, Result<usize, SpoolError>> {
        let mut state = self.lock();
        let before = state.dead.len();
        state.dead.retain(|_, d| d.failed_at >= before_ms);
        ready(Ok(before - state.dead.len()))
    }

    fn dead_counts(&self) -> Vec<(String, u64)> {
        let state = self.lock();
        let mut counts: BTreeMap<String, u64> =
            state.dead_labels.iter().map(|l| (l.clone(), 0)).collect();
        for d in state.dead.values() {
            *counts.entry(d.target_label().to_string()).or_default() += 1;
        }
        counts.into_iter().collect()
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), SpoolError>> {
        ready(Ok(()))
    }

    fn on_ready(&self, waker: Waker) {
        *self.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(waker);
    }
}
