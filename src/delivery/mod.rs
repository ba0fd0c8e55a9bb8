//! Delivery: per-target schedulers that take due deliveries from the spool and send them.
//!
//! Each target has its own scheduler task, so a slow or failing target only ever holds its own
//! concurrency slots. A scheduler reads the target's *current* definition from the live rule set
//! before each attempt (a reload changes URL, headers or concurrency for queued deliveries too).
//! The attempt itself is a small state machine: send → classify (`retry.rs`) → delivered /
//! retry later / failed.

pub mod client;
pub mod retry;
pub mod signing;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::dialect::Callback;
use crate::metrics as m;
use crate::rules::{RuleSet, Target};
use crate::spool::Spool;
use retry::Disposition;

/// One (callback, route, target): the unit that is queued, attempted and retried.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// Sent as `webhook-id`, the same on every attempt.
    pub id: Arc<str>,
    pub event_id: Arc<str>,
    pub source: Arc<str>,
    pub command: Arc<str>,
    pub route: Arc<str>,
    pub target: Arc<str>,
    /// `None`: `application/json` (transformed bodies).
    pub content_type: Option<http::HeaderValue>,
    pub body: Bytes,
    /// Attempts made so far.
    pub attempts: u32,
    /// ms since the epoch.
    pub created_at: u64,
    /// When the next attempt is due, ms since the epoch.
    pub due_at: u64,
    /// What went wrong last time, if anything.
    pub last_error: Option<String>,
}

impl Delivery {
    pub fn new(
        callback: &Callback,
        route: Arc<str>,
        target: Arc<str>,
        body: Bytes,
        content_type: Option<http::HeaderValue>,
    ) -> Delivery {
        Delivery {
            id: uuid::Uuid::now_v7().to_string().into(),
            event_id: callback.event_id.clone(),
            source: callback.source.name.clone(),
            command: callback.command.as_str().into(),
            route,
            target,
            content_type,
            body,
            attempts: 0,
            created_at: callback.received_at,
            due_at: callback.received_at,
            last_error: None,
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs the per-target schedulers.
pub struct Deliverer {
    spool: Arc<dyn Spool>,
    rules: Arc<ArcSwap<RuleSet>>,
    client: reqwest::Client,
    workers: Mutex<HashMap<Arc<str>, Arc<Worker>>>,
    stop: CancellationToken,
    attempts: TaskTracker,
}

struct Worker {
    name: Arc<str>,
    wake: Notify,
    in_flight: AtomicUsize,
}

impl Deliverer {
    pub fn new(
        spool: Arc<dyn Spool>,
        rules: Arc<ArcSwap<RuleSet>>,
        stop: CancellationToken,
    ) -> Arc<Deliverer> {
        Arc::new(Deliverer {
            spool,
            rules,
            client: client::build_client(),
            workers: Mutex::new(HashMap::new()),
            stop,
            attempts: TaskTracker::new(),
        })
    }

    /// Makes sure every target of the current rules, and every target with queued deliveries,
    /// has a scheduler. Called at start and after each reload.
    pub fn sync_targets(self: &Arc<Self>) {
        let rules = self.rules.load();
        let mut names: Vec<Arc<str>> = rules.targets.iter().map(|t| t.name.clone()).collect();
        names.extend(self.spool.targets().into_iter().map(Arc::from));
        for name in names {
            self.worker(&name).wake.notify_one();
        }
    }

    /// Wakes the schedulers of the targets of freshly queued deliveries.
    pub fn kick(self: &Arc<Self>, targets: &[Arc<str>]) {
        for (i, target) in targets.iter().enumerate() {
            if targets[..i].iter().any(|t| t == target) {
                continue;
            }
            self.worker(target).wake.notify_one();
        }
    }

    fn worker(self: &Arc<Self>, name: &Arc<str>) -> Arc<Worker> {
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = workers.get(name) {
            return w.clone();
        }
        let worker = Arc::new(Worker {
            name: name.clone(),
            wake: Notify::new(),
            in_flight: AtomicUsize::new(0),
        });
        workers.insert(name.clone(), worker.clone());
        if !self.stop.is_cancelled() {
            tokio::spawn(self.clone().schedule(worker.clone()));
        }
        worker
    }

    /// Names of targets with a scheduler.
    pub fn target_names(&self) -> Vec<Arc<str>> {
        let workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        workers.keys().cloned().collect()
    }

    /// Publishes queue gauges; called before each metrics scrape.
    pub fn publish_gauges(&self) {
        let now = now_ms();
        for name in self.target_names() {
            let stats = self.spool.stats(&name);
            let label = name.to_string();
            metrics::gauge!(m::QUEUE_DEPTH, "target" => label.clone())
                .set((stats.queued + stats.in_flight) as f64);
            let oldest = stats
                .oldest_created_at
                .map(|t| now.saturating_sub(t) as f64 / 1000.0)
                .unwrap_or(0.0);
            metrics::gauge!(m::QUEUE_OLDEST, "target" => label).set(oldest);
        }
    }

    /// The scheduler of one target.
    async fn schedule(self: Arc<Self>, worker: Arc<Worker>) {
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            let rules = self.rules.load_full();
            match rules.target(&worker.name) {
                Some(target) => self.start_due(&worker, target),
                None => self.fail_removed(&worker),
            }
            let next_due = self.spool.next_due(&worker.name);
            // One reading of the clock: with two, the millisecond can tick between the check
            // and the subtraction, which underflowed (a panic that killed this target's
            // scheduler for good in debug builds, a near-endless sleep in release).
            let now = now_ms();
            let sleep = match next_due {
                Some(due) if due > now => Duration::from_millis(due - now),
                // Fell due after `start_due` read the clock, and a slot is free: go round again
                // (sleeping an hour here stranded it until some other delivery woke us).
                Some(_) if has_free_slot(&worker, &rules) => Duration::from_millis(1),
                // Due now but no free slot: an attempt's end wakes us.
                Some(_) | None => Duration::from_secs(3600),
            };
            tokio::select! {
                _ = worker.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
                _ = self.stop.cancelled() => return,
            }
        }
    }

    fn start_due(self: &Arc<Self>, worker: &Arc<Worker>, target: &Arc<Target>) {
        let in_flight = worker.in_flight.load(Ordering::Acquire);
        let free = target.concurrency.saturating_sub(in_flight);
        if free == 0 {
            return;
        }
        for delivery in self.spool.take_due(&worker.name, now_ms(), free) {
            worker.in_flight.fetch_add(1, Ordering::AcqRel);
            let this = self.clone();
            let worker = worker.clone();
            let target = target.clone();
            self.attempts.spawn(async move {
                this.attempt(&target, delivery).await;
                worker.in_flight.fetch_sub(1, Ordering::AcqRel);
                worker.wake.notify_one();
            });
        }
    }

    /// The target is gone from the rules: its queued deliveries cannot be sent.
    fn fail_removed(&self, worker: &Worker) {
        for delivery in self.spool.take_due(&worker.name, u64::MAX, usize::MAX) {
            self.fail(&delivery, "target removed");
        }
    }

    async fn attempt(&self, target: &Target, mut delivery: Delivery) {
        let started = Instant::now();
        let prepared = client::prepare(target, &delivery, now_ms() / 1000);
        let outcome = client::send(&self.client, target, prepared).await;
        delivery.attempts += 1;
        metrics::histogram!(m::DELIVERY_DURATION, "target" => delivery.target.to_string())
            .record(started.elapsed().as_secs_f64());
        match retry::classify(&outcome, delivery.attempts, &target.retry) {
            Disposition::Delivered => {
                count(&delivery, "delivered");
                tracing::debug!(
                    delivery_id = %delivery.id, route = %delivery.route, target = %delivery.target,
                    attempt = delivery.attempts, status = outcome.status(), "delivered"
                );
                self.spool.complete(&delivery);
            }
            Disposition::Retry { after } => {
                count(&delivery, "retry");
                let error = outcome.describe();
                tracing::info!(
                    delivery_id = %delivery.id, route = %delivery.route, target = %delivery.target,
                    attempt = delivery.attempts, retry_in_ms = after.as_millis() as u64,
                    error = %error, "attempt failed, will retry"
                );
                delivery.last_error = Some(error);
                let due = now_ms() + after.as_millis() as u64;
                self.spool.retry_at(delivery, due);
            }
            Disposition::Failed { reason } => {
                self.fail(&delivery, &reason);
            }
        }
    }

    fn fail(&self, delivery: &Delivery, reason: &str) {
        count(delivery, "failed");
        tracing::error!(
            delivery_id = %delivery.id, event_id = %delivery.event_id, route = %delivery.route,
            target = %delivery.target, attempts = delivery.attempts, reason = %reason,
            "delivery failed"
        );
        self.spool.complete(delivery);
    }

    /// Stops starting attempts and waits up to `grace` for those in flight.
    pub async fn shutdown(&self, grace: Duration) {
        self.stop.cancel();
        self.attempts.close();
        if tokio::time::timeout(grace, self.attempts.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = self.attempts.len(),
                "shutdown grace period over with attempts still in flight"
            );
        }
        let left: u64 = self
            .target_names()
            .iter()
            .map(|t| {
                let s = self.spool.stats(t);
                s.queued + s.in_flight
            })
            .sum();
        if left > 0 {
            tracing::warn!(
                queued = left,
                "deliveries still queued in memory are dropped at exit"
            );
        }
    }
}

fn has_free_slot(worker: &Worker, rules: &RuleSet) -> bool {
    rules
        .target(&worker.name)
        .is_some_and(|t| worker.in_flight.load(Ordering::Acquire) < t.concurrency)
}

fn count(delivery: &Delivery, outcome: &'static str) {
    metrics::counter!(
        m::DELIVERIES,
        "route" => delivery.route.to_string(),
        "target" => delivery.target.to_string(),
        "outcome" => outcome
    )
    .increment(1);
}
