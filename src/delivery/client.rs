//! The outbound HTTP client and the exact request a delivery attempt sends.
//!
//! One hyper client for the process (connection pooling, rustls with the webpki roots, no
//! redirects, explicit timeouts). [`prepare`] builds method, URL, headers and body; `explain` shows
//! its result, and [`send`] sends it, so a dry run and a real attempt cannot disagree.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::retry::{parse_retry_after, Outcome};
use super::{signing, Delivery};
use crate::rules::url::UrlVars;
use crate::rules::Target;

/// Largest part of an answer kept for diagnostics.
pub const ANSWER_HEAD: usize = 1024;
/// An answer is read up to this size (so the connection can be reused), then dropped.
const ANSWER_READ_LIMIT: usize = 64 * 1024;

/// The outbound client: HTTP/1.1 over TCP or TLS, with a pool of kept-alive connections.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

const USER_AGENT: &str = concat!("switchyard/", env!("CARGO_PKG_VERSION"));

/// Builds the process's client.
pub fn build_client() -> HttpClient {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    http.set_nodelay(true);
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(1024)
        .pool_timer(TokioTimer::new())
        .build(https)
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
pub async fn send(client: &HttpClient, target: &Target, prepared: Prepared) -> Outcome {
    send_keeping(
        client,
        prepared,
        target.timeout,
        ANSWER_HEAD,
        ANSWER_READ_LIMIT,
    )
    .await
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
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        // The status is what counts; a broken answer body only loses the diagnostic text.
        let body_head = read_head(response.into_body(), keep, read_limit)
            .await
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

async fn read_head(
    mut body: Incoming,
    keep: usize,
    read_limit: usize,
) -> Result<Bytes, hyper::Error> {
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
            break;
        }
    }
    Ok(head.into())
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
        let client = build_client();
        for scheme in ["http", "https"] {
            let url = format!("{scheme}://127.0.0.1:{port}/in");
            let outcome =
                send_keeping(&client, request(&url), Duration::from_secs(5), 16, 16).await;
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
