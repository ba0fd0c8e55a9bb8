//! Dialects: how each IM vendor calls us and how it wants to be answered.
//!
//! A dialect turns an HTTP request into a [`Callback`] (or a [`Rejection`]) and renders the
//! acknowledgement and error bodies in the sender's own shape. It checks authenticity (Tencent's
//! `SdkAppid` and `Sign`) before the body is read. Nothing here routes or delivers.

pub mod generic;
pub mod openim;
pub mod tencent;

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use crate::rules::Source;

/// The protocol family of a source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DialectKind {
    Tencent,
    OpenIm,
    Generic,
}

impl DialectKind {
    pub fn parse(name: &str) -> Option<DialectKind> {
        match name {
            "tencent" => Some(DialectKind::Tencent),
            "openim" => Some(DialectKind::OpenIm),
            "generic" => Some(DialectKind::Generic),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DialectKind::Tencent => "tencent",
            DialectKind::OpenIm => "openim",
            DialectKind::Generic => "generic",
        }
    }
}

/// One accepted callback, as the router sees it.
#[derive(Clone, Debug)]
pub struct Callback {
    /// The gateway's id for this callback (a UUIDv7: sortable by time).
    pub event_id: Arc<str>,
    /// Receive time, ms since the epoch.
    pub received_at: u64,
    pub source: Arc<Source>,
    /// `""` when the callback has none.
    pub command: Arc<str>,
    /// Tencent `SdkAppid`, `""` otherwise.
    pub app_id: String,
    /// Every query parameter, in order.
    pub query: Vec<(String, String)>,
    /// Every header, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The request's content type, sent on with untransformed bodies.
    pub content_type: Option<http::HeaderValue>,
    /// The body exactly as received.
    pub body: Bytes,
}

/// The parts of a request a dialect reads before and after the body arrives.
pub struct Request<'a> {
    /// Every query parameter, in order, decoded once.
    pub query: Vec<(String, String)>,
    /// For openim: the path segment after the source's path.
    pub path_suffix: &'a str,
    pub headers: &'a HeaderMap,
}

impl<'a> Request<'a> {
    /// `raw_query` is the query string without `?`.
    pub fn new(raw_query: &str, path_suffix: &'a str, headers: &'a HeaderMap) -> Request<'a> {
        Request {
            query: form_urlencoded::parse(raw_query.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
            path_suffix,
            headers,
        }
    }

    /// The first value of a query parameter.
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn header_pairs(&self) -> Vec<(String, String)> {
        self.headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect()
    }
}

/// The headers of a request given as `(name, value)` pairs (`explain`, `switchyard test`), with `content-type: application/json` unless given.
pub fn request_headers<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        let name = http::HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("`{name}` is not a valid header name"))?;
        let value = http::HeaderValue::from_str(value.trim())
            .map_err(|_| format!("the value of header `{name}` is not valid header text"))?;
        headers.append(name, value);
    }
    if !headers.contains_key(http::header::CONTENT_TYPE) {
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
    }
    Ok(headers)
}

/// Why a request was refused; answered in the dialect's error shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    pub reason: String,
}

impl Rejection {
    pub fn new(status: StatusCode, reason: impl Into<String>) -> Rejection {
        Rejection {
            status,
            reason: reason.into(),
        }
    }

    pub fn bad_json(err: &serde_json::Error) -> Rejection {
        Rejection::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not valid JSON: {err}"),
        )
    }

    /// The `outcome` label of `switchyard_callbacks_total`.
    pub fn outcome(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST => "bad_request",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::PAYLOAD_TOO_LARGE => "too_large",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable",
            StatusCode::REQUEST_TIMEOUT => "timeout",
            _ => "rejected",
        }
    }
}

/// Checks what can be checked before reading the body (Tencent's app id and signature).
pub fn authorize(source: &Source, req: &Request<'_>, now_secs: u64) -> Result<(), Rejection> {
    match source.dialect {
        DialectKind::Tencent => tencent::authorize(source, req, now_secs),
        DialectKind::OpenIm | DialectKind::Generic => Ok(()),
    }
}

/// Builds the callback from an authorized request and its body.
pub fn parse(
    source: &Arc<Source>,
    req: Request<'_>,
    body: Bytes,
    event_id: Arc<str>,
    received_at: u64,
) -> Result<Callback, Rejection> {
    check_json(&body)?;
    let (command, app_id) = match source.dialect {
        DialectKind::Tencent => tencent::command(&req, &body)?,
        DialectKind::OpenIm => (openim::command(&req, &body)?, String::new()),
        DialectKind::Generic => (generic::command(source, &req, &body)?, String::new()),
    };
    let headers = req.header_pairs();
    Ok(Callback {
        event_id,
        received_at,
        source: source.clone(),
        command: command.into(),
        app_id,
        query: req.query,
        headers,
        // Copied for the same reason as the body: not to pin the connection's read buffer.
        content_type: req
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| http::HeaderValue::from_bytes(v.as_bytes()).ok()),
        body,
    })
}

/// Deepest nesting of arrays and objects accepted: what scripts can read (serde_json's
/// recursion limit is 128), so a body a route could not look at is refused up front.
pub const MAX_DEPTH: usize = 127;

/// What the dialects' partial parses let through unchecked: they skip the fields they do not
/// read without validating UTF-8 or bounding the depth. One pass over the bytes, no allocation.
fn check_json(body: &[u8]) -> Result<(), Rejection> {
    if let Err(e) = std::str::from_utf8(body) {
        return Err(Rejection::new(
            StatusCode::BAD_REQUEST,
            format!(
                "the body is not valid JSON: invalid UTF-8 at byte {}",
                e.valid_up_to()
            ),
        ));
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in body {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(Rejection::new(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "the body is not usable JSON: it nests deeper than {MAX_DEPTH} levels"
                        ),
                    ));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Reads the fields a dialect needs from a body that must be a JSON object; `field` names the
/// command field for the error message.
fn parse_object<T: serde::de::DeserializeOwned>(body: &[u8], field: &str) -> Result<T, Rejection> {
    let parsed = serde_json::from_slice(body).map_err(|e| {
        if e.is_data() {
            Rejection::new(
                StatusCode::BAD_REQUEST,
                format!("the body must be a JSON object with a string {field}: {e}"),
            )
        } else {
            Rejection::bad_json(&e)
        }
    })?;
    // serde also reads a struct from an array.
    if !is_object(body) {
        return Err(Rejection::new(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object, not an array",
        ));
    }
    Ok(parsed)
}

/// Whether the body is a JSON object (serde would also take an array for a struct).
fn is_object(body: &[u8]) -> bool {
    body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// The acknowledgement of an accepted callback.
pub fn ack(kind: DialectKind, event_id: &str) -> Bytes {
    match kind {
        DialectKind::Tencent => tencent::ok(),
        DialectKind::OpenIm => openim::ok(),
        DialectKind::Generic => generic::ok(event_id),
    }
}

/// The "no" of a synchronous answer that could not come from its target (`on_respond_failure:
/// deny`): Tencent `ErrorCode` 1 (the action is refused), OpenIM `nextCode` 1 (v3.7+: the
/// before-operation stops), generic `ok: false`. The reason is generic on purpose: the IM server
/// may show it to the end user, who has no business knowing the gateway's targets.
pub fn deny(kind: DialectKind, event_id: &str) -> Bytes {
    match kind {
        DialectKind::Tencent => tencent::deny(DENY_REASON),
        DialectKind::OpenIm => openim::deny(DENY_REASON),
        DialectKind::Generic => generic::deny(event_id, DENY_REASON),
    }
}

const DENY_REASON: &str = "the request could not be reviewed; try again later";

/// The error body of a rejection.
pub fn reject(kind: DialectKind, rejection: &Rejection) -> Bytes {
    match kind {
        DialectKind::Tencent => tencent::error(&rejection.reason),
        DialectKind::OpenIm => openim::error(rejection.status, &rejection.reason),
        DialectKind::Generic => generic::error(&rejection.reason),
    }
}

/// A JSON string literal.
fn json_str(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_json_refuses_invalid_utf8_and_deep_nesting() {
        assert!(check_json(br#"{"a":[1,{"b":"x"}]}"#).is_ok());
        let err = check_json(b"{\"a\":\"\xff\"}").unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(err.reason.contains("UTF-8"), "{}", err.reason);
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(check_json(deep(MAX_DEPTH).as_bytes()).is_ok());
        assert!(check_json(deep(MAX_DEPTH + 1).as_bytes()).is_err());
        // Brackets inside strings, and escaped quotes, do not count.
        let text = format!(r#"{{"s":"{}\"{}"}}"#, "[".repeat(500), "{".repeat(500));
        assert!(check_json(text.as_bytes()).is_ok());
        // A body serde_json can read as a whole is never refused for depth.
        let ok = deep(MAX_DEPTH);
        assert!(serde_json::from_str::<serde_json::Value>(&ok).is_ok());
    }

    #[test]
    fn objects_only() {
        assert!(is_object(b" \r\n\t{}"));
        assert!(!is_object(b"[\"Profile.X\"]"));
        assert!(!is_object(b""));
    }
}
