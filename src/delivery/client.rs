//! The outbound HTTP client and the exact request a delivery attempt sends.
//!
//! Queued deliveries go out on [`Lane`]s: each keeps one HTTP/1.1 connection alive and drives it
//! in its own task. Synchronous asks use the process's pooled hyper client. Both connect with one
//! connector (rustls with the webpki roots), follow no redirects and have explicit timeouts.
//! [`prepare`] builds method, URL, headers and body; `explain` shows its result, and a lane sends
//! it, so a dry run and a real attempt cannot disagree. (A lane prepares with `prepare_with`,
//! which reuses the header values of its last request where they are the same, and keeps its
//! last URL parsed: the same request, made with fewer allocations.)

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower_service::Service;

use super::retry::{parse_retry_after, Outcome};
use super::{signing, Delivery};
use crate::rules::url::UrlVars;
use crate::rules::Target;

/// Largest part of an answer kept for diagnostics.
pub const ANSWER_HEAD: usize = 1024;
/// An answer is read up to this size (so the connection can be reused), then dropped.
const ANSWER_READ_LIMIT: usize = 64 * 1024;

/// The outbound client: HTTP/1.1 over TCP or TLS, with a pool of kept-alive connections.
pub type HttpClient = Client<Connector, Full<Bytes>>;

/// Opens TCP or TLS connections (rustls with the webpki roots), 5 s to connect, no Nagle.
pub type Connector = HttpsConnector<HttpConnector>;

const USER_AGENT: &str = concat!("switchyard/", env!("CARGO_PKG_VERSION"));

/// How long a kept-alive connection may sit unused before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Builds the connector the client and the delivery lanes connect with.
pub fn build_connector() -> Connector {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    http.set_nodelay(true);
    http.enforce_http(false);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

/// Builds the process's pooled client (synchronous asks use it).
pub fn build_client(connector: Connector) -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(IDLE_TIMEOUT)
        .pool_max_idle_per_host(1024)
        .pool_timer(TokioTimer::new())
        .build(connector)
}

/// One attempt's request.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub method: Method,
    pub url: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

static WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
static WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
static WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");
static X_EVENT: HeaderName = HeaderName::from_static("x-switchyard-event");
static X_SOURCE: HeaderName = HeaderName::from_static("x-switchyard-source");
static X_COMMAND: HeaderName = HeaderName::from_static("x-switchyard-command");
static X_ROUTE: HeaderName = HeaderName::from_static("x-switchyard-route");
static X_ATTEMPT: HeaderName = HeaderName::from_static("x-switchyard-attempt");

/// A header value from any text: visible ASCII is kept, anything else percent-encoded.
fn header_text(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| {
        let encoded: String =
            percent_encoding::utf8_percent_encode(text, percent_encoding::CONTROLS).collect();
        HeaderValue::from_str(&encoded).unwrap_or_else(|_| HeaderValue::from_static(""))
    })
}

/// Header values made for earlier requests, kept while later ones carry the same text: the
/// deliveries of one lane mostly share their source, command and route, and a second's
/// timestamp.
#[derive(Default)]
struct HeaderValues {
    source: Last<Arc<str>>,
    command: Last<Arc<str>>,
    route: Last<Arc<str>>,
    timestamp: Last<u64>,
}

/// The value made for the last key given.
struct Last<K>(Option<(K, HeaderValue)>);

impl<K> Default for Last<K> {
    fn default() -> Self {
        Last(None)
    }
}

impl<K: PartialEq + Clone> Last<K> {
    fn get(&mut self, key: &K, make: impl FnOnce(&K) -> HeaderValue) -> HeaderValue {
        match &self.0 {
            Some((last, value)) if last == key => value.clone(),
            _ => {
                let value = make(key);
                self.0 = Some((key.clone(), value.clone()));
                value
            }
        }
    }
}

/// `x-switchyard-attempt` for the first attempts without making a value each time.
fn attempt_value(attempt: u32) -> HeaderValue {
    const SMALL: [&str; 9] = ["1", "2", "3", "4", "5", "6", "7", "8", "9"];
    match SMALL.get((attempt as usize).wrapping_sub(1)) {
        Some(text) => HeaderValue::from_static(text),
        None => HeaderValue::from(attempt),
    }
}

/// The request for attempt number `delivery.attempts + 1`, stamped at `now_secs`.
pub fn prepare(target: &Target, delivery: &Delivery, now_secs: u64) -> Prepared {
    prepare_with(target, delivery, now_secs, &mut HeaderValues::default())
}

/// [`prepare`], taking the header values it can from `values` (a lane's).
fn prepare_with(
    target: &Target,
    delivery: &Delivery,
    now_secs: u64,
    values: &mut HeaderValues,
) -> Prepared {
    let url = target.url.render(&UrlVars {
        command: &delivery.command,
        source: &delivery.source,
        route: &delivery.route,
    });
    // Room for the target's headers and the ten added here and in `send_keeping`: a clone of
    // the target's map would be grown, and rehashed, on the way.
    let mut headers = http::HeaderMap::with_capacity(target.headers.len() + 10);
    for (name, value) in &target.headers {
        headers.append(name.clone(), value.clone());
    }
    headers.insert(
        http::header::CONTENT_TYPE,
        delivery
            .content_type
            .clone()
            .unwrap_or_else(|| HeaderValue::from_static("application/json")),
    );
    headers.insert(WEBHOOK_ID.clone(), header_text(&delivery.id));
    headers.insert(
        WEBHOOK_TIMESTAMP.clone(),
        values
            .timestamp
            .get(&now_secs, |&secs| HeaderValue::from(secs)),
    );
    if let Some(key) = &target.signing_key {
        let sig = signing::signature(key, &delivery.id, now_secs, &delivery.body);
        headers.insert(WEBHOOK_SIGNATURE.clone(), header_text(&sig));
    }
    headers.insert(X_EVENT.clone(), header_text(&delivery.event_id));
    let text = |key: &Arc<str>| header_text(key);
    headers.insert(X_SOURCE.clone(), values.source.get(&delivery.source, text));
    headers.insert(
        X_COMMAND.clone(),
        values.command.get(&delivery.command, text),
    );
    headers.insert(X_ROUTE.clone(), values.route.get(&delivery.route, text));
    headers.insert(X_ATTEMPT.clone(), attempt_value(delivery.attempts + 1));
    Prepared {
        method: target.method.clone(),
        url,
        headers,
        body: delivery.body.clone(),
    }
}

/// Sends a request within `timeout` (connecting and reading the answer included) and keeps the
/// first `keep` bytes of the answer, reading at most `read_limit` of it.
pub async fn send_keeping(
    client: &HttpClient,
    prepared: Prepared,
    timeout: Duration,
    keep: usize,
    read_limit: usize,
) -> Outcome {
    let uri = match uri_of(&prepared.url) {
        Ok(u) => u,
        Err(e) => return Outcome::Invalid(format!("url {}: {e}", prepared.url)),
    };
    let mut request = http::Request::new(Full::new(prepared.body));
    *request.method_mut() = prepared.method;
    *request.uri_mut() = uri;
    *request.headers_mut() = prepared.headers;
    request
        .headers_mut()
        .entry(http::header::USER_AGENT)
        .or_insert(HeaderValue::from_static(USER_AGENT));
    let exchange = async {
        let response = match client.request(request).await {
            Ok(r) => r,
            Err(e) => return transport_outcome(&e),
        };
        let status = response.status().as_u16();
        let retry_after = retry_after_of(response.headers());
        // The status is what counts; a broken answer body only loses the diagnostic text.
        let body_head = read_head(response.into_body(), keep, read_limit)
            .await
            .map(|(head, _)| head)
            .unwrap_or_default();
        Outcome::Answered {
            status,
            retry_after,
            body_head,
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Outcome::Timeout)
}

/// The connection of one delivery lane: at most one kept-alive HTTP/1.1 connection, to the origin
/// of the lane's last request, driven by the lane's own task — an attempt needs no other task, no
/// pool lookup and no hand-over between tasks.
pub struct Lane {
    link: Link,
    /// The header values of the lane's last request, for the next one.
    values: HeaderValues,
    alarm: Alarm,
}

/// What a lane sends through: its connection, and how to make a new one.
struct Link {
    connector: Connector,
    conn: Option<Conn>,
    /// The last URL the lane sent to, parsed, for the next request to it.
    last_url: Option<RequestTarget>,
}

/// A lane's one timer, for its attempts' timeouts and for how long it stays idle. A timer per
/// attempt (`tokio::time::timeout`) is put into the runtime's timer wheel and taken out again
/// every time, each under the wheel's lock; this one is moved only when it goes off before the
/// deadline waited for, or must go off sooner — under load about once per timeout, not once per
/// attempt.
#[derive(Default)]
struct Alarm {
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Alarm {
    /// Completes once `deadline` has passed.
    async fn until(&mut self, deadline: tokio::time::Instant) {
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() > deadline {
            sleep.as_mut().reset(deadline);
        }
        loop {
            sleep.as_mut().await;
            if sleep.deadline() >= deadline {
                return;
            }
            // It went off for an earlier deadline, one nothing waits for any more.
            sleep.as_mut().reset(deadline);
        }
    }
}

/// What a request needs of its URL, made once for every request to that URL.
struct RequestTarget {
    url: String,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    /// `Host`, unless the target's headers set one.
    host: HeaderValue,
    /// The origin form HTTP/1.1 sends: path and query.
    path: Uri,
}

impl RequestTarget {
    fn of(url: String) -> Result<RequestTarget, Outcome> {
        let uri = uri_of(&url).map_err(|e| Outcome::Invalid(format!("url {url}: {e}")))?;
        let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned())
        else {
            return Err(Outcome::Invalid(format!("url {url}: no scheme or host")));
        };
        Ok(RequestTarget {
            host: host_header(&scheme, &authority),
            path: origin_form(uri),
            url,
            scheme,
            authority,
        })
    }
}

struct Conn {
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    sender: http1::SendRequest<Full<Bytes>>,
    /// The connection's own future: it writes requests and reads answers while it is polled.
    driver: Driver,
}

impl Conn {
    fn serves(&self, scheme: &http::uri::Scheme, authority: &http::uri::Authority) -> bool {
        *scheme == self.scheme && *authority == self.authority
    }
}

type Driver = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// Runs `work` while polling the connection, which is what moves its bytes; and tells whether
/// the connection ended meanwhile. It ends after an answer that closes it, say, which `work` may
/// still hold: `work` is finished once the connection's state is dropped (what it was waiting
/// for is there then, or fails).
async fn drive<F: Future>(driver: &mut Driver, work: F) -> (F::Output, bool) {
    tokio::pin!(work);
    tokio::select! {
        biased;
        _ = driver.as_mut() => {
            *driver = Box::pin(std::future::pending());
            (work.await, true)
        }
        out = &mut work => (out, false),
    }
}

impl Lane {
    pub fn new(connector: Connector) -> Lane {
        Lane {
            link: Link {
                connector,
                conn: None,
                last_url: None,
            },
            values: HeaderValues::default(),
            alarm: Alarm::default(),
        }
    }

    /// [`prepare`], with the header values this lane made for its earlier requests.
    pub fn prepare(&mut self, target: &Target, delivery: &Delivery, now_secs: u64) -> Prepared {
        prepare_with(target, delivery, now_secs, &mut self.values)
    }

    /// Whether the lane holds a kept-alive connection.
    pub fn is_connected(&self) -> bool {
        self.link.conn.is_some()
    }

    /// Waits while the lane has no work: `true` as soon as its kept-alive connection ends (the
    /// peer closed it, say), `false` once `idle_for` has passed.
    pub async fn idle(&mut self, idle_for: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + idle_for;
        tokio::select! {
            () = self.link.watch() => true,
            () = self.alarm.until(deadline) => false,
        }
    }

    /// Sends one attempt on this lane's connection (a new one if it has none to the URL's origin)
    /// and reports what came of it, within `timeout` (connecting and reading the answer included).
    pub async fn send(&mut self, prepared: Prepared, timeout: Duration) -> Outcome {
        let deadline = tokio::time::Instant::now() + timeout;
        let outcome = tokio::select! {
            biased;
            outcome = self.link.exchange(prepared) => Some(outcome),
            () = self.alarm.until(deadline) => None,
        };
        outcome.unwrap_or_else(|| {
            // The answer may still come: the connection cannot carry another request.
            self.link.conn = None;
            Outcome::Timeout
        })
    }
}

impl Link {
    /// Completes when the kept-alive connection ends (the peer closed it, say), which the lane
    /// notices while it waits for work; pending for ever without one.
    async fn watch(&mut self) {
        match &mut self.conn {
            Some(conn) => {
                let _ = conn.driver.as_mut().await;
                self.conn = None;
            }
            None => std::future::pending().await,
        }
    }

    async fn exchange(&mut self, prepared: Prepared) -> Outcome {
        let url = match self.last_url.take() {
            Some(last) if last.url == prepared.url => last,
            _ => match RequestTarget::of(prepared.url) {
                Ok(url) => url,
                Err(invalid) => return invalid,
            },
        };
        let (scheme, authority) = (url.scheme.clone(), url.authority.clone());
        if self
            .conn
            .as_ref()
            .is_some_and(|c| !c.serves(&scheme, &authority) || c.sender.is_closed())
        {
            self.conn = None;
        }
        let mut request = http::Request::new(Full::new(prepared.body));
        *request.method_mut() = prepared.method;
        *request.headers_mut() = prepared.headers;
        let headers = request.headers_mut();
        if !headers.contains_key(http::header::HOST) {
            headers.insert(http::header::HOST, url.host.clone());
        }
        headers
            .entry(http::header::USER_AGENT)
            .or_insert(HeaderValue::from_static(USER_AGENT));
        *request.uri_mut() = url.path.clone();
        self.last_url = Some(url);
        let mut request = Some(request);
        // A kept-alive connection the peer closed just now fails the request before it is
        // written; it then goes once more on a new connection.
        for second_try in [false, true] {
            if self.conn.is_none() {
                match Box::pin(self.connect(&scheme, &authority)).await {
                    Ok(conn) => self.conn = Some(conn),
                    Err(e) => return Outcome::Connect(e),
                }
            }
            let conn = self.conn.as_mut().expect("connected above");
            let req = request.take().expect("a request to send");
            let (sent, ended) = drive(&mut conn.driver, conn.sender.try_send_request(req)).await;
            let answer = match sent {
                Ok(response) => response,
                Err(mut e) => {
                    self.conn = None;
                    match e.take_message() {
                        Some(unsent) if !second_try => {
                            request = Some(unsent);
                            continue;
                        }
                        _ => return Outcome::Transport(root_cause(e.error())),
                    }
                }
            };
            let status = answer.status().as_u16();
            let retry_after = retry_after_of(answer.headers());
            let read = drive(
                &mut conn.driver,
                read_head(answer.into_body(), ANSWER_HEAD, ANSWER_READ_LIMIT),
            );
            let (read, ended_reading) = read.await;
            // The status is what counts; a broken answer only loses the diagnostic text. An
            // answer not read to its end leaves the connection unusable.
            let (body_head, reusable) = match read {
                Ok((head, complete)) => (head, complete),
                Err(_) => (Bytes::new(), false),
            };
            if ended || ended_reading || !reusable {
                self.conn = None;
            }
            return Outcome::Answered {
                status,
                retry_after,
                body_head,
            };
        }
        Outcome::Transport("connection closed before the request was sent".into())
    }

    async fn connect(
        &mut self,
        scheme: &http::uri::Scheme,
        authority: &http::uri::Authority,
    ) -> Result<Conn, String> {
        let origin = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| e.to_string())?;
        std::future::poll_fn(|cx| self.connector.poll_ready(cx))
            .await
            .map_err(|e| root_cause(&*e))?;
        let io = self
            .connector
            .call(origin)
            .await
            .map_err(|e| root_cause(&*e))?;
        let (sender, connection) = http1::handshake(io).await.map_err(|e| root_cause(&e))?;
        Ok(Conn {
            scheme: scheme.clone(),
            authority: authority.clone(),
            sender,
            driver: Box::pin(connection),
        })
    }
}

/// `Host`: the authority without user information, the port only when it is not the scheme's.
fn host_header(scheme: &http::uri::Scheme, authority: &http::uri::Authority) -> HeaderValue {
    let default_port = if *scheme == http::uri::Scheme::HTTPS {
        443
    } else {
        80
    };
    let host = match authority.port_u16() {
        Some(port) if port != default_port => format!("{}:{port}", authority.host()),
        _ => authority.host().to_string(),
    };
    HeaderValue::from_str(&host).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The request target HTTP/1.1 sends to an origin server: path and query only.
fn origin_form(uri: Uri) -> Uri {
    let mut parts = uri.into_parts();
    parts.scheme = None;
    parts.authority = None;
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
}

fn retry_after_of(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()))
}

/// The URI of a rendered target URL. Rule loading checked the template with a WHATWG URL parser;
/// what `http::Uri` does not take as is (an international host name, say) goes through it again,
/// which gives its ASCII form.
fn uri_of(url: &str) -> Result<Uri, String> {
    if let Ok(uri) = url.parse::<Uri>() {
        return Ok(uri);
    }
    let normalized = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
    normalized
        .as_str()
        .parse::<Uri>()
        .map_err(|e| e.to_string())
}

/// The first `keep` bytes of an answer, reading at most `read_limit`; and whether the answer was
/// read to its end (only then can its connection carry another request).
async fn read_head(
    mut body: Incoming,
    keep: usize,
    read_limit: usize,
) -> Result<(Bytes, bool), hyper::Error> {
    let mut head = Vec::new();
    let mut read = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(chunk) = frame?.into_data() else {
            continue;
        };
        read += chunk.len();
        if head.len() < keep {
            let room = keep - head.len();
            head.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        if read >= read_limit {
            return Ok((head.into(), body.is_end_stream()));
        }
    }
    Ok((head.into(), true))
}

fn transport_outcome(e: &hyper_util::client::legacy::Error) -> Outcome {
    if e.is_connect() {
        Outcome::Connect(root_cause(e))
    } else {
        Outcome::Transport(root_cause(e))
    }
}

/// The innermost error message: "connection refused" rather than "error sending request".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn request(url: &str) -> Prepared {
        Prepared {
            method: Method::POST,
            url: url.to_string(),
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"{}"),
        }
    }

    #[tokio::test]
    async fn https_and_http_targets_that_refuse_are_connect_errors() {
        // A closed port on loopback: refused at once, for TLS as for plain HTTP.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let client = build_client(build_connector());
        for scheme in ["http", "https"] {
            let url = format!("{scheme}://127.0.0.1:{port}/in");
            let outcome =
                send_keeping(&client, request(&url), Duration::from_secs(5), 16, 16).await;
            assert!(matches!(outcome, Outcome::Connect(_)), "{url}: {outcome:?}");
        }
    }

    /// How the test server answers each request.
    #[derive(Clone, Copy)]
    enum Mode {
        KeepAlive,
        /// `Connection: close`, then closes.
        Close,
        /// Answers as if kept alive, then closes without saying so, 100 ms later.
        SilentClose,
        /// An answer larger than the lane reads.
        Large,
        /// Never answers.
        Mute,
    }

    /// Per connection, the request line and `Host` of each request.
    type Seen = Arc<Mutex<Vec<Vec<(String, String)>>>>;

    /// A one-request-at-a-time HTTP/1.1 server on loopback that records, per connection, the
    /// request line and `Host` of each request.
    async fn server(mode: Mode) -> (String, Seen) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen: Seen = Arc::default();
        let record = seen.clone();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let index = {
                    let mut seen = record.lock().unwrap();
                    seen.push(Vec::new());
                    seen.len() - 1
                };
                let record = record.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        // Read one request: head, then a Content-Length body.
                        let head_end = loop {
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break i + 4;
                            }
                            let mut chunk = [0u8; 4096];
                            match socket.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                        let header = |name: &str| {
                            head.lines()
                                .find_map(|l| {
                                    let (k, v) = l.split_once(':')?;
                                    k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                                })
                                .unwrap_or_default()
                        };
                        let length: usize = header("content-length").parse().unwrap_or(0);
                        while buf.len() < head_end + length {
                            let mut chunk = [0u8; 4096];
                            match socket.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.drain(..head_end + length);
                        let line = head.lines().next().unwrap_or_default().to_string();
                        record.lock().unwrap()[index].push((line, header("host")));
                        let answer = match mode {
                            Mode::KeepAlive | Mode::SilentClose => {
                                "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_string()
                            }
                            Mode::Close => "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok".to_string(),
                            Mode::Large => {
                                let body = "x".repeat(ANSWER_READ_LIMIT * 2);
                                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len())
                            }
                            Mode::Mute => {
                                tokio::time::sleep(Duration::from_secs(30)).await;
                                return;
                            }
                        };
                        if socket.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                        match mode {
                            Mode::Close => return,
                            Mode::SilentClose => {
                                // Closed once the client holds the connection as idle.
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                return;
                            }
                            _ => {}
                        }
                    }
                });
            }
        });
        (url, seen)
    }

    fn per_connection(seen: &Seen) -> Vec<usize> {
        seen.lock().unwrap().iter().map(Vec::len).collect()
    }

    fn answered_200(outcome: &Outcome) -> bool {
        matches!(outcome, Outcome::Answered { status: 200, .. })
    }

    const WAIT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_lane_keeps_its_connection_and_sends_origin_form_with_host() {
        let (url, seen) = server(Mode::KeepAlive).await;
        let mut lane = Lane::new(build_connector());
        // A URL again, then another: each request goes where its own URL says.
        let queries = [0, 0, 1, 1, 2];
        for i in queries {
            let outcome = lane.send(request(&format!("{url}/in?n={i}")), WAIT).await;
            assert!(answered_200(&outcome), "{outcome:?}");
            assert!(lane.is_connected());
        }
        assert_eq!(
            per_connection(&seen),
            vec![5],
            "one connection for all five"
        );
        let host = url.trim_start_matches("http://");
        let lines = |seen: &Seen, connection: usize| -> Vec<(String, String)> {
            seen.lock().unwrap()[connection].clone()
        };
        let expected: Vec<_> = queries
            .iter()
            .map(|i| (format!("POST /in?n={i} HTTP/1.1"), host.to_string()))
            .collect();
        assert_eq!(lines(&seen, 0), expected);
        // Another origin: a connection of its own, and back to the first one.
        let (other, other_seen) = server(Mode::KeepAlive).await;
        assert!(answered_200(
            &lane.send(request(&format!("{other}/x")), WAIT).await
        ));
        assert_eq!(per_connection(&other_seen), vec![1]);
        let other_host = other.trim_start_matches("http://").to_string();
        assert_eq!(
            lines(&other_seen, 0),
            vec![("POST /x HTTP/1.1".to_string(), other_host)]
        );
        assert!(answered_200(
            &lane.send(request(&format!("{url}/in?n=2")), WAIT).await
        ));
        assert_eq!(per_connection(&seen), vec![5, 1]);
        assert_eq!(
            lines(&seen, 1),
            vec![("POST /in?n=2 HTTP/1.1".to_string(), host.to_string())]
        );
    }

    /// A target with headers of its own and a signing secret, on a URL with placeholders.
    fn signed_target() -> Arc<Target> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("rules.yaml"),
            r#"
sources:
  app: { path: /hooks/app, dialect: generic, command: body.type }
targets:
  t:
    url: "http://127.0.0.1:9/{source}/{command}?route={route}"
    headers: { x-team: platform }
    signing_secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
routes:
  - name: r
    to: [t]
"#,
        )
        .unwrap();
        let engine = crate::script::ScriptEngine::new(dir.path(), &Default::default());
        let rules = crate::rules::load(dir.path(), &engine).unwrap();
        rules.target("t").unwrap().clone()
    }

    fn delivery(n: usize, source: &str, command: &str, route: &str, attempts: u32) -> Delivery {
        Delivery {
            id: format!("msg_{n}").into(),
            event_id: format!("ev-{n}").into(),
            source: source.into(),
            command: command.into(),
            route: route.into(),
            target: "t".into(),
            content_type: None,
            body: Bytes::from(format!("{{\"n\":{n}}}")),
            attempts,
            created_at: 0,
            due_at: 0,
            last_error: None,
        }
    }

    #[test]
    fn a_lane_prepares_every_request_as_a_fresh_prepare_would() {
        let target = signed_target();
        let mut lane = Lane::new(build_connector());
        // Sources, commands, routes, attempts and seconds that repeat and change, in both
        // directions; a command that needs percent-encoding in a header.
        let cases = [
            (delivery(1, "app", "Group.A", "r", 0), 1_700_000_000),
            (delivery(2, "app", "Group.A", "r", 0), 1_700_000_000),
            (delivery(3, "app", "Group.B", "r", 2), 1_700_000_000),
            (delivery(4, "other", "Group.B", "r2", 9), 1_700_000_001),
            (delivery(5, "app", "Gruppe.ä", "r", 0), 1_700_000_001),
            (delivery(6, "app", "Group.A", "r", 41), 1_700_000_000),
        ];
        for (delivery, now) in &cases {
            let fresh = prepare(&target, delivery, *now);
            let kept = lane.prepare(&target, delivery, *now);
            assert_eq!(kept.url, fresh.url);
            assert_eq!(kept.method, fresh.method);
            assert_eq!(kept.body, fresh.body);
            assert_eq!(kept.headers, fresh.headers, "delivery {}", delivery.id);
            let attempt = (delivery.attempts + 1).to_string();
            assert_eq!(kept.headers["x-switchyard-attempt"], attempt.as_str());
            assert_eq!(kept.headers["webhook-timestamp"], now.to_string().as_str());
            assert_eq!(kept.headers["x-switchyard-route"], &*delivery.route);
        }
    }

    #[tokio::test]
    async fn a_lane_opens_a_new_connection_after_one_the_server_closed() {
        // Said in the answer.
        let (url, seen) = server(Mode::Close).await;
        let mut lane = Lane::new(build_connector());
        for _ in 0..3 {
            assert!(answered_200(
                &lane.send(request(&format!("{url}/in")), WAIT).await
            ));
            assert!(!lane.is_connected());
        }
        assert_eq!(per_connection(&seen), vec![1, 1, 1]);
        // Not said: the lane notices while it waits for work.
        let (url, seen) = server(Mode::SilentClose).await;
        for _ in 0..3 {
            assert!(answered_200(
                &lane.send(request(&format!("{url}/in")), WAIT).await
            ));
            assert!(lane.is_connected());
            assert!(lane.idle(WAIT).await, "the lane saw its connection end");
            assert!(!lane.is_connected());
        }
        assert_eq!(per_connection(&seen), vec![1, 1, 1]);
    }

    #[tokio::test]
    async fn a_lane_drops_a_connection_it_cannot_reuse() {
        // An answer larger than what is read: its rest is never read, so the connection goes.
        let (url, seen) = server(Mode::Large).await;
        let mut lane = Lane::new(build_connector());
        for _ in 0..2 {
            let outcome = lane.send(request(&format!("{url}/in")), WAIT).await;
            let Outcome::Answered {
                status, body_head, ..
            } = outcome
            else {
                panic!("{outcome:?}");
            };
            assert_eq!((status, body_head.len()), (200, ANSWER_HEAD));
            assert!(!lane.is_connected());
        }
        assert_eq!(per_connection(&seen), vec![1, 1]);
        // No answer in time: a timeout, and the connection goes with it. The lane's timer was
        // last set for a later deadline (the sends above, with WAIT): it goes off at this one.
        let (url, _) = server(Mode::Mute).await;
        let started = std::time::Instant::now();
        let outcome = lane
            .send(request(&format!("{url}/in")), Duration::from_millis(200))
            .await;
        assert!(matches!(outcome, Outcome::Timeout), "{outcome:?}");
        assert!(started.elapsed() < WAIT / 2, "{:?}", started.elapsed());
        assert!(!lane.is_connected());
    }

    /// An alarm goes off at the deadline waited for, whatever it was set for before: a later
    /// one (it is moved back), or an earlier one that passed (it is moved on).
    #[tokio::test(start_paused = true)]
    async fn an_alarm_goes_off_at_the_deadline_waited_for() {
        let start = tokio::time::Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        let now = || (tokio::time::Instant::now() - start).as_millis();
        let mut alarm = Alarm::default();
        alarm.until(at(10)).await;
        assert_eq!(now(), 10_000);
        // Waited for until 70 s, given up at 11 s: the alarm is left set for 70 s.
        let gave_up = tokio::time::timeout(Duration::from_secs(1), alarm.until(at(70))).await;
        assert!(gave_up.is_err());
        assert_eq!(now(), 11_000);
        alarm.until(at(16)).await;
        assert_eq!(now(), 16_000);
        alarm.until(at(46)).await;
        assert_eq!(now(), 46_000);
        // A deadline already passed: at once.
        alarm.until(at(20)).await;
        assert_eq!(now(), 46_000);
    }

    #[tokio::test]
    async fn a_lane_reports_refused_connections_as_connect_errors() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut lane = Lane::new(build_connector());
        for scheme in ["http", "https"] {
            let url = format!("{scheme}://127.0.0.1:{port}/in");
            let outcome = lane.send(request(&url), WAIT).await;
            assert!(matches!(outcome, Outcome::Connect(_)), "{url}: {outcome:?}");
        }
    }

    #[test]
    fn urls_http_does_not_take_as_they_are_are_normalized() {
        assert_eq!(
            uri_of("http://bücher.example/im/x").unwrap().host(),
            Some("xn--bcher-kva.example")
        );
        assert!(uri_of("not a url").is_err());
    }
}
