//! OpenIM callbacks: the command from the path (v3.5+), the query (v3.0–3.4) or the body (v2).

use bytes::Bytes;
use http::StatusCode;

use super::{json_str, Rejection, Request};

#[derive(serde::Deserialize)]
struct Body {
    #[serde(rename = "callbackCommand")]
    command: Option<String>,
}

pub(super) fn command(req: &Request<'_>, body: &[u8]) -> Result<String, Rejection> {
    let parsed: Body = super::parse_object(body, "callbackCommand")?;
    if !req.path_suffix.is_empty() {
        return Ok(req.path_suffix.to_string());
    }
    if let Some(c) = req.query_param("command").filter(|c| !c.is_empty()) {
        return Ok(c.to_string());
    }
    Ok(parsed.command.unwrap_or_default())
}

pub(super) fn ok() -> Bytes {
    Bytes::from_static(br#"{"actionCode":0,"errCode":0,"errMsg":"","errDlt":"","nextCode":0}"#)
}

/// A before-callback answer that stops the operation: since v3.7 OpenIM refuses it when
/// `actionCode == 0 && nextCode == 1`, passing `errCode` (5000–9999: the app's own range) and
/// `errMsg` back to the caller.
pub(super) fn deny(reason: &str) -> Bytes {
    format!(
        r#"{{"actionCode":0,"errCode":5000,"errMsg":{},"errDlt":"","nextCode":1}}"#,
        json_str(reason)
    )
    .into()
}

pub(super) fn error(status: StatusCode, reason: &str) -> Bytes {
    format!(
        r#"{{"actionCode":1,"errCode":{},"errMsg":{},"errDlt":"","nextCode":0}}"#,
        status.as_u16(),
        json_str(reason)
    )
    .into()
}
