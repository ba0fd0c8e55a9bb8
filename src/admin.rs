//! The admin listener: health, readiness, Prometheus metrics, the rules' state, dead letters
//! and the targets' delivery state (with pause / resume).
//!
//! It reads shared state, and changes only what an operator asks for (replaying or dropping dead
//! letters, pausing a target); it never sits in the callback path. Bind it to a private address:
//! it has no authentication. Every answer is JSON except `/metrics`; errors are
//! `{"error": "..."}` with a 4xx/5xx status.

mod dead_letters;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::Request;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use crate::delivery::{Deliverer, TargetState};
use crate::reload::Reloader;
use crate::rules::RuleSet;
use crate::script::ScriptEngine;
use crate::server::{self, HttpResponse};
use crate::spool::Spool;

pub struct Admin {
    pub rules: Arc<ArcSwap<RuleSet>>,
    pub reloader: Arc<Reloader>,
    pub deliverer: Arc<Deliverer>,
    pub spool: Arc<dyn Spool>,
    pub engine: Arc<ScriptEngine>,
    pub metrics: PrometheusHandle,
}

/// Largest request body the admin API reads (a replay or drop of 1000 ids is ~40 KiB).
const MAX_BODY: usize = 1 << 20;
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `/readyz` waits for the spool to confirm it can write.
const SPOOL_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a request asks for, by its path.
#[derive(Debug, PartialEq, Eq)]
enum Endpoint {
    Health,
    Ready,
    Metrics,
    Rules,
    DeadLetters,
    DeadLetter(String),
    ReplayDeadLetters,
    DropDeadLetters,
    Targets,
    Pause(String),
    Resume(String),
}

impl Endpoint {
    /// The endpoint at `path`; segments are percent-decoded (target names may need it).
    fn of(path: &str) -> Option<Endpoint> {
        let segments = path
            .strip_prefix('/')?
            .split('/')
            .map(|s| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8()
                    .ok()
                    .map(|s| s.into_owned())
            })
            .collect::<Option<Vec<String>>>()?;
        let s: Vec<&str> = segments.iter().map(String::as_str).collect();
        Some(match s.as_slice() {
            ["healthz"] => Endpoint::Health,
            ["readyz"] => Endpoint::Ready,
            ["metrics"] => Endpoint::Metrics,
            ["admin", "rules"] => Endpoint::Rules,
            ["admin", "dead-letters"] => Endpoint::DeadLetters,
            ["admin", "dead-letters", "replay"] => Endpoint::ReplayDeadLetters,
            ["admin", "dead-letters", "drop"] => Endpoint::DropDeadLetters,
            ["admin", "dead-letters", id] if !id.is_empty() => Endpoint::DeadLetter(id.to_string()),
            ["admin", "targets"] => Endpoint::Targets,
            ["admin", "targets", name, "pause"] => Endpoint::Pause(name.to_string()),
            ["admin", "targets", name, "resume"] => Endpoint::Resume(name.to_string()),
            _ => return None,
        })
    }

    fn methods(&self) -> &'static [Method] {
        match self {
            Endpoint::DeadLetter(_) => &[Method::GET, Method::DELETE],
            Endpoint::ReplayDeadLetters
            | Endpoint::DropDeadLetters
            | Endpoint::Pause(_)
            | Endpoint::Resume(_) => &[Method::POST],
            _ => &[Method::GET],
        }
    }
}

/// An answer that is not a success: its status and what to tell the caller.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    fn response(self) -> HttpResponse {
        server::json(self.status, json!({"error": self.message}).to_string())
    }
}

impl From<crate::spool::SpoolError> for ApiError {
    fn from(e: crate::spool::SpoolError) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

type Answer = Result<HttpResponse, ApiError>;

fn ok_json(value: &impl serde::Serialize) -> Answer {
    let body = serde_json::to_vec(value).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot render the answer: {e}"),
        )
    })?;
    Ok(server::json(StatusCode::OK, body))
}

impl Admin {
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> HttpResponse {
        let Some(endpoint) = Endpoint::of(req.uri().path()) else {
            let path = req.uri().path();
            return ApiError::not_found(format!("nothing at {path}")).response();
        };
        let allowed = endpoint.methods();
        if !allowed.contains(req.method()) {
            let list: Vec<&str> = allowed.iter().map(Method::as_str).collect();
            let mut resp = ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!(
                    "{} is not allowed on {}; use {}",
                    req.method(),
                    req.uri().path(),
                    list.join(" or ")
                ),
            )
            .response();
            if let Ok(v) = http::HeaderValue::from_str(&list.join(", ")) {
                resp.headers_mut().insert(http::header::ALLOW, v);
            }
            return resp;
        }
        let answer = match endpoint {
            Endpoint::Health => Ok(server::json(StatusCode::OK, r#"{"status":"ok"}"#)),
            Endpoint::Ready => Ok(self.ready().await),
            Endpoint::Metrics => Ok(self.metrics()),
            Endpoint::Rules => ok_json(&self.rules_state()),
            Endpoint::DeadLetters => self.list_dead(req.uri().query().unwrap_or("")),
            Endpoint::DeadLetter(id) if req.method() == Method::DELETE => {
                self.delete_dead(&id).await
            }
            Endpoint::DeadLetter(id) => self.show_dead(&id),
            Endpoint::ReplayDeadLetters => match read_json(req).await {
                Ok(selection) => self.replay_dead(selection).await,
                Err(e) => Err(e),
            },
            Endpoint::DropDeadLetters => match read_json(req).await {
                Ok(selection) => self.drop_dead(selection).await,
                Err(e) => Err(e),
            },
            Endpoint::Targets => ok_json(&json!({ "targets": self.targets() })),
            Endpoint::Pause(name) => self.pause(&name, true),
            Endpoint::Resume(name) => self.pause(&name, false),
        };
        answer.unwrap_or_else(ApiError::response)
    }

    /// Ready when the rules have a source to receive on and the spool can write.
    async fn ready(&self) -> HttpResponse {
        let reason = if self.rules.load().sources.is_empty() {
            Some("no sources loaded".to_string())
        } else {
            spool_ready(&*self.spool).await.err()
        };
        match reason {
            None => server::json(StatusCode::OK, r#"{"status":"ready"}"#),
            Some(reason) => server::json(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "not ready", "reason": reason}).to_string(),
            ),
        }
    }

    fn metrics(&self) -> HttpResponse {
        self.deliverer.publish_gauges();
        let mut resp = server::json(StatusCode::OK, self.metrics.render());
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        resp
    }

    fn rules_state(&self) -> serde_json::Value {
        let rules = self.rules.load();
        let status = self.reloader.status();
        json!({
            "generation": rules.generation,
            "loaded_at": rfc3339(rules.loaded_at),
            "dir": rules.dir.display().to_string(),
            "files": rules.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
            "sources": rules.sources.iter().map(|s| json!({
                "name": &*s.name, "path": s.path, "dialect": s.dialect.as_str(),
            })).collect::<Vec<_>>(),
            "targets": rules.targets.iter().map(|t| json!({
                "name": &*t.name, "url": t.url.as_str(), "method": t.method.as_str(),
            })).collect::<Vec<_>>(),
            "routes": rules.routes.iter().map(|r| json!({
                "name": &*r.name,
                "to": r.to.iter().map(|t| &**t).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "last_reload_at": status.last_attempt_at.map(rfc3339),
            "last_reload_error": status.last_error.map(|f| json!({
                "at": rfc3339(f.at),
                "errors": f.errors,
            })),
        })
    }

    fn targets(&self) -> Vec<TargetView> {
        self.deliverer
            .target_states()
            .into_iter()
            .map(TargetView::from)
            .collect()
    }

    fn pause(&self, name: &str, paused: bool) -> Answer {
        if !self.deliverer.set_paused(name, paused) {
            return Err(ApiError::not_found(format!("no target named `{name}`")));
        }
        match self.targets().into_iter().find(|t| t.state.name == name) {
            Some(state) => ok_json(&state),
            None => Err(ApiError::not_found(format!("no target named `{name}`"))),
        }
    }
}

/// A target's state as the admin API shows it: [`TargetState`] plus `depth`, the same number as
/// `switchyard_queue_depth` (queued + in flight).
#[derive(serde::Serialize)]
struct TargetView {
    #[serde(flatten)]
    state: TargetState,
    depth: u64,
}

impl From<TargetState> for TargetView {
    fn from(state: TargetState) -> TargetView {
        TargetView {
            depth: state.queued + state.in_flight,
            state,
        }
    }
}

/// Whether the spool can still store: a flush must reach the storage in time.
async fn spool_ready(spool: &dyn Spool) -> Result<(), String> {
    match tokio::time::timeout(SPOOL_PROBE_TIMEOUT, spool.flush()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("spool: {e}")),
        Err(_) => Err(format!(
            "spool: no answer within {}s",
            SPOOL_PROBE_TIMEOUT.as_secs()
        )),
    }
}

/// Reads a JSON request body, bounded in size and time.
async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let limited = Limited::new(req.into_body(), MAX_BODY);
    let bytes: Bytes = match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "the body did not arrive in time",
            ))
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {MAX_BODY} bytes"),
            ))
        }
        Ok(Err(e)) => return Err(ApiError::bad_request(format!("cannot read the body: {e}"))),
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("expected a JSON body"));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the body is not what was expected: {e}")))
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// [`rfc3339`] of a time in ms since the epoch.
pub fn rfc3339_ms(ms: u64) -> String {
    rfc3339(UNIX_EPOCH + Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_by_path() {
        let cases = [
            ("/healthz", Some(Endpoint::Health)),
            ("/admin/rules", Some(Endpoint::Rules)),
            ("/admin/dead-letters", Some(Endpoint::DeadLetters)),
            (
                "/admin/dead-letters/0190-abc",
                Some(Endpoint::DeadLetter("0190-abc".into())),
            ),
            (
                "/admin/dead-letters/replay",
                Some(Endpoint::ReplayDeadLetters),
            ),
            ("/admin/dead-letters/drop", Some(Endpoint::DropDeadLetters)),
            ("/admin/dead-letters/", None),
            ("/admin/dead-letters/a/b", None),
            ("/admin/targets", Some(Endpoint::Targets)),
            (
                "/admin/targets/profile%20svc/pause",
                Some(Endpoint::Pause("profile svc".into())),
            ),
            (
                "/admin/targets/t/resume",
                Some(Endpoint::Resume("t".into())),
            ),
            ("/admin/targets/t", None),
            ("/admin/targets/%FF/pause", None),
            ("/admin", None),
            ("/admin/rules/x", None),
            ("", None),
        ];
        for (path, expected) in cases {
            assert_eq!(Endpoint::of(path), expected, "{path}");
        }
    }

    #[test]
    fn methods_per_endpoint() {
        assert_eq!(Endpoint::Rules.methods(), [Method::GET]);
        assert_eq!(
            Endpoint::DeadLetter("x".into()).methods(),
            [Method::GET, Method::DELETE]
        );
        assert_eq!(Endpoint::ReplayDeadLetters.methods(), [Method::POST]);
        assert_eq!(Endpoint::Pause("t".into()).methods(), [Method::POST]);
    }

    #[tokio::test]
    async fn a_spool_that_cannot_write_is_not_ready() {
        let dir = tempfile::tempdir().unwrap();
        let spool = crate::spool::RedbSpool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool_ready(&spool).await, Ok(()));
        spool.close();
        let err = spool_ready(&spool).await.unwrap_err();
        assert!(err.contains("closed"), "{err}");
    }
}
