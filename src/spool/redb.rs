//! The durable spool: redb in `--data-dir`, written by one thread that commits in groups.
//!
//! Every change goes through the writer thread. It takes whatever has queued up while the last
//! commit was on its way to the disk and writes all of it in one transaction with one fsync, so
//! the cost of durability is shared by every callback that arrived meanwhile (group commit).
//! An enqueue resolves only after its commit returned, so the ingress acknowledges nothing that
//! is not on disk. A commit is a record of the write-ahead log (`spool.wal`, `spool.wal.1`); redb
//! itself is written durably about once a second (a checkpoint), and a group that only stores and
//! completes deliveries is not written to redb at all until then (see `Held`), so that a delivery
//! stored and completed in between never costs redb any work — nor one still on its way at the
//! checkpoint, which carries it over in the log.
//!
//! Tables: `pending` ((target, due, id) → record) — the schedule with the records, scanned in due
//! order per target, `age` (target, id) of the deliveries whose due time is not their creation
//! time (retried or replayed) — ids are UUIDv7, so its first one is the oldest of those, and the
//! first of `pending` the oldest of the others — and `dead` (id → dead letter). Deliveries handed to a scheduler are "in flight" only in memory:
//! after a crash they are simply due again (at-least-once, same `webhook-id`).

use std::collections::{BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use ::redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, TableHandle,
    WriteTransaction,
};
// Keys are target names from the rules and the gateway's own ids: no hash flooding to guard.
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use tokio::sync::oneshot;

use super::codec;
use super::wal::{self, Entry, Wal};
use super::{Batch, BoxFuture, DeadLetter, DeadQuery, Spool, SpoolError, TargetStats, Waker};
use crate::delivery::Delivery;
use crate::metrics as m;

/// The schedule and the records: (target, due, id) → the delivery.
const PENDING: TableDefinition<(&str, u64, u128), &[u8]> = TableDefinition::new("pending");
/// Before `pending`, files kept the records in `deliveries` and the schedule in `queue`; they are
/// moved into `pending` when such a file is opened.
const OLD_DELIVERIES: TableDefinition<u128, &[u8]> = TableDefinition::new("deliveries");
const OLD_QUEUE: TableDefinition<(&str, u64, u128), ()> = TableDefinition::new("queue");
const AGE: TableDefinition<(&str, u128), ()> = TableDefinition::new("age");
const DEAD: TableDefinition<u128, &[u8]> = TableDefinition::new("dead");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const USED_BYTES: &str = "used_bytes";
/// The last generation of the write-ahead log whose changes redb holds durably.
const WAL_GENERATION: &str = "wal_generation";
/// The write-ahead log's two files, beside `spool.redb`.
const WAL_FILES: [&str; 2] = ["spool.wal", "spool.wal.1"];

/// Room for records in each of the write-ahead log's two files; when the current one is full the
/// next group is a checkpoint.
#[cfg(not(test))]
const WAL_BYTES: u64 = 64 << 20;
/// Smaller in unit tests, whose crash images copy the files while the writer runs.
#[cfg(test)]
const WAL_BYTES: u64 = 8 << 20;
/// Most bytes of delivery records held in memory beside the log and not in redb (see [`Held`]): a
/// group that would hold more is a checkpoint, which writes them to redb. Deliveries pile up so
/// only while a target falls behind; a checkpoint that writes more would keep the answers that
/// wait for it waiting longer.
const HELD_MAX: usize = 1 << 20;
/// Most bytes of delivery records a checkpoint carries over into the log's next generation
/// instead of writing them to redb (see [`Held::checkpoint`]); at a checkpoint while the targets
/// keep up, the deliveries of the last few milliseconds: up to ~140 KB at 12,000 callbacks/s.
const CARRY_MAX: usize = 512 << 10;
/// How long redb may hold changes that only the write-ahead log makes durable: after this the
/// next group (or, idle, a group of its own) commits redb durably and the log goes on with its
/// next generation.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// How far the spool's byte count may move, up or down, by transactions (the groups written to
/// redb) between checkpoints. Deliveries held while the targets keep up never reach redb and do
/// not count (they are bounded by [`HELD_MAX`]); a backlog in redb that grows (a target down) or
/// drains changes pages that a checkpoint must write, and checkpoints that come often keep each
/// one short, as an acknowledgement may wait for one.
const CHECKPOINT_DRIFT: u64 = 256 << 10;
/// Least time between the starts of two groups: under load a group waits out the rest, so that
/// one transaction and one fsync carry more operations (each costs CPU time as well as the wait
/// for the disk); a callback arriving after a pause does not wait.
const GROUP_GAP: std::time::Duration = std::time::Duration::from_micros(600);

/// Bytes counted per delivery beside its body.
const OVERHEAD: u64 = 256;
/// Most operations written by one commit.
const MAX_GROUP: usize = 8192;
/// How long a group of settlements only waits for more operations before it is written.
const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_millis(2);
/// A commit at least this slow is logged: every acknowledgement waiting for it waited that long.
const SLOW_COMMIT: std::time::Duration = std::time::Duration::from_millis(250);
/// Slow commits are logged at most this often; a line counts the slow commits since the last.
const SLOW_COMMIT_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// Page cache of the database; the rest stays on disk (a large backlog does not grow memory).
/// 8 MiB holds the hot pages of the schedule (measured: a larger cache drains no faster).
const CACHE_BYTES: usize = 8 << 20;
/// Most deliveries per target kept in memory for the scheduler beside their stored copy.
const FRESH_MAX: usize = 4096;
/// Scans from a target's cursor before its schedule is scanned from the start again.
const CURSOR_RESCAN: u32 = 16;
/// Deliveries a scan reads beyond those asked for, kept for the next takes.
const READ_AHEAD: usize = 256;

/// Where the next scan of a target's schedule starts: after the last delivery taken.
#[derive(Clone, Copy)]
struct Cursor {
    after: (u64, u128),
    uses: u32,
}

type Reply<T> = oneshot::Sender<Result<T, SpoolError>>;

enum Op {
    Enqueue(Batch, Reply<()>),
    Complete(Key),
    Retry { delivery: Delivery, old_due: u64 },
    Bury(Key, DeadLetter),
    Revive(u128, Vec<Delivery>, Reply<bool>),
    Rebury(DeadLetter, Reply<()>),
    DropDead(Vec<u128>, Reply<usize>),
    Flush(Reply<()>),
}

/// Where a queued delivery is stored.
#[derive(Clone)]
struct Key {
    target: Arc<str>,
    due: u64,
    id: u128,
    cost: u64,
    /// Also in `age`.
    aged: bool,
}

impl Key {
    fn of(d: &Delivery) -> Key {
        Key {
            target: d.target.clone(),
            due: d.due_at,
            id: id_of(&d.id),
            cost: cost(d),
            aged: in_age(d),
        }
    }
}

/// Whether `age` lists the delivery: a delivery due when it was created is found as the oldest
/// by its place in `pending` (due order is creation order for those), the others are listed.
fn in_age(d: &Delivery) -> bool {
    d.due_at != d.created_at
}

fn cost(d: &Delivery) -> u64 {
    d.body.len() as u64 + OVERHEAD
}

/// Delivery and dead-letter ids are UUIDs; anything else maps to 0 (never produced by us).
fn id_of(text: &str) -> u128 {
    uuid::Uuid::parse_str(text)
        .map(|u| u.as_u128())
        .unwrap_or(0)
}

fn storage(e: impl std::fmt::Display) -> SpoolError {
    SpoolError::Storage(e.to_string())
}

/// State shared by the writer thread and the readers.
struct Shared {
    /// Ids handed to a scheduler and not yet settled, per target. Lock it *before* starting a
    /// read transaction: the writer clears ids only after their commit, under this lock, so a
    /// reader never sees a settled delivery as takeable.
    in_flight: Mutex<HashMap<Arc<str>, HashSet<u128>>>,
    /// Ids of delivery records this build cannot decode (damaged, or from a newer version):
    /// left on disk untouched and skipped until the next start. Without it the record stayed
    /// "due", and the scheduler went round every millisecond failing to take it. Locked only
    /// while `in_flight` is held.
    unreadable: Mutex<HashSet<u128>>,
    /// Entries of `queue` per target (in flight and unreadable included).
    queued: Mutex<HashMap<Arc<str>, u64>>,
    /// Per target, stored deliveries that are neither in flight nor taken, in due order, so
    /// `take_due` can hand them out without reading the spool: either *every* such delivery of
    /// the target (`queued == in flight + fresh`, kept so as new ones are stored), or the window
    /// that the last scan read ahead (the earliest due; new ones are not added). Locked after
    /// `in_flight`, `cursors` and `queued`.
    fresh: Mutex<HashMap<Arc<str>, VecDeque<Delivery>>>,
    /// Per target, where `take_due`'s next scan starts; locked after `in_flight`.
    cursors: Mutex<HashMap<Arc<str>, Cursor>>,
    dead: Mutex<HashMap<String, u64>>,
    /// Per target, the ids of the deliveries that only the write-ahead log holds (see [`Held`]),
    /// for the oldest in `stats`. Written by the writer alone.
    held_ids: Mutex<HashMap<Arc<str>, BTreeSet<u128>>>,
    used: AtomicU64,
    limit: u64,
    waker: Mutex<Option<Waker>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Durable spool on redb.
pub struct RedbSpool {
    db: Arc<Database>,
    tx: Mutex<Option<mpsc::Sender<Op>>>,
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
    pub path: PathBuf,
}

impl RedbSpool {
    /// Opens (or creates) `dir/spool.redb`. Fails if another process has it open.
    pub fn open(dir: &Path, limit_bytes: u64) -> Result<RedbSpool, SpoolError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| storage(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("spool.redb");
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| storage(format!("cannot open {}: {e}", path.display())))?;
        let wal_paths = WAL_FILES.map(|name| dir.join(name));
        let mut wal = Wal::open([&wal_paths[0], &wal_paths[1]], WAL_BYTES)
            .map_err(|e| storage(format!("cannot open the spool's log: {e}")))?;
        let txn = db.begin_write().map_err(storage)?;
        migrate(&txn)?;
        let used = {
            let mut tables = Tables::open(&txn, false)?;
            let mut meta = txn.open_table(META).map_err(storage)?;
            let mut used = meta.get(USED_BYTES).map_err(storage)?.map(|v| v.value());
            let checkpointed = meta
                .get(WAL_GENERATION)
                .map_err(storage)?
                .map_or(0, |v| v.value());
            let replayed = wal
                .replay(checkpointed + 1, |payload| {
                    replay_record(&mut tables, payload, &mut used)
                })
                .map_err(|e| storage(format!("cannot read the spool's log: {e}")))?
                .map_err(|e| {
                    storage(format!(
                        "the spool's log, generation {}: {e}",
                        checkpointed + 1
                    ))
                })?;
            if replayed > 0 {
                meta.insert(USED_BYTES, used.unwrap_or(0))
                    .map_err(storage)?;
                tracing::info!(
                    records = replayed,
                    "spool changes since the last checkpoint restored from the write-ahead log"
                );
            }
            // The log's changes are now redb's, durably with this commit, and the log goes on
            // with the generation after — even when nothing was replayed: a record the last run
            // wrote but never fsync'd may lie behind a torn one, and must never be read as one of
            // the records written from now on.
            meta.insert(WAL_GENERATION, checkpointed + 1)
                .map_err(storage)?;
            wal.restart(checkpointed + 2);
            used.unwrap_or(0)
        };
        txn.commit().map_err(storage)?;

        let (queued, dead) = count_entries(&db)?;
        let shared = Arc::new(Shared {
            in_flight: Mutex::new(HashMap::default()),
            unreadable: Mutex::new(HashSet::default()),
            queued: Mutex::new(queued),
            fresh: Mutex::new(HashMap::default()),
            cursors: Mutex::new(HashMap::default()),
            dead: Mutex::new(dead),
            held_ids: Mutex::new(HashMap::default()),
            used: AtomicU64::new(used),
            limit: limit_bytes,
            waker: Mutex::new(None),
        });
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel();
        let writer = {
            let db = db.clone();
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("spool-writer".into())
                .spawn(move || {
                    crate::sched::prompt();
                    write_loop(&db, &shared, &rx, wal)
                })
                .map_err(storage)?
        };
        Ok(RedbSpool {
            db,
            tx: Mutex::new(Some(tx)),
            shared,
            writer: Mutex::new(Some(writer)),
            path,
        })
    }

    fn send(&self, op: Op) -> Result<(), SpoolError> {
        match &*lock(&self.tx) {
            Some(tx) => tx.send(op).map_err(|_| SpoolError::Closed),
            None => Err(SpoolError::Closed),
        }
    }

    /// Sends an operation that answers, and waits for its commit.
    fn call<T: Send + 'static>(
        &self,
        make: impl FnOnce(Reply<T>) -> Op,
    ) -> BoxFuture<'_, Result<T, SpoolError>> {
        let (reply, answer) = oneshot::channel();
        let sent = self.send(make(reply));
        Box::pin(async move {
            sent?;
            answer.await.unwrap_or(Err(SpoolError::Closed))
        })
    }

    /// An operation that needs no answer; a failure to send means the writer is gone, and the
    /// delivery stays as stored (it will be attempted again after a restart).
    fn tell(&self, op: Op) {
        if self.send(op).is_err() {
            tracing::error!("the spool writer has stopped; a delivery's new state was not stored");
        }
    }

    /// Stops the writer after it has written everything sent so far.
    pub fn close(&self) {
        lock(&self.tx).take();
        if let Some(writer) = lock(&self.writer).take() {
            let _ = writer.join();
        }
    }

    pub fn used_bytes(&self) -> u64 {
        self.shared.used.load(Ordering::Relaxed)
    }
}

impl Drop for RedbSpool {
    fn drop(&mut self) {
        self.close();
    }
}

/// Moves the records of a file written before `pending` existed into it.
fn migrate(txn: &WriteTransaction) -> Result<(), SpoolError> {
    let names: Vec<String> = txn
        .list_tables()
        .map_err(storage)?
        .map(|t| t.name().to_string())
        .collect();
    if !names.iter().any(|n| n == OLD_QUEUE.name()) {
        return Ok(());
    }
    let mut moved = 0u64;
    {
        let queue = txn.open_table(OLD_QUEUE).map_err(storage)?;
        let records = txn.open_table(OLD_DELIVERIES).map_err(storage)?;
        let mut pending = txn.open_table(PENDING).map_err(storage)?;
        let mut age = txn.open_table(AGE).map_err(storage)?;
        for entry in queue.iter().map_err(storage)? {
            let (key, _) = entry.map_err(storage)?;
            let (target, due, id) = key.value();
            if let Some(record) = records.get(id).map_err(storage)? {
                pending
                    .insert((target, due, id), record.value())
                    .map_err(storage)?;
                // `age` lists only deliveries not due at their creation now.
                if codec::decode_delivery(record.value()).is_ok_and(|d| !in_age(&d)) {
                    age.remove((target, id)).map_err(storage)?;
                }
                moved += 1;
            }
        }
    }
    txn.delete_table(OLD_QUEUE).map_err(storage)?;
    txn.delete_table(OLD_DELIVERIES).map_err(storage)?;
    tracing::info!(
        deliveries = moved,
        "spool file upgraded to the current layout"
    );
    Ok(())
}

/// Queued entries per target, and dead letters per target label.
type Counts = (HashMap<Arc<str>, u64>, HashMap<String, u64>);

fn count_entries(db: &Database) -> Result<Counts, SpoolError> {
    let txn = db.begin_read().map_err(storage)?;
    let mut queued: HashMap<Arc<str>, u64> = HashMap::default();
    let queue = txn.open_table(PENDING).map_err(storage)?;
    let mut last: Option<Arc<str>> = None;
    for entry in queue.iter().map_err(storage)? {
        let (key, _) = entry.map_err(storage)?;
        let target = key.value().0;
        let name = match &last {
            Some(l) if &**l == target => l.clone(),
            _ => {
                let n: Arc<str> = target.into();
                last = Some(n.clone());
                n
            }
        };
        *queued.entry(name).or_default() += 1;
    }
    let mut dead: HashMap<String, u64> = HashMap::default();
    let table = txn.open_table(DEAD).map_err(storage)?;
    for entry in table.iter().map_err(storage)? {
        let (_, value) = entry.map_err(storage)?;
        let target = codec::dead_target(value.value()).unwrap_or_default();
        *dead.entry(target).or_default() += 1;
    }
    Ok((queued, dead))
}

/// The tables of one write transaction, opened once per group. Every change goes through it, so
/// that what the transaction changed can be written to the log as well.
struct Tables<'t> {
    pending: ::redb::Table<'t, (&'static str, u64, u128), &'static [u8]>,
    age: ::redb::Table<'t, (&'static str, u128), ()>,
    dead: ::redb::Table<'t, u128, &'static [u8]>,
    /// The changes made, for the write-ahead log; `None` where the commit is durable itself.
    log: Option<wal::Entries>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction, logged: bool) -> Result<Tables<'t>, SpoolError> {
        Ok(Tables {
            pending: txn.open_table(PENDING).map_err(storage)?,
            age: txn.open_table(AGE).map_err(storage)?,
            dead: txn.open_table(DEAD).map_err(storage)?,
            log: logged.then(wal::Entries::default),
        })
    }

    fn note(&mut self, entry: Entry<'_>) {
        if let Some(log) = &mut self.log {
            log.push(&entry);
        }
    }

    fn pending_insert(
        &mut self,
        target: &str,
        due: u64,
        id: u128,
        value: &[u8],
    ) -> Result<(), SpoolError> {
        self.pending
            .insert((target, due, id), value)
            .map_err(storage)?;
        self.note(Entry::PendingInsert {
            target,
            due,
            id,
            value,
        });
        Ok(())
    }

    /// Whether there was such an entry.
    fn pending_remove(&mut self, target: &str, due: u64, id: u128) -> Result<bool, SpoolError> {
        let existed = self
            .pending
            .remove((target, due, id))
            .map_err(storage)?
            .is_some();
        self.note(Entry::PendingRemove { target, due, id });
        Ok(existed)
    }

    fn age_insert(&mut self, target: &str, id: u128) -> Result<(), SpoolError> {
        self.age.insert((target, id), ()).map_err(storage)?;
        self.note(Entry::AgeInsert { target, id });
        Ok(())
    }

    fn age_remove(&mut self, target: &str, id: u128) -> Result<(), SpoolError> {
        self.age.remove((target, id)).map_err(storage)?;
        self.note(Entry::AgeRemove { target, id });
        Ok(())
    }

    /// The target label of the dead letter it replaced, if any.
    fn dead_insert(&mut self, id: u128, value: &[u8]) -> Result<Option<String>, SpoolError> {
        let previous = self
            .dead
            .insert(id, value)
            .map_err(storage)?
            .map(|old| codec::dead_target(old.value()).unwrap_or_default());
        self.note(Entry::DeadInsert { id, value });
        Ok(previous)
    }

    /// The target label of the dead letter removed, if there was one.
    fn dead_remove(&mut self, id: u128) -> Result<Option<String>, SpoolError> {
        let removed = self
            .dead
            .remove(id)
            .map_err(storage)?
            .map(|old| codec::dead_target(old.value()).unwrap_or_default());
        self.note(Entry::DeadRemove { id });
        Ok(removed)
    }
}

/// Applies the entries of one record of the write-ahead log; `used` becomes the byte count it
/// ends with, if it has one.
fn replay_record(t: &mut Tables<'_>, payload: &[u8], used: &mut Option<u64>) -> Result<(), String> {
    for entry in wal::entries(payload) {
        match entry? {
            Entry::PendingInsert {
                target,
                due,
                id,
                value,
            } => t.pending_insert(target, due, id, value),
            Entry::PendingRemove { target, due, id } => t.pending_remove(target, due, id).map(drop),
            Entry::AgeInsert { target, id } => t.age_insert(target, id),
            Entry::AgeRemove { target, id } => t.age_remove(target, id),
            Entry::DeadInsert { id, value } => t.dead_insert(id, value).map(drop),
            Entry::DeadRemove { id } => t.dead_remove(id).map(drop),
            Entry::Used(n) => {
                *used = Some(n);
                Ok(())
            }
        }
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// What a committed group changes in memory.
#[derive(Default)]
struct Effects {
    queued: HashMap<Arc<str>, i64>,
    dead: HashMap<String, i64>,
    used: i64,
    settled: Vec<(Arc<str>, u128)>,
    /// Deliveries newly stored by `Enqueue`s, for the `fresh` cache.
    stored: Vec<Delivery>,
    /// Targets with deliveries that only the log held and redb now holds too: a scheduler
    /// reading redb finds them now.
    written: HashSet<Arc<str>>,
    /// Ids that leave [`Held`]: written to redb, or completed in a transaction.
    unheld: HashSet<u128>,
    /// Whether everything held was written (a checkpoint).
    all_written: bool,
}

/// Deliveries stored that only the write-ahead log holds, not redb yet.
///
/// A group of operations that only stores deliveries and completes deliveries stored that way —
/// the whole of the work while the targets keep up — is not written to redb at all: it goes to
/// the log, fsync'd, and its deliveries are kept here until a checkpoint writes them to redb. A
/// delivery stored and completed in between — nearly every one — never reaches redb: the
/// completion cancels the held delivery (the log has both, so a replay cancels them too). The
/// checkpoint under load carries the deliveries still on their way over into the log's next
/// generation (see [`Held::checkpoint`]), so that those too are completed in the log; the one
/// after writes any still held. Any other operation is a transaction, and one that concerns a held
/// delivery (a retry, a dead letter) writes that delivery to redb first.
///
/// Deliveries are held only where their target's `fresh` cache holds every delivery queued and
/// has room for them (see [`taken_from_memory`]), so they are taken from memory as before: a
/// scheduler that reads redb would not find a held delivery until a checkpoint wrote it.
#[derive(Default)]
struct Held {
    inserts: HashMap<u128, HeldInsert>,
    /// The records' bytes.
    bytes: usize,
}

struct HeldInsert {
    target: Arc<str>,
    due: u64,
    record: Vec<u8>,
    aged: bool,
    /// Carried over by a checkpoint already: the next one writes it to redb.
    carried: bool,
}

impl HeldInsert {
    fn write(&self, id: u128, t: &mut Tables<'_>) -> Result<(), SpoolError> {
        t.pending
            .insert((&*self.target, self.due, id), self.record.as_slice())
            .map_err(storage)?;
        if self.aged {
            t.age.insert((&*self.target, id), ()).map_err(storage)?;
        }
        Ok(())
    }
}

/// One change a group planned for [`Held`].
enum Change {
    Insert(u128, HeldInsert),
    /// The completion of a held delivery: neither is written to redb.
    Cancel(u128),
}

impl Held {
    /// Whether the delivery stored under `target`, `due` and `id` is held.
    fn holds(&self, target: &str, due: u64, id: u128) -> bool {
        self.inserts
            .get(&id)
            .is_some_and(|h| h.due == due && &*h.target == target)
    }

    /// Keeps the changes of a group that the log now holds.
    fn keep(&mut self, shared: &Shared, changes: Vec<Change>) {
        let mut ids = lock(&shared.held_ids);
        for change in changes {
            match change {
                Change::Insert(id, insert) => {
                    target_entry(&mut ids, &insert.target).insert(id);
                    self.bytes += insert.record.len();
                    self.inserts.insert(id, insert);
                }
                Change::Cancel(id) => {
                    if let Some(h) = self.inserts.remove(&id) {
                        self.bytes -= h.record.len();
                        forget(&mut ids, &h.target, id);
                    }
                }
            }
        }
    }

    /// Lets go of what a committed transaction wrote to redb or completed.
    fn release(&mut self, shared: &Shared, fx: &Effects) {
        let mut ids = lock(&shared.held_ids);
        if fx.all_written {
            self.inserts.clear();
            self.bytes = 0;
            ids.clear();
            return;
        }
        for id in &fx.unheld {
            if let Some(h) = self.inserts.remove(id) {
                self.bytes -= h.record.len();
                forget(&mut ids, &h.target, *id);
            }
        }
    }

    /// Writes the held delivery `id` in `t`, not to the log (which has it).
    fn write(&self, id: u128, t: &mut Tables<'_>, fx: &mut Effects) -> Result<(), SpoolError> {
        let Some(h) = self.inserts.get(&id) else {
            return Ok(());
        };
        if !fx.unheld.insert(id) {
            return Ok(());
        }
        h.write(id, t)?;
        if !fx.written.contains(&h.target) {
            fx.written.insert(h.target.clone());
        }
        Ok(())
    }

    /// Writes every held delivery in `t` that has not left it in this transaction.
    fn write_all(&self, t: &mut Tables<'_>, fx: &mut Effects) -> Result<(), SpoolError> {
        for &id in self.inserts.keys() {
            self.write(id, t, fx)?;
        }
        fx.all_written = true;
        Ok(())
    }

    /// At a checkpoint, which starts the log's next generation: the held deliveries that go on
    /// being held are carried over into that generation's first record (if `may_carry`), the
    /// others written in `t`. Returns that record (ending with the spool's byte count, `used`)
    /// and the ids it carries; `None` when everything was written.
    ///
    /// A checkpoint under load comes while the deliveries of the last few milliseconds are on
    /// their way to the targets. Written to redb, each would be removed again by a transaction
    /// moments later; carried, it is completed in the log like any other held delivery. A
    /// delivery is carried only once — one still held at the next checkpoint (a target that is
    /// slow or paused) is written to redb then — and only while it is in its target's cache or in
    /// flight, so that the scheduler finds it without reading redb. Without `may_carry` (an idle
    /// second, a clean stop, a backlog growing) everything is written, and the log then holds
    /// nothing redb does not.
    fn checkpoint(
        &self,
        shared: &Shared,
        may_carry: bool,
        used: u64,
        t: &mut Tables<'_>,
        fx: &mut Effects,
    ) -> Result<Option<(wal::Entries, Vec<u128>)>, SpoolError> {
        let mut carry: HashSet<u128> = HashSet::default();
        let mut bytes = 0;
        if may_carry {
            let in_flight = lock(&shared.in_flight);
            let queued = lock(&shared.queued);
            let fresh = lock(&shared.fresh);
            let mut complete: HashMap<&str, bool> = HashMap::default();
            for (id, h) in &self.inserts {
                if !h.carried
                    && !fx.unheld.contains(id)
                    && *complete
                        .entry(&h.target)
                        .or_insert_with(|| cache_complete(&in_flight, &queued, &fresh, &h.target))
                {
                    carry.insert(*id);
                    bytes += h.record.len();
                }
            }
        }
        if carry.is_empty() || bytes > CARRY_MAX {
            self.write_all(t, fx)?;
            return Ok(None);
        }
        let mut entries = wal::Entries::default();
        for (&id, h) in &self.inserts {
            if !carry.contains(&id) {
                self.write(id, t, fx)?;
                continue;
            }
            entries.push(&Entry::PendingInsert {
                target: &h.target,
                due: h.due,
                id,
                value: &h.record,
            });
            if h.aged {
                entries.push(&Entry::AgeInsert {
                    target: &h.target,
                    id,
                });
            }
        }
        entries.push(&Entry::Used(used));
        Ok(Some((entries, carry.into_iter().collect())))
    }

    /// Notes that a checkpoint carried `ids` over.
    fn carried(&mut self, ids: &[u128]) {
        for id in ids {
            if let Some(h) = self.inserts.get_mut(id) {
                h.carried = true;
            }
        }
    }
}

/// Takes `id` out of a target's held ids.
fn forget(ids: &mut HashMap<Arc<str>, BTreeSet<u128>>, target: &str, id: u128) {
    if let Some(set) = ids.get_mut(target) {
        set.remove(&id);
        if set.is_empty() {
            ids.remove(target);
        }
    }
}

/// A group that needs no transaction, planned from its operations.
#[derive(Default)]
struct Plan {
    entries: wal::Entries,
    changes: Vec<Change>,
    effects: Effects,
    /// Per `Enqueue`, in order: stored, or why not.
    verdicts: Vec<Result<(), SpoolError>>,
    /// The bytes of the records it holds.
    held: usize,
}

/// Plans a group of operations that only the log need hold (see [`Op::deferrable`]).
fn plan(shared: &Shared, ops: &[Op]) -> Plan {
    let mut p = Plan::default();
    for op in ops {
        match op {
            Op::Enqueue(batch, _) => {
                let held = hold(
                    shared,
                    batch,
                    |e| p.entries.push(&e),
                    &mut p.changes,
                    &mut p.effects,
                );
                p.held += held.as_ref().map_or(0, |n| *n);
                p.verdicts.push(held.map(drop));
            }
            Op::Complete(key) => {
                cancel(|e| p.entries.push(&e), key, &mut p.effects);
                p.changes.push(Change::Cancel(key.id));
            }
            _ => unreachable!("only deferrable operations are planned"),
        }
    }
    let used = (shared.used.load(Ordering::Acquire) as i64 + p.effects.used).max(0) as u64;
    p.entries.push(&Entry::Used(used));
    p
}

/// Stores `batch`'s deliveries in the log alone, if the spool has room for them: their entries
/// logged (by `note`), their records planned for [`Held`] and their effects counted. Returns the
/// records' bytes.
fn hold(
    shared: &Shared,
    batch: &Batch,
    mut note: impl FnMut(Entry<'_>),
    changes: &mut Vec<Change>,
    effects: &mut Effects,
) -> Result<usize, SpoolError> {
    let extra: u64 = batch.deliveries.iter().map(cost).sum();
    fits(shared, effects, extra)?;
    let mut bytes = 0;
    for d in &batch.deliveries {
        let id = id_of(&d.id);
        let record = codec::encode_delivery(d);
        let aged = in_age(d);
        note(Entry::PendingInsert {
            target: &d.target,
            due: d.due_at,
            id,
            value: &record,
        });
        if aged {
            note(Entry::AgeInsert {
                target: &d.target,
                id,
            });
        }
        *effects.queued.entry(d.target.clone()).or_default() += 1;
        effects.used += cost(d) as i64;
        let insert = HeldInsert {
            target: d.target.clone(),
            due: d.due_at,
            record,
            aged,
            carried: false,
        };
        bytes += insert.record.len();
        changes.push(Change::Insert(id, insert));
    }
    Ok(bytes)
}

/// The completion of a held delivery: logged (by `note`), and settled, without touching redb.
fn cancel(mut note: impl FnMut(Entry<'_>), key: &Key, effects: &mut Effects) {
    note(Entry::PendingRemove {
        target: &key.target,
        due: key.due,
        id: key.id,
    });
    if key.aged {
        note(Entry::AgeRemove {
            target: &key.target,
            id: key.id,
        });
    }
    *effects.queued.entry(key.target.clone()).or_default() -= 1;
    effects.used -= key.cost as i64;
    effects.settled.push((key.target.clone(), key.id));
}

enum Pending {
    Unit(Reply<()>, Result<(), SpoolError>),
    Bool(Reply<bool>, Result<bool, SpoolError>),
    Count(Reply<usize>, Result<usize, SpoolError>),
}

impl Pending {
    // A caller that stopped waiting (its request was dropped) is no error of ours.
    fn fail(self, e: &SpoolError) {
        match self {
            Pending::Unit(r, _) => drop(r.send(Err(e.clone()))),
            Pending::Bool(r, _) => drop(r.send(Err(e.clone()))),
            Pending::Count(r, _) => drop(r.send(Err(e.clone()))),
        }
    }
    fn answer(self) {
        match self {
            Pending::Unit(r, v) => drop(r.send(v)),
            Pending::Bool(r, v) => drop(r.send(v)),
            Pending::Count(r, v) => drop(r.send(v)),
        }
    }
}

/// The writer's write-ahead log, and how far redb is behind it.
struct Logged {
    wal: Wal,
    /// When redb was last committed durably.
    checkpointed: Instant,
    /// Whether the log holds changes since then that redb does not hold durably.
    behind: bool,
    /// Changes only the log holds, for the next transaction to write.
    held: Held,
    /// How the spool's byte count moved since then.
    drift: i64,
    /// When the last group started.
    started: Instant,
}

impl Logged {
    fn checkpoint_due(&self) -> bool {
        self.checkpointed.elapsed() >= CHECKPOINT_EVERY
    }
}

fn write_loop(db: &Database, shared: &Shared, rx: &mpsc::Receiver<Op>, wal: Wal) {
    let mut slow = SlowCommits::default();
    let mut log = Logged {
        wal,
        checkpointed: Instant::now(),
        behind: false,
        held: Held::default(),
        drift: 0,
        started: Instant::now(),
    };
    loop {
        // A group anyone waits for is written at once, or once GROUP_GAP has passed since the
        // last one began. That time is slept out before looking for work: under load operations
        // come meanwhile, and each wait for the first of them would wake the writer only for it
        // to sleep again.
        let since = log.started.elapsed();
        if since < GROUP_GAP && !log.checkpoint_due() {
            std::thread::sleep(GROUP_GAP - since);
        }
        // Idle with changes that only the log holds: checkpoint when they are due. Idle means no
        // operation for GROUP_GAP at least: under load the queue is empty now and then for a
        // moment, and a checkpoint under load carries deliveries over where an idle one writes
        // them to redb.
        let first = if log.behind {
            let left = CHECKPOINT_EVERY
                .saturating_sub(log.checkpointed.elapsed())
                .max(GROUP_GAP);
            match rx.recv_timeout(left) {
                Ok(op) => op,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    write_group(db, shared, Vec::new(), &mut log);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(op) => op,
                Err(_) => break,
            }
        };
        let mut ops = vec![first];
        let mut waited = false;
        gather(rx, &mut ops, |ops| {
            // Nobody waits for a group of settlements (delivered, retried, dead): let it gather
            // more, up to SETTLE_WAIT, so fewer transactions carry them.
            if waited || ops.iter().any(Op::awaited) {
                return None;
            }
            waited = true;
            Some(SETTLE_WAIT)
        });
        let took = write_group(db, shared, ops, &mut log);
        if let Some(report) = slow.note(took, Instant::now()) {
            // The line may come at a fast commit (reporting earlier slow ones): it names only them.
            tracing::warn!(
                slow_commits = report.count,
                slowest_ms = report.slowest.as_millis() as u64,
                "spool commits took {} ms or more; acknowledgements waited for the disk",
                SLOW_COMMIT.as_millis()
            );
        }
    }
    // Closed: a last checkpoint, so the log holds nothing redb does not.
    if log.behind {
        write_group(db, shared, Vec::new(), &mut log);
    }
}

/// Adds what is queued to `ops`, up to [`MAX_GROUP`]; when nothing is, `wait` says how long to
/// wait for more (`None`: not at all).
fn gather(
    rx: &mpsc::Receiver<Op>,
    ops: &mut Vec<Op>,
    mut wait: impl FnMut(&[Op]) -> Option<std::time::Duration>,
) {
    while ops.len() < MAX_GROUP {
        match rx.try_recv() {
            Ok(op) => ops.push(op),
            Err(mpsc::TryRecvError::Disconnected) => break,
            Err(mpsc::TryRecvError::Empty) => match wait(ops) {
                Some(timeout) => match rx.recv_timeout(timeout) {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                },
                None => break,
            },
        }
    }
}

/// Slow commits since the last line about them, logged at most every [`SLOW_COMMIT_LOG_EVERY`].
#[derive(Default)]
struct SlowCommits {
    logged_at: Option<std::time::Instant>,
    count: u64,
    slowest: std::time::Duration,
}

/// What a line about slow commits says.
#[derive(Debug, PartialEq)]
struct SlowReport {
    count: u64,
    slowest: std::time::Duration,
}

impl SlowCommits {
    /// Notes a commit that took `took`, written at `now`: the report to log, if one is due — at
    /// the first slow commit, then no sooner than [`SLOW_COMMIT_LOG_EVERY`] after the last line,
    /// at the next commit (slow or not) once slow ones went unlogged.
    fn note(&mut self, took: std::time::Duration, now: std::time::Instant) -> Option<SlowReport> {
        if took >= SLOW_COMMIT {
            self.count += 1;
            self.slowest = self.slowest.max(took);
        }
        if self.count == 0
            || self
                .logged_at
                .is_some_and(|at| now.duration_since(at) < SLOW_COMMIT_LOG_EVERY)
        {
            return None;
        }
        self.logged_at = Some(now);
        let report = SlowReport {
            count: self.count,
            slowest: self.slowest,
        };
        self.count = 0;
        self.slowest = std::time::Duration::ZERO;
        Some(report)
    }
}

impl Op {
    /// Whether a caller waits for this operation's commit.
    fn awaited(&self) -> bool {
        !matches!(self, Op::Complete(_) | Op::Retry { .. } | Op::Bury(..))
    }

    /// Whether only the log need hold the operation (see [`Held`]): storing deliveries, and
    /// completing held ones. Anything else is a transaction.
    fn deferrable(&self, held: &Held) -> bool {
        match self {
            Op::Enqueue(batch, _) => batch.dead.is_empty(),
            Op::Complete(key) => held.holds(&key.target, key.due, key.id),
            _ => false,
        }
    }

    /// The held delivery the operation changes, which a transaction writes to redb first.
    fn held_delivery(&self, held: &Held) -> Option<u128> {
        let (target, due, id) = match self {
            Op::Retry { delivery, old_due } => (&delivery.target, *old_due, id_of(&delivery.id)),
            Op::Bury(key, _) => (&key.target, key.due, key.id),
            _ => return None,
        };
        held.holds(target, due, id).then_some(id)
    }
}

/// Writes one group of operations; how long it took.
///
/// A group that only stores deliveries and completes held ones is appended to the write-ahead
/// log as one record and held there (see [`Held`]), fsync'd when anyone waits for it. Any other
/// group is a transaction, committed to redb without an fsync and its changes appended to the
/// log; or, when a checkpoint is due (or the log is full, or the held deliveries would pass
/// [`HELD_MAX`], or transactions moved the spool's size by [`CHECKPOINT_DRIFT`]), committed
/// durably with what is held (or carried over, see [`Held::checkpoint`]) and the log generation
/// it covers, after which the log goes on with the next generation. An empty group is a
/// checkpoint of its own.
fn write_group(
    db: &Database,
    shared: &Shared,
    ops: Vec<Op>,
    log: &mut Logged,
) -> std::time::Duration {
    let mut effects = Effects::default();
    let mut pending = Vec::new();
    let (stored, settled) = ops.iter().fold((0u64, 0u64), |(s, t), op| match op {
        Op::Enqueue(..) => (s + 1, t),
        Op::Complete(_) | Op::Retry { .. } | Op::Bury(..) => (s, t + 1),
        _ => (s, t),
    });
    let checkpoint = ops.is_empty() || log.checkpoint_due();
    let started = Instant::now();
    log.started = started;
    let result = if checkpoint
        || !ops.iter().all(|op| op.deferrable(&log.held))
        || !taken_from_memory(shared, &ops)
    {
        transaction(db, shared, ops, log, checkpoint, &mut effects, &mut pending)
    } else {
        let plan = plan(shared, &ops);
        if log.wal.has_room(plan.entries.as_bytes().len()) && log.held.bytes + plan.held <= HELD_MAX
        {
            log_only(shared, ops, plan, log, &mut effects, &mut pending)
        } else {
            // Too much for the log, or to hold: a checkpoint.
            transaction(db, shared, ops, log, true, &mut effects, &mut pending)
        }
    };
    let outcome = if result.is_ok() { "ok" } else { "error" };
    metrics::counter!(m::SPOOL_COMMITS, "outcome" => outcome).increment(1);
    let took = started.elapsed();
    metrics::histogram!(m::SPOOL_COMMIT_DURATION).record(took.as_secs_f64());
    metrics::counter!(m::SPOOL_COMMIT_OPS, "op" => "store").increment(stored);
    metrics::counter!(m::SPOOL_COMMIT_OPS, "op" => "settle").increment(settled);
    match result {
        Ok(()) => {
            // In-flight ids, counts and the cache change together, so `take_due` sees them
            // consistent.
            let mut in_flight = lock(&shared.in_flight);
            for (target, id) in &effects.settled {
                if let Some(set) = in_flight.get_mut(target) {
                    set.remove(id);
                }
            }
            // Targets with new deliveries are woken from here, not by whoever stored them: a
            // request dropped while its commit was on the way (the sender hung up) would
            // otherwise leave them asleep (see `Spool::on_ready`).
            let grown: Vec<Arc<str>> = effects
                .queued
                .iter()
                .filter(|(_, delta)| **delta > 0)
                .map(|(target, _)| target.clone())
                .collect();
            let mut queued = lock(&shared.queued);
            for (target, delta) in effects.queued {
                let n = queued.entry(target.clone()).or_default();
                *n = (*n as i64 + delta).max(0) as u64;
                if *n == 0 {
                    queued.remove(&target);
                }
            }
            cache_stored(
                &in_flight,
                &queued,
                &mut lock(&shared.fresh),
                effects.stored,
            );
            drop(queued);
            drop(in_flight);
            let mut dead = lock(&shared.dead);
            for (target, delta) in effects.dead {
                let n = dead.entry(target.clone()).or_default();
                *n = (*n as i64 + delta).max(0) as u64;
            }
            drop(dead);
            if effects.used >= 0 {
                shared.used.fetch_add(effects.used as u64, Ordering::AcqRel);
            } else {
                shared
                    .used
                    .fetch_sub(effects.used.unsigned_abs(), Ordering::AcqRel);
            }
            for p in pending {
                p.answer();
            }
            wake(
                shared,
                effects
                    .settled
                    .iter()
                    .map(|(target, _)| target)
                    .chain(&grown)
                    .chain(&effects.written),
            );
        }
        Err(e) => {
            tracing::error!(error = %e, "spool write failed");
            // Deliveries whose settlement was lost are still stored as before: release them so
            // they are attempted again (at-least-once).
            let mut in_flight = lock(&shared.in_flight);
            for (target, id) in &effects.settled {
                if let Some(set) = in_flight.get_mut(target) {
                    set.remove(id);
                }
            }
            drop(in_flight);
            for p in pending {
                p.fail(&e);
            }
            wake(shared, effects.settled.iter().map(|(target, _)| target));
        }
    }
    took
}

/// Whether the deliveries that `ops` store will be taken from the `fresh` cache, their targets'
/// caches holding every delivery queued. Where they do not (a backlog in redb), a held delivery
/// gains nothing — it would be read from redb once written — and the checkpoint that wrote it
/// would carry the work every group would otherwise have done: those groups are transactions.
fn taken_from_memory(shared: &Shared, ops: &[Op]) -> bool {
    // Per target: how many deliveries the group stores.
    let mut targets: Vec<(&str, u64)> = Vec::new();
    for op in ops {
        if let Op::Enqueue(batch, _) = op {
            for d in &batch.deliveries {
                match targets.iter_mut().find(|(t, _)| *t == &*d.target) {
                    Some((_, n)) => *n += 1,
                    None => targets.push((&d.target, 1)),
                }
            }
        }
    }
    if targets.is_empty() {
        return true;
    }
    let in_flight = lock(&shared.in_flight);
    let queued = lock(&shared.queued);
    let fresh = lock(&shared.fresh);
    targets.iter().all(|(t, n)| {
        let (q, i, f) = counts(&in_flight, &queued, &fresh, t);
        cache_takes(q, i, f, *n)
    })
}

/// Appends a planned group to the log and holds its changes.
fn log_only(
    shared: &Shared,
    ops: Vec<Op>,
    plan: Plan,
    log: &mut Logged,
    effects: &mut Effects,
    pending: &mut Vec<Pending>,
) -> Result<(), SpoolError> {
    let awaited = ops.iter().any(Op::awaited);
    let Plan {
        mut entries,
        changes,
        effects: planned,
        verdicts,
        ..
    } = plan;
    *effects = planned;
    let mut verdicts = verdicts.into_iter();
    for op in ops {
        if let Op::Enqueue(batch, reply) = op {
            let verdict = verdicts.next().expect("a verdict per enqueue");
            answer_store(batch, reply, verdict, effects, pending);
        }
    }
    log.wal
        .append(&mut entries, awaited)
        .map_err(|e| log_error(log, e))?;
    log.held.keep(shared, changes);
    log.behind = true;
    Ok(())
}

/// The answer to a store held in the log: its deliveries count as stored if it was.
fn answer_store(
    batch: Batch,
    reply: Reply<()>,
    verdict: Result<(), SpoolError>,
    effects: &mut Effects,
    pending: &mut Vec<Pending>,
) {
    if verdict.is_ok() {
        effects.stored.extend(batch.deliveries);
    }
    pending.push(Pending::Unit(reply, verdict));
}

fn log_error(log: &Logged, e: std::io::Error) -> SpoolError {
    storage(format!(
        "cannot write the spool's log {}: {e}",
        log.wal.path().display()
    ))
}

/// Writes `ops` in one redb transaction — first the held deliveries they retry or bury, and at a
/// checkpoint every held delivery — either as a checkpoint, or committed without an fsync with
/// `ops`' changes appended to the log.
fn transaction(
    db: &Database,
    shared: &Shared,
    ops: Vec<Op>,
    log: &mut Logged,
    mut checkpoint: bool,
    effects: &mut Effects,
    pending: &mut Vec<Pending>,
) -> Result<(), SpoolError> {
    let awaited = ops.iter().any(Op::awaited);
    let ops_empty = ops.is_empty();
    // Deliveries stored by this group are held like those of a group that is only logged (else
    // their completions would make the groups they come in transactions too, and so on) — but
    // for a group that puts a delivery back into redb's schedule (a retry, a revival): that leaves
    // its target's cache incomplete, and a delivery held then would be found by no scheduler until
    // a checkpoint wrote it.
    let hold_stores = !checkpoint
        && !ops
            .iter()
            .any(|op| matches!(op, Op::Retry { .. } | Op::Revive(..)))
        && taken_from_memory(shared, &ops);
    let mut changes = Vec::new();
    let mut held_bytes = 0;
    // How the spool's byte count moved by what is held, not written to redb.
    let mut held_used = 0;
    let mut txn = db.begin_write().map_err(storage)?;
    let (entries, carry) = {
        let mut tables = Tables::open(&txn, !checkpoint)?;
        for op in ops {
            let before = effects.used;
            match op {
                Op::Complete(key) if log.held.holds(&key.target, key.due, key.id) => {
                    cancel(|e| tables.note(e), &key, effects);
                    effects.unheld.insert(key.id);
                    held_used += effects.used - before;
                }
                Op::Enqueue(batch, reply)
                    if hold_stores
                        && batch.dead.is_empty()
                        && log.held.bytes + held_bytes <= HELD_MAX =>
                {
                    let verdict = hold(shared, &batch, |e| tables.note(e), &mut changes, effects)
                        .map(|n| held_bytes += n);
                    answer_store(batch, reply, verdict, effects, pending);
                    held_used += effects.used - before;
                }
                op => {
                    if let Some(id) = op.held_delivery(&log.held) {
                        log.held.write(id, &mut tables, effects)?;
                    }
                    apply(&mut tables, shared, op, effects, pending)?;
                }
            }
        }
        let used = (shared.used.load(Ordering::Acquire) as i64 + effects.used).max(0) as u64;
        tables.note(Entry::Used(used));
        let entries = tables.log.take();
        let drifted = (log.drift + effects.used - held_used).unsigned_abs() > CHECKPOINT_DRIFT;
        if entries
            .as_ref()
            .is_some_and(|e| drifted || !log.wal.has_room(e.as_bytes().len()))
        {
            checkpoint = true;
            // The log this group was to be held by starts over: redb holds its deliveries.
            for change in changes.drain(..) {
                if let Change::Insert(id, insert) = change {
                    insert.write(id, &mut tables)?;
                }
            }
        }
        let mut meta = txn.open_table(META).map_err(storage)?;
        meta.insert(USED_BYTES, used).map_err(storage)?;
        let mut carry = None;
        if checkpoint {
            // The log's next generation starts after this commit: redb must hold all the log
            // held, but for what that generation's first record carries over.
            let may_carry = !ops_empty;
            carry = log
                .held
                .checkpoint(shared, may_carry, used, &mut tables, effects)?;
            meta.insert(WAL_GENERATION, log.wal.generation())
                .map_err(storage)?;
        }
        (entries, carry)
    };
    if checkpoint {
        // The next generation's first record is on disk before the commit that makes it the one
        // a replay reads; the current generation stays whole in its own file until then.
        let next = match carry {
            Some((mut first, ids)) => {
                let next = log.wal.prepare_next(&mut first).map_err(|e| {
                    storage(format!(
                        "cannot write the spool's log {}: {e}",
                        log.wal.next_path().display()
                    ))
                })?;
                Some((next, ids))
            }
            None => None,
        };
        txn.set_durability(Durability::Immediate).map_err(storage)?;
        commit(txn)?;
        log.behind = next.is_some();
        match next {
            Some((next, ids)) => {
                log.wal.start(next);
                log.held.carried(&ids);
            }
            None => log.wal.restart(log.wal.generation() + 1),
        }
        log.checkpointed = Instant::now();
        log.drift = 0;
        metrics::counter!(m::SPOOL_CHECKPOINTS).increment(1);
    } else {
        let mut entries = entries.expect("logged unless a checkpoint");
        // On disk first: if the log cannot be written, the transaction is dropped undone.
        log.wal
            .append(&mut entries, awaited)
            .map_err(|e| log_error(log, e))?;
        txn.set_durability(Durability::None).map_err(storage)?;
        commit(txn)?;
        log.held.keep(shared, changes);
        log.behind = true;
        log.drift += effects.used - held_used;
    }
    log.held.release(shared, effects);
    Ok(())
}

/// Whether the cache holds every queued, not-in-flight delivery of `target`.
fn cache_complete(
    in_flight: &HashMap<Arc<str>, HashSet<u128>>,
    queued: &HashMap<Arc<str>, u64>,
    fresh: &HashMap<Arc<str>, VecDeque<Delivery>>,
    target: &str,
) -> bool {
    let (q, i, f) = counts(in_flight, queued, fresh, target);
    q == i + f
}

/// The value of `target` in a per-target map, made if missing (without allocating the name on
/// every call of the hot path, as `entry` would).
fn target_entry<'m, V: Default>(map: &'m mut HashMap<Arc<str>, V>, target: &str) -> &'m mut V {
    if !map.contains_key(target) {
        map.insert(Arc::from(target), V::default());
    }
    map.get_mut(target).expect("just inserted")
}

/// A target's stored, in-flight and cached deliveries.
fn counts(
    in_flight: &HashMap<Arc<str>, HashSet<u128>>,
    queued: &HashMap<Arc<str>, u64>,
    fresh: &HashMap<Arc<str>, VecDeque<Delivery>>,
    target: &str,
) -> (u64, u64, u64) {
    (
        queued.get(target).copied().unwrap_or(0),
        in_flight.get(target).map_or(0, |s| s.len() as u64),
        fresh.get(target).map_or(0, |c| c.len() as u64),
    )
}

/// Whether a target's cache takes `n` new deliveries: it holds every one queued before them
/// (`queued`, less those `in_flight`, are the `cached`) and has room for all `n`.
fn cache_takes(queued: u64, in_flight: u64, cached: u64, n: u64) -> bool {
    queued == in_flight + cached && cached + n <= FRESH_MAX as u64
}

/// Puts just-stored deliveries in the cache of their target, where the cache was complete
/// before them (else it stays incomplete and the scheduler reads the spool).
fn cache_stored(
    in_flight: &HashMap<Arc<str>, HashSet<u128>>,
    queued: &HashMap<Arc<str>, u64>,
    fresh: &mut HashMap<Arc<str>, VecDeque<Delivery>>,
    stored: Vec<Delivery>,
) {
    if stored.is_empty() {
        return;
    }
    // Per target: how many this group stored.
    let mut added: HashMap<Arc<str>, u64> = HashMap::default();
    for d in &stored {
        *added.entry(d.target.clone()).or_default() += 1;
    }
    let mut ok: HashMap<Arc<str>, bool> = HashMap::default();
    for (target, n) in &added {
        // `queued` counts this group's already.
        let (q, i, f) = counts(in_flight, queued, fresh, target);
        let takes = q
            .checked_sub(*n)
            .is_some_and(|before| cache_takes(before, i, f, *n));
        ok.insert(target.clone(), takes);
    }
    for d in stored {
        if !ok.get(&d.target).copied().unwrap_or(false) {
            continue;
        }
        // A scheduler may have read it from the spool between the commit and this lock.
        let id = id_of(&d.id);
        if in_flight.get(&d.target).is_some_and(|s| s.contains(&id)) {
            continue;
        }
        fresh.entry(d.target.clone()).or_default().push_back(d);
    }
}

/// Ids of dead letters that died before `before_ms` (and of records that cannot be read, which
/// cannot be replayed either).
fn expired_dead(db: &Database, before_ms: u64) -> Result<Vec<u128>, SpoolError> {
    let txn = db.begin_read().map_err(storage)?;
    let dead = txn.open_table(DEAD).map_err(storage)?;
    let mut ids = Vec::new();
    for entry in dead.iter().map_err(storage)? {
        let (id, value) = entry.map_err(storage)?;
        match codec::decode_dead(value.value()) {
            Ok(letter) if letter.failed_at >= before_ms => {}
            _ => ids.push(id.value()),
        }
    }
    Ok(ids)
}

/// Tells the schedulers of settled deliveries that their targets may have work again.
/// Wakes the schedulers of `targets`, once each.
fn wake<'a>(shared: &Shared, targets: impl IntoIterator<Item = &'a Arc<str>>) {
    if let Some(waker) = lock(&shared.waker).clone() {
        super::wake_each(&waker, targets);
    }
}

fn commit(txn: WriteTransaction) -> Result<(), SpoolError> {
    txn.commit().map_err(storage)
}

fn insert_delivery(
    t: &mut Tables<'_>,
    d: &Delivery,
    effects: &mut Effects,
) -> Result<(), SpoolError> {
    let id = id_of(&d.id);
    t.pending_insert(&d.target, d.due_at, id, &codec::encode_delivery(d))?;
    if in_age(d) {
        t.age_insert(&d.target, id)?;
    }
    *effects.queued.entry(d.target.clone()).or_default() += 1;
    effects.used += cost(d) as i64;
    Ok(())
}

fn remove_delivery(t: &mut Tables<'_>, key: &Key, effects: &mut Effects) -> Result<(), SpoolError> {
    let existed = t.pending_remove(&key.target, key.due, key.id)?;
    if key.aged {
        t.age_remove(&key.target, key.id)?;
    }
    if existed {
        *effects.queued.entry(key.target.clone()).or_default() -= 1;
        effects.used -= key.cost as i64;
    }
    effects.settled.push((key.target.clone(), key.id));
    Ok(())
}

fn insert_dead(
    t: &mut Tables<'_>,
    letter: &DeadLetter,
    effects: &mut Effects,
) -> Result<(), SpoolError> {
    let previous = t.dead_insert(id_of(&letter.id), &codec::encode_dead(letter))?;
    if let Some(old) = previous {
        *effects.dead.entry(old).or_default() -= 1;
    }
    *effects
        .dead
        .entry(letter.target_label().to_string())
        .or_default() += 1;
    Ok(())
}

fn remove_dead(t: &mut Tables<'_>, id: u128, effects: &mut Effects) -> Result<bool, SpoolError> {
    match t.dead_remove(id)? {
        Some(target) => {
            *effects.dead.entry(target).or_default() -= 1;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Whether `extra` more bytes fit, counting what this group already added.
fn fits(shared: &Shared, effects: &Effects, extra: u64) -> Result<(), SpoolError> {
    let used = (shared.used.load(Ordering::Acquire) as i64 + effects.used).max(0) as u64;
    if used + extra > shared.limit {
        return Err(SpoolError::Full {
            used,
            limit: shared.limit,
        });
    }
    Ok(())
}

fn apply(
    t: &mut Tables<'_>,
    shared: &Shared,
    op: Op,
    effects: &mut Effects,
    pending: &mut Vec<Pending>,
) -> Result<(), SpoolError> {
    match op {
        Op::Enqueue(batch, reply) => {
            let extra: u64 = batch.deliveries.iter().map(cost).sum();
            if let Err(e) = fits(shared, effects, extra) {
                pending.push(Pending::Unit(reply, Err(e)));
                return Ok(());
            }
            for d in &batch.deliveries {
                insert_delivery(t, d, effects)?;
            }
            for letter in &batch.dead {
                insert_dead(t, letter, effects)?;
            }
            effects.stored.extend(batch.deliveries);
            pending.push(Pending::Unit(reply, Ok(())));
        }
        Op::Complete(key) => remove_delivery(t, &key, effects)?,
        Op::Retry { delivery, old_due } => {
            let id = id_of(&delivery.id);
            t.pending_remove(&delivery.target, old_due, id)?;
            let record = codec::encode_delivery(&delivery);
            t.pending_insert(&delivery.target, delivery.due_at, id, &record)?;
            if in_age(&delivery) {
                t.age_insert(&delivery.target, id)?;
            } else {
                t.age_remove(&delivery.target, id)?;
            }
            effects.settled.push((delivery.target.clone(), id));
        }
        Op::Bury(key, letter) => {
            remove_delivery(t, &key, effects)?;
            insert_dead(t, &letter, effects)?;
        }
        Op::Revive(id, deliveries, reply) => {
            let extra: u64 = deliveries.iter().map(cost).sum();
            let exists = t.dead.get(id).map_err(storage)?.is_some();
            if !exists {
                pending.push(Pending::Bool(reply, Ok(false)));
                return Ok(());
            }
            if let Err(e) = fits(shared, effects, extra) {
                pending.push(Pending::Bool(reply, Err(e)));
                return Ok(());
            }
            remove_dead(t, id, effects)?;
            for d in &deliveries {
                insert_delivery(t, d, effects)?;
            }
            pending.push(Pending::Bool(reply, Ok(true)));
        }
        Op::Rebury(letter, reply) => {
            insert_dead(t, &letter, effects)?;
            pending.push(Pending::Unit(reply, Ok(())));
        }
        Op::DropDead(ids, reply) => {
            let mut n = 0;
            for id in ids {
                if remove_dead(t, id, effects)? {
                    n += 1;
                }
            }
            pending.push(Pending::Count(reply, Ok(n)));
        }
        Op::Flush(reply) => pending.push(Pending::Unit(reply, Ok(()))),
    }
    Ok(())
}

impl Spool for RedbSpool {
    fn enqueue(&self, batch: Batch) -> BoxFuture<'_, Result<(), SpoolError>> {
        if batch.deliveries.is_empty() && batch.dead.is_empty() {
            return Box::pin(std::future::ready(Ok(())));
        }
        self.call(|reply| Op::Enqueue(batch, reply))
    }

    fn take_due(&self, target: &str, now_ms: u64, max: usize) -> Vec<Delivery> {
        let mut in_flight = lock(&self.shared.in_flight);
        let mut out = Vec::new();
        let mut cursors = lock(&self.shared.cursors);
        {
            let queued = lock(&self.shared.queued);
            let mut fresh = lock(&self.shared.fresh);
            let complete = cache_complete(&in_flight, &queued, &fresh, target);
            let rescan = cursors.get(target).is_some_and(|c| c.uses >= CURSOR_RESCAN);
            if complete || !rescan {
                // Every queued delivery is cached, or the cache is the window read ahead by the
                // last scan: take from it.
                if let Some(cache) = fresh.get_mut(target) {
                    let taken = target_entry(&mut in_flight, target);
                    while out.len() < max && cache.front().is_some_and(|d| d.due_at <= now_ms) {
                        let d = cache.pop_front().expect("front exists");
                        taken.insert(id_of(&d.id));
                        out.push(d);
                    }
                }
                if complete || out.len() >= max {
                    return out;
                }
            }
            // Read the schedule: the window is used up, or it is time to look from the start.
            fresh.remove(target);
        }
        let mut unreadable = lock(&self.shared.unreadable);
        let result = (|| -> Result<(), SpoolError> {
            let txn = self.db.begin_read().map_err(storage)?;
            let queue = txn.open_table(PENDING).map_err(storage)?;
            let taken = target_entry(&mut in_flight, target);
            // Beyond what is asked for, up to READ_AHEAD more are kept as the window, so the
            // next takes need no read transaction.
            let mut ahead = VecDeque::new();
            let mut scan = |from: (u64, u128),
                            out: &mut Vec<Delivery>,
                            ahead: &mut VecDeque<Delivery>|
             -> Result<Option<(u64, u128)>, SpoolError> {
                let mut last = None;
                for entry in queue
                    .range((target, from.0, from.1)..=(target, now_ms, u128::MAX))
                    .map_err(storage)?
                {
                    if out.len() >= max && ahead.len() >= READ_AHEAD {
                        break;
                    }
                    let (key, record) = entry.map_err(storage)?;
                    let (_, due, id) = key.value();
                    if (due, id) == from || taken.contains(&id) || unreadable.contains(&id) {
                        continue;
                    }
                    match codec::decode_delivery(record.value()) {
                        Ok(d) => {
                            if out.len() < max {
                                taken.insert(id);
                                out.push(d);
                            } else {
                                ahead.push_back(d);
                            }
                            last = Some((due, id));
                        }
                        Err(e) => {
                            unreadable.insert(id);
                            tracing::error!(
                                target, delivery_id = %uuid::Uuid::from_u128(id), error = %e,
                                "skipping a damaged delivery record until the next start; it stays in the spool untouched"
                            );
                        }
                    }
                }
                Ok(last)
            };
            // Under load the front of the schedule is deliveries in flight: a scan starts after
            // the last delivery read instead of stepping over them every time. A delivery stored
            // behind the cursor (a callback whose commit came late) is found by the scan from
            // the start made whenever the cursor's scan reaches the end, and at least every
            // CURSOR_RESCAN takes.
            let cursor = cursors.get(target).copied();
            let last = match cursor {
                Some(c) if c.uses < CURSOR_RESCAN => {
                    let last = scan(c.after, &mut out, &mut ahead)?;
                    // Stopped before the end of the schedule?
                    if out.len() >= max && ahead.len() >= READ_AHEAD {
                        let after = last.unwrap_or(c.after);
                        cursors.insert(
                            Arc::from(target),
                            Cursor {
                                after,
                                uses: c.uses + 1,
                            },
                        );
                        lock(&self.shared.fresh).insert(Arc::from(target), ahead);
                        return Ok(());
                    }
                    // The end: look from the start too (what was read ahead is read again).
                    ahead.clear();
                    scan((0, 0), &mut out, &mut ahead)?
                }
                _ => scan((0, 0), &mut out, &mut ahead)?,
            };
            cursors.remove(target);
            if let Some(after) = last {
                if !ahead.is_empty() {
                    cursors.insert(Arc::from(target), Cursor { after, uses: 0 });
                }
            }
            if !ahead.is_empty() {
                lock(&self.shared.fresh).insert(Arc::from(target), ahead);
            }
            Ok(())
        })();
        if let Err(e) = result {
            tracing::error!(target, error = %e, "cannot read the spool");
        }
        out
    }

    fn next_due(&self, target: &str) -> Option<u64> {
        let in_flight = lock(&self.shared.in_flight);
        {
            let queued = lock(&self.shared.queued);
            let fresh = lock(&self.shared.fresh);
            if cache_complete(&in_flight, &queued, &fresh, target) {
                return fresh.get(target).and_then(|c| c.front()).map(|d| d.due_at);
            }
        }
        let unreadable = lock(&self.shared.unreadable);
        let taken = in_flight.get(target);
        let txn = self.db.begin_read().ok()?;
        let queue = txn.open_table(PENDING).ok()?;
        for entry in queue
            .range((target, 0u64, 0u128)..=(target, u64::MAX, u128::MAX))
            .ok()?
        {
            let (key, _) = entry.ok()?;
            let (_, due, id) = key.value();
            if taken.is_some_and(|t| t.contains(&id)) || unreadable.contains(&id) {
                continue;
            }
            return Some(due);
        }
        None
    }

    fn complete(&self, delivery: &Delivery) {
        self.tell(Op::Complete(Key::of(delivery)));
    }

    fn retry_at(&self, mut delivery: Delivery, due_ms: u64) {
        let old_due = delivery.due_at;
        delivery.due_at = due_ms;
        self.tell(Op::Retry { delivery, old_due });
    }

    fn bury(&self, delivery: &Delivery, letter: DeadLetter) {
        self.tell(Op::Bury(Key::of(delivery), letter));
    }

    fn targets(&self) -> Vec<String> {
        lock(&self.shared.queued)
            .keys()
            .map(|k| k.to_string())
            .collect()
    }

    fn stats(&self, target: &str) -> TargetStats {
        let total = lock(&self.shared.queued).get(target).copied().unwrap_or(0);
        let in_flight = lock(&self.shared.in_flight)
            .get(target)
            .map_or(0, |s| s.len() as u64);
        let held = lock(&self.shared.held_ids)
            .get(target)
            .and_then(|ids| ids.first().copied());
        let time_of = |id: u128| {
            let (secs, nanos) = uuid::Uuid::from_u128(id).get_timestamp()?.to_unix();
            Some(secs * 1000 + u64::from(nanos) / 1_000_000)
        };
        let oldest = (|| {
            let txn = self.db.begin_read().ok()?;
            let pending = txn.open_table(PENDING).ok()?;
            let first = pending
                .range((target, 0u64, 0u128)..=(target, u64::MAX, u128::MAX))
                .ok()?
                .next()
                .and_then(|e| e.ok())
                .and_then(|(key, _)| time_of(key.value().2));
            let age = txn.open_table(AGE).ok()?;
            let listed = age
                .range((target, 0u128)..=(target, u128::MAX))
                .ok()?
                .next()
                .and_then(|e| e.ok())
                .and_then(|(key, _)| time_of(key.value().1));
            first.into_iter().chain(listed).min()
        })();
        let oldest = oldest.into_iter().chain(held.and_then(time_of)).min();
        TargetStats {
            queued: total.saturating_sub(in_flight),
            in_flight,
            oldest_created_at: oldest,
        }
    }

    fn list_dead(&self, query: &DeadQuery) -> Result<Vec<DeadLetter>, SpoolError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let dead = txn.open_table(DEAD).map_err(storage)?;
        let start = query
            .after
            .as_deref()
            .map(id_of)
            .map_or(0, |id| id.saturating_add(1));
        let mut out = Vec::new();
        for entry in dead.range(start..).map_err(storage)? {
            if out.len() >= query.limit {
                break;
            }
            let (_, value) = entry.map_err(storage)?;
            if let Ok(letter) = codec::decode_dead(value.value()) {
                if query.matches(&letter) {
                    out.push(letter);
                }
            }
        }
        Ok(out)
    }

    fn get_dead(&self, id: &str) -> Result<Option<DeadLetter>, SpoolError> {
        let Ok(uuid) = uuid::Uuid::parse_str(id) else {
            return Ok(None);
        };
        let txn = self.db.begin_read().map_err(storage)?;
        let dead = txn.open_table(DEAD).map_err(storage)?;
        let Some(value) = dead.get(uuid.as_u128()).map_err(storage)? else {
            return Ok(None);
        };
        codec::decode_dead(value.value()).map(Some).map_err(storage)
    }

    fn revive(
        &self,
        id: &str,
        deliveries: Vec<Delivery>,
    ) -> BoxFuture<'_, Result<bool, SpoolError>> {
        let Ok(uuid) = uuid::Uuid::parse_str(id) else {
            return Box::pin(std::future::ready(Ok(false)));
        };
        self.call(|reply| Op::Revive(uuid.as_u128(), deliveries, reply))
    }

    fn rebury(&self, letter: DeadLetter) -> BoxFuture<'_, Result<(), SpoolError>> {
        self.call(|reply| Op::Rebury(letter, reply))
    }

    fn drop_dead(&self, ids: Vec<String>) -> BoxFuture<'_, Result<usize, SpoolError>> {
        let ids = ids
            .iter()
            .filter_map(|id| uuid::Uuid::parse_str(id).ok().map(|u| u.as_u128()))
            .collect();
        self.call(|reply| Op::DropDead(ids, reply))
    }

    fn purge_dead(&self, before_ms: u64) -> BoxFuture<'_, Result<usize, SpoolError>> {
        // The scan reads a snapshot outside the writer, so it never holds up the ingress's
        // commits; only the removal of what it found goes through the writer.
        let db = self.db.clone();
        Box::pin(async move {
            let expired = tokio::task::spawn_blocking(move || expired_dead(&db, before_ms))
                .await
                .map_err(storage)??;
            if expired.is_empty() {
                return Ok(0);
            }
            self.call(|reply| Op::DropDead(expired, reply)).await
        })
    }

    fn dead_counts(&self) -> Vec<(String, u64)> {
        let mut counts: Vec<(String, u64)> = lock(&self.shared.dead)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        counts.sort();
        counts
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), SpoolError>> {
        self.call(Op::Flush)
    }

    fn on_ready(&self, waker: Waker) {
        *lock(&self.shared.waker) = Some(waker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::CallbackRecord;
    use bytes::Bytes;

    fn delivery(target: &str, due: u64) -> Delivery {
        Delivery {
            id: uuid::Uuid::now_v7().to_string().into(),
            event_id: "ev".into(),
            source: "s".into(),
            command: "c".into(),
            route: "r".into(),
            target: target.into(),
            content_type: None,
            body: Bytes::from_static(br#"{"n":1}"#),
            attempts: 0,
            created_at: due,
            due_at: due,
            last_error: None,
        }
    }

    /// The ids of the deliveries `take_due` hands out.
    fn taken_ids(spool: &RedbSpool, target: &str, now_ms: u64, max: usize) -> Vec<Arc<str>> {
        let taken = spool.take_due(target, now_ms, max);
        taken.into_iter().map(|d| d.id).collect()
    }

    async fn put(spool: &RedbSpool, deliveries: Vec<Delivery>) {
        spool
            .enqueue(Batch {
                deliveries,
                dead: Vec::new(),
            })
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn what_is_stored_survives_reopening_and_in_flight_is_due_again() {
        let dir = tempfile::tempdir().unwrap();
        let spool = RedbSpool::open(dir.path(), 1 << 30).unwrap();
        let (a, b) = (delivery("t", 10), delivery("t", 20));
        put(&spool, vec![a.clone(), b.clone()]).await;
        assert_eq!(spool.next_due("t"), Some(10));
        let taken = spool.take_due("t", 15, 10);
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].id, a.id);
        // In flight: not taken twice, and the next due is the other one.
        assert!(spool.take_due("t", 15, 10).is_empty());
        assert_eq!(spool.next_due("t"), Some(20));
        assert_eq!(spool.stats("t").in_flight, 1);
        assert_eq!(spool.stats("t").queued, 1);
        // A crash with `a` in flight: both are there after reopening.
        drop(spool);
        let spool = RedbSpool::open(dir.path(), 1 << 30).unwrap();
        let ids = taken_ids(&spool, "t", 100, 10);
        assert_eq!(ids, vec![a.id.clone(), b.id.clone()]);
    }

    #[tokio::test]
    async fn an_unreadable_record_is_skipped_and_no_longer_due() {
        let dir = tempfile::tempdir().unwrap();
        let spool = RedbSpool::open(dir.path(), 1 << 30).unwrap();
        let (a, b) = (delivery("t", 10), delivery("t", 20));
        put(&spool, vec![a.clone(), b.clone()]).await;
        drop(spool);
        {
            // `a` as a newer version would have written it.
            let db = Database::create(dir.path().join("spool.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            let mut record = codec::encode_delivery(&a);
            record[0] = 0xfe;
            txn.open_table(PENDING)
                .unwrap()
                .insert(("t", a.due_at, id_of(&a.id)), record.as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let spool = RedbSpool::open(dir.path(), 1 << 30).unwrap();
        let taken = spool.take_due("t", 100, 10);
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].id, b.id);
        spool.complete(&taken[0]);
        spool.flush().await.unwrap();
        // Nothing is due any more (a scheduler would otherwise go round at once, forever)…
        assert_eq!(spool.next_due("t"), None);
        assert!(spool.take_due("t", 100, 10).is_empty());
        // …and the record is still stored, as it was.
        assert_eq!(spool.stats("t").queued, 1);
    }

    #[tokio::test]
    async fn the_oldest_queued_delivery_is_found_whether_retried_or_not() {
        let id_ms = |d: &Delivery| {
            let (secs, nanos) = uuid::Uuid::parse_str(&d.id)
                .unwrap()
                .get_timestamp()
                .unwrap()
                .to_unix();
            secs * 1000 + u64::from(nanos) / 1_000_000
        };
        let dir = tempfile::tempdir().unwrap();
        let spool = RedbSpool::open(dir.path(), 1 << 30).unwrap();
        let old = delivery("t", 100);
        put(&spool, vec![old.clone()]).await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let young = delivery("t", 200);
        put(&spool, vec![young.clone()]).await;
        assert_eq!(spool.stats("t").oldest_created_at, Some(id_ms(&old)));
        // The old one is retried far in the future: it is no longer first in due order, and
        // still the oldest.
        let taken = spool.take_due("t", 150, 1);
        assert_eq!(taken[0].id, old.id);
        spool.retry_at(taken[0].clone(), 1 << 50);
        spool.flush().await.unwrap();
        assert_eq!(spool.stats("t").oldest_created_at, Some(id_ms(&old)));
        // Once it is delivered, the young one is the oldest; then nothing is queued.
        let taken = spool.take_due("t", u64::MAX, 2);
        assert_eq!(taken.len(), 2);
        let (first, second) = if taken[0].id == old.id {
            (&taken[0], &taken[1])
        } else {
            (&taken[1], &taken[0])
        };
        spool.complete(first);
        spool.flush().await.unwrap();
        assert_eq!(spool.stats("t").oldest_created_at, Some(id_ms(&young)));
        spool.complete(second);
        spool.flush().await.unwrap();
        assert_eq!(spool.stats("t").oldest_created_at, None);
    }

    #[tokio::test]
    async fn a_large_backlog_taken_a_few_at_a_time_gives_each_delivery_once() {
        let dir = tempfile::tempdir().unwrap();
        let spool = RedbSpool::open(dir.path(), 1 << 30).unwrap();
        let backlog: Vec<Delivery> = (0..1500).map(|i| delivery("t", 1000 + i)).collect();
        put(&spool, backlog.clone()).await;
        drop(spool);
        // Reopened: nothing cached, the windows and the cursor do the work.
        let spool = RedbSpool::open(dir.path(), 1 << 30).unwrap();
        let mut seen = HashSet::default();
        let mut expected: HashSet<Arc<str>> = backlog.iter().map(|d| d.id.clone()).collect();
        let mut round = 0u64;
        loop {
            let batch = spool.take_due("t", 1 << 40, 3);
            if batch.is_empty() {
                break;
            }
            for d in batch {
                assert!(seen.insert(d.id.clone()), "{} taken twice", d.id);
                spool.complete(&d);
            }
            round += 1;
            if round % 50 == 0 {
                // A late commit, due before everything read so far.
                let late = delivery("t", 500 + round);
                expected.insert(late.id.clone());
                put(&spool, vec![late]).await;
                spool.flush().await.unwrap();
            }
        }
        spool.flush().await.unwrap();
        assert_eq!(seen.len(), expected.len());
        assert_eq!(seen, expected);
        assert_eq!(spool.stats("t").queued, 0);
    }

    #[tokio::test]
    async fn a_delivery_stored_behind_the_scan_cursor_is_still_taken() {
        let dir = tempfile::tempdir().unwrap();
        let spool = RedbSpool::open(dir.path(), 1 << 30).unwrap();
        let five: Vec<Delivery> = (10..15).map(|due| delivery("t", due)).collect();
        put(&spool, five.clone()).await;
        drop(spool);
        // Reopened, nothing is cached: takes read the schedule.
        let spool = RedbSpool::open(dir.path(), 1 << 30).unwrap();
        let mut taken: Vec<Arc<str>> = Vec::new();
        for _ in 0..2 {
            let batch = spool.take_due("t", 100, 2);
            assert_eq!(batch.len(), 2);
            taken.extend(batch.into_iter().map(|d| d.id));
        }
        // A late commit puts a delivery before the cursor.
        let late = delivery("t", 5);
        put(&spool, vec![late.clone()]).await;
        let rest = taken_ids(&spool, "t", 100, 10);
        assert_eq!(rest.len(), 2, "{rest:?}");
        assert!(rest.contains(&late.id));
        assert!(rest.contains(&five[4].id));
        taken.extend(rest);
        taken.sort();
        taken.dedup();
        assert_eq!(taken.len(), 6, "each delivery taken exactly once");
    }

    #[tokio::test]
    async fn a_file_of_the_earlier_layout_is_upgraded_with_its_deliveries() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (delivery("t", 10), delivery("u", 20));
        {
            let db = Database::create(dir.path().join("spool.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut records = txn.open_table(OLD_DELIVERIES).unwrap();
                let mut queue = txn.open_table(OLD_QUEUE).unwrap();
                let mut age = txn.open_table(AGE).unwrap();
                for d in [&a, &b] {
                    let id = id_of(&d.id);
                    records
                        .insert(id, codec::encode_delivery(d).as_slice())
                        .unwrap();
                    queue.insert((&*d.target, d.due_at, id), ()).unwrap();
                    age.insert((&*d.target, id), ()).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let spool = RedbSpool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(spool.stats("t").queued, 1);
        let taken = spool.take_due("u", 100, 10);
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].id, b.id);
        assert_eq!(taken[0].body, b.body);
        spool.complete(&taken[0]);
        spool.flush().await.unwrap();
        drop(spool);
        // Upgraded once: the old tables are gone, and what is left is still there.
        let spool = RedbSpool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(spool.stats("u").queued, 0);
        let taken = spool.take_due("t", 100, 10);
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].id, a.id);
    }

    /// Stores `a` and `b` (target `t`) and `c` (target `u`), then settles them: `a` delivered,
    /// `b` retried at 500 after 3 attempts, `c` buried.
    async fn complete_retry_and_bury(spool: &RedbSpool) -> (Delivery, Delivery, Delivery) {
        let (a, b, c) = (delivery("t", 1), delivery("t", 1), delivery("u", 1));
        put(spool, vec![a.clone(), b.clone(), c.clone()]).await;
        let mut taken = spool.take_due("t", 1, 10);
        assert_eq!(taken.len(), 2);
        spool.complete(&taken[0]);
        let mut again = taken.remove(1);
        again.attempts = 3;
        again.last_error = Some("HTTP 503".into());
        spool.retry_at(again, 500);
        let c_taken = spool.take_due("u", 1, 10).remove(0);
        let oops = Bytes::from_static(b"oops");
        let letter = DeadLetter::of_delivery(&c_taken, "gave up".into(), Some(500), oops, 7);
        spool.bury(&c_taken, letter);
        (a, b, c)
    }

    /// What [`complete_retry_and_bury`] leaves, seen by a spool opened again.
    fn assert_completed_retried_and_buried(spool: &RedbSpool, b: &Delivery, c: &Delivery) {
        assert!(spool.take_due("t", 499, 10).is_empty());
        let retried = spool.take_due("t", 500, 10);
        assert_eq!(retried.len(), 1);
        assert_eq!(retried[0].id, b.id);
        assert_eq!(retried[0].attempts, 3);
        assert_eq!(retried[0].last_error.as_deref(), Some("HTTP 503"));
        assert!(spool.targets().iter().all(|t| t != "u"));
        let dead = spool.get_dead(&c.id).unwrap().unwrap();
        assert_eq!(dead.reason, "gave up");
        assert_eq!(dead.last_status, Some(500));
        assert_eq!(dead.last_answer, Bytes::from_static(b"oops"));
        assert_eq!(spool.dead_counts(), vec![("u".to_string(), 1)]);
    }

    #[tokio::test]
    async fn complete_retry_and_bury_are_stored() {
        let dir = tempfile::tempdir().unwrap();
        let spool = RedbSpool::open(dir.path(), 1 << 30).unwrap();
        let (_, b, c) = complete_retry_and_bury(&spool).await;
        spool.flush().await.unwrap();
        drop(spool);

        let spool = RedbSpool::open(dir.path(), 1 << 30).unwrap();
        assert_completed_retried_and_buried(&spool, &b, &c);
    }

    /// Every file of the spool.
    const ALL_FILES: [&str; 3] = ["spool.redb", WAL_FILES[0], WAL_FILES[1]];

    /// The files as a crash of the process would leave them: copied while the spool is open, so
    /// redb holds only its last checkpoint and the write-ahead log the rest.
    fn crash_image(from: &Path, files: &[&str]) -> tempfile::TempDir {
        let to = tempfile::tempdir().unwrap();
        for file in files {
            std::fs::copy(from.join(file), to.path().join(file)).unwrap();
        }
        to
    }

    #[tokio::test]
    async fn after_a_crash_the_write_ahead_log_restores_what_redb_had_not_made_durable() {
        let dir = tempfile::tempdir().unwrap();
        let spool = RedbSpool::open(dir.path(), 1 << 30).unwrap();
        let (_, b, c) = complete_retry_and_bury(&spool).await;
        let d = delivery("t", 2);
        put(&spool, vec![d.clone()]).await;
        spool.flush().await.unwrap();
        let used = spool.used_bytes();

        // redb alone has none of it: its last durable commit came before.
        let only_redb = crash_image(dir.path(), &["spool.redb"]);
        let bare = RedbSpool::open(only_redb.path(), 1 << 30).unwrap();
        assert_eq!(bare.stats("t").queued, 0);
        assert!(bare.get_dead(&c.id).unwrap().is_none());
        drop(bare);

        let image = crash_image(dir.path(), &ALL_FILES);
        drop(spool);
        // Opened twice: the first replays the log, and closing checkpoints; the second must
        // find the same, not the log applied again.
        for reopening in 0..2 {
            let spool = RedbSpool::open(image.path(), 1 << 30).unwrap();
            assert_eq!(spool.used_bytes(), used, "reopening {reopening}");
            assert_eq!(spool.stats("t").queued, 2, "reopening {reopening}");
            let due = spool.take_due("t", 2, 10);
            assert_eq!(due.len(), 1, "reopening {reopening}");
            assert_eq!(due[0].id, d.id);
            assert_completed_retried_and_buried(&spool, &b, &c);
        }
    }

    /// A crash can leave a torn record with a whole one behind it that was never fsync'd (nor
    /// acknowledged). The next run must not take that one for its own when its records reach
    /// up to it: here the next run's first record is as long as the torn one, so the stale record
    /// follows it exactly.
    #[tokio::test]
    async fn a_stale_record_behind_a_torn_one_is_never_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let x = delivery("t", 1);
        let stale = delivery("t", 2);
        let record_of = |d: &Delivery| {
            let mut e = wal::Entries::default();
            e.push(&Entry::PendingInsert {
                target: &d.target,
                due: d.due_at,
                id: id_of(&d.id),
                value: &codec::encode_delivery(d),
            });
            e.push(&Entry::Used(cost(d)));
            e
        };
        {
            let paths = WAL_FILES.map(|name| dir.path().join(name));
            let mut log = Wal::open([&paths[0], &paths[1]], WAL_BYTES).unwrap();
            log.append(&mut record_of(&x), false).unwrap();
            log.append(&mut record_of(&stale), false).unwrap();
        }
        // The first record torn: its last byte never reached the disk.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join(WAL_FILES[0]))
            .unwrap();
        let torn_at = (wal::HEADER + record_of(&x).as_bytes().len() - 1) as u64;
        std::os::unix::fs::FileExt::write_all_at(&file, &[0xee], torn_at).unwrap();

        let spool = RedbSpool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(spool.stats("t").queued, 0);
        put(&spool, vec![x.clone()]).await;
        let image = crash_image(dir.path(), &ALL_FILES);
        drop(spool);
        let spool = RedbSpool::open(image.path(), 1 << 30).unwrap();
        let queued = taken_ids(&spool, "t", 10, 10);
        assert_eq!(queued, vec![x.id.clone()]);
    }

    /// Rows of `pending` that redb's readers see now (checkpointed or not).
    fn rows_in_redb(spool: &RedbSpool) -> Vec<u128> {
        let txn = spool.db.begin_read().unwrap();
        let pending = txn.open_table(PENDING).unwrap();
        let rows = pending.iter().unwrap();
        rows.map(|e| e.unwrap().0.value().2).collect()
    }

    #[tokio::test]
    async fn a_delivery_completed_before_the_checkpoint_never_reaches_redb() {
        let dir = tempfile::tempdir().unwrap();
        let spool = RedbSpool::open(dir.path(), 1 << 30).unwrap();
        let (a, b) = (delivery("t", 1), delivery("t", 1));
        put(&spool, vec![a.clone(), b.clone()]).await;
        let taken = spool.take_due("t", 1, 10);
        assert_eq!(taken.len(), 2);
        spool.complete(&taken[0]);
        // Written after the completion (one writer, in order).
        let c = delivery("t", 2);
        put(&spool, vec![c.clone()]).await;
        assert!(rows_in_redb(&spool).is_empty(), "held in the log only");
        assert_eq!(spool.stats("t").in_flight, 1);
        assert_eq!(spool.stats("t").queued, 1);

        // A crash now: the log has all of it.
        let image = crash_image(dir.path(), &ALL_FILES);
        // A flush stores it in the log: still nothing in redb.
        spool.flush().await.unwrap();
        assert!(rows_in_redb(&spool).is_empty());
        // The (idle) checkpoint writes what is held: `a` is not among it.
        tokio::time::sleep(CHECKPOINT_EVERY + std::time::Duration::from_millis(500)).await;
        let mut rows = rows_in_redb(&spool);
        rows.sort();
        let mut want = vec![id_of(&b.id), id_of(&c.id)];
        want.sort();
        assert_eq!(rows, want);
        drop(spool);
        let spool = RedbSpool::open(image.path(), 1 << 30).unwrap();
        let ids = taken_ids(&spool, "t", 10, 10);
        assert_eq!(ids, vec![b.id.clone(), c.id.clone()]);
    }

    /// Stores `first` and then `second` such that `second`'s group is a checkpoint under load:
    /// the writer is held up on `first`'s group until the checkpoint is due, and `second` is
    /// waiting for it then, so the idle checkpoint never comes.
    async fn checkpoint_under_load(spool: &RedbSpool, first: Delivery, second: Delivery) {
        in_one_group(spool, first, || {
            drop(spool.enqueue(Batch {
                deliveries: vec![second],
                dead: Vec::new(),
            }));
            std::thread::sleep(CHECKPOINT_EVERY);
        });
        spool.flush().await.unwrap();
    }

    #[tokio::test]
    async fn a_checkpoint_under_load_carries_deliveries_on_their_way_over_in_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let spool = RedbSpool::open(dir.path(), 1 << 30).unwrap();
        let (a, b) = (delivery("t", 1), delivery("t", 1));
        put(&spool, vec![a.clone(), b.clone()]).await;
        assert_eq!(taken_ids(&spool, "t", 1, 1), vec![a.id.clone()]);
        // redb as it was before the checkpoint, with the log as it will be after it: a crash
        // after the next generation was written and before redb's commit named it.
        let before = crash_image(dir.path(), &["spool.redb"]);

        let (c, d) = (delivery("t", 2), delivery("t", 2));
        checkpoint_under_load(&spool, c.clone(), d.clone()).await;
        // `d` came in the checkpoint's own transaction; `a` (in flight), `b` and `c` (queued)
        // were carried over in the log, not written to redb.
        assert_eq!(rows_in_redb(&spool), vec![id_of(&d.id)]);
        for file in WAL_FILES {
            std::fs::copy(dir.path().join(file), before.path().join(file)).unwrap();
        }
        let after = crash_image(dir.path(), &ALL_FILES);
        // A carried delivery is completed in the log alone, like any held one. (The assertions on
        // redb's rows come within the second, before an idle checkpoint would write them all.)
        spool.complete(&a);
        spool.flush().await.unwrap();
        assert_eq!(rows_in_redb(&spool), vec![id_of(&d.id)]);
        let completed = crash_image(dir.path(), &ALL_FILES);

        let queued_after_reopening =
            |image: &Path| queued(&RedbSpool::open(image, 1 << 30).unwrap());
        assert_eq!(queued_after_reopening(before.path()), ids(&[&a, &b, &c]));
        assert_eq!(queued_after_reopening(after.path()), ids(&[&a, &b, &c, &d]));
        assert_eq!(queued_after_reopening(completed.path()), ids(&[&b, &c, &d]));

        // Still held at the next checkpoint: carried once already, written to redb now.
        let (e, f) = (delivery("t", 3), delivery("t", 3));
        checkpoint_under_load(&spool, e.clone(), f.clone()).await;
        let mut rows = rows_in_redb(&spool);
        rows.sort();
        let mut want: Vec<u128> = [&b, &c, &d, &f].iter().map(|x| id_of(&x.id)).collect();
        want.sort();
        assert_eq!(rows, want);
        let image = crash_image(dir.path(), &ALL_FILES);
        assert_eq!(
            queued_after_reopening(image.path()),
            ids(&[&b, &c, &d, &e, &f])
        );
        // Every delivery is handed out once, from memory.
        assert_eq!(queued(&spool), ids(&[&b, &c, &d, &e, &f]));
    }

    /// The ids of `ds`, sorted.
    fn ids(ds: &[&Delivery]) -> Vec<Arc<str>> {
        let mut ids: Vec<Arc<str>> = ds.iter().map(|d| d.id.clone()).collect();
        ids.sort();
        ids
    }

    /// The ids of every delivery of target `t` the spool hands out now (up to 10), sorted.
    fn queued(spool: &RedbSpool) -> Vec<Arc<str>> {
        let mut ids = taken_ids(spool, "t", 10, 10);
        ids.sort();
        ids
    }

    /// Sends what `send` sends as one group: the writer is held up (it waits for a lock the test
    /// holds) on a group of its own, storing `first`, while `send` runs.
    fn in_one_group(spool: &RedbSpool, first: Delivery, send: impl FnOnce()) {
        let held_up = lock(&spool.shared.in_flight);
        drop(spool.enqueue(Batch {
            deliveries: vec![first],
            dead: Vec::new(),
        }));
        std::thread::sleep(std::time::Duration::from_millis(100));
        send();
        drop(held_up);
    }

    /// A group with a dead letter in it is a transaction; the deliveries it stores are held all
    /// the same, else their completions would make the groups they come in transactions too. A
    /// group with a retry stores them in redb: its target's cache no longer holds every delivery,
    /// and the scheduler must find them there.
    #[tokio::test]
    async fn deliveries_stored_by_a_transaction_are_held_in_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let spool = RedbSpool::open(dir.path(), 1 << 30).unwrap();
        let (a, b) = (delivery("t", 1), delivery("t", 1));
        put(&spool, vec![a.clone(), b.clone()]).await;
        let taken = spool.take_due("t", 1, 2);
        let (c, y) = (delivery("t", 1), delivery("t", 1));
        in_one_group(&spool, c.clone(), || {
            let letter = DeadLetter::of_delivery(&taken[0], "r".into(), None, Bytes::new(), 1);
            spool.bury(&taken[0], letter);
            drop(spool.enqueue(Batch {
                deliveries: vec![y.clone()],
                dead: Vec::new(),
            }));
        });
        spool.flush().await.unwrap();
        // `a` went to redb to be buried; `y` stayed in the log, as `b` and `c` did.
        assert!(rows_in_redb(&spool).is_empty());
        assert!(spool.get_dead(&a.id).unwrap().is_some());
        let image = crash_image(dir.path(), &ALL_FILES);
        let reopened = RedbSpool::open(image.path(), 1 << 30).unwrap();
        assert_eq!(queued(&reopened), ids(&[&b, &c, &y]));
        drop(reopened);
        // The running spool hands out the two stored since, from memory.
        assert_eq!(queued(&spool), ids(&[&c, &y]));

        let z = delivery("t", 1);
        in_one_group(&spool, delivery("t", 1), || {
            spool.retry_at(taken[1].clone(), 5);
            drop(spool.enqueue(Batch {
                deliveries: vec![z.clone()],
                dead: Vec::new(),
            }));
        });
        spool.flush().await.unwrap();
        assert!(
            rows_in_redb(&spool).contains(&id_of(&z.id)),
            "{z:?} in redb"
        );
        let handed_out = taken_ids(&spool, "t", 10, 10);
        assert!(
            handed_out.contains(&z.id) && handed_out.contains(&b.id),
            "{handed_out:?}"
        );
    }

    /// A transaction that turns out to move the spool too far is a checkpoint: the log starts
    /// over, and the deliveries the group was to hold there are written to redb with it.
    #[tokio::test]
    async fn a_transaction_that_becomes_a_checkpoint_writes_what_it_would_have_held() {
        let dir = tempfile::tempdir().unwrap();
        let spool = RedbSpool::open(dir.path(), 1 << 30).unwrap();
        let big = Delivery {
            body: Bytes::from(vec![b'x'; 300 << 10]),
            ..delivery("t", 1)
        };
        let letter = DeadLetter::of_delivery(&delivery("u", 1), "r".into(), None, Bytes::new(), 1);
        let (c, y) = (delivery("t", 1), delivery("t", 1));
        in_one_group(&spool, c.clone(), || {
            // With a dead letter, a batch goes to redb: 300 KiB more there since the checkpoint.
            drop(spool.enqueue(Batch {
                deliveries: vec![big.clone()],
                dead: vec![letter],
            }));
            drop(spool.enqueue(Batch {
                deliveries: vec![y.clone()],
                dead: Vec::new(),
            }));
        });
        spool.flush().await.unwrap();
        let mut rows = rows_in_redb(&spool);
        rows.sort();
        let mut want = vec![id_of(&big.id), id_of(&y.id)];
        want.sort();
        assert_eq!(rows, want, "`c` carried over, `y` and the big one in redb");
        let image = crash_image(dir.path(), &ALL_FILES);
        let reopened = RedbSpool::open(image.path(), 1 << 30).unwrap();
        assert_eq!(queued(&reopened), ids(&[&big, &c, &y]));
    }

    /// A backlog read from redb, completed in part, and a delivery stored behind it (its target's
    /// cache is not complete, so it goes to redb at once rather than being held): each is handed
    /// out once.
    #[tokio::test]
    async fn a_backlog_and_a_delivery_held_meanwhile_are_each_handed_out_once() {
        let dir = tempfile::tempdir().unwrap();
        let spool = RedbSpool::open(dir.path(), 1 << 30).unwrap();
        let n = 2 + READ_AHEAD + 5;
        let backlog: Vec<Delivery> = (0..n).map(|_| delivery("t", 1)).collect();
        put(&spool, backlog.clone()).await;
        drop(spool);
        // Opened again, nothing is cached: the first take reads redb, two and a window.
        let spool = RedbSpool::open(dir.path(), 1 << 30).unwrap();
        let first = spool.take_due("t", 1, 2);
        assert_eq!(first.len(), 2);
        for d in &first {
            spool.complete(d);
        }
        let late = delivery("t", 1);
        put(&spool, vec![late.clone()]).await;
        assert_eq!(spool.stats("t").in_flight, 0);
        assert_eq!(spool.stats("t").queued, (n - 2 + 1) as u64);
        // The window, then the rest of redb from the cursor and from the start.
        let mut seen: Vec<Arc<str>> = first.iter().map(|d| d.id.clone()).collect();
        seen.extend(spool.take_due("t", 1, 10_000).into_iter().map(|d| d.id));
        spool.flush().await.unwrap();
        seen.extend(spool.take_due("t", 1, 10_000).into_iter().map(|d| d.id));
        let mut want: Vec<Arc<str>> = backlog.iter().map(|d| d.id.clone()).collect();
        want.push(late.id.clone());
        seen.sort();
        want.sort();
        assert_eq!(seen, want, "every delivery handed out once");
        assert_eq!(spool.stats("t").in_flight, (n - 2 + 1) as u64);
    }

    #[tokio::test]
    async fn deliveries_past_the_in_memory_window_are_handed_out_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let spool = RedbSpool::open(dir.path(), 1 << 30).unwrap();
        // The first group nearly fills the target's window and is held in the log; the second
        // has no room there, so it goes to redb, where the scheduler finds it — not only after
        // the next checkpoint has written it.
        let first: Vec<Delivery> = (0..FRESH_MAX - 2).map(|_| delivery("t", 1)).collect();
        put(&spool, first.clone()).await;
        let second: Vec<Delivery> = (0..5).map(|_| delivery("t", 1)).collect();
        put(&spool, second.clone()).await;
        assert_eq!(spool.stats("t").queued, (FRESH_MAX + 3) as u64);
        // The window stays within its bound: memory does not grow with a backlog.
        let cached = lock(&spool.shared.fresh).get("t").map_or(0, VecDeque::len);
        assert_eq!(cached, FRESH_MAX - 2);
        let mut seen = taken_ids(&spool, "t", 1, 10_000);
        let mut want: Vec<Arc<str>> = first.iter().chain(&second).map(|d| d.id.clone()).collect();
        seen.sort();
        want.sort();
        let missing = want
            .iter()
            .filter(|id| seen.binary_search(id).is_err())
            .count();
        assert_eq!(missing, 0, "every delivery handed out");
        assert!(seen == want, "and none twice");
        assert!(taken_ids(&spool, "t", 1, 10_000).is_empty());
        // The next group of the target is a transaction too while its window misses some.
        let third = delivery("t", 1);
        put(&spool, vec![third.clone()]).await;
        assert_eq!(taken_ids(&spool, "t", 1, 10), vec![third.id.clone()]);
        for d in first.iter().chain(&second).chain([&third]) {
            spool.complete(d);
        }
        spool.flush().await.unwrap();
        assert_eq!(spool.stats("t").queued, 0);
    }

    #[tokio::test]
    async fn a_growing_backlog_and_an_idle_second_are_checkpointed_into_redb() {
        let dir = tempfile::tempdir().unwrap();
        let spool = RedbSpool::open(dir.path(), 1 << 30).unwrap();
        let big = |due| Delivery {
            body: Bytes::from(vec![b'x'; 400 << 10]),
            ..delivery("t", due)
        };
        // The third would hold more than HELD_MAX: its group is committed to redb durably, with
        // the two before (more than a checkpoint carries over); the fourth is in the log only.
        for due in 1..=4 {
            put(&spool, vec![big(due)]).await;
        }
        let in_redb = |dir: &Path| {
            let image = crash_image(dir, &["spool.redb"]);
            RedbSpool::open(image.path(), 1 << 30)
                .unwrap()
                .stats("t")
                .queued
        };
        assert_eq!(in_redb(dir.path()), 3);
        // Idle for a second: a checkpoint of its own.
        tokio::time::sleep(CHECKPOINT_EVERY + std::time::Duration::from_millis(500)).await;
        assert_eq!(in_redb(dir.path()), 4);
    }

    #[tokio::test]
    async fn dead_letters_list_revive_drop_and_purge() {
        let dir = tempfile::tempdir().unwrap();
        let spool = RedbSpool::open(dir.path(), 1 << 30).unwrap();
        let mut letters = Vec::new();
        for (i, target) in ["a", "b", "a"].iter().enumerate() {
            let d = delivery(target, 1);
            let mut l =
                DeadLetter::of_delivery(&d, format!("r{i}"), None, Bytes::new(), 100 * i as u64);
            if i == 2 {
                l.target = None;
                l.callback = Some(CallbackRecord {
                    app_id: String::new(),
                    query: vec![],
                    headers: vec![],
                    received_at: 1,
                });
            }
            letters.push(l);
        }
        spool
            .enqueue(Batch {
                deliveries: Vec::new(),
                dead: letters.clone(),
            })
            .await
            .unwrap();
        let all = spool
            .list_dead(&DeadQuery {
                limit: 10,
                ..DeadQuery::default()
            })
            .unwrap();
        assert_eq!(all.len(), 3);
        let page = spool
            .list_dead(&DeadQuery {
                limit: 1,
                after: Some(all[0].id.to_string()),
                ..DeadQuery::default()
            })
            .unwrap();
        assert_eq!(page[0].id, all[1].id);
        let only_a = spool
            .list_dead(&DeadQuery {
                target: Some("a".into()),
                limit: 10,
                ..DeadQuery::default()
            })
            .unwrap();
        assert_eq!(only_a.len(), 1);
        // Revive puts a delivery back and removes the letter, atomically.
        let d = delivery("a", 5);
        assert!(spool.revive(&letters[0].id, vec![d.clone()]).await.unwrap());
        assert!(!spool.revive(&letters[0].id, vec![]).await.unwrap());
        assert_eq!(spool.take_due("a", 5, 10)[0].id, d.id);
        assert_eq!(
            spool
                .drop_dead(vec![letters[1].id.to_string(), "nope".into()])
                .await
                .unwrap(),
            1
        );
        // failed_at of the last one is 200.
        assert_eq!(spool.purge_dead(150).await.unwrap(), 0);
        assert_eq!(spool.purge_dead(201).await.unwrap(), 1);
        assert!(spool.dead_counts().iter().all(|(_, n)| *n == 0));
    }

    #[tokio::test]
    async fn the_budget_is_enforced_and_freed() {
        let dir = tempfile::tempdir().unwrap();
        let one = cost(&delivery("t", 1));
        let spool = RedbSpool::open(dir.path(), one * 2).unwrap();
        put(&spool, vec![delivery("t", 1), delivery("t", 1)]).await;
        let err = spool
            .enqueue(Batch {
                deliveries: vec![delivery("t", 1)],
                dead: vec![],
            })
            .await
            .unwrap_err();
        assert!(matches!(err, SpoolError::Full { .. }), "{err}");
        let taken = spool.take_due("t", 1, 1);
        spool.complete(&taken[0]);
        spool.flush().await.unwrap();
        put(&spool, vec![delivery("t", 1)]).await;
        drop(spool);
        // The budget in use is stored too.
        let spool = RedbSpool::open(dir.path(), one * 2).unwrap();
        assert_eq!(spool.used_bytes(), one * 2);
    }

    #[test]
    fn slow_commits_are_reported_at_once_then_at_most_every_interval() {
        let ms = std::time::Duration::from_millis;
        let t0 = std::time::Instant::now();
        let mut slow = SlowCommits::default();
        assert_eq!(slow.note(ms(3), t0), None, "a fast commit says nothing");
        // The first slow commit is reported when it happens.
        assert_eq!(
            slow.note(ms(400), t0 + ms(10)),
            Some(SlowReport {
                count: 1,
                slowest: ms(400)
            })
        );
        // Within the interval, slow commits are counted, not logged…
        assert_eq!(slow.note(ms(900), t0 + ms(2_000)), None);
        assert_eq!(slow.note(ms(300), t0 + ms(5_000)), None);
        assert_eq!(slow.note(ms(1), t0 + ms(9_000)), None);
        // …and the first commit after it, fast or not, reports them with the slowest.
        assert_eq!(
            slow.note(ms(2), t0 + ms(10_010)),
            Some(SlowReport {
                count: 2,
                slowest: ms(900)
            })
        );
        assert_eq!(
            slow.note(ms(2), t0 + ms(30_000)),
            None,
            "nothing new to say"
        );
        assert_eq!(
            slow.note(SLOW_COMMIT, t0 + ms(31_000)),
            Some(SlowReport {
                count: 1,
                slowest: SLOW_COMMIT
            })
        );
    }

    #[test]
    fn a_second_process_cannot_open_the_same_spool() {
        let dir = tempfile::tempdir().unwrap();
        let _first = RedbSpool::open(dir.path(), 1 << 20).unwrap();
        let err = RedbSpool::open(dir.path(), 1 << 20).err().unwrap();
        assert!(err.to_string().contains("spool.redb"), "{err}");
    }
}
