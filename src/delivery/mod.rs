//! Delivery: per-target schedulers that take due deliveries from the spool and send them.
//!
//! Each target has its own scheduler task and up to `concurrency` lanes, so a slow or failing
//! target only ever holds its own slots. A lane is a task with one kept-alive connection that
//! takes the target's next due delivery from the spool, attempts it, and takes the next; the
//! scheduler starts and wakes lanes when work arrives and when a retry falls due. Lanes read the
//! target's *current* definition from the live rule set before each attempt (a reload changes
//! URL, headers or concurrency for queued deliveries too).
//! The attempt itself is a small state machine: send → classify (`retry.rs`) → delivered /
//! retry later / failed.

pub mod client;
pub mod replay;
pub mod retry;
pub mod signing;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
use crate::spool::{DeadLetter, Spool};
use retry::{Disposition, Outcome};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

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
            command: callback.command.clone(),
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

/// How often a scheduler looks at its queue while deliveries are due and its lanes are busy.
const RECHECK: Duration = Duration::from_millis(25);
/// How long a lane without a connection waits for work before it ends.
const LANE_IDLE: Duration = Duration::from_secs(5);

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
    client: client::HttpClient,
    connector: client::Connector,
    workers: Mutex<HashMap<Arc<str>, Arc<Worker>>>,
    stop: CancellationToken,
    attempts: TaskTracker,
    /// Schedulers and lanes run here, on threads of their own.
    runtime: DeliveryRuntime,
}

/// The runtime of delivery: its own worker threads (`--workers`), beside the ingress's. The
/// operating system then shares the cores between answering and delivering, and neither queues
/// behind the other's tasks: in paired `bench/fanout.sh` runs this sustained ~30 % more callbacks
/// per second at 12–27 % less CPU each, and halved the ack p99 at 8,600 callbacks/s, against one
/// shared runtime. Its threads run as batch work (`sched::background`): on shared cores an
/// answer waits less for a core, p99 4.8 against 5.1 ms (medians of 12 paired paced runs).
struct DeliveryRuntime(Option<tokio::runtime::Runtime>);

impl DeliveryRuntime {
    fn start(workers: usize) -> std::io::Result<DeliveryRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("delivery")
            .on_thread_start(crate::sched::background)
            .enable_all()
            .build()?;
        Ok(DeliveryRuntime(Some(runtime)))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("running until dropped").handle()
    }
}

impl Drop for DeliveryRuntime {
    fn drop(&mut self) {
        // Dropped from async code too, where waiting for its threads is not allowed; by then
        // `Deliverer::shutdown` has let the attempts in flight finish.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

struct Worker {
    name: Arc<str>,
    /// Wakes the scheduler.
    wake: Notify,
    /// Wakes an idle lane.
    lane_wake: Notify,
    /// Lanes running, at most the target's concurrency.
    lanes: AtomicUsize,
    /// Lanes waiting for work.
    idle: AtomicUsize,
    /// Lanes in an attempt.
    in_flight: AtomicUsize,
    paused: AtomicBool,
    delivered: AtomicU64,
    failed: AtomicU64,
    last_error: Mutex<Option<(u64, String)>>,
}

/// A target's delivery state, for `GET /admin/targets`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TargetState {
    pub name: String,
    /// False when queued deliveries name a target the current rules no longer have.
    pub configured: bool,
    pub paused: bool,
    pub queued: u64,
    pub in_flight: u64,
    pub oldest_age_seconds: Option<f64>,
    /// Since this process started.
    pub delivered: u64,
    pub failed: u64,
    pub dead_letters: u64,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
}

impl Deliverer {
    pub fn new(
        spool: Arc<dyn Spool>,
        rules: Arc<ArcSwap<RuleSet>>,
        stop: CancellationToken,
        workers: usize,
    ) -> std::io::Result<Arc<Deliverer>> {
        let connector = client::build_connector();
        let deliverer = Arc::new(Deliverer {
            spool,
            rules,
            client: client::build_client(connector.clone()),
            connector,
            workers: Mutex::new(HashMap::new()),
            stop,
            attempts: TaskTracker::new(),
            runtime: DeliveryRuntime::start(workers)?,
        });
        let weak = Arc::downgrade(&deliverer);
        deliverer.spool.on_ready(Arc::new(move |target: &str| {
            if let Some(d) = weak.upgrade() {
                if let Some(w) = d.existing_worker(target) {
                    w.wake.notify_one();
                }
            }
        }));
        Ok(deliverer)
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

    /// The process's outbound client (synchronous routes use it too).
    pub fn client(&self) -> &client::HttpClient {
        &self.client
    }

    fn worker(self: &Arc<Self>, name: &Arc<str>) -> Arc<Worker> {
        let mut workers = lock(&self.workers);
        if let Some(w) = workers.get(name) {
            return w.clone();
        }
        let worker = Arc::new(Worker {
            name: name.clone(),
            wake: Notify::new(),
            lane_wake: Notify::new(),
            lanes: AtomicUsize::new(0),
            idle: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            paused: AtomicBool::new(false),
            delivered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            last_error: Mutex::new(None),
        });
        workers.insert(name.clone(), worker.clone());
        if !self.stop.is_cancelled() {
            self.runtime
                .handle()
                .spawn(self.clone().schedule(worker.clone()));
        }
        worker
    }

    /// Names of targets with a scheduler.
    pub fn target_names(&self) -> Vec<Arc<str>> {
        lock(&self.workers).keys().cloned().collect()
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
        for (target, n) in self.spool.dead_counts() {
            metrics::gauge!(m::DEAD_LETTERS, "target" => target).set(n as f64);
        }
    }

    /// Every target's state: those of the rules, and those that still have deliveries queued.
    pub fn target_states(&self) -> Vec<TargetState> {
        let rules = self.rules.load();
        let dead: HashMap<String, u64> = self.spool.dead_counts().into_iter().collect();
        let now = now_ms();
        let mut names: Vec<Arc<str>> = rules.targets.iter().map(|t| t.name.clone()).collect();
        for name in self.target_names() {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
            .into_iter()
            .map(|name| {
                let stats = self.spool.stats(&name);
                let worker = self.existing_worker(&name);
                let last = worker.as_ref().and_then(|w| lock(&w.last_error).clone());
                TargetState {
                    configured: rules.target(&name).is_some(),
                    paused: worker
                        .as_ref()
                        .is_some_and(|w| w.paused.load(Ordering::Acquire)),
                    queued: stats.queued,
                    in_flight: stats.in_flight,
                    oldest_age_seconds: stats
                        .oldest_created_at
                        .map(|t| now.saturating_sub(t) as f64 / 1000.0),
                    delivered: worker
                        .as_ref()
                        .map_or(0, |w| w.delivered.load(Ordering::Relaxed)),
                    failed: worker
                        .as_ref()
                        .map_or(0, |w| w.failed.load(Ordering::Relaxed)),
                    dead_letters: dead.get(&*name).copied().unwrap_or(0),
                    last_error_at: last.as_ref().map(|(at, _)| {
                        crate::admin::rfc3339(UNIX_EPOCH + Duration::from_millis(*at))
                    }),
                    last_error: last.map(|(_, e)| e),
                    name: name.to_string(),
                }
            })
            .collect()
    }

    /// Pauses or resumes a target's deliveries (they stay queued meanwhile). `false` when the
    /// target is unknown.
    pub fn set_paused(self: &Arc<Self>, target: &str, paused: bool) -> bool {
        if self.rules.load().target(target).is_none() && self.existing_worker(target).is_none() {
            return false;
        }
        let worker = self.worker(&Arc::from(target));
        worker.paused.store(paused, Ordering::Release);
        worker.wake.notify_one();
        tracing::info!(
            target,
            paused,
            "target {}",
            if paused { "paused" } else { "resumed" }
        );
        true
    }

    fn existing_worker(&self, name: &str) -> Option<Arc<Worker>> {
        lock(&self.workers).get(name).cloned()
    }

    /// The scheduler of one target: it keeps lanes at work while deliveries are due, wakes for the
    /// next retry, and turns a removed target's deliveries into dead letters. The lanes take the
    /// deliveries themselves, so under load a delivery passes through no other task.
    async fn schedule(self: Arc<Self>, worker: Arc<Worker>) {
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            let rules = self.rules.load_full();
            let target = rules.target(&worker.name);
            if target.is_none() {
                self.fail_removed(&worker);
            }
            let next_due = match target {
                Some(_) if !worker.paused.load(Ordering::Acquire) => {
                    self.spool.next_due(&worker.name)
                }
                _ => None,
            };
            // One reading of the clock: with two, the millisecond can tick between the check
            // and the subtraction, which underflowed (a panic that killed this target's
            // scheduler for good in debug builds, a near-endless sleep in release).
            let now = now_ms();
            let sleep = match (next_due, target) {
                (Some(due), _) if due > now => Duration::from_millis(due - now),
                (Some(_), Some(target)) => {
                    self.staff(&worker, target);
                    // Busy lanes take what is due as they finish; look again soon for what falls
                    // due after it (a retry's due time is known only once it is next).
                    RECHECK
                }
                _ => Duration::from_secs(3600),
            };
            tokio::select! {
                _ = worker.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
                _ = self.stop.cancelled() => return,
            }
        }
    }

    /// Something is due: an idle lane takes it, or a new lane if there is none and the target's
    /// concurrency allows.
    fn staff(self: &Arc<Self>, worker: &Arc<Worker>, target: &Target) {
        if worker.idle.load(Ordering::SeqCst) > 0 {
            worker.lane_wake.notify_one();
            return;
        }
        let mut lanes = worker.lanes.load(Ordering::Acquire);
        loop {
            if lanes >= target.concurrency {
                return;
            }
            match worker.lanes.compare_exchange(
                lanes,
                lanes + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(now) => lanes = now,
            }
        }
        let this = self.clone();
        let worker = worker.clone();
        self.attempts.spawn_on(
            async move { this.lane(&worker).await },
            self.runtime.handle(),
        );
    }

    /// One lane: attempts one delivery at a time on its own kept-alive connection, taking the
    /// next due one as it finishes, and waits while there is none. It ends once idle for a minute
    /// (5 s if it holds no connection), when the target is gone or a reload left it fewer slots
    /// than lanes, and at shutdown.
    async fn lane(self: &Arc<Self>, worker: &Arc<Worker>) {
        let mut lane = client::Lane::new(self.connector.clone());
        let mut meters = LaneMeters::new(&worker.name);
        loop {
            if self.stop.is_cancelled() {
                break;
            }
            let Some(target) = self.rules.load().target(&worker.name).cloned() else {
                break;
            };
            // A reload lowered the concurrency: lanes beyond it end.
            if worker
                .lanes
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n > target.concurrency).then(|| n - 1)
                })
                .is_ok()
            {
                return;
            }
            let paused = worker.paused.load(Ordering::Acquire);
            if !paused {
                if let Some((delivery, more)) = self.spool.take_next(&worker.name, now_ms()) {
                    if more {
                        self.staff(worker, &target);
                    }
                    worker.in_flight.fetch_add(1, Ordering::AcqRel);
                    // Awaited here rather than inside a function of its own: the attempt's
                    // future is then made once, not moved again into another.
                    let started = Instant::now();
                    let prepared = lane.prepare(&target, &delivery, now_ms() / 1000);
                    let outcome = lane.send(prepared, target.timeout).await;
                    meters.duration.record(started.elapsed().as_secs_f64());
                    self.settle(worker, &target, &mut meters, delivery, outcome);
                    worker.in_flight.fetch_sub(1, Ordering::AcqRel);
                    continue;
                }
            }
            // Idle: say so, then look once more, so that work stored meanwhile is either seen
            // here or finds this lane idle and wakes it.
            let notified = worker.lane_wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            worker.idle.fetch_add(1, Ordering::SeqCst);
            let due = !paused
                && self
                    .spool
                    .next_due(&worker.name)
                    .is_some_and(|due| due <= now_ms());
            let idle_for = if lane.is_connected() {
                client::IDLE_TIMEOUT
            } else {
                LANE_IDLE
            };
            let go_on = due
                || tokio::select! {
                    _ = notified => true,
                    // The connection ended (go on without it), or the lane was idle too long.
                    ended = lane.idle(idle_for) => ended,
                    _ = self.stop.cancelled() => false,
                };
            worker.idle.fetch_sub(1, Ordering::SeqCst);
            if !go_on {
                break;
            }
        }
        worker.lanes.fetch_sub(1, Ordering::AcqRel);
    }

    /// The target is gone from the rules: its queued deliveries become dead letters.
    fn fail_removed(&self, worker: &Worker) {
        // In batches, so a large backlog is streamed, not loaded at once.
        loop {
            let batch = self.spool.take_due(&worker.name, u64::MAX, 512);
            if batch.is_empty() {
                return;
            }
            for delivery in batch {
                self.fail(worker, &delivery, "target removed".into(), None);
            }
        }
    }

    /// What an attempt's outcome makes of its delivery: delivered, retried later, or a dead
    /// letter.
    fn settle(
        &self,
        worker: &Worker,
        target: &Target,
        meters: &mut LaneMeters,
        mut delivery: Delivery,
        outcome: Outcome,
    ) {
        delivery.attempts += 1;
        match retry::classify(&outcome, delivery.attempts, &target.retry) {
            Disposition::Delivered => {
                meters
                    .delivered
                    .get(delivery.route.clone(), |route| {
                        counter(route.clone(), delivery.target.clone(), "delivered")
                    })
                    .increment(1);
                worker.delivered.fetch_add(1, Ordering::Relaxed);
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
                *lock(&worker.last_error) = Some((now_ms(), error.clone()));
                delivery.last_error = Some(error);
                let due = now_ms() + after.as_millis() as u64;
                self.spool.retry_at(delivery, due);
                // The scheduler wakes the lanes when it falls due.
                worker.wake.notify_one();
            }
            Disposition::Failed { reason } => {
                self.fail(worker, &delivery, reason, Some(&outcome));
            }
        }
    }

    /// The delivery gives up: it becomes a dead letter with the reason and the last answer.
    fn fail(&self, worker: &Worker, delivery: &Delivery, reason: String, last: Option<&Outcome>) {
        count(delivery, "failed");
        worker.failed.fetch_add(1, Ordering::Relaxed);
        *lock(&worker.last_error) = Some((now_ms(), reason.clone()));
        tracing::error!(
            delivery_id = %delivery.id, event_id = %delivery.event_id, route = %delivery.route,
            target = %delivery.target, attempts = delivery.attempts, reason = %reason,
            "delivery failed; kept as a dead letter"
        );
        let (status, answer) = match last {
            Some(Outcome::Answered {
                status, body_head, ..
            }) => (Some(*status), body_head.clone()),
            _ => (None, Bytes::new()),
        };
        let letter = DeadLetter::of_delivery(delivery, reason, status, answer, now_ms());
        self.spool.bury(delivery, letter);
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
                lanes = self.attempts.len(),
                "shutdown grace period over with attempts still in flight"
            );
        }
        if let Err(e) = self.spool.flush().await {
            tracing::error!(error = %e, "could not store the last delivery states; those deliveries will be attempted again");
        }
        let left: u64 = self
            .target_names()
            .iter()
            .map(|t| self.spool.stats(t).queued)
            .sum();
        if left > 0 {
            tracing::info!(queued = left, "deliveries left queued for the next start");
        }
    }
}

fn count(delivery: &Delivery, outcome: &'static str) {
    counter(delivery.route.clone(), delivery.target.clone(), outcome).increment(1);
}

fn counter(route: Arc<str>, target: Arc<str>, outcome: &'static str) -> metrics::Counter {
    metrics::counter!(m::DELIVERIES, "route" => route, "target" => target, "outcome" => outcome)
}

/// The series a lane records on every attempt, kept by the lane (`m::Kept`): its target's
/// attempt durations and, by route, its deliveries made. Retries and failures, rarer, are counted
/// through the registry.
struct LaneMeters {
    duration: metrics::Histogram,
    delivered: m::Kept<Arc<str>, metrics::Counter>,
}

impl LaneMeters {
    fn new(target: &Arc<str>) -> LaneMeters {
        LaneMeters {
            duration: metrics::histogram!(m::DELIVERY_DURATION, "target" => target.clone()),
            delivered: m::Kept::new(),
        }
    }
}

/// Drops dead letters older than `retention`: at start, then every tenth of the retention (at
/// least a second, at most ten minutes apart), so none outlives its retention by much.
pub async fn expire_dead_letters(
    spool: Arc<dyn Spool>,
    retention: Duration,
    stop: CancellationToken,
) {
    let every = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(600));
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let before = now_ms().saturating_sub(retention.as_millis() as u64);
        match spool.purge_dead(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(dropped = n, "dead letters past their retention dropped"),
            Err(e) => tracing::warn!(error = %e, "cannot drop expired dead letters"),
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    /// The calling thread's scheduling policy and nice value.
    fn scheduling() -> (libc::c_int, libc::c_int) {
        // SAFETY: neither call touches memory; 0 is the calling thread.
        unsafe {
            (
                libc::sched_getscheduler(0),
                libc::getpriority(libc::PRIO_PROCESS, 0),
            )
        }
    }

    #[test]
    fn delivery_threads_run_as_batch_work_at_the_same_nice_value() {
        let (_, nice) = scheduling();
        let runtime = super::DeliveryRuntime::start(1).unwrap();
        let on_worker = runtime
            .handle()
            .block_on(runtime.handle().spawn(async { scheduling() }))
            .unwrap();
        assert_eq!(on_worker, (libc::SCHED_BATCH, nice));
        drop(runtime);
    }
}
