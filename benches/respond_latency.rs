//! The latency a synchronous route adds to a before-callback's answer.
//!
//! ```text
//! cargo bench --bench respond_latency                      # 200 callbacks/s over 8 connections, 15 s
//! RATE=500 CONNECTIONS=16 SECONDS=30 TARGET_MS=5 cargo bench --bench respond_latency
//! ```
//!
//! A release gateway is started on a fresh rules directory: a signed Tencent source, a
//! `respond: true` route with a `response_transform` to a moderation target, and a plain route
//! copying every callback (durably, through the redb spool) to an audit target. Clients post
//! `Group.CallbackBeforeSendMsg` callbacks with a valid `Sign` at a fixed rate. The moderation
//! target (in this process) takes `TARGET_MS` to answer and notes, per callback, how long it
//! held each request. For every callback the added latency is the answer time the client saw
//! minus the target's hold time: both network hops, the ingress, the router, the spool write
//! done meanwhile, the response transform. The same clients then post straight to the target,
//! which shows what one bare HTTP hop costs on this machine.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const TOKEN: &str = "bench-token";
const APP_ID: &str = "1400000000";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// How long the target held each request, by the callback's `Random`.
type Holds = Arc<Mutex<HashMap<u64, Duration>>>;

async fn target(delay: Duration) -> (SocketAddr, Holds) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let holds: Holds = Arc::default();
    let shared = holds.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let holds = shared.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let holds = holds.clone();
                    async move {
                        let arrived = Instant::now();
                        let moderate = req.uri().path() == "/moderate";
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        if moderate {
                            tokio::time::sleep(delay).await;
                            if let Some(random) = random_of(&body) {
                                holds.lock().unwrap().insert(random, arrived.elapsed());
                            }
                        }
                        let answer: &'static [u8] = if moderate {
                            br#"{"verdict":"pass"}"#
                        } else {
                            b"ok"
                        };
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(answer))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, holds)
}

fn random_of(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(body).ok()?["Random"].as_u64()
}

fn rules(dir: &std::path::Path, target: SocketAddr) {
    std::fs::write(
        dir.join("bench.yaml"),
        format!(
            "sources:
  tencent-im: {{path: /im/tencent, dialect: tencent, app_ids: ['{APP_ID}'], token: {TOKEN}}}
targets:
  moderation: {{url: 'http://{target}/moderate', timeout: 1s}}
  audit: {{url: 'http://{target}/audit'}}
routes:
  - name: moderate
    commands: ['*.CallbackBeforeSendMsg']
    respond: true
    response_transform: |
      #{{ActionStatus: \"OK\", ErrorCode: if response.verdict == \"pass\" {{ 0 }} else {{ 1 }}, ErrorInfo: \"\"}}
    to: [moderation]
  - name: audit
    to: [audit]
"
        ),
    )
    .unwrap();
}

struct Gateway {
    child: std::process::Child,
    ingress: SocketAddr,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_gateway(rules: &std::path::Path, data: &std::path::Path) -> Gateway {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("serve")
        .arg("--rules")
        .arg(rules)
        .arg("--data-dir")
        .arg(data)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--log-format", "json"])
        .env("SWITCHYARD_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start switchyard");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let ingress = loop {
        let line = lines
            .next()
            .expect("switchyard exited before it listened")
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["message"] == "listening" && v["listener"] == "ingress" {
            break v["addr"].as_str().unwrap().parse().unwrap();
        }
    };
    // Keep draining the log so the gateway never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Gateway { child, ingress }
}

fn body(random: u64) -> String {
    format!(
        r#"{{"CallbackCommand":"Group.CallbackBeforeSendMsg","GroupId":"@TGS#2J4SZEAEL","Type":"Public","From_Account":"jared","Operator_Account":"admin","Random":{random},"OnlineOnlyFlag":1,"MsgBody":[{{"MsgType":"TIMTextElem","MsgContent":{{"Text":"hello"}}}}]}}"#
    )
}

/// Posts callbacks at `rate` per second over `connections` for `seconds`; returns, per answered
/// callback, (answer time, the callback's Random).
async fn drive(
    url: Arc<dyn Fn() -> String + Send + Sync>,
    rate: u64,
    connections: u64,
    seconds: u64,
    first_random: u64,
) -> Vec<(Duration, u64)> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(connections as usize)
        .build()
        .unwrap();
    let interval = Duration::from_secs_f64(connections as f64 / rate as f64);
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut next = Instant::now() + interval.mul_f64(c as f64 / connections as f64);
            let mut n = 0u64;
            while next < end {
                tokio::time::sleep_until(next.into()).await;
                next += interval;
                let random = first_random + c * 10_000_000 + n;
                n += 1;
                let started = Instant::now();
                let reply = client
                    .post(url())
                    .header("content-type", "application/json")
                    .body(body(random))
                    .send()
                    .await;
                if let Ok(reply) = reply {
                    let ok = reply.status().is_success();
                    let text = reply.bytes().await.unwrap_or_default();
                    if ok && !text.is_empty() {
                        out.push((started.elapsed(), random));
                    }
                }
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn added(samples: &[(Duration, u64)], holds: &Holds) -> Vec<f64> {
    let holds = holds.lock().unwrap();
    let mut out: Vec<f64> = samples
        .iter()
        .filter_map(|(total, random)| {
            let hold = holds.get(random)?;
            Some((total.saturating_sub(*hold)).as_secs_f64() * 1000.0)
        })
        .collect();
    out.sort_by(|a, b| a.partial_cmp(b).unwrap());
    out
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing and wants no run.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rate: u64 = env_or("RATE", 200);
    let connections: u64 = env_or("CONNECTIONS", 8);
    let seconds: u64 = env_or("SECONDS", 15);
    let delay = Duration::from_millis(env_or("TARGET_MS", 2));
    let (target_addr, holds) = target(delay).await;
    let dir = tempfile::tempdir().unwrap();
    let (rules_dir, data_dir) = (dir.path().join("rules"), dir.path().join("data"));
    std::fs::create_dir_all(&rules_dir).unwrap();
    rules(&rules_dir, target_addr);
    let gateway = start_gateway(&rules_dir, &data_dir);
    let ingress = gateway.ingress;
    let gateway_url: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            .to_string();
        let sign = switchyard::dialect::tencent::sign(TOKEN, &t);
        format!(
            "http://{ingress}/im/tencent?SdkAppid={APP_ID}&CallbackCommand=Group.CallbackBeforeSendMsg\
             &contenttype=json&ClientIP=127.0.0.1&OptPlatform=RESTAPI&Sign={sign}&RequestTime={t}"
        )
    });
    println!(
        "synchronous route: {rate} callbacks/s over {connections} connections for {seconds}s, \
         target answers in {delay:?}"
    );
    // A short warm-up fills the connection pools on both sides.
    drive(gateway_url.clone(), rate, connections, 1, 1).await;
    let via_gateway = drive(gateway_url, rate, connections, seconds, 1 << 40).await;
    let direct_url: Arc<dyn Fn() -> String + Send + Sync> =
        Arc::new(move || format!("http://{target_addr}/moderate"));
    let direct = drive(direct_url, rate, connections, seconds.min(5), 1 << 41).await;

    let gw = added(&via_gateway, &holds);
    let bare = added(&direct, &holds);
    let expected = rate * seconds;
    println!(
        "answered through the gateway: {} of {expected} (timed against the target: {})",
        via_gateway.len(),
        gw.len()
    );
    println!("                           p50 ms   p90 ms   p99 ms   max ms");
    for (name, v) in [("gateway adds", &gw), ("a direct HTTP hop", &bare)] {
        println!(
            "{name:<24} {:>8.3} {:>8.3} {:>8.3} {:>8.3}",
            percentile(v, 0.50),
            percentile(v, 0.90),
            percentile(v, 0.99),
            v.last().copied().unwrap_or(f64::NAN)
        );
    }
    drop(gateway);
}
