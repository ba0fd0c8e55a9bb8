//! Issue 3, durable delivery, as the IM server and the downstream service observe it: whatever
//! the gateway acknowledged reaches its target, across `kill -9`, crash loops, outages of the
//! target and graceful restarts, with retry state carried over; a full spool answers 503 and
//! loses nothing it acknowledged; a second gateway cannot open a spool in use.
//!
//! Every callback carries a unique sequence number `n`; the sinks' bodies are grouped by it, so
//! "missing" and "duplicated" are exact. At-least-once: a repeat is only acceptable when an
//! attempt may have been in flight at a crash, and then it must carry the same `webhook-id`.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;
use switchyard::spool::Spool as _;

const GENERIC: &str = "sources:\n  g: {path: /hooks/g, dialect: generic, command: body.type}\n";
/// Short backoffs, and enough attempts that nothing becomes a dead letter during a test.
const RETRY: &str = "{max_attempts: 1000, backoff: 50ms, max_backoff: 300ms}";

/// Rules with the generic source, one target `t` at `url` and one route `r` to it.
fn one_target(url: &str, target_extra: &str) -> RulesDir {
    let rules = RulesDir::new();
    rules.write(
        "r.yaml",
        &format!(
            "{GENERIC}targets:\n  t: {{url: '{url}', retry: {RETRY}{target_extra}}}\nroutes:\n  - {{name: r, to: [t]}}\n"
        ),
    );
    rules
}

fn body(n: u64) -> String {
    format!(r#"{{"type":"x","n":{n}}}"#)
}

/// One acknowledged callback.
#[derive(Clone, Debug)]
struct Ack {
    event_id: String,
    at: Instant,
}

/// Acknowledged callbacks by sequence number.
type Acked = BTreeMap<u64, Ack>;

/// A client that never pools, so a request never rides a connection to a gateway that died.
fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Posts callback `n`; `Err` when no HTTP answer came (the gateway is down or died meanwhile),
/// else the status and, for a 200, the acknowledged event id.
async fn try_post(
    client: &reqwest::Client,
    url: &str,
    n: u64,
) -> Result<(u16, Option<String>), reqwest::Error> {
    let resp = client
        .post(url)
        .header("content-type", "application/json")
        .body(body(n))
        .send()
        .await?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    if status != 200 {
        return Ok((status, None));
    }
    let ack: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("an acknowledgement that is not JSON ({e}): {text:?}"));
    assert_eq!(ack["ok"], true, "{ack}");
    let event_id = ack["event_id"].as_str().expect("event_id").to_string();
    Ok((status, Some(event_id)))
}

/// Posts callbacks `seqs` all at once (so they share commits); every one must be acknowledged.
async fn post_all(gw: &Gateway, seqs: std::ops::Range<u64>) -> Acked {
    let client = fresh_client();
    let url = gw.url("/hooks/g");
    let mut set = tokio::task::JoinSet::new();
    for n in seqs {
        let (client, url) = (client.clone(), url.clone());
        set.spawn(async move { (n, try_post(&client, &url, n).await) });
    }
    let mut acked = Acked::new();
    while let Some(joined) = set.join_next().await {
        let (n, result) = joined.unwrap();
        match result {
            Ok((200, Some(event_id))) => {
                acked.insert(
                    n,
                    Ack {
                        event_id,
                        at: Instant::now(),
                    },
                );
            }
            other => panic!("callback {n} was not acknowledged: {other:?}"),
        }
    }
    acked
}

fn seq_of(r: &Received) -> u64 {
    r.json()["n"]
        .as_u64()
        .unwrap_or_else(|| panic!("a body without n: {:?}", r.body))
}

/// Everything the sinks received, by sequence number, in arrival order per sink.
fn by_seq(sinks: &[&Sink]) -> BTreeMap<u64, Vec<Received>> {
    let mut out: BTreeMap<u64, Vec<Received>> = BTreeMap::new();
    for sink in sinks {
        for r in sink.received() {
            out.entry(seq_of(&r)).or_default().push(r);
        }
    }
    out
}

/// Waits until every acknowledged callback reached one of the sinks; panics naming the missing
/// ones after `timeout`.
async fn wait_delivered(
    sinks: &[&Sink],
    acked: &Acked,
    timeout: Duration,
) -> BTreeMap<u64, Vec<Received>> {
    let deadline = Instant::now() + timeout;
    loop {
        let got = by_seq(sinks);
        let missing: Vec<u64> = acked
            .keys()
            .filter(|n| !got.contains_key(n))
            .copied()
            .collect();
        if missing.is_empty() {
            return got;
        }
        if Instant::now() > deadline {
            panic!(
                "{} of {} acknowledged callbacks never reached the target, e.g. {:?}",
                missing.len(),
                acked.len(),
                &missing[..missing.len().min(20)]
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every acknowledged callback arrived, each time as the delivery of its own event and with one
/// `webhook-id` however often it arrived. Returns how many requests were repeats.
fn assert_same_delivery_on_every_arrival(
    acked: &Acked,
    got: &BTreeMap<u64, Vec<Received>>,
) -> usize {
    let mut repeats = 0;
    for (n, ack) in acked {
        let arrivals = got.get(n).unwrap_or_else(|| panic!("callback {n} missing"));
        let id = arrivals[0].header("webhook-id");
        assert!(!id.is_empty(), "callback {n} arrived without a webhook-id");
        for r in arrivals {
            assert_eq!(
                r.header("x-switchyard-event"),
                ack.event_id,
                "callback {n} arrived as another event"
            );
            assert_eq!(
                r.header("webhook-id"),
                id,
                "callback {n} arrived twice with different webhook-ids: a repeat a receiver cannot dedupe"
            );
        }
        repeats += arrivals.len() - 1;
    }
    repeats
}

/// Exactly the acknowledged callbacks arrived, each exactly once.
fn assert_exactly_once(acked: &Acked, got: &BTreeMap<u64, Vec<Received>>) {
    let repeats = assert_same_delivery_on_every_arrival(acked, got);
    let twice: Vec<u64> = got
        .iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(repeats, 0, "delivered more than once: {twice:?}");
    let extra: Vec<&u64> = got.keys().filter(|n| !acked.contains_key(n)).collect();
    assert!(
        extra.is_empty(),
        "delivered but never acknowledged: {extra:?}"
    );
}

/// Waits until nothing listens on `addr` any more.
async fn wait_closed(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "{addr} still accepts connections"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What the spool file holds for `target`, read by this process with the gateway's own code:
/// deliveries queued, and dead letters in all.
fn spool_on_disk(dir: &Path, target: &str) -> (u64, u64) {
    let spool = switchyard::spool::RedbSpool::open(dir, u64::MAX)
        .unwrap_or_else(|e| panic!("cannot open the spool in {}: {e}", dir.display()));
    let stats = spool.stats(target);
    let dead = spool.dead_counts().iter().map(|(_, n)| n).sum();
    (stats.queued + stats.in_flight, dead)
}

/// Background senders posting numbered callbacks to whatever gateway is current, until stopped
/// (or a bound on the count is reached). Only 200 answers count as acknowledged.
struct Traffic {
    url: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Acked>>,
    /// Requests that got no HTTP answer (the gateway was down or died under them).
    unanswered: Arc<AtomicU64>,
    /// HTTP answers other than 200: (n, status).
    refused: Arc<Mutex<Vec<(u64, u16)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    /// At most this many callbacks in all: the loops are bounded whatever happens.
    const MAX: u64 = 20_000;

    fn start(url: String, senders: usize, pause: Duration) -> Traffic {
        let url = Arc::new(Mutex::new(url));
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Acked::new()));
        let unanswered = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(Mutex::new(Vec::new()));
        let next = Arc::new(AtomicU64::new(0));
        let tasks = (0..senders)
            .map(|_| {
                let (url, stop, acked) = (url.clone(), stop.clone(), acked.clone());
                let (unanswered, refused, next) =
                    (unanswered.clone(), refused.clone(), next.clone());
                tokio::spawn(async move {
                    let client = fresh_client();
                    while !stop.load(Ordering::Acquire) {
                        let n = next.fetch_add(1, Ordering::AcqRel);
                        if n >= Self::MAX {
                            return;
                        }
                        let current = url.lock().unwrap().clone();
                        match try_post(&client, &current, n).await {
                            Ok((200, Some(event_id))) => {
                                let at = Instant::now();
                                acked.lock().unwrap().insert(n, Ack { event_id, at });
                            }
                            Ok((status, _)) => refused.lock().unwrap().push((n, status)),
                            Err(_) => {
                                unanswered.fetch_add(1, Ordering::Relaxed);
                                // The gateway is down: do not spin.
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                        tokio::time::sleep(pause).await;
                    }
                })
            })
            .collect();
        Traffic {
            url,
            stop,
            acked,
            unanswered,
            refused,
            tasks,
        }
    }

    fn retarget(&self, url: String) {
        *self.url.lock().unwrap() = url;
    }

    fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits until `n` more callbacks than `since` were acknowledged.
    async fn wait_acked(&self, since: usize, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.acked_count() < since + n {
            assert!(
                Instant::now() < deadline,
                "the senders got only {} acknowledgements in {timeout:?}",
                self.acked_count() - since
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the senders; returns what was acknowledged, how many requests went unanswered and
    /// the non-200 answers.
    async fn finish(self) -> (Acked, u64, Vec<(u64, u16)>) {
        self.stop.store(true, Ordering::Release);
        for task in self.tasks {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("a sender did not stop")
                .unwrap();
        }
        let acked = self.acked.lock().unwrap().clone();
        let refused = self.refused.lock().unwrap().clone();
        (acked, self.unanswered.load(Ordering::Relaxed), refused)
    }
}

/// Issue 3 §3, and the ack is sent only once the spool file holds the delivery: callbacks are
/// acknowledged while the target is down, the gateway is killed the instant the last ack
/// arrives, and the next gateway on the same data dir delivers every one of them, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_acknowledged_while_the_target_is_down_survive_kill_9() {
    let addr = reserved_addr().await;
    let rules = one_target(&format!("http://{addr}/in"), "");
    let gw = Gateway::start(rules.path());
    let acked = post_all(&gw, 0..40).await;
    // No pause between the last acknowledgement and the crash.
    let data = gw.kill();

    let sink = Sink::restart_on(addr).await;
    let gw = Gateway::start_in(rules.path(), data, &[], &[]);
    let got = wait_delivered(&[&sink], &acked, Duration::from_secs(20)).await;
    // Time for any repeat to show up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The target never answered before the crash, so no attempt can be repeated: exactly once.
    assert_exactly_once(&acked, &by_seq(&[&sink]));
    assert_eq!(got.len(), 40);
    eventually(Duration::from_secs(5), "the queue is empty", || async {
        gw.metric("switchyard_queue_depth{target=\"t\"}").await == 0.0
    })
    .await;
}

/// The file on disk, read right after each crash: at the moment an acknowledgement is received,
/// its delivery is already in the spool file (kill -9 with no delay after the ack, three times
/// over on the same data dir); then the target comes up and gets every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spool_file_holds_every_callback_at_the_moment_of_its_ack() {
    let addr = reserved_addr().await;
    let rules = one_target(&format!("http://{addr}/in"), "");
    let mut data = tempfile::tempdir().unwrap();
    let mut acked = Acked::new();
    for round in 0..3u64 {
        let gw = Gateway::start_in(rules.path(), data, &[], &[]);
        acked.extend(post_all(&gw, round * 10..round * 10 + 10).await);
        data = gw.kill();
        let (queued, dead) = spool_on_disk(data.path(), "t");
        assert_eq!(
            queued,
            acked.len() as u64,
            "after round {round}: {} callbacks acknowledged, {queued} deliveries in the spool file",
            acked.len()
        );
        assert_eq!(dead, 0);
    }
    let sink = Sink::restart_on(addr).await;
    let _gw = Gateway::start_in(rules.path(), data, &[], &[]);
    wait_delivered(&[&sink], &acked, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_exactly_once(&acked, &by_seq(&[&sink]));
}

/// SPEC §4/§5: the target goes down for a few seconds while callbacks keep coming; every one is
/// acknowledged at once regardless, and every one is delivered once the target is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_the_target_under_traffic_loses_nothing() {
    // Below the ephemeral ports: nothing else can take the port while the sink is down.
    let addr = reserved_addr().await;
    let sink = Sink::start_on(&addr.to_string()).await;
    let rules = one_target(&format!("{}/in", sink.url()), "");
    let gw = Gateway::start(rules.path());
    let traffic = Traffic::start(gw.url("/hooks/g"), 2, Duration::from_millis(5));

    traffic.wait_acked(0, 20, Duration::from_secs(10)).await;
    sink.stop();
    wait_closed(addr).await;
    let down_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let up_at = Instant::now();
    let back = Sink::restart_on(addr).await;
    let since = traffic.acked_count();
    traffic.wait_acked(since, 20, Duration::from_secs(10)).await;
    let (acked, unanswered, refused) = traffic.finish().await;

    assert_eq!(unanswered, 0, "the gateway left requests unanswered");
    assert!(refused.is_empty(), "not acknowledged: {refused:?}");
    let during = acked
        .values()
        .filter(|a| a.at > down_at && a.at < up_at)
        .count();
    assert!(during > 0, "no callback was acknowledged during the outage");
    let retries = gw
        .metric("switchyard_deliveries_total{route=\"r\",target=\"t\",outcome=\"retry\"}")
        .await;
    assert!(retries > 0.0, "the gateway never saw the outage");

    let got = wait_delivered(&[&sink, &back], &acked, Duration::from_secs(30)).await;
    // An attempt cut off by the sink going down may be repeated, with its webhook-id.
    let repeats = assert_same_delivery_on_every_arrival(&acked, &got);
    eprintln!(
        "outage: {} acknowledged ({during} during the outage), {repeats} repeated",
        acked.len()
    );
}

/// `kill -9`, then a gateway on the same data dir that the traffic goes to; and when the killed
/// process was gone.
fn restart_after_kill(gw: Gateway, rules: &RulesDir, traffic: &Traffic) -> (Gateway, Instant) {
    let data = gw.kill();
    let gone = Instant::now();
    let gw = Gateway::start_in(rules.path(), data, &[], &[]);
    traffic.retarget(gw.url("/hooks/g"));
    (gw, gone)
}

/// After the last restart: `more` callbacks acknowledged, the traffic stopped, and every one it
/// had acknowledged delivered, each time as the same delivery. Returns what was acknowledged,
/// how many requests went unanswered, the arrivals and how many of them were repeats.
async fn finish_after_crashes(
    traffic: Traffic,
    sink: &Sink,
    more: usize,
) -> (Acked, u64, BTreeMap<u64, Vec<Received>>, usize) {
    let since = traffic.acked_count();
    traffic
        .wait_acked(since, more, Duration::from_secs(15))
        .await;
    let (acked, unanswered, refused) = traffic.finish().await;
    assert!(
        refused.is_empty(),
        "a live gateway refused callbacks: {refused:?}"
    );
    let got = wait_delivered(&[sink], &acked, Duration::from_secs(30)).await;
    let repeats = assert_same_delivery_on_every_arrival(&acked, &got);
    (acked, unanswered, got, repeats)
}

/// Issue 3 §3: `kill -9` four times while callbacks flow (and deliveries are in flight to a
/// slowish target), each time restarting on the same data dir: nothing acknowledged is missing,
/// and whatever arrived twice arrived as the same delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_under_traffic_loses_nothing_acknowledged() {
    let sink = Sink::start().await;
    sink.set_default(Answer::status(200).delayed(Duration::from_millis(30)));
    let rules = one_target(&format!("{}/in", sink.url()), ", concurrency: 4");
    let mut gw = Gateway::start(rules.path());
    let traffic = Traffic::start(gw.url("/hooks/g"), 3, Duration::from_millis(2));
    // When each kill was sent, and when the process was gone.
    let mut crashes: Vec<(Instant, Instant)> = Vec::new();
    for _ in 0..4 {
        // Kill only once this life has acknowledged some callbacks: the crash hits live traffic.
        let since = traffic.acked_count();
        traffic.wait_acked(since, 30, Duration::from_secs(15)).await;
        let sent = Instant::now();
        let gone;
        (gw, gone) = restart_after_kill(gw, &rules, &traffic);
        crashes.push((sent, gone));
    }
    let (acked, unanswered, got, repeats) = finish_after_crashes(traffic, &sink, 15).await;
    // Callbacks whose request died with the gateway may or may not have been stored (those may
    // arrive too, unacknowledged): at-least-once is about what was acknowledged. But a repeat,
    // of any callback, is only ever the attempt a crash interrupted: a crash lies between any
    // two arrivals of one callback.
    for (n, arrivals) in &got {
        let mut at: Vec<Instant> = arrivals.iter().map(|r| r.at).collect();
        at.sort();
        for pair in at.windows(2) {
            assert!(
                crashes
                    .iter()
                    .any(|(sent, gone)| pair[0] <= *gone && pair[1] >= *sent),
                "callback {n} was delivered twice by one gateway, {:?} apart",
                pair[1] - pair[0]
            );
        }
    }
    eprintln!(
        "crash loop: {} acknowledged, {unanswered} unanswered, {repeats} repeated",
        acked.len()
    );
}

/// `kill -9` after the spool has checkpointed under traffic, twice: a checkpoint while deliveries
/// are on their way carries them over into the write-ahead log's other file instead of writing
/// them to the database, and a crash after it must find them there. Nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_checkpoints_under_traffic_loses_nothing_acknowledged() {
    let sink = Sink::start().await;
    // Slower than the traffic: deliveries wait their turn, and each checkpoint finds some on
    // their way that the crash after it comes before.
    sink.set_default(Answer::status(200).delayed(Duration::from_millis(20)));
    let rules = one_target(&format!("{}/in", sink.url()), ", concurrency: 4");
    let mut gw = Gateway::start(rules.path());
    let traffic = Traffic::start(gw.url("/hooks/g"), 2, Duration::from_millis(5));
    for life in 0..2 {
        let since = traffic.acked_count();
        traffic.wait_acked(since, 20, Duration::from_secs(15)).await;
        // Checkpoints come once a second: two of them under traffic before the crash.
        tokio::time::sleep(Duration::from_millis(2300)).await;
        let checkpoints = gw.metric("switchyard_spool_checkpoints_total").await;
        assert!(checkpoints >= 2.0, "life {life}: {checkpoints} checkpoints");
        gw = restart_after_kill(gw, &rules, &traffic).0;
    }
    let (acked, unanswered, _, repeats) = finish_after_crashes(traffic, &sink, 20).await;
    eprintln!(
        "crashes after checkpoints: {} acknowledged, {unanswered} unanswered, {repeats} repeated",
        acked.len()
    );
}

/// Issue 3 §2: the retry state lives in the spool. A delivery fails a few times, the gateway is
/// stopped, and the next one goes on with the next attempt number and the same webhook-id;
/// after a `kill -9` it goes on too (repeating at most the attempt that was in flight). A
/// delivery with `max_attempts: 3` makes three attempts in all, however the restarts split them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_state_survives_a_restart() {
    let sink = Sink::start().await;
    sink.set_default(Answer::status(503));
    let capped = Sink::start().await;
    capped.set_default(Answer::status(503));
    let rules = RulesDir::new();
    rules.write(
        "r.yaml",
        &format!(
            "{GENERIC}targets:
  t: {{url: '{}/in', retry: {RETRY}}}
  capped: {{url: '{}/in', retry: {{max_attempts: 3, backoff: 50ms, max_backoff: 300ms}}}}
routes:
  - {{name: r, to: [t, capped]}}
",
            sink.url(),
            capped.url()
        ),
    );
    let gw = Gateway::start(rules.path());
    let acked = post_all(&gw, 0..1).await;
    sink.wait_for(2, Duration::from_secs(10)).await;
    let (status, _, data) = gw.stop_keeping_data(Duration::from_secs(15));
    assert!(status.success(), "exit status {status:?}");
    // The gateway is gone: every attempt it made has been answered and counted.
    let before = sink.count();

    let gw = Gateway::start_in(rules.path(), data, &[], &[]);
    let got = sink.wait_for(before + 2, Duration::from_secs(10)).await;
    let attempts: Vec<u32> = got
        .iter()
        .map(|r| r.header("x-switchyard-attempt").parse().unwrap())
        .collect();
    let expected: Vec<u32> = (1..=got.len() as u32).collect();
    assert_eq!(
        attempts, expected,
        "attempt numbers across a graceful restart after {before} attempts"
    );
    let id = got[0].header("webhook-id");
    assert!(got.iter().all(|r| r.header("webhook-id") == id));
    let capped_got = capped.wait_for(3, Duration::from_secs(10)).await;
    let capped_attempts: Vec<&str> = capped_got
        .iter()
        .map(|r| r.header("x-switchyard-attempt"))
        .collect();
    assert_eq!(capped_attempts, ["1", "2", "3"]);

    // Now a crash; the target recovers meanwhile.
    let data = gw.kill();
    sink.set_default(Answer::status(200));
    let before_crash = sink.count();
    let _gw = Gateway::start_in(rules.path(), data, &[], &[]);
    let got = sink
        .wait_for(before_crash + 1, Duration::from_secs(10))
        .await;
    let after: u32 = got[before_crash]
        .header("x-switchyard-attempt")
        .parse()
        .unwrap();
    // The last attempt before the crash may not have been stored: it is the only one repeated.
    assert!(
        after == before_crash as u32 || after == before_crash as u32 + 1,
        "after {before_crash} attempts and a kill -9, the next attempt was numbered {after}"
    );
    assert_eq!(got[before_crash].header("webhook-id"), id);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        sink.count(),
        before_crash + 1,
        "nothing is sent after the 2xx"
    );
    assert_same_delivery_on_every_arrival(&acked, &by_seq(&[&sink]));
    // Two starts and many backoff periods later, the capped delivery is still at three attempts
    // (unless the crash came before its third failure was stored: then it repeats that one).
    let capped_total = capped.count();
    let last = capped.received()[capped_total - 1]
        .header("x-switchyard-attempt")
        .to_string();
    assert!(
        capped_total == 3 || (capped_total == 4 && last == "3"),
        "a delivery of max_attempts 3 made {capped_total} attempts across restarts"
    );
}

/// Issue 3 §3: graceful shutdown finishes or re-queues. At SIGTERM, the attempt in flight to a
/// slowish target finishes and is not made again; deliveries waiting for a target that is down,
/// and attempts still hanging on another target when the grace period ends, are delivered
/// after the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_queued_or_in_flight_at_sigterm_are_delivered_after_the_next_start() {
    let down = reserved_addr().await;
    let hang = Sink::start().await;
    hang.set_default(Answer::status(200).delayed(Duration::from_secs(60)));
    let busy = Sink::start().await;
    busy.set_default(Answer::status(200).delayed(Duration::from_millis(800)));
    let rules = RulesDir::new();
    rules.write(
        "r.yaml",
        &format!(
            "{GENERIC}targets:
  down: {{url: 'http://{down}/d', retry: {RETRY}}}
  hang: {{url: '{}/h', concurrency: 2, timeout: 60s, retry: {RETRY}}}
  busy: {{url: '{}/b', concurrency: 1, retry: {RETRY}}}
routes:
  - {{name: r, to: [down, hang, busy]}}
",
            hang.url(),
            busy.url()
        ),
    );
    let gw = Gateway::start(rules.path());
    let acked = post_all(&gw, 0..10).await;
    let hung = hang.wait_for(2, Duration::from_secs(10)).await;
    busy.wait_for(1, Duration::from_secs(10)).await;
    let (status, logs, data) = gw.stop_keeping_data(Duration::from_secs(20));
    assert!(status.success(), "exit status {status:?}");
    // Every attempt `busy` got before the exit was answered within the grace period.
    let busy_before = busy.count();
    let log = parse_log(&logs);
    let left = log
        .iter()
        .find(|l| l["message"] == "deliveries left queued for the next start")
        .unwrap_or_else(|| panic!("no count of what was left queued:\n{}", logs.join("\n")));
    // Ten for `down`, eight waiting behind the two hung attempts of `hang`, and those of `busy`
    // that had not been attempted.
    assert_eq!(left["queued"], 10 + 8 + (10 - busy_before), "{left}");

    hang.set_default(Answer::status(200));
    busy.set_default(Answer::status(200));
    let up = Sink::restart_on(down).await;
    let _gw = Gateway::start_in(rules.path(), data, &[], &[]);
    // Ten deliveries, two of them a second time (the hung attempts seen before the stop).
    hang.wait_for(12, Duration::from_secs(20)).await;
    wait_delivered(&[&hang], &acked, Duration::from_secs(5)).await;
    wait_delivered(&[&up], &acked, Duration::from_secs(20)).await;
    wait_delivered(&[&busy], &acked, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_exactly_once(&acked, &by_seq(&[&up]));
    // The attempts that finished during the shutdown were stored as delivered.
    assert_exactly_once(&acked, &by_seq(&[&busy]));
    // The two attempts cut off at exit are made again, with their webhook-ids; nothing else is.
    let got = by_seq(&[&hang]);
    assert_same_delivery_on_every_arrival(&acked, &got);
    let twice: Vec<u64> = got
        .iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(n, _)| *n)
        .collect();
    let hung: Vec<u64> = hung.iter().map(seq_of).collect();
    assert_eq!(twice.len(), 2, "{twice:?}");
    assert!(twice.iter().all(|n| hung.contains(n)), "{twice:?} {hung:?}");
}

/// SPEC §5 with the durable spool: a target that is slow (a backlog behind one slot) and one
/// that is down do not delay a third.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_target_with_a_backlog_does_not_delay_another() {
    const HOLD: Duration = Duration::from_secs(5);
    let slow = Sink::start().await;
    slow.set_default(Answer::status(200).delayed(HOLD));
    let fast = Sink::start().await;
    let down = reserved_addr().await;
    let rules = RulesDir::new();
    rules.write(
        "r.yaml",
        &format!(
            "{GENERIC}targets:
  slow: {{url: '{}/slow', concurrency: 1, timeout: 30s}}
  down: {{url: 'http://{down}/down', retry: {RETRY}}}
  fast: {{url: '{}/fast'}}
routes:
  - {{name: r, to: [slow, down, fast]}}
",
            slow.url(),
            fast.url()
        ),
    );
    let gw = Gateway::start(rules.path());
    let acked = post_all(&gw, 0..20).await;
    let got = wait_delivered(&[&fast], &acked, Duration::from_secs(10)).await;
    let first_slow = slow.wait_for(1, Duration::from_secs(5)).await[0].at;
    let last_fast = got.values().flatten().map(|r| r.at).max().unwrap();
    assert!(
        last_fast < first_slow + HOLD,
        "the fast target got its last delivery {:?} after the slow one's first request, which \
         is held {HOLD:?}",
        last_fast - first_slow
    );
    // The slow target is still on its first request with the rest queued behind it.
    assert_eq!(slow.count(), 1);
    let depth = gw.metric("switchyard_queue_depth{target=\"slow\"}").await;
    assert_eq!(depth, 20.0, "one in flight and nineteen queued");
    assert_exactly_once(&acked, &by_seq(&[&fast]));
    slow.stop();
}

/// Issue 3 §1: over `--max-spool` the ingress answers 503 in each dialect's shape; after a crash
/// and a restart with the target up, exactly the acknowledged callbacks are delivered, and the
/// budget they held is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_answers_503_and_a_restart_delivers_exactly_what_was_acknowledged() {
    let addr = reserved_addr().await;
    let rules = RulesDir::new();
    rules.write(
        "r.yaml",
        &format!(
            "sources:
  g: {{path: /hooks/g, dialect: generic, command: body.type}}
  t: {{path: /im/tencent, dialect: tencent, app_ids: ['{APP_ID}']}}
  o: {{path: /im/openim, dialect: openim}}
targets:
  t: {{url: 'http://{addr}/x', retry: {RETRY}}}
routes:
  - {{name: r, to: [t]}}
"
        ),
    );
    let args = ["--max-spool", "4KiB"];
    let gw = Gateway::start_with(rules.path(), &args, &[]);
    let client = fresh_client();
    let url = gw.url("/hooks/g");
    let pad = "p".repeat(100);
    let padded = |n: u64| format!(r#"{{"type":"x","n":{n},"pad":"{pad}"}}"#);
    let mut acked = Acked::new();
    let mut refused = Vec::new();
    for n in 0..100u64 {
        let resp = client
            .post(&url)
            .header("content-type", "application/json")
            .body(padded(n))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let answer: serde_json::Value = resp.json().await.unwrap();
        match status {
            200 => {
                let event_id = answer["event_id"].as_str().unwrap().to_string();
                let at = Instant::now();
                acked.insert(n, Ack { event_id, at });
            }
            503 => {
                assert_eq!(answer["ok"], false, "{answer}");
                assert!(!answer["error"].as_str().unwrap().is_empty(), "{answer}");
                refused.push(n);
                // A few more after the first refusal: all refused, nothing drains.
                if refused.len() == 5 {
                    break;
                }
            }
            other => panic!("unexpected {other}: {answer}"),
        }
    }
    assert_eq!(refused.len(), 5, "a 4 KiB spool never filled up");
    assert!(acked.len() >= 3, "only {} acknowledged", acked.len());
    assert!(
        refused.iter().all(|r| acked.keys().all(|a| a < r)),
        "acknowledged after a refusal with nothing drained: {acked:?} {refused:?}"
    );

    // The other dialects, in their own shapes (and with their own marks, to check below).
    let tencent = post_json(
        &gw.url(&format!(
            "/im/tencent?{}",
            tencent_query("State.StateChange", None)
        )),
        &format!(r#"{{"CallbackCommand":"x","n":900,"pad":"{pad}"}}"#),
    )
    .await;
    assert_eq!(tencent.status, 503, "{tencent:?}");
    let t = tencent.json();
    assert_eq!(t["ActionStatus"], "FAIL", "{t}");
    assert_eq!(t["ErrorCode"], 1, "{t}");
    assert!(!t["ErrorInfo"].as_str().unwrap().is_empty(), "{t}");
    let openim = post_json(
        &gw.url("/im/openim/callbackAfterSendSingleMsgCommand"),
        &format!(r#"{{"n":901,"pad":"{pad}"}}"#),
    )
    .await;
    assert_eq!(openim.status, 503, "{openim:?}");
    let o = openim.json();
    assert_eq!(o["actionCode"], 1, "{o}");
    assert_eq!(o["errCode"], 503, "{o}");
    assert!(!o["errMsg"].as_str().unwrap().is_empty(), "{o}");
    eventually(Duration::from_secs(5), "refusals counted", || async {
        gw.metric("switchyard_callbacks_total{source=\"g\",command=\"x\",outcome=\"unavailable\"}")
            .await
            == 5.0
    })
    .await;

    let data = gw.kill();
    let sink = Sink::restart_on(addr).await;
    let gw = Gateway::start_in(rules.path(), data, &args, &[]);
    wait_delivered(&[&sink], &acked, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Exactly the acknowledged ones: none of the refused (generic, tencent, openim) arrived.
    assert_exactly_once(&acked, &by_seq(&[&sink]));

    // Delivered deliveries gave their budget back: a full spool's worth fits again.
    let url = gw.url("/hooks/g");
    let more: Vec<u64> = (1000..1000 + acked.len() as u64).collect();
    for n in &more {
        let resp = client
            .post(&url)
            .header("content-type", "application/json")
            .body(padded(*n))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
    }
    sink.wait_for(acked.len() + more.len(), Duration::from_secs(10))
        .await;
}

/// `--spool memory` still serves (and writes no spool file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_spool_still_delivers() {
    let sink = Sink::start().await;
    let rules = one_target(&format!("{}/in", sink.url()), "");
    let gw = Gateway::start_with(rules.path(), &["--spool", "memory"], &[]);
    let acked = post_all(&gw, 0..5).await;
    wait_delivered(&[&sink], &acked, Duration::from_secs(10)).await;
    assert_exactly_once(&acked, &by_seq(&[&sink]));
    assert!(!gw.data_dir.path().join("spool.redb").exists());
}

/// A second gateway on a data dir in use exits at once with an error naming the spool file,
/// and the first one is unharmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_on_the_same_data_dir_refuses_to_start() {
    let sink = Sink::start().await;
    let rules = one_target(&format!("{}/in", sink.url()), "");
    let gw = Gateway::start(rules.path());
    let acked = post_all(&gw, 0..3).await;
    wait_delivered(&[&sink], &acked, Duration::from_secs(10)).await;

    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("serve")
        .arg("--rules")
        .arg(rules.path())
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(gw.data_dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("a second gateway is running on a spool in use");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "exit status {status:?}; {stderr}");
    let file = gw.data_dir.path().join("spool.redb");
    assert!(
        stderr.contains(&*file.to_string_lossy()),
        "the error does not name {}:\n{stderr}",
        file.display()
    );

    let more = post_all(&gw, 3..6).await;
    let mut all = acked;
    all.extend(more);
    wait_delivered(&[&sink], &all, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_exactly_once(&all, &by_seq(&[&sink]));
}

/// A delivery record this build cannot read (damaged, or written by a newer version) is left
/// alone: the others are delivered, and the gateway neither spins on it nor floods the log (it
/// used to retry it every millisecond, logging an error each time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_delivery_record_does_not_stall_or_spin_the_scheduler() {
    use redb::{ReadableDatabase as _, ReadableTable as _};
    const PENDING: redb::TableDefinition<(&str, u64, u128), &[u8]> =
        redb::TableDefinition::new("pending");
    let addr = reserved_addr().await;
    let rules = one_target(&format!("http://{addr}/in"), "");
    let gw = Gateway::start(rules.path());
    let mut acked = post_all(&gw, 0..5).await;
    let data = gw.kill();
    // What the killed gateway's write-ahead log holds is moved into redb (and the log
    // checkpointed) by opening and closing the spool, before the file is edited behind its back.
    spool_on_disk(data.path(), "t");

    // Callback 2's record gets a version byte from the future.
    {
        let db = redb::Database::create(data.path().join("spool.redb")).unwrap();
        let records: Vec<((String, u64, u128), Vec<u8>)> = {
            let txn = db.begin_read().unwrap();
            let table = txn.open_table(PENDING).unwrap();
            table
                .iter()
                .unwrap()
                .map(|e| {
                    let (k, v) = e.unwrap();
                    let (target, due, id) = k.value();
                    ((target.to_string(), due, id), v.value().to_vec())
                })
                .collect()
        };
        let needle = body(2);
        let (id, mut record) = records
            .into_iter()
            .find(|(_, v)| v.windows(needle.len()).any(|w| w == needle.as_bytes()))
            .expect("the record of callback 2");
        record[0] = 0xfe;
        let txn = db.begin_write().unwrap();
        txn.open_table(PENDING)
            .unwrap()
            .insert((id.0.as_str(), id.1, id.2), record.as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    acked.remove(&2);

    let sink = Sink::restart_on(addr).await;
    let gw = Gateway::start_in(rules.path(), data, &[], &[]);
    wait_delivered(&[&sink], &acked, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_exactly_once(&acked, &by_seq(&[&sink]));
    let complaints = gw.logs().iter().filter(|l| l.contains("damaged")).count();
    assert_eq!(
        complaints, 1,
        "{complaints} log lines about the one unreadable record"
    );
    // It is still in the spool, for a build that can read it.
    eventually(
        Duration::from_secs(5),
        "one delivery left queued",
        || async { gw.metric("switchyard_queue_depth{target=\"t\"}").await == 1.0 },
    )
    .await;
}
