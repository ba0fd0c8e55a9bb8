//! Hot reload: watch the rules directory, debounce, load, validate, swap the whole rule set.
//!
//! The directory is watched (not single files), recursively, so an in-place write, an editor's
//! write-to-temp-then-rename, and a Kubernetes ConfigMap `..data` symlink swap are all seen.
//! A cheap stat poll backs the watcher up: if the watcher dies or cannot be created (inotify
//! limits, the directory replaced), changes are still picked up within a few seconds. SIGHUP
//! forces a reload. A failed load leaves the running rules in place and records its errors.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;
use crate::rules::{self, LoadErrors, RuleSet};
use crate::script::ScriptEngine;

/// Quiet time after the last file event before loading.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// Interval of the stat poll that backs the watcher up.
const POLL: Duration = Duration::from_secs(2);

/// Why a reload was asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// A file change: skipped when the files' contents did not change.
    Change,
    /// SIGHUP or an explicit request: always swaps in a fresh load.
    Force,
}

/// What a reload did.
#[derive(Debug)]
pub enum Outcome {
    Unchanged,
    Reloaded { generation: u64 },
    Failed(LoadErrors),
}

/// The last failed reload, for `/admin/rules`.
#[derive(Clone, Debug)]
pub struct Failure {
    pub at: SystemTime,
    pub errors: Vec<String>,
}

/// Reload history visible in the admin API.
#[derive(Clone, Debug, Default)]
pub struct Status {
    pub last_attempt_at: Option<SystemTime>,
    /// Set while the newest attempt failed; cleared by a successful reload.
    pub last_error: Option<Failure>,
}

pub struct Reloader {
    dir: PathBuf,
    engine: Arc<ScriptEngine>,
    rules: Arc<ArcSwap<RuleSet>>,
    status: Mutex<Status>,
    on_swap: Box<dyn Fn() + Send + Sync>,
}

impl Reloader {
    pub fn new(
        dir: PathBuf,
        engine: Arc<ScriptEngine>,
        rules: Arc<ArcSwap<RuleSet>>,
        on_swap: Box<dyn Fn() + Send + Sync>,
    ) -> Arc<Reloader> {
        metrics::gauge!(m::RULES_GENERATION).set(rules.load().generation as f64);
        Arc::new(Reloader {
            dir,
            engine,
            rules,
            status: Mutex::new(Status::default()),
            on_swap,
        })
    }

    pub fn status(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Loads the directory and, if it is valid (and changed, for `Trigger::Change`), swaps it in.
    pub async fn reload(self: &Arc<Self>, trigger: Trigger) -> Outcome {
        let this = self.clone();
        let loaded = tokio::task::spawn_blocking(move || rules::load(&this.dir, &this.engine))
            .await
            .unwrap_or_else(|e| {
                Err(LoadErrors(vec![rules::LoadError {
                    file: self.dir.display().to_string(),
                    line: 0,
                    col: 0,
                    message: format!("the load crashed: {e}"),
                }]))
            });
        let now = SystemTime::now();
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.last_attempt_at = Some(now);
        match loaded {
            Ok(mut new) => {
                let current = self.rules.load();
                if trigger == Trigger::Change && new.fingerprint == current.fingerprint {
                    status.last_error = None;
                    return Outcome::Unchanged;
                }
                new.generation = current.generation + 1;
                let generation = new.generation;
                self.rules.store(Arc::new(new));
                status.last_error = None;
                drop(status);
                (self.on_swap)();
                metrics::gauge!(m::RULES_GENERATION).set(generation as f64);
                metrics::counter!(m::RULES_RELOADS, "outcome" => "ok").increment(1);
                tracing::info!(generation, ?trigger, "rules reloaded");
                Outcome::Reloaded { generation }
            }
            Err(errors) => {
                metrics::counter!(m::RULES_RELOADS, "outcome" => "error").increment(1);
                tracing::error!(
                    errors = errors.0.len(),
                    generation = self.rules.load().generation,
                    "rules reload failed; the running rules stay in place"
                );
                for e in &errors.0 {
                    tracing::error!("{e}");
                }
                status.last_error = Some(Failure {
                    at: now,
                    errors: errors.0.iter().map(ToString::to_string).collect(),
                });
                Outcome::Failed(errors)
            }
        }
    }

    /// Watches the directory and SIGHUP until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let changed = Arc::new(Notify::new());
        let mut watcher = start_watcher(&self.dir, &changed);
        let mut hup = hangup_signal();
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen = stat_fingerprint(&self.dir);
        loop {
            let trigger = tokio::select! {
                _ = changed.notified() => Trigger::Change,
                _ = recv_hup(&mut hup) => Trigger::Force,
                _ = poll.tick() => {
                    if watcher.is_none() {
                        watcher = start_watcher(&self.dir, &changed);
                    }
                    let now = stat_fingerprint(&self.dir);
                    if now == seen {
                        continue;
                    }
                    Trigger::Change
                }
                _ = stop.cancelled() => return,
            };
            if trigger == Trigger::Change {
                // Let a burst of events (an editor's save, a ConfigMap swap) settle.
                while tokio::time::timeout(DEBOUNCE, changed.notified())
                    .await
                    .is_ok()
                {}
            }
            seen = stat_fingerprint(&self.dir);
            self.reload(trigger).await;
        }
    }
}

fn start_watcher(dir: &Path, changed: &Arc<Notify>) -> Option<notify::RecommendedWatcher> {
    let notify = changed.clone();
    let handler = move |event: notify::Result<notify::Event>| match event {
        Ok(e) if e.kind.is_access() => {}
        Ok(_) => notify.notify_one(),
        Err(e) => {
            tracing::warn!(error = %e, "rules watcher error; relying on polling");
            notify.notify_one();
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot create the rules watcher; polling every 2s");
            return None;
        }
    };
    match watcher.watch(dir, RecursiveMode::Recursive) {
        Ok(()) => Some(watcher),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the rules directory; polling every 2s");
            None
        }
    }
}

/// Names, sizes and modification times of everything under `dir` (symlinks followed), hashed.
fn stat_fingerprint(dir: &Path) -> u64 {
    fn walk(dir: &Path, depth: u32, h: &mut DefaultHasher) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        entries.sort();
        for path in entries {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            path.hash(h);
            meta.len().hash(h);
            meta.modified().ok().hash(h);
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if meta.is_dir() && !hidden && depth < 4 {
                walk(&path, depth + 1, h);
            }
        }
    }
    let mut h = DefaultHasher::new();
    walk(dir, 0, &mut h);
    h.finish()
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

#[cfg(unix)]
fn hangup_signal() -> Hangup {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}
#[cfg(not(unix))]
fn hangup_signal() -> Hangup {
    None
}

#[cfg(unix)]
async fn recv_hup(hup: &mut Hangup) {
    match hup {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}
#[cfg(not(unix))]
async fn recv_hup(_: &mut Hangup) {
    std::future::pending().await
}
