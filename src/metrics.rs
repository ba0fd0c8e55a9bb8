//! Metric names (the contract of SPEC §7) and the Prometheus recorder.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock, RwLock};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const CALLBACKS: &str = "switchyard_callbacks_total";
pub const ACK_DURATION: &str = "switchyard_ack_duration_seconds";
pub const DELIVERIES: &str = "switchyard_deliveries_total";
pub const DELIVERY_DURATION: &str = "switchyard_delivery_duration_seconds";
pub const QUEUE_DEPTH: &str = "switchyard_queue_depth";
pub const QUEUE_OLDEST: &str = "switchyard_queue_oldest_seconds";
pub const DEAD_LETTERS: &str = "switchyard_dead_letters";
pub const RULES_GENERATION: &str = "switchyard_rules_generation";
pub const RULES_RELOADS: &str = "switchyard_rules_reloads_total";
pub const SCRIPT_ERRORS: &str = "switchyard_script_errors_total";
pub const SPOOL_COMMITS: &str = "switchyard_spool_commits_total";
pub const SPOOL_COMMIT_DURATION: &str = "switchyard_spool_commit_duration_seconds";
pub const SPOOL_COMMIT_OPS: &str = "switchyard_spool_commit_ops_total";
pub const SPOOL_CHECKPOINTS: &str = "switchyard_spool_checkpoints_total";

/// Metric handles kept by whoever records the same few series over and over (a delivery lane,
/// an ingress thread), found by their label values. The `counter!`/`histogram!` macros build,
/// hash and drop a key and look it up in the registry on every call (about 0.2 µs; a callback
/// fanned out to three targets made eight such calls); a kept handle is an atomic add. Labels are
/// shared strings, so most comparisons end at the pointer. At most `KEPT` series are kept: past
/// that (label values renamed by many reloads) the cache starts over.
pub struct Kept<K, H> {
    entries: Vec<(K, H)>,
}

const KEPT: usize = 64;

impl<K: PartialEq, H> Default for Kept<K, H> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: PartialEq, H> Kept<K, H> {
    pub fn new() -> Self {
        Kept {
            entries: Vec::new(),
        }
    }

    /// The handle of `key`, made by `make` the first time.
    pub fn get(&mut self, key: K, make: impl FnOnce(&K) -> H) -> &H {
        let found = self.entries.iter().position(|(k, _)| *k == key);
        let at = match found {
            Some(at) => at,
            None => {
                if self.entries.len() >= KEPT {
                    self.entries.clear();
                }
                let handle = make(&key);
                self.entries.push((key, handle));
                self.entries.len() - 1
            }
        };
        &self.entries[at].1
    }
}

/// How often the histograms take in the samples recorded since the last time.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Until `stop`, every `UPKEEP_EVERY`: the samples the histograms recorded since the last time
/// are counted into their buckets and dropped. Without it they are kept until `/metrics` is
/// scraped — about four per callback, so under load a gateway that nobody scrapes, or scrapes
/// once a minute, grew by megabytes every second.
pub async fn upkeep(handle: PrometheusHandle, stop: tokio_util::sync::CancellationToken) {
    every(UPKEEP_EVERY, stop, || handle.run_upkeep()).await
}

/// Calls `f` every `period` until `stop`.
async fn every(
    period: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
    mut f: impl FnMut(),
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => f(),
            _ = stop.cancelled() => return,
        }
    }
}

/// Installs the process-wide recorder once and returns its handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(ACK_DURATION.to_string()),
                    &[
                        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                        0.25, 0.5, 1.0,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(DELIVERY_DURATION.to_string()),
                        &[
                            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                            10.0, 30.0,
                        ],
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(SPOOL_COMMIT_DURATION.to_string()),
                        &[
                            0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0,
                        ],
                    )
                })
                .expect("bucket lists are non-empty");
            let handle = builder
                .install_recorder()
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder().handle());
            describe();
            handle
        })
        .clone()
}

fn describe() {
    metrics::describe_counter!(CALLBACKS, "Callbacks received, by outcome");
    metrics::describe_histogram!(ACK_DURATION, "Time from request to acknowledgement");
    metrics::describe_counter!(DELIVERIES, "Delivery attempts, by outcome");
    metrics::describe_histogram!(DELIVERY_DURATION, "Duration of one delivery attempt");
    metrics::describe_gauge!(QUEUE_DEPTH, "Deliveries queued or in flight");
    metrics::describe_gauge!(QUEUE_OLDEST, "Age of the oldest queued delivery");
    metrics::describe_gauge!(
        DEAD_LETTERS,
        "Dead letters kept, by target (\"\" for callbacks a route's script failed on)"
    );
    metrics::describe_gauge!(RULES_GENERATION, "Generation of the running rule set");
    metrics::describe_counter!(RULES_RELOADS, "Rule reloads, by outcome");
    metrics::describe_counter!(SCRIPT_ERRORS, "Filter and transform runtime errors");
    metrics::describe_counter!(
        SPOOL_COMMITS,
        "Spool transactions, by outcome (each one fsync of the write-ahead log, or a checkpoint)"
    );
    metrics::describe_histogram!(
        SPOOL_COMMIT_DURATION,
        "Time to write one spool transaction: its write-ahead log record, or a checkpoint"
    );
    metrics::describe_counter!(
        SPOOL_CHECKPOINTS,
        "Durable commits of the spool's database, after which its write-ahead log goes on in its other file"
    );
    metrics::describe_counter!(
        SPOOL_COMMIT_OPS,
        "Operations carried by spool transactions: stored callbacks and settled deliveries"
    );
}

/// Most distinct command labels kept; beyond it commands are counted as "other", so a sender
/// inventing commands cannot grow the metrics without bound.
const MAX_COMMAND_LABELS: usize = 1000;

/// The `command` label for a command: itself when it looks like a command name and the label
/// budget allows, else "other" ("" stays "").
/// Labels already in use are shared, not copied, on every callback.
pub fn command_label(command: &str) -> Arc<str> {
    static SEEN: OnceLock<RwLock<HashSet<Arc<str>>>> = OnceLock::new();
    static OTHER: OnceLock<Arc<str>> = OnceLock::new();
    let other = || OTHER.get_or_init(|| "other".into()).clone();
    let plausible = command.len() <= 100
        && command
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'/'));
    if !plausible {
        return other();
    }
    let seen = SEEN.get_or_init(|| RwLock::new(HashSet::new()));
    if let Some(label) = seen.read().unwrap_or_else(|e| e.into_inner()).get(command) {
        return label.clone();
    }
    let mut seen = seen.write().unwrap_or_else(|e| e.into_inner());
    if let Some(label) = seen.get(command) {
        return label.clone();
    }
    if seen.len() >= MAX_COMMAND_LABELS {
        return other();
    }
    let label: Arc<str> = command.into();
    seen.insert(label.clone());
    label
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_label_is_the_command_shared_or_other() {
        let first = command_label("Group.CallbackAfterGroupInfoChanged");
        assert_eq!(&*first, "Group.CallbackAfterGroupInfoChanged");
        let again = command_label("Group.CallbackAfterGroupInfoChanged");
        assert!(
            Arc::ptr_eq(&first, &again),
            "a known label is shared, not copied"
        );
        assert_eq!(&*command_label("a command with spaces"), "other");
        assert_eq!(&*command_label(&"x".repeat(101)), "other");
        assert_eq!(&*command_label(""), "");
    }

    #[tokio::test]
    async fn upkeep_runs_every_period_until_stopped() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let calls = Arc::new(AtomicUsize::new(0));
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn({
            let (calls, stop) = (calls.clone(), stop.clone());
            async move {
                every(std::time::Duration::from_millis(20), stop, || {
                    calls.fetch_add(1, Ordering::SeqCst);
                })
                .await
            }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while calls.load(Ordering::SeqCst) < 3 {
            assert!(std::time::Instant::now() < deadline, "upkeep did not run");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        stop.cancel();
        task.await.unwrap();
        let after = calls.load(Ordering::SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(60)).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            after,
            "upkeep ran after the stop"
        );
    }

    #[test]
    fn a_kept_handle_is_made_once_per_key_and_the_cache_starts_over_when_full() {
        let mut kept: Kept<Arc<str>, usize> = Kept::new();
        let mut made = 0;
        let mut get = |kept: &mut Kept<Arc<str>, usize>, key: &str| {
            *kept.get(key.into(), |_| {
                made += 1;
                made
            })
        };
        assert_eq!(get(&mut kept, "a"), 1);
        assert_eq!(get(&mut kept, "b"), 2);
        // Equal text, another allocation: the same series.
        assert_eq!(get(&mut kept, "a"), 1);
        for i in 0..KEPT {
            get(&mut kept, &format!("k{i}"));
        }
        assert!(kept.entries.len() <= KEPT);
        // "a" was dropped when the cache filled up: made again, and kept again.
        let again = get(&mut kept, "a");
        assert!(again > 2, "{again}");
        assert_eq!(get(&mut kept, "a"), again);
    }
}
