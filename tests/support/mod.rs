//! Test harness: the real `switchyard` binary on 127.0.0.1 port 0, real HTTP sinks, real files.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

pub const APP_ID: &str = "1400000000";
pub const TOKEN: &str = "test-token";

/// A rules directory in a temporary folder.
pub struct RulesDir {
    pub dir: tempfile::TempDir,
}

impl RulesDir {
    pub fn new() -> RulesDir {
        RulesDir {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes (creating folders) a file relative to the directory.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// One request a sink received.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("sink body is JSON")
    }
}

/// How a sink answers.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub delay: Duration,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn status(status: u16) -> Answer {
        Answer {
            status,
            delay: Duration::ZERO,
            headers: Vec::new(),
            body: String::new(),
        }
    }

    pub fn delayed(mut self, delay: Duration) -> Answer {
        self.delay = delay;
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Answer {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn body(mut self, body: &str) -> Answer {
        self.body = body.into();
        self
    }
}

struct SinkState {
    received: Vec<Received>,
    /// Answers used in order; when empty, `default` answers.
    script: VecDeque<Answer>,
    default: Answer,
}

/// An HTTP server on 127.0.0.1:0 that records every request.
#[derive(Clone)]
pub struct Sink {
    pub addr: SocketAddr,
    state: Arc<Mutex<SinkState>>,
    stop: tokio_util::sync::CancellationToken,
}

impl Sink {
    pub async fn start() -> Sink {
        Self::start_on("127.0.0.1:0").await
    }

    pub async fn start_on(addr: &str) -> Sink {
        Self::serve(TcpListener::bind(addr).await.expect("bind sink"))
    }

    /// A sink answering on `listener`.
    fn serve(listener: TcpListener) -> Sink {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(SinkState {
            received: Vec::new(),
            script: VecDeque::new(),
            default: Answer::status(200),
        }));
        let stop = tokio_util::sync::CancellationToken::new();
        let sink = Sink {
            addr,
            state: state.clone(),
            stop: stop.clone(),
        };
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
                    _ = stop.cancelled() => return,
                };
                let state = state.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let state = state.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let answer = {
                                let mut s = state.lock().unwrap();
                                s.received.push(Received {
                                    method: parts.method.to_string(),
                                    uri: parts.uri.to_string(),
                                    headers: parts.headers,
                                    body,
                                    at: Instant::now(),
                                });
                                let default = s.default.clone();
                                s.script.pop_front().unwrap_or(default)
                            };
                            if !answer.delay.is_zero() {
                                tokio::time::sleep(answer.delay).await;
                            }
                            let mut resp =
                                hyper::Response::new(Full::new(Bytes::from(answer.body)));
                            *resp.status_mut() = http::StatusCode::from_u16(answer.status).unwrap();
                            for (k, v) in answer.headers {
                                resp.headers_mut().insert(
                                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                                    http::HeaderValue::from_str(&v).unwrap(),
                                );
                            }
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        sink
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers the next requests with these, in order, then with the default.
    pub fn script(&self, answers: Vec<Answer>) {
        self.state.lock().unwrap().script.extend(answers);
    }

    pub fn set_default(&self, answer: Answer) {
        self.state.lock().unwrap().default = answer;
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    pub fn count(&self) -> usize {
        self.state.lock().unwrap().received.len()
    }

    /// Waits until at least `n` requests arrived, or panics after `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            if Instant::now() > deadline {
                panic!(
                    "sink {} got {} requests, expected {n}: {got:#?}",
                    self.addr,
                    got.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops listening and drops open connections (the target goes down).
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// A running gateway process.
pub struct Gateway {
    child: Option<Child>,
    pub ingress: SocketAddr,
    pub admin: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    pub data_dir: tempfile::TempDir,
}

impl Gateway {
    /// Starts `switchyard serve` on the rules directory with test defaults.
    pub fn start(rules: &Path) -> Gateway {
        Self::start_with(rules, &[], &[])
    }

    pub fn start_with(rules: &Path, args: &[&str], env: &[(&str, &str)]) -> Gateway {
        let data_dir = tempfile::tempdir().unwrap();
        Self::start_in(rules, data_dir, args, env)
    }

    pub fn start_in(
        rules: &Path,
        data_dir: tempfile::TempDir,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Gateway {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        cmd.arg("serve")
            .arg("--rules")
            .arg(rules)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data_dir.path())
            .args(["--log-format", "json", "--shutdown-grace", "5s"])
            .args(args)
            .env("SWITCHYARD_LOG", "info,switchyard=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn switchyard");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel::<Option<(String, SocketAddr)>>();
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                        if v["message"] == "listening" {
                            if let (Some(name), Some(addr)) =
                                (v["listener"].as_str(), v["addr"].as_str())
                            {
                                let _ = tx.send(Some((name.to_string(), addr.parse().unwrap())));
                            }
                        }
                    }
                    logs.lock().unwrap().push(line);
                }
                let _ = tx.send(None);
            });
        }
        let mut ingress = None;
        let mut admin = None;
        while ingress.is_none() || admin.is_none() {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(Some((name, addr))) if name == "ingress" => ingress = Some(addr),
                Ok(Some((name, addr))) if name == "admin" => admin = Some(addr),
                Ok(Some(_)) => {}
                _ => {
                    let _ = child.kill();
                    panic!(
                        "switchyard did not start; its log:\n{}",
                        logs.lock().unwrap().join("\n")
                    );
                }
            }
        }
        Gateway {
            child: Some(child),
            ingress: ingress.unwrap(),
            admin: admin.unwrap(),
            logs,
            data_dir,
        }
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.ingress, path_and_query)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Waits until a log line contains `needle`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.logs().into_iter().find(|l| l.contains(needle)) {
                return line;
            }
            if Instant::now() > deadline {
                panic!(
                    "no log line with {needle:?}; log:\n{}",
                    self.logs().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.admin_url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of one metric line (exact name and labels as printed), 0 when absent.
    pub async fn metric(&self, name_and_labels: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name_and_labels)
                    .and_then(|rest| rest.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        reqwest::get(self.admin_url(path))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends a signal (e.g. "HUP", "TERM") to the process.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// SIGTERM, then waits for the exit; returns the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("switchyard did not stop after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: a crash.
    pub fn kill(mut self) -> tempfile::TempDir {
        let mut child = self.child.take().unwrap();
        let _ = child.kill();
        let _ = child.wait();
        std::mem::replace(&mut self.data_dir, tempfile::tempdir().unwrap())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The answer a client got.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("answer is not JSON ({e}): {:?}", self.body))
    }
}

/// A client that never pools (so a test sees each request's own fate).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

pub async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<reqwest::Body>,
) -> Reply {
    let mut req = client().request(method.parse().unwrap(), url).body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("request failed");
    Reply {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        body: resp.text().await.unwrap(),
    }
}

pub async fn post_json(url: &str, body: &str) -> Reply {
    send(
        "POST",
        url,
        &[("content-type", "application/json")],
        body.to_string(),
    )
    .await
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The query string Tencent sends, with a valid Sign for `token` when given.
pub fn tencent_query(command: &str, token: Option<&str>) -> String {
    let mut q = format!(
        "SdkAppid={APP_ID}&CallbackCommand={command}&contenttype=json&ClientIP=127.0.0.1&OptPlatform=RESTAPI"
    );
    if let Some(token) = token {
        let t = now_secs().to_string();
        let sign = switchyard::dialect::tencent::sign(token, &t);
        q.push_str(&format!("&Sign={sign}&RequestTime={t}"));
    }
    q
}

/// A sample body from `examples/samples`.
pub fn sample(path: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/samples")
            .join(path),
    )
    .unwrap()
}

/// Polls `cond` until true, or panics with `what` after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        if Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the `switchyard` binary with arguments; returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    run_cli_env(args, stdin, &[])
}

// ---- helpers for the delivery, reload and admin tests (appended) ----

impl Gateway {
    /// The exit status if the process has exited, without waiting.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits (after a signal sent with [`Gateway::signal`]) for the process to exit; returns its
    /// status and its whole log.
    pub fn wait_exit(mut self, timeout: Duration) -> (std::process::ExitStatus, Vec<String>) {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "switchyard did not exit in {timeout:?}; log:\n{}",
                    self.logs().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        // Let the log reader drain the pipe.
        std::thread::sleep(Duration::from_millis(100));
        (status, self.logs())
    }

    /// The log lines as JSON objects (lines that are not JSON are skipped).
    pub fn log_json(&self) -> Vec<serde_json::Value> {
        parse_log(&self.logs())
    }
}

/// JSON log lines, parsed.
pub fn parse_log(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

impl Sink {
    /// Starts a sink on a given address, retrying while the address is still in use (a sink
    /// on it was just stopped, or an outgoing connection took the freed port as its own): the
    /// target comes back up on the same port. The listener that binds is the one that serves,
    /// so nothing can take the port in between.
    pub async fn restart_on(addr: SocketAddr) -> Sink {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match TcpListener::bind(addr).await {
                Ok(listener) => return Sink::serve(listener),
                Err(e) if Instant::now() > deadline => panic!("cannot rebind {addr}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// A port with nothing listening: a sink is started, its port noted, and the sink stopped.
    /// An address where connections are refused and a sink can be started later. Taken below
    /// the ephemeral range where possible: an ephemeral port can be handed to some outgoing
    /// connection meanwhile, and the sink could then not bind it again.
    pub async fn down() -> SocketAddr {
        reserved_addr().await
    }

    async fn ephemeral_down() -> SocketAddr {
        let sink = Sink::start().await;
        let addr = sink.addr;
        sink.stop();
        // Wait until the listener is really closed.
        let deadline = Instant::now() + Duration::from_secs(5);
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            assert!(Instant::now() < deadline, "sink on {addr} did not stop");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        addr
    }
}

// ---- helpers for the ingress, robustness and CLI tests (appended) ----

/// An answer read off a raw TCP connection.
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "answer is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Sends `request` as raw bytes on a new connection (written while the answer is read, so a
/// server that answers before the body is complete is seen doing so) and returns the first
/// answer, or `None` when the server closed the connection without one. Panics after 10 s.
pub async fn raw_request(addr: SocketAddr, request: Vec<u8>) -> Option<RawReply> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        // The server may close early (e.g. 413): a failed write is part of what is tested.
        for chunk in request.chunks(64 * 1024) {
            if wr.write_all(chunk).await.is_err() {
                return;
            }
        }
        let _ = wr.flush().await;
        // Keep the write half open: closing it could end the connection before the answer.
        tokio::time::sleep(Duration::from_secs(10)).await;
        drop(wr);
    });
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some(reply) = parse_raw_reply(&buf) {
                return Some(reply);
            }
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => return parse_raw_reply(&buf),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let reply = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("no answer and no close within 10 s");
    writer.abort();
    reply
}

/// A complete HTTP/1.1 response at the start of `buf` (Content-Length bodies only).
fn parse_raw_reply(buf: &[u8]) -> Option<RawReply> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let body = buf.get(end + 4..end + 4 + len)?.to_vec();
    Some(RawReply {
        status,
        headers,
        body,
    })
}

/// A body in HTTP/1.1 chunked encoding, in chunks of `chunk` bytes.
pub fn chunked(body: &[u8], chunk: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / chunk * 8 + 8);
    for part in body.chunks(chunk) {
        out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// Like [`run_cli`], with extra environment variables.
pub fn run_cli_env(
    args: &[&str],
    stdin: Option<&str>,
    env: &[(&str, &str)],
) -> (i32, String, String) {
    use std::io::Write;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    {
        let mut sin = child.stdin.take().unwrap();
        if let Some(input) = stdin {
            sin.write_all(input.as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---- helpers for the durability tests (appended) ----

impl Gateway {
    /// SIGTERM, then waits (up to `timeout`) for the exit; returns the exit status, the whole log
    /// and the data directory, so the next gateway can start on the same spool.
    pub fn stop_keeping_data(
        mut self,
        timeout: Duration,
    ) -> (std::process::ExitStatus, Vec<String>, tempfile::TempDir) {
        self.signal("TERM");
        let data_dir = std::mem::replace(&mut self.data_dir, tempfile::tempdir().unwrap());
        let (status, logs) = self.wait_exit(timeout);
        (status, logs, data_dir)
    }
}

// ---- helpers for the dead-letter tests (appended) ----

impl Gateway {
    /// SIGTERM, waits for a clean exit, and hands back the data directory, so the next gateway
    /// can start on the same spool.
    pub fn terminate(mut self) -> tempfile::TempDir {
        self.signal("TERM");
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("switchyard did not stop after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "switchyard exited with {status}");
        std::mem::replace(&mut self.data_dir, tempfile::tempdir().unwrap())
    }
}

/// A free address on 127.0.0.1 whose port is below the kernel's ephemeral range, for a target
/// that goes down and comes back on the same port. A port from [`Sink::down`] is an ephemeral
/// one: while nothing listens there, any outgoing connection of the machine may be given it as
/// its source port — among them the gateway's own attempts to reach it, which then connect to
/// themselves — and the sink cannot bind it again. Below the range, only a listener takes it.
pub async fn reserved_addr() -> SocketAddr {
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    const FIRST: u64 = 20_000;
    let low: u64 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768);
    if low <= FIRST + 100 {
        return Sink::ephemeral_down().await;
    }
    let span = low - FIRST;
    // Spread over the span, so that tests running in parallel do not try the same ports.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
        ^ (u64::from(std::process::id()) << 20)
        ^ CALLS.fetch_add(1, Ordering::Relaxed).wrapping_mul(7919);
    for i in 0..500 {
        let port = FIRST + (seed.wrapping_add(i * 104_729)) % span;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        if let Ok(probe) = TcpListener::bind(addr).await {
            drop(probe);
            return addr;
        }
    }
    panic!("no free port between {FIRST} and {low}");
}
