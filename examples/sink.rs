//! A tiny HTTP sink standing in for the internal services of the example rules.
//!
//! ```text
//! cargo run --example sink                 # listens on 127.0.0.1:7001, 7002, 7003 and 7004
//! cargo run --example sink -- 9001 9002    # other ports
//! SINK_SIGNING_SECRET=whsec_... cargo run --example sink   # also verifies webhook-signature
//! ```
//!
//! For every request it prints the port, method, path and query, the `webhook-*` and
//! `x-switchyard-*` headers and the body, then answers 200. A request to `/moderate` gets a
//! moderation verdict, as the example rules' synchronous route expects: `{"verdict":"block",
//! "reason":...}` when the body mentions a red packet, `{"verdict":"pass"}` otherwise. With `SINK_SIGNING_SECRET` it checks
//! the Standard Webhooks signature the way a receiver would: `v1,` + base64 of
//! HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{body}"), the key being the base64 after
//! `whsec_`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use sha2::Sha256;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut ports: Vec<u16> = std::env::args()
        .skip(1)
        .map(|arg| arg.parse())
        .collect::<Result<_, _>>()
        .map_err(|_| "usage: sink [PORT...]")?;
    if ports.is_empty() {
        ports = vec![7001, 7002, 7003, 7004];
    }
    let key: Option<Arc<Vec<u8>>> = match std::env::var("SINK_SIGNING_SECRET") {
        Ok(secret) if !secret.is_empty() => {
            let b64 = secret
                .strip_prefix("whsec_")
                .ok_or("SINK_SIGNING_SECRET must look like whsec_<base64>")?;
            Some(Arc::new(BASE64.decode(b64)?))
        }
        _ => None,
    };

    for port in ports {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        println!("sink listening on http://127.0.0.1:{port}");
        tokio::spawn(accept(listener, port, key.clone()));
    }
    tokio::signal::ctrl_c().await?;
    Ok(())
}

async fn accept(listener: TcpListener, port: u16, key: Option<Arc<Vec<u8>>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors and the like: wait instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let key = key.clone();
        let service = service_fn(move |req| handle(req, port, key.clone()));
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    port: u16,
    key: Option<Arc<Vec<u8>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };

    // One string, one println!: requests arriving together do not interleave.
    let mut out = format!("── :{port} {} {}\n", parts.method, parts.uri);
    for (name, value) in &parts.headers {
        if name.as_str().starts_with("webhook-") || name.as_str().starts_with("x-switchyard-") {
            out += &format!("   {name}: {}\n", String::from_utf8_lossy(value.as_bytes()));
        }
    }
    if let Some(key) = &key {
        let (id, ts, sig) = (
            header("webhook-id"),
            header("webhook-timestamp"),
            header("webhook-signature"),
        );
        let verdict = if sig.is_empty() {
            "none (this target has no signing_secret)"
        } else if verify(key, id, ts, &body, sig) {
            "ok"
        } else {
            "MISMATCH"
        };
        out += &format!("   signature: {verdict}\n");
    }
    out += &format!("   {}", String::from_utf8_lossy(&body).trim_end());
    let answer: &'static [u8] = if parts.uri.path() == "/moderate" {
        if String::from_utf8_lossy(&body).contains("red packet") {
            br#"{"verdict":"block","reason":"red packets are not allowed here"}"#
        } else {
            br#"{"verdict":"pass"}"#
        }
    } else {
        b"ok"
    };
    if answer != b"ok" {
        out += &format!("\n   answered: {}", String::from_utf8_lossy(answer));
    }
    println!("{out}\n");

    let mut response = Response::new(Full::new(Bytes::from_static(answer)));
    if answer != b"ok" {
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
    }
    Ok(response)
}

/// True when one of the space-separated `v1,<base64>` signatures matches (in constant time).
fn verify(key: &[u8], id: &str, timestamp: &str, body: &[u8], signatures: &str) -> bool {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    signatures
        .split_whitespace()
        .filter_map(|s| s.strip_prefix("v1,"))
        .filter_map(|s| BASE64.decode(s).ok())
        .any(|sig| mac.clone().verify_slice(&sig).is_ok())
}
