//! `switchyard explain`: one callback through the rules, as JSON, sending nothing.
//!
//! It uses the same dialect parse, router and request preparation as the server, so what it
//! prints is what `serve` would do with the same callback under the same rules.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Value};

use crate::delivery::{client, now_ms};
use crate::dialect::{self, Callback};
use crate::router::{self, Verdict};
use crate::rules::RuleSet;
use crate::script::ScriptEngine;

/// The request to explain, as the IM server would send it.
pub struct Input {
    pub source: String,
    pub path_suffix: String,
    pub query: String,
    /// `Name: value` lines.
    pub headers: Vec<String>,
    pub body: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("no source named `{0}` (sources: {1})")]
    UnknownSource(String, String),
    #[error("bad --header: {0}; expected `Name: value`")]
    BadHeader(String),
    #[error("the {dialect} dialect rejects this callback with {status}: {reason}")]
    Rejected {
        dialect: &'static str,
        status: u16,
        reason: String,
    },
}

/// Runs the explanation and returns the JSON report.
pub fn explain(
    rules: &RuleSet,
    engine: &ScriptEngine,
    input: Input,
) -> Result<Value, ExplainError> {
    let source = rules.source(&input.source).ok_or_else(|| {
        let names: Vec<&str> = rules.sources.iter().map(|s| &*s.name).collect();
        ExplainError::UnknownSource(input.source.clone(), names.join(", "))
    })?;
    let mut pairs = Vec::new();
    for line in &input.headers {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| ExplainError::BadHeader(format!("`{line}`")))?;
        pairs.push((name, value));
    }
    let headers =
        dialect::request_headers(pairs).map_err(|e| ExplainError::BadHeader(e.to_string()))?;
    let request = dialect::Request::new(
        input.query.trim_start_matches('?'),
        &input.path_suffix,
        &headers,
    );
    let now = now_ms();
    let authorization = match dialect::authorize(source, &request, now / 1000) {
        Ok(()) => json!({"ok": true}),
        Err(r) => json!({"ok": false, "status": r.status.as_u16(), "reason": r.reason}),
    };
    let event_id: Arc<str> = "explain".into();
    let callback = dialect::parse(source, request, input.body, event_id, now).map_err(|r| {
        ExplainError::Rejected {
            dialect: source.dialect.as_str(),
            status: r.status.as_u16(),
            reason: r.reason,
        }
    })?;
    Ok(report(rules, engine, &callback, authorization))
}

fn report(
    rules: &RuleSet,
    engine: &ScriptEngine,
    callback: &Callback,
    authorization: Value,
) -> Value {
    let routing = router::route(callback, rules, engine);
    let mut deliveries = routing.deliveries(callback);
    let responder = routing.responder(callback);
    let answered_by = responder.as_ref().map(|r| {
        json!({
            "route": &*r.route.name,
            "target": r.route.to.first().map(|t| &**t),
            "respond_timeout_ms": callback.source.respond_timeout.as_millis() as u64,
            "on_respond_failure": callback.source.on_respond_failure.as_str(),
            "fails_with": r.delivery.as_ref().err().map(|e| e.to_string()),
        })
    });
    if let Some(delivery) = responder.and_then(|r| r.delivery.ok()) {
        deliveries.push(delivery);
    }
    let now_secs = now_ms() / 1000;
    let mut routes = Vec::new();
    for result in &routing.results {
        let route = result.route;
        let (matched, reason) = match &result.verdict {
            Verdict::OtherSource => (
                false,
                Some(format!(
                    "source `{}` is not in this route's sources",
                    callback.source.name
                )),
            ),
            Verdict::OtherCommand => (
                false,
                Some(format!(
                    "command `{}` matches none of {:?}",
                    callback.command,
                    route
                        .commands
                        .iter()
                        .flatten()
                        .map(|g| g.as_str())
                        .collect::<Vec<_>>()
                )),
            ),
            Verdict::FilteredOut => (false, Some("the filter returned false".to_string())),
            Verdict::Dropped => (false, Some("the transform returned ()".to_string())),
            Verdict::Failed(e) => (false, Some(e.to_string())),
            Verdict::Deliver(_) => (true, None),
        };
        let mine: Vec<Value> = deliveries
            .iter()
            .filter(|d| d.route == route.name)
            .filter_map(|d| {
                let target = rules.target(&d.target)?;
                let prepared = client::prepare(target, d, now_secs);
                let headers: serde_json::Map<String, Value> = prepared
                    .headers
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().to_string(),
                            Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
                        )
                    })
                    .collect();
                Some(json!({
                    "target": &*d.target,
                    "method": prepared.method.as_str(),
                    "url": prepared.url,
                    "headers": headers,
                    "body": body_value(&prepared.body),
                }))
            })
            .collect();
        routes.push(json!({
            "route": &*route.name,
            "defined_at": route.origin.to_string(),
            "matched": matched,
            "respond": route.respond,
            "reason": reason,
            "filter": result.filter,
            "deliveries": mine,
        }));
    }
    json!({
        "source": &*callback.source.name,
        "dialect": callback.source.dialect.as_str(),
        "command": &*callback.command,
        "app_id": callback.app_id,
        "authorization": authorization,
        "rules_generation": rules.generation,
        "routes": routes,
        "deliveries": deliveries.len(),
        "answered_by": answered_by,
    })
}

/// A body as JSON when it is JSON, else as text.
fn body_value(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}
