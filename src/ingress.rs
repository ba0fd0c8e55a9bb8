//! The callback ingress: request → dialect → router → spool → acknowledgement.
//!
//! One rule-set snapshot per request. Cheap checks come first (path, method, declared length,
//! Tencent's app id and signature) so a bad request costs no body read. The acknowledgement is
//! sent once the spool holds every delivery of the callback; it never waits for a target.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::Request;

use crate::delivery::{now_ms, Deliverer};
use crate::dialect::{self, DialectKind, Rejection};
use crate::metrics as m;
use crate::respond;
use crate::router;
use crate::rules::{RuleSet, Source};
use crate::script::{RunError, ScriptEngine, Stage};
use crate::server::{json, HttpResponse};
use crate::spool::{Batch, DeadLetter, Spool};

/// How long a client may take to send a body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// What every request handler shares.
pub struct Ingress {
    pub rules: Arc<ArcSwap<RuleSet>>,
    pub engine: Arc<ScriptEngine>,
    pub spool: Arc<dyn Spool>,
    pub deliverer: Arc<Deliverer>,
}

impl Ingress {
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> HttpResponse {
        let started = Instant::now();
        let rules = self.rules.load_full();
        let path = req.uri().path().to_string();
        let Some((source, suffix)) = rules.source_for_path(&path) else {
            let none = m::command_label("");
            count(&none, &none, "not_found");
            let rejection = Rejection::new(StatusCode::NOT_FOUND, format!("no source at {path}"));
            return reject(DialectKind::Generic, &rejection);
        };
        let source = source.clone();
        let suffix = suffix.to_string();
        let response = self.accept(&rules, &source, &suffix, req, started).await;
        let took = started.elapsed().as_secs_f64();
        KEPT.with_borrow_mut(|kept| {
            kept.acks
                .get(
                    source.name.clone(),
                    |source| metrics::histogram!(m::ACK_DURATION, "source" => source.clone()),
                )
                .record(took)
        });
        response
    }

    async fn accept(
        &self,
        rules: &RuleSet,
        source: &Arc<Source>,
        suffix: &str,
        req: Request<Incoming>,
        started: Instant,
    ) -> HttpResponse {
        let kind = source.dialect;
        let refuse = |rejection: Rejection| {
            tracing::info!(
                source = %source.name, status = rejection.status.as_u16(),
                reason = %rejection.reason, "callback rejected"
            );
            count(&source.name, &m::command_label(""), rejection.outcome());
            reject(kind, &rejection)
        };
        if req.method() != Method::POST {
            let mut resp = refuse(Rejection::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{} is not allowed; callbacks are POSTed", req.method()),
            ));
            resp.headers_mut()
                .insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
            return resp;
        }
        let declared = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > source.max_body as u64) {
            return refuse(too_large(source.max_body));
        }
        let (parts, body) = req.into_parts();
        let request =
            dialect::Request::new(parts.uri.query().unwrap_or(""), suffix, &parts.headers);
        let received_at = now_ms();
        if let Err(rejection) = dialect::authorize(source, &request, received_at / 1000) {
            return refuse(rejection);
        }
        let body = match read_body(body, source.max_body).await {
            Ok(b) => b,
            Err(rejection) => return refuse(rejection),
        };
        let event_id: Arc<str> = uuid::Uuid::now_v7().to_string().into();
        let callback = match dialect::parse(source, request, body, event_id, received_at) {
            Ok(c) => c,
            Err(rejection) => return refuse(rejection),
        };

        let mut routing = router::route(&callback, rules, &self.engine);
        let mut dead = Vec::new();
        for (route, error) in routing.errors() {
            count_script_error(&route.name, error);
            tracing::warn!(
                event_id = %callback.event_id, source = %source.name, command = %callback.command,
                route = %route.name, stage = error.stage.as_str(),
                location = error.location.as_deref().unwrap_or("-"),
                error = %error.message, "script failed; the callback is kept as a dead letter of the route"
            );
            dead.push(DeadLetter::of_callback(
                &callback,
                route.name.clone(),
                error.to_string(),
                now_ms(),
            ));
        }
        let deliveries = routing.deliveries(&callback);
        let responder = routing.responder(&callback);
        let command = m::command_label(&callback.command);
        if responder.is_none() && deliveries.is_empty() && dead.is_empty() {
            count(&source.name, &command, "unrouted");
            tracing::debug!(event_id = %callback.event_id, source = %source.name, command = %callback.command, "no route matched");
            return json(StatusCode::OK, dialect::ack(kind, &callback.event_id));
        }
        let queued = deliveries.len();
        let outcome = if deliveries.is_empty() && responder.is_none() {
            "unrouted"
        } else {
            "routed"
        };
        let batch = Batch { deliveries, dead };
        let store = async {
            if batch.deliveries.is_empty() && batch.dead.is_empty() {
                return Ok(());
            }
            // The spool wakes the targets' schedulers itself once the deliveries are stored.
            self.spool.enqueue(batch).await
        };
        // The synchronous answer is asked for while the other routes' copies are stored.
        let deadline = started + source.respond_timeout;
        let ask = async {
            let delivery = responder.as_ref()?.delivery.as_ref().ok()?;
            let reply = match rules.target(&delivery.target) {
                Some(target) => {
                    respond::exchange(self.deliverer.client(), target, delivery, deadline).await
                }
                None => Err(respond::Failure::Unreachable(format!(
                    "no target named {}",
                    delivery.target
                ))),
            };
            Some(reply)
        };
        let (stored, reply) = tokio::join!(store, ask);
        if let Err(e) = stored {
            tracing::warn!(
                event_id = %callback.event_id, source = %source.name, error = %e,
                "cannot store the deliveries; answering 503"
            );
            count(&source.name, &command, "unavailable");
            return reject(
                kind,
                &Rejection::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the gateway is overloaded; try again later",
                ),
            );
        }
        count(&source.name, &command, outcome);
        tracing::debug!(
            event_id = %callback.event_id, source = %source.name, command = %callback.command,
            deliveries = queued, "callback accepted"
        );
        let Some(responder) = responder else {
            return json(StatusCode::OK, dialect::ack(kind, &callback.event_id));
        };
        let route = responder.route;
        let reply = match (responder.delivery, reply) {
            (Ok(_), Some(reply)) => reply,
            (Err(e), _) => Err(respond::Failure::Script(e)),
            (Ok(_), None) => unreachable!("a firing responder is always asked"),
        };
        let vars = route
            .response_transform
            .is_some()
            .then(|| routing.vars(&callback));
        let answer = respond::relay(&callback, route, &self.engine, vars, reply);
        let target = route.to.first().map(|t| t.to_string()).unwrap_or_default();
        metrics::counter!(
            m::DELIVERIES,
            "route" => route.name.clone(),
            "target" => target.clone(),
            "outcome" => answer.outcome
        )
        .increment(1);
        if let Some(failure) = &answer.failure {
            // Filter and transform errors were counted with the other routes' above.
            if let respond::Failure::Script(
                error @ RunError {
                    stage: Stage::Response,
                    ..
                },
            ) = failure
            {
                count_script_error(&route.name, error);
            }
            tracing::warn!(
                event_id = %callback.event_id, source = %source.name, command = %callback.command,
                route = %route.name, target = %target, outcome = answer.outcome,
                answered = source.on_respond_failure.as_str(), cause = %failure,
                "synchronous answer fell back to on_respond_failure"
            );
        }
        json(StatusCode::OK, answer.body)
    }
}

pub(crate) fn too_large(limit: usize) -> Rejection {
    Rejection::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the body is larger than this source's max_body of {limit} bytes"),
    )
}

async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, Rejection> {
    let limited = Limited::new(body, limit);
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => Err(Rejection::new(
            StatusCode::REQUEST_TIMEOUT,
            "the body did not arrive in time",
        )),
        // A copy: the collected bytes are usually a slice of the connection's read buffer, which
        // a queued delivery would otherwise keep alive whole (kilobytes per callback).
        Ok(Ok(collected)) => Ok(Bytes::copy_from_slice(&collected.to_bytes())),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large(limit)),
        Ok(Err(e)) => Err(Rejection::new(
            StatusCode::BAD_REQUEST,
            format!("the body could not be read: {e}"),
        )),
    }
}

fn reject(kind: DialectKind, rejection: &Rejection) -> HttpResponse {
    json(rejection.status, dialect::reject(kind, rejection))
}

fn count_script_error(route: &str, error: &RunError) {
    metrics::counter!(
        m::SCRIPT_ERRORS,
        "route" => route.to_string(),
        "stage" => error.stage.as_str()
    )
    .increment(1);
}

/// Labels are shared strings (the source's name, `m::command_label`), not copied per callback,
/// and the handles are kept by each thread.
fn count(source: &Arc<str>, command: &Arc<str>, outcome: &'static str) {
    KEPT.with_borrow_mut(|kept| {
        kept.callbacks
            .get((source.clone(), command.clone(), outcome), |(s, c, o)| {
                metrics::counter!(
                    m::CALLBACKS,
                    "source" => s.clone(),
                    "command" => c.clone(),
                    "outcome" => *o
                )
            })
            .increment(1)
    });
}

/// The series every callback records, kept by the thread that takes it (`m::Kept`).
#[derive(Default)]
struct Kept {
    acks: m::Kept<Arc<str>, metrics::Histogram>,
    callbacks: m::Kept<(Arc<str>, Arc<str>, &'static str), metrics::Counter>,
}

thread_local! {
    static KEPT: std::cell::RefCell<Kept> = std::cell::RefCell::new(Kept::default());
}
