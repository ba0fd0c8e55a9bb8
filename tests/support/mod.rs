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
        let listener = TcpListener::bind(addr).await.expect("bind sink");
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
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
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
