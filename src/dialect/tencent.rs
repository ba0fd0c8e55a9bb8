//! Tencent Cloud IM (Chat) callbacks: `SdkAppid` allow-list, `Sign` + `RequestTime`, answers.

use bytes::Bytes;
use http::StatusCode;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{json_str, Rejection, Request};
use crate::rules::Source;

pub(super) fn authorize(
    source: &Source,
    req: &Request<'_>,
    now_secs: u64,
) -> Result<(), Rejection> {
    let app_id = req.query_param("SdkAppid").unwrap_or_default();
    if app_id.is_empty() {
        return Err(Rejection::new(
            StatusCode::FORBIDDEN,
            "SdkAppid is missing from the query",
        ));
    }
    if !source.app_ids.iter().any(|a| a == app_id) {
        return Err(Rejection::new(
            StatusCode::FORBIDDEN,
            format!("SdkAppid {app_id} is not accepted here"),
        ));
    }
    if let Some(token) = &source.token {
        let sign = req.query_param("Sign").unwrap_or_default();
        let time = req.query_param("RequestTime").unwrap_or_default();
        check_sign(token, time, sign, now_secs, source.max_clock_skew.as_secs())
            .map_err(|reason| Rejection::new(StatusCode::UNAUTHORIZED, reason))?;
    }
    Ok(())
}

/// The documented signature: lower-hex `SHA-256(token + RequestTime)`.
pub fn sign(token: &str, request_time: &str) -> String {
    let mut h = Sha256::new();
    h.update(token.as_bytes());
    h.update(request_time.as_bytes());
    hex::encode(h.finalize())
}

/// Checks `Sign` (constant time, hex case-insensitive) and the clock skew of `RequestTime`.
pub fn check_sign(
    token: &str,
    request_time: &str,
    sign_hex: &str,
    now_secs: u64,
    max_skew_secs: u64,
) -> Result<(), &'static str> {
    if sign_hex.is_empty() || request_time.is_empty() {
        return Err("Sign and RequestTime are required");
    }
    let Ok(time) = request_time.parse::<u64>() else {
        return Err("RequestTime is not a unix time in seconds");
    };
    if now_secs.abs_diff(time) > max_skew_secs {
        return Err("RequestTime is too far from the current time");
    }
    let expected = sign(token, request_time);
    let given = sign_hex.to_ascii_lowercase();
    if expected.as_bytes().ct_eq(given.as_bytes()).into() {
        Ok(())
    } else {
        Err("Sign does not match")
    }
}

#[derive(serde::Deserialize)]
struct Body {
    #[serde(rename = "CallbackCommand")]
    command: Option<String>,
}

/// Command from the query, else from the body; also validates the body.
pub(super) fn command(req: &Request<'_>, body: &[u8]) -> Result<(String, String), Rejection> {
    let parsed: Body = super::parse_object(body, "CallbackCommand")?;
    let command = req
        .query_param("CallbackCommand")
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .or(parsed.command)
        .unwrap_or_default();
    let app_id = req.query_param("SdkAppid").unwrap_or_default().to_string();
    Ok((command, app_id))
}

pub(super) fn ok() -> Bytes {
    Bytes::from_static(br#"{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":""}"#)
}

/// A handled before-callback that refuses the action (`ErrorCode` 1: "forbid").
pub(super) fn deny(reason: &str) -> Bytes {
    format!(
        r#"{{"ActionStatus":"OK","ErrorCode":1,"ErrorInfo":{}}}"#,
        json_str(reason)
    )
    .into()
}

pub(super) fn error(reason: &str) -> Bytes {
    format!(
        r#"{{"ActionStatus":"FAIL","ErrorCode":1,"ErrorInfo":{}}}"#,
        json_str(reason)
    )
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_check_value() {
        assert_eq!(
            sign("xxxxyyyy", "1669872112"),
            "17773bc39a671d7b9aa835458704d2a6db81360a5940292b587d6d760d484061"
        );
    }

    #[test]
    fn sign_check() {
        let good = "17773bc39a671d7b9aa835458704d2a6db81360a5940292b587d6d760d484061";
        assert_eq!(
            check_sign("xxxxyyyy", "1669872112", good, 1669872112, 60),
            Ok(())
        );
        assert_eq!(
            check_sign(
                "xxxxyyyy",
                "1669872112",
                &good.to_uppercase(),
                1669872150,
                60
            ),
            Ok(())
        );
        assert_eq!(
            check_sign("xxxxyyyy", "1669872112", good, 1669872112 + 61, 60),
            Err("RequestTime is too far from the current time")
        );
        assert_eq!(
            check_sign("xxxxyyyy", "1669872112", good, 1669872112 - 61, 60),
            Err("RequestTime is too far from the current time")
        );
        assert_eq!(
            check_sign("other", "1669872112", good, 1669872112, 60),
            Err("Sign does not match")
        );
        assert_eq!(
            check_sign("xxxxyyyy", "1669872112", &good[..63], 1669872112, 60),
            Err("Sign does not match")
        );
        assert_eq!(
            check_sign("xxxxyyyy", "", good, 1669872112, 60),
            Err("Sign and RequestTime are required")
        );
        assert_eq!(
            check_sign("xxxxyyyy", "16698x", good, 1669872112, 60),
            Err("RequestTime is not a unix time in seconds")
        );
    }

    #[test]
    fn error_body_escapes_reason() {
        let body = error("bad \"quote\"");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["ErrorInfo"], "bad \"quote\"");
        assert_eq!(v["ActionStatus"], "FAIL");
        assert_eq!(v["ErrorCode"], 1);
    }
}
