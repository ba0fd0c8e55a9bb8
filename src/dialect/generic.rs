//! Any JSON webhook: the command comes from a configured body path, header or query parameter.

use bytes::Bytes;
use serde::de::IgnoredAny;

use super::{json_str, Rejection, Request};
use crate::rules::{CommandLocation, Source};

pub(super) fn command(
    source: &Source,
    req: &Request<'_>,
    body: &[u8],
) -> Result<String, Rejection> {
    match &source.command {
        CommandLocation::Body(path) => {
            let value: serde_json::Value =
                serde_json::from_slice(body).map_err(|e| Rejection::bad_json(&e))?;
            let mut at = &value;
            for key in path {
                match at.get(key) {
                    Some(v) => at = v,
                    None => return Ok(String::new()),
                }
            }
            Ok(match at {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                _ => String::new(),
            })
        }
        other => {
            serde_json::from_slice::<IgnoredAny>(body).map_err(|e| Rejection::bad_json(&e))?;
            Ok(match other {
                CommandLocation::Header(name) => req
                    .headers
                    .get(name.as_str())
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string(),
                CommandLocation::Query(name) => {
                    req.query_param(name).unwrap_or_default().to_string()
                }
                CommandLocation::None | CommandLocation::Body(_) => String::new(),
            })
        }
    }
}

pub(super) fn ok(event_id: &str) -> Bytes {
    format!(r#"{{"ok":true,"event_id":{}}}"#, json_str(event_id)).into()
}

pub(super) fn error(reason: &str) -> Bytes {
    format!(r#"{{"ok":false,"error":{}}}"#, json_str(reason)).into()
}

pub(super) fn deny(event_id: &str, reason: &str) -> Bytes {
    format!(
        r#"{{"ok":false,"event_id":{},"error":{}}}"#,
        json_str(event_id),
        json_str(reason)
    )
    .into()
}
