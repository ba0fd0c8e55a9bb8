//! Synchronous routes: a before-callback goes to one target at once and its answer is relayed.
//!
//! [`exchange`] asks the target within the source's `respond_timeout`; [`relay`] turns what came
//! back into the IM server's answer: the target's JSON object (through the route's
//! `response_transform` when there is one), or the source's `on_respond_failure` fallback.
//! `serve` calls both; `switchyard test` calls [`relay`] with a mocked reply, so a rule test
//! checks the same answer the server would give.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::delivery::client;
use crate::delivery::retry::Outcome;
use crate::delivery::{now_ms, Delivery};
use crate::dialect::{self, Callback};
use crate::rules::{OnRespondFailure, Route, Target};
use crate::script::{self, RunError, ScriptEngine, Vars};

/// Largest answer relayed from a synchronous target.
pub const MAX_ANSWER: usize = 1024 * 1024;

/// What the target sent back.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
}

/// Why a synchronous answer could not come from the target.
#[derive(Debug, Clone)]
pub enum Failure {
    /// No answer within `respond_timeout` (or the target's own, shorter, timeout).
    Timeout,
    /// No connection, or it broke before the answer was complete.
    Unreachable(String),
    /// The target answered with a status other than 2xx.
    Status(u16),
    /// The answer is not a JSON object, or is larger than [`MAX_ANSWER`].
    Invalid(String),
    /// The route's filter, transform or response_transform failed.
    Script(RunError),
}

impl Failure {
    /// The `outcome` label of `switchyard_deliveries_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            Failure::Timeout => "respond_timeout",
            Failure::Unreachable(_) => "respond_unreachable",
            Failure::Status(_) => "respond_status",
            Failure::Invalid(_) => "respond_invalid",
            Failure::Script(_) => "respond_script_error",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Timeout => f.write_str("the target did not answer in time"),
            Failure::Unreachable(e) => write!(f, "the target is unreachable: {e}"),
            Failure::Status(s) => write!(f, "the target answered HTTP {s}"),
            Failure::Invalid(e) => write!(f, "the target's answer is unusable: {e}"),
            Failure::Script(e) => write!(f, "{e}"),
        }
    }
}

/// The `outcome` label of an answer relayed from the target.
pub const RESPONDED: &str = "responded";

/// The answer the IM server gets (always with HTTP 200: both vendors read the body).
#[derive(Debug)]
pub struct Answer {
    pub body: Bytes,
    /// [`RESPONDED`] or the failure's label.
    pub outcome: &'static str,
    /// Why the fallback answered, if it did.
    pub failure: Option<Failure>,
}

/// The IM server's answer from the target's reply. `vars` is the scope of the callback, needed
/// only when the route has a `response_transform`.
pub fn relay(
    callback: &Callback,
    route: &Route,
    engine: &ScriptEngine,
    vars: Option<Result<&Vars, RunError>>,
    reply: Result<Reply, Failure>,
) -> Answer {
    match answer_body(route, engine, vars, reply) {
        Ok(body) => Answer {
            body,
            outcome: RESPONDED,
            failure: None,
        },
        Err(failure) => Answer {
            body: fallback(callback),
            outcome: failure.outcome(),
            failure: Some(failure),
        },
    }
}

/// The source's `on_respond_failure` answer.
pub fn fallback(callback: &Callback) -> Bytes {
    let kind = callback.source.dialect;
    match callback.source.on_respond_failure {
        OnRespondFailure::Allow => dialect::ack(kind, &callback.event_id),
        OnRespondFailure::Deny => dialect::deny(kind, &callback.event_id),
    }
}

fn answer_body(
    route: &Route,
    engine: &ScriptEngine,
    vars: Option<Result<&Vars, RunError>>,
    reply: Result<Reply, Failure>,
) -> Result<Bytes, Failure> {
    let reply = reply?;
    if !(200..300).contains(&reply.status) {
        return Err(Failure::Status(reply.status));
    }
    if reply.body.len() > MAX_ANSWER {
        return Err(Failure::Invalid(format!(
            "it is larger than {} KiB",
            MAX_ANSWER / 1024
        )));
    }
    // Valid JSON whose first token opens an object is a JSON object.
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&reply.body) {
        return Err(Failure::Invalid(format!("it is not JSON: {e}")));
    }
    if reply.body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(Failure::Invalid("it is JSON but not an object".into()));
    }
    let Some(script) = &route.response_transform else {
        return Ok(reply.body);
    };
    let vars = vars
        .expect("the scope is given for a route with a response_transform")
        .map_err(Failure::Script)?;
    let response = script::json_to_dynamic(&reply.body)
        .map_err(|e| Failure::Invalid(format!("it cannot be given to scripts: {e}")))?;
    engine
        .response_transform(&route.name, script, vars, response, reply.status)
        .map(Bytes::from)
        .map_err(Failure::Script)
}

/// Sends the responder's delivery and waits for the answer until `deadline` at the latest.
pub async fn exchange(
    client: &client::HttpClient,
    target: &Target,
    delivery: &Delivery,
    deadline: Instant,
) -> Result<Reply, Failure> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    if remaining.is_zero() {
        return Err(Failure::Timeout);
    }
    let timeout = remaining.min(target.timeout);
    let prepared = client::prepare(target, delivery, now_ms() / 1000);
    // One byte past the limit tells a too-large answer from one exactly at it.
    let send = client::send_keeping(client, prepared, timeout, MAX_ANSWER + 1, MAX_ANSWER + 1);
    // The client's timeout covers connect, request and answer; this one is the backstop.
    let outcome = match tokio::time::timeout(timeout + Duration::from_millis(5), send).await {
        Ok(outcome) => outcome,
        Err(_) => return Err(Failure::Timeout),
    };
    match outcome {
        Outcome::Answered {
            status, body_head, ..
        } => Ok(Reply {
            status,
            body: body_head,
        }),
        Outcome::Timeout => Err(Failure::Timeout),
        Outcome::Connect(e) | Outcome::Transport(e) | Outcome::Invalid(e) => {
            Err(Failure::Unreachable(e))
        }
    }
}
