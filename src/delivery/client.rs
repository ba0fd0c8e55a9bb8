//! The outbound HTTP client and the exact request a delivery attempt sends.
//!
//! One `reqwest::Client` for the process (connection pooling, rustls, no redirects, explicit
//! timeouts). [`prepare`] builds method, URL, headers and body; `explain` shows its result, and
//! [`send`] sends it, so a dry run and a real attempt cannot disagree.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method};

use super::retry::{parse_retry_after, Outcome};
use super::{signing, Delivery};
use crate::rules::url::UrlVars;
use crate::rules::Target;

/// Largest part of an answer kept for diagnostics.
pub const ANSWER_HEAD: usize = 1024;
/// An answer is read up to this size (so the connection can be reused), then dropped.
const ANSWER_READ_LIMIT: usize = 64 * 1024;

/// Builds the process's client.
pub fn build_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(1024)
        .tcp_nodelay(true)
        .user_agent(concat!("switchyard/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("the TLS backend and resolver are built in")
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

/// The request for attempt number `delivery.attempts + 1`, stamped at `now_secs`.
pub fn prepare(target: &Target, delivery: &Delivery, now_secs: u64) -> Prepared {
    let url = target.url.render(&UrlVars {
        command: &delivery.command,
        source: &delivery.source,
        route: &delivery.route,
    });
    let mut headers = target.headers.clone();
    headers.insert(
        http::header::CONTENT_TYPE,
        delivery
            .content_type
            .clone()
            .unwrap_or_else(|| HeaderValue::from_static("application/json")),
    );
    headers.insert(WEBHOOK_ID.clone(), header_text(&delivery.id));
    headers.insert(WEBHOOK_TIMESTAMP.clone(), HeaderValue::from(now_secs));
    if let Some(key) = &target.signing_key {
        let sig = signing::signature(key, &delivery.id, now_secs, &delivery.body);
        headers.insert(WEBHOOK_SIGNATURE.clone(), header_text(&sig));
    }
    headers.insert(X_EVENT.clone(), header_text(&delivery.event_id));
    headers.insert(X_SOURCE.clone(), header_text(&delivery.source));
    headers.insert(X_COMMAND.clone(), header_text(&delivery.command));
    headers.insert(X_ROUTE.clone(), header_text(&delivery.route));
    headers.insert(X_ATTEMPT.clone(), HeaderValue::from(delivery.attempts + 1));
    Prepared {
        method: target.method.clone(),
        url,
        headers,
        body: delivery.body.clone(),
    }
}

/// Sends one attempt and reports what came of it.
pub async fn send(client: &reqwest::Client, target: &Target, prepared: Prepared) -> Outcome {
    send_keeping(
        client,
        prepared,
        target.timeout,
        ANSWER_HEAD,
        ANSWER_READ_LIMIT,
    )
    .await
}

/// Sends a request within `timeout` (connecting included) and keeps the first `keep` bytes of
/// the answer, reading at most `read_limit` of it.
pub async fn send_keeping(
    client: &reqwest::Client,
    prepared: Prepared,
    timeout: Duration,
    keep: usize,
    read_limit: usize,
) -> Outcome {
    let url = match reqwest::Url::parse(&prepared.url) {
        Ok(u) => u,
        Err(e) => return Outcome::Invalid(format!("url {}: {e}", prepared.url)),
    };
    let request = client
        .request(prepared.method, url)
        .headers(prepared.headers)
        .timeout(timeout)
        .body(prepared.body);
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => return transport_outcome(&e),
    };
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    let body_head = match read_head(response, keep, read_limit).await {
        Ok(head) => head,
        // The status is what counts; a broken answer body only loses the diagnostic text.
        Err(_) => Bytes::new(),
    };
    Outcome::Answered {
        status,
        retry_after,
        body_head,
    }
}

async fn read_head(
    mut response: reqwest::Response,
    keep: usize,
    read_limit: usize,
) -> Result<Bytes, reqwest::Error> {
    let mut head = Vec::new();
    let mut read = 0usize;
    while let Some(chunk) = response.chunk().await? {
        read += chunk.len();
        if head.len() < keep {
            let room = keep - head.len();
            head.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        if read >= read_limit {
            break;
        }
    }
    Ok(head.into())
}

fn transport_outcome(e: &reqwest::Error) -> Outcome {
    if e.is_timeout() {
        Outcome::Timeout
    } else if e.is_connect() {
        Outcome::Connect(root_cause(e))
    } else if e.is_builder() {
        Outcome::Invalid(root_cause(e))
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
