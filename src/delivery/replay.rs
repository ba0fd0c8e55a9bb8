//! Replaying a dead letter: a failed delivery goes back to its target's queue with the same
//! `webhook-id`; a callback a route's script failed on goes through that route of the *current*
//! rules, so a fixed rule handles it as if it had just arrived.

use std::sync::Arc;

use crate::delivery::{now_ms, Delivery};
use crate::dialect::Callback;
use crate::router::{self, Verdict};
use crate::rules::RuleSet;
use crate::script::ScriptEngine;
use crate::spool::{DeadLetter, Spool, SpoolError};

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Replayed {
    /// Queued again: this many deliveries.
    Queued {
        deliveries: usize,
    },
    /// The route, as it is now, does not deliver this callback (its filter says no, or its
    /// transform returns `()`): the dead letter is dropped.
    Skipped {
        reason: String,
    },
    /// Still cannot be delivered; the dead letter stays, with this reason.
    Kept {
        reason: String,
    },
    NotFound,
}

/// Replays one dead letter.
pub async fn replay(
    spool: &dyn Spool,
    rules: &RuleSet,
    engine: &ScriptEngine,
    id: &str,
) -> Result<Replayed, SpoolError> {
    let Some(letter) = spool.get_dead(id)? else {
        return Ok(Replayed::NotFound);
    };
    let deliveries = match &letter.target {
        Some(target) => match rules.target(target) {
            Some(_) => vec![again(&letter, target.clone())],
            None => {
                return Ok(Replayed::Kept {
                    reason: format!("target `{target}` is not in the current rules"),
                })
            }
        },
        None => match through_route(&letter, rules, engine) {
            Ok(deliveries) => deliveries,
            Err(Replay::Skip(reason)) => {
                spool.revive(id, Vec::new()).await?;
                return Ok(Replayed::Skipped { reason });
            }
            Err(Replay::Keep(reason)) => {
                let mut updated = letter.clone();
                updated.reason = reason.clone();
                updated.failed_at = now_ms();
                spool.rebury(updated).await?;
                return Ok(Replayed::Kept { reason });
            }
        },
    };
    let n = deliveries.len();
    if spool.revive(id, deliveries).await? {
        Ok(Replayed::Queued { deliveries: n })
    } else {
        Ok(Replayed::NotFound)
    }
}

/// The failed delivery, due now, with a fresh attempt count and its original id.
fn again(letter: &DeadLetter, target: Arc<str>) -> Delivery {
    let now = now_ms();
    Delivery {
        id: letter.id.clone(),
        event_id: letter.event_id.clone(),
        source: letter.source.clone(),
        command: letter.command.clone(),
        route: letter.route.clone(),
        target,
        content_type: letter.content_type.clone(),
        body: letter.body.clone(),
        attempts: 0,
        created_at: letter.created_at,
        due_at: now,
        last_error: None,
    }
}

enum Replay {
    Skip(String),
    Keep(String),
}

fn through_route(
    letter: &DeadLetter,
    rules: &RuleSet,
    engine: &ScriptEngine,
) -> Result<Vec<Delivery>, Replay> {
    let Some(record) = &letter.callback else {
        return Err(Replay::Keep(
            "the dead letter has no callback to replay".into(),
        ));
    };
    let source = rules.source(&letter.source).ok_or_else(|| {
        Replay::Keep(format!(
            "source `{}` is not in the current rules",
            letter.source
        ))
    })?;
    let route = rules
        .routes
        .iter()
        .find(|r| r.name == letter.route)
        .ok_or_else(|| {
            Replay::Keep(format!(
                "route `{}` is not in the current rules",
                letter.route
            ))
        })?;
    let callback = Callback {
        event_id: letter.event_id.clone(),
        received_at: record.received_at,
        source: source.clone(),
        command: letter.command.clone(),
        app_id: record.app_id.clone(),
        query: record.query.clone(),
        headers: record.headers.clone(),
        content_type: letter.content_type.clone(),
        body: letter.body.clone(),
    };
    let routing = router::route_one(&callback, route, engine);
    match &routing.results[0].verdict {
        Verdict::Deliver(_) => Ok(routing.deliveries(&callback)),
        Verdict::Failed(e) => Err(Replay::Keep(e.to_string())),
        Verdict::FilteredOut => Err(Replay::Skip("the filter returned false".into())),
        Verdict::Dropped => Err(Replay::Skip("the transform returned ()".into())),
        Verdict::OtherSource | Verdict::OtherCommand => Err(Replay::Skip(
            "the route no longer takes this source or command".into(),
        )),
    }
}
